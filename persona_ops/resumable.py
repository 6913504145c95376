"""Resumable record generation: what a long stage (transcripts, answers, datasets) made survives
a kill, and a rerun makes only what is missing, with the result an uninterrupted run gives.

Requests (dicts in a fixed order, each with a unique ``key``) are cut into fixed chunks; the
caller makes a chunk's records (seeded per chunk: :func:`chunk_seed`), which are appended to
``<final>.partial.jsonl`` in one flushed write. A rerun with the same fingerprint keeps the
records already there (a torn last line is dropped) and regenerates only chunks with missing
records, whole, keeping only the missing ones. The complete file is written atomically, then
the partial files are removed. A final file whose provenance sidecar carries the fingerprint is
current: nothing is made.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Hashable

from pydantic import BaseModel, Field

from persona_ops.io import read_json, write_json, write_jsonl
from persona_ops.provenance import read_sidecar


class ChunkingCfg(BaseModel):
    """How a resumable stage cuts its work: ``chunk_size`` records per flushed write, ``resume``
    off to start over."""

    chunk_size: int = Field(64, ge=1)
    resume: bool = True


def fingerprint(settings: dict, prompts: list[tuple[Hashable, str]]) -> str:
    """What the records depend on: ``settings`` (model, sampling, chunking...) and each
    ``(key, prompt)``."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for key, prompt in prompts:
        h.update(json.dumps([key, prompt], default=str).encode())
    return h.hexdigest()


def chunk_seed(seed: int, name: str, chunk: int) -> int:
    """A per-(name, chunk) seed, so a regenerated chunk comes out as the first time."""
    return zlib.crc32(f"{seed}:{name}:{chunk}".encode()) & 0x7FFFFFFF


def partial_paths(final: Path) -> tuple[Path, Path]:
    """The partial records file and its fingerprint file beside ``final``."""
    return final.with_suffix(".partial.jsonl"), final.with_suffix(".partial.meta.json")


def generate_resumable(requests: list[dict], key: Callable[[dict], Hashable], final: Path, fp: str,
                       make_chunk: Callable[[int, list[dict]], list[dict]], cfg: ChunkingCfg,
                       finished: Callable[[dict, dict], bool],
                       on_chunk: Callable[[int], None] | None = None) -> dict:
    """Make ``final`` (see the module docstring): ``make_chunk(i, requests)`` returns chunk ``i``'s
    records in order; ``finished(record, request)`` says whether a record read back from the
    partial file completes that request; ``on_chunk(i)`` runs once chunk ``i`` is on disk.
    Returns ``records``, ``generated``, ``resumed`` and ``skipped`` counts."""
    final = Path(final)
    partial, meta = partial_paths(final)
    done_before = read_sidecar(final) if final.exists() else None
    if cfg.resume and done_before and done_before.get("fingerprint") == fp:
        for p in (partial, meta):
            p.unlink(missing_ok=True)  # a kill after the final write left them behind
        return {"records": len(requests), "generated": 0, "resumed": 0, "skipped": 1}
    expected = {key(r): r for r in requests}
    done: dict[Hashable, dict] = {}
    if cfg.resume and meta.exists() and read_json(meta).get("fingerprint") == fp:
        done = _read_partial(partial, key, expected, finished)
        write_jsonl(partial, [done[k] for k in expected if k in done])  # drops torn or stale lines
    else:
        partial.unlink(missing_ok=True)
        write_json(meta, {"fingerprint": fp})
    resumed, generated = len(done), 0
    for ci, start in enumerate(range(0, len(requests), cfg.chunk_size)):
        chunk = requests[start:start + cfg.chunk_size]
        if all(key(r) in done for r in chunk):
            continue
        new = [rec for rec in make_chunk(ci, chunk) if key(rec) not in done]
        _append(partial, new)
        done.update((key(r), r) for r in new)
        generated += len(chunk)
        if on_chunk is not None:
            on_chunk(ci)
    write_jsonl(final, [done[k] for k in expected])
    partial.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    return {"records": len(requests), "generated": generated, "resumed": resumed, "skipped": 0}


def _read_partial(path: Path, key, expected: dict, finished) -> dict:
    """Records of a partial file that complete a request; torn or foreign lines are ignored."""
    done: dict = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            rec = json.loads(line)
            k = key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        req = expected.get(k)
        if req is not None and finished(rec, req):
            done.setdefault(k, rec)
    return done


def _append(path: Path, records: list[dict]) -> None:
    """Append records in one write, flushed to disk before returning."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
