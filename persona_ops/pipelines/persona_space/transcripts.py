"""Stage ``role_transcripts``: roles x instructions x questions x rollouts, resumable at chunk level.

Requests are cut into fixed chunks, each generated with its own seed and appended to
``<role>.partial.jsonl`` in one flushed write. On resume, records already in the partial file
are kept and only chunks with missing records are regenerated (whole, so outputs equal an
uninterrupted run); only the missing records are appended. The complete file is written
atomically, then the partial files are removed. A finished role whose provenance carries the
same fingerprint (prompts, sampling, chunking, what generates) is skipped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable

from persona_ops.chat import chat_messages, render_prompt
from persona_ops.data import Role, load_questions, load_role
from persona_ops.inference.backends import make_generator
from persona_ops.inference.sampling import SamplingParams
from persona_ops.io import read_json, write_json, write_jsonl
from persona_ops.pipelines.persona_space.roles import OUT, model_short_name, record_key, role_files
from persona_ops.pipelines.stage import stage
from persona_ops.provenance import read_sidecar

ROLE_FILE = "{persona_space.roles.dir}/{item}.json"
TRANSCRIPT = OUT + "/transcripts/{item}.jsonl"


def build_role_requests(role: Role, questions: list, tokenizer, roles, rollouts: int, model_name: str) -> list[dict]:
    """One record per instruction x question x rollout, in a fixed order, with its rendered prompt."""
    systems = role.system_prompts(model_name)[: roles.instructions_limit]
    out = []
    for si, system in enumerate(systems):
        for qi, q in enumerate(questions[: roles.questions_limit]):
            prompt = render_prompt(tokenizer, chat_messages(tokenizer, system or None, q.question))
            for ri in range(rollouts):
                out.append({"system_prompt_idx": si, "question_idx": qi, "rollout_idx": ri,
                            "system_prompt": system, "question": q.question, "prompt": prompt})
    return out


def fingerprint(requests: list[dict], t, generator_label: str) -> str:
    """What a role's records depend on: prompts, sampling, chunking and what generates."""
    h = hashlib.sha256()
    h.update(json.dumps({"model": generator_label, "backend": t.backend, "sampling": dataclasses.asdict(t.sampling),
                         "batch_size": t.batch_size, "chunk_size": t.chunk_size}, sort_keys=True).encode())
    for rec in requests:
        h.update(json.dumps([record_key(rec), rec["prompt"]]).encode())
    return h.hexdigest()


def chunk_seed(seed: int, role: str, chunk: int) -> int:
    """A per-(role, chunk) seed, so a resumed chunk is generated exactly as the first time."""
    return zlib.crc32(f"{seed}:{role}:{chunk}".encode()) & 0x7FFFFFFF


def _read_partial(path: Path, expected: dict[tuple, dict]) -> dict[tuple, dict]:
    """Records of a partial file that match a request; a torn last line (a kill mid-write) is ignored."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            rec = json.loads(line)
            key = record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # empty, torn or foreign line
        req = expected.get(key)
        if req is not None and rec.get("prompt") == req["prompt"] and isinstance(rec.get("response"), str):
            done.setdefault(key, rec)
    return done


def _append(path: Path, records: list[dict]) -> None:
    """Append records in one write, flushed to disk before returning."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def generate_role_transcripts(generator, role_name: str, requests: list[dict], t, final: Path,
                              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Generate (or resume) one role's transcripts into ``final`` (see the module docstring);
    ``on_chunk(role, i)`` is called after chunk ``i`` is on disk. Returns counts and the
    fingerprint (recorded in the output's provenance)."""
    partial, meta = final.with_suffix(".partial.jsonl"), final.with_suffix(".partial.meta.json")
    fp = fingerprint(requests, t, generator.label)
    done_before = read_sidecar(final) if final.exists() else None
    if t.resume and done_before and done_before.get("fingerprint") == fp:
        for p in (partial, meta):
            p.unlink(missing_ok=True)  # a kill after the final write left them behind
        return {"records": len(requests), "generated": 0, "skipped": 1, "fingerprint": fp}
    expected = {record_key(r): r for r in requests}
    done: dict[tuple, dict] = {}
    if t.resume and meta.exists() and read_json(meta).get("fingerprint") == fp:
        done = _read_partial(partial, expected)
        write_jsonl(partial, [done[k] for k in expected if k in done])  # drops torn or stale lines
    else:
        partial.unlink(missing_ok=True)
        write_json(meta, {"role": role_name, "fingerprint": fp})
    resumed, generated = len(done), 0
    tok = generator.tokenizer
    for ci, start in enumerate(range(0, len(requests), t.chunk_size)):
        chunk = requests[start:start + t.chunk_size]
        if all(record_key(r) in done for r in chunk):
            continue
        s = t.sampling
        sampling = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, chunk_seed(s.seed, role_name, ci))
        chats = [chat_messages(tok, r["system_prompt"] or None, r["question"]) for r in chunk]  # as in "prompt"
        answers = generator.generate(chats, sampling, t.batch_size)
        new = [dict(r, response=a) for r, a in zip(chunk, answers) if record_key(r) not in done]
        _append(partial, new)
        done.update((record_key(r), r) for r in new)
        generated += len(chunk)
        if on_chunk is not None:
            on_chunk(role_name, ci)
    write_jsonl(final, [done[k] for k in expected])
    partial.unlink(missing_ok=True)
    meta.unlink(missing_ok=True)
    return {"records": len(requests), "generated": generated, "resumed": resumed, "skipped": 0, "fingerprint": fp}


@stage("role_transcripts", pipeline="persona-space", each="persona_space.roles.names", each_default=role_files,
       params=["persona_space.model", "persona_space.roles.instructions_limit", "persona_space.roles.questions_limit",
               "persona_space.roles.model_name", "persona_space.transcripts"],
       inputs={"role": ROLE_FILE, "questions": "{persona_space.roles.questions}"},
       outputs={"transcripts": TRANSCRIPT}, persist=("transcripts",))
def role_transcripts(cfg, io, on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """One role's transcripts from the reference model (``transcripts.backend``: any backend)."""
    ps = cfg.persona_space
    role = load_role(io.input("role"))
    questions = load_questions(io.input("questions"))
    generator = make_generator(ps.transcripts, ps.model, "persona_space.transcripts", load=io.model)
    io.made_with(generator.label)
    requests = build_role_requests(role, questions, generator.tokenizer, ps.roles, ps.transcripts.rollouts,
                                   model_short_name(ps.roles, ps.model))
    stats = generate_role_transcripts(generator, role.name, requests, ps.transcripts, io.output("transcripts"),
                                      on_chunk)
    io.extra["fingerprint"] = stats.pop("fingerprint")
    return stats


@role_transcripts.validator
def _role_and_questions(cfg, io) -> None:
    load_role(io.input("role"))
    load_questions(io.input("questions"))
