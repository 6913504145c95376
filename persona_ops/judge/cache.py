"""A SQLite cache of judge scores, so a rerun never pays for the same judgement twice.

Key: ``sha256(judge label + "\\0" + prompt text)``. Each row keeps the score (NULL
when the judge's numeric mass was too small), the probability per integer answer as
JSON, the scale it was scored on and when it was made. WAL mode lets several
processes read while one writes; inside a process one connection is shared under a
lock, so it is safe to use from several threads.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import inspect
import json
import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from persona_ops.errors import InputError, TransientError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS judgements (
    key TEXT PRIMARY KEY,
    score REAL,
    probs TEXT NOT NULL,
    lo INTEGER NOT NULL,
    hi INTEGER NOT NULL,
    created_at TEXT NOT NULL
)
"""
_CHUNK = 500  # stay far below SQLite's limit on bound variables per statement


def cache_key(label: str, prompt: str) -> str:
    """The cache key of one judge prompt for one judge model."""
    return hashlib.sha256(f"{label}\0{prompt}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CachedScore:
    """One cached judgement: the score, the probability per integer answer and the scale."""

    score: float | None
    probs: dict[int, float]
    lo: int
    hi: int


class JudgeCache:
    """Score cache in a SQLite file (``":memory:"`` for a throw-away cache)."""

    def __init__(self, path: str | os.PathLike = ":memory:"):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
        with self._lock:
            if self.path != ":memory:":
                self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=NORMAL")
            self._conn.execute(_SCHEMA)
            self._conn.commit()

    def get_many(self, keys: Iterable[str]) -> dict[str, CachedScore]:
        """The cached judgements among ``keys`` (missing keys are absent from the result)."""
        keys = list(dict.fromkeys(keys))
        found: dict[str, CachedScore] = {}
        with self._lock:
            for i in range(0, len(keys), _CHUNK):
                chunk = keys[i:i + _CHUNK]
                rows = self._conn.execute(
                    f"SELECT key, score, probs, lo, hi FROM judgements WHERE key IN "
                    f"({','.join('?' * len(chunk))})", chunk).fetchall()
                for key, score, probs, lo, hi in rows:
                    found[key] = CachedScore(score, {int(k): v for k, v in json.loads(probs).items()}, lo, hi)
        return found

    def put_many(self, items: Iterable[tuple[str, float | None, dict[int, float], int, int]]) -> int:
        """Store ``(key, score, probs, lo, hi)`` rows (replacing existing keys); return how many."""
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        rows = [(key, None if score is None else float(score),
                 json.dumps({str(k): float(p) for k, p in probs.items()}, sort_keys=True), lo, hi, now)
                for key, score, probs, lo, hi in items]
        with self._lock:
            with self._conn:  # one transaction
                self._conn.executemany(
                    "INSERT OR REPLACE INTO judgements (key, score, probs, lo, hi, created_at) "
                    "VALUES (?, ?, ?, ?, ?, ?)", rows)
        return len(rows)

    def __len__(self) -> int:
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0]

    def close(self) -> None:
        """Close the connection."""
        with self._lock:
            self._conn.close()


class CachedJudge:
    """A judge backend behind the score cache.

    Only prompts missing from the cache (for this backend's ``label`` and scale) go to
    the backend, each once however often it repeats; ``backend_calls`` counts the
    prompts sent, so a rerun of a finished stage shows 0. Misses go in chunks of
    ``chunk_size``; a backend that streams its results (``score_prompts(..., on_result=)``,
    the OpenAI judge) has each judgement stored as it arrives, so when some requests of a
    chunk fail the others are kept; the error is raised after the chunk, and the later chunks
    are not asked (a rerun asks only what is missing).
    """

    def __init__(self, backend, cache: JudgeCache, chunk_size: int = 256):
        self.backend = backend
        self.cache = cache
        self.chunk_size = chunk_size  # misses are scored and stored in chunks: a crash keeps progress
        self.backend_calls = 0
        self._lock = threading.Lock()
        self._streams = "on_result" in inspect.signature(backend.score_prompts).parameters

    @property
    def label(self) -> str:
        return self.backend.label

    def score_details(self, prompts: list[str], lo: int = 0, hi: int = 100) -> list[CachedScore]:
        """Score and probability per integer answer for each prompt, from the cache or the backend."""
        keys = [cache_key(self.backend.label, p) for p in prompts]
        found = {k: v for k, v in self.cache.get_many(keys).items() if (v.lo, v.hi) == (lo, hi)}
        misses = list(dict.fromkeys(p for p, k in zip(prompts, keys) if k not in found))
        for i in range(0, len(misses), self.chunk_size):
            chunk = misses[i:i + self.chunk_size]
            with self._lock:
                self.backend_calls += len(chunk)
            try:
                self._score_chunk(chunk, lo, hi, found)
            except (TransientError, InputError) as e:
                left = len(misses) - i - len(chunk)
                if not left:
                    raise
                raise type(e)(f"{e}; {left} more prompts not asked (a rerun asks only what is missing)") from None
        return [found[k] for k in keys]

    def _score_chunk(self, chunk: list[str], lo: int, hi: int, found: dict[str, CachedScore]) -> None:
        """Score ``chunk`` with the backend; store every judgement in the cache and ``found``."""
        def keep(rows) -> None:
            rows = [(cache_key(self.backend.label, p), score, probs, lo, hi) for p, (score, probs) in rows]
            self.cache.put_many(rows)
            for key, score, probs, _, _ in rows:
                found[key] = CachedScore(score, dict(probs), lo, hi)

        if self._streams:
            self.backend.score_prompts(chunk, lo, hi, on_result=lambda j, result: keep([(chunk[j], result)]))
        else:
            keep(zip(chunk, self.backend.score_prompts(chunk, lo, hi)))

    def score(self, prompts: list[str], lo: int = 0, hi: int = 100) -> list[float | None]:
        """The score of each prompt (None where the judge gave no usable number)."""
        return [r.score for r in self.score_details(prompts, lo, hi)]


def make_judge(cfg, root: str | os.PathLike = ".", load=None) -> CachedJudge:
    """The cached judge a ``JudgeCfg`` describes (the one way a judge is built).

    ``local``: the judge model ``cfg.model_ref()``, loaded by ``load`` (a stage's ``io.model``:
    the run's shared pool) or here; ``openai``: ``cfg.openai`` names the server and the served
    model. The cache is ``cfg.cache`` under ``root`` (``":memory:"`` keeps nothing).
    """
    cache = cfg.cache if cfg.cache == ":memory:" else Path(root) / cfg.cache
    if cfg.backend == "local":
        from persona_ops.judge.local import LocalJudge

        ref = cfg.model_ref()
        if load is None:
            from persona_ops.models.loading import load_model

            loaded = load_model(ref.name, ref.revision, dtype=ref.dtype, device=ref.device)
        else:
            loaded = load(ref)
        judge = LocalJudge(loaded, batch_size=cfg.batch_size, answer_prefix=cfg.answer_prefix)
    elif cfg.backend == "openai":
        from persona_ops.judge.openai_backend import OpenAIJudge

        o = cfg.openai
        if not o.model:
            raise InputError("judge.openai.model: the served model's name is required with judge.backend=openai")
        judge = OpenAIJudge(o.model, base_url=o.base_url, api_key_env=o.api_key_env,
                            max_concurrency=o.max_concurrency, max_retries=o.max_retries, timeout=o.timeout,
                            backoff_base=o.backoff_base, backoff_max=o.backoff_max)
    else:
        raise InputError(f"judge.backend: expected local|openai, got {cfg.backend!r}")
    return CachedJudge(judge, JudgeCache(cache))
