"""Stage ``role_transcripts``: roles x instructions x questions x rollouts, resumable at chunk
level (:mod:`persona_ops.resumable`): a killed run resumes to the records an uninterrupted run
makes, and a finished role whose provenance carries the same fingerprint (prompts, sampling,
chunking, what generates) is skipped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

from persona_ops.chat import chat_messages, render_prompt
from persona_ops.data import Role, load_questions, load_role
from persona_ops.inference.backends import make_generator
from persona_ops.inference.sampling import SamplingParams
from persona_ops.pipelines.persona_space.roles import OUT, model_short_name, record_key, role_files
from persona_ops.pipelines.stage import stage
from persona_ops.resumable import chunk_seed, fingerprint, generate_resumable

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


def generate_role_transcripts(generator, role_name: str, requests: list[dict], t, final: Path,
                              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Generate (or resume) one role's transcripts into ``final`` (see the module docstring);
    ``on_chunk(role, i)`` is called after chunk ``i`` is on disk. Returns counts and the
    fingerprint (recorded in the output's provenance)."""
    settings = {"model": generator.label, "backend": t.backend, "sampling": dataclasses.asdict(t.sampling),
                "batch_size": t.batch_size, "chunk_size": t.chunk_size}
    fp = fingerprint(settings, [(record_key(r), r["prompt"]) for r in requests])
    tok = generator.tokenizer

    def make_chunk(ci: int, chunk: list[dict]) -> list[dict]:
        s = t.sampling
        sampling = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, chunk_seed(s.seed, role_name, ci))
        chats = [chat_messages(tok, r["system_prompt"] or None, r["question"]) for r in chunk]  # as in "prompt"
        return [dict(r, response=a) for r, a in zip(chunk, generator.generate(chats, sampling, t.batch_size))]

    stats = generate_resumable(requests, record_key, final, fp, make_chunk, t, finished=_answered,
                               on_chunk=None if on_chunk is None else lambda ci: on_chunk(role_name, ci))
    return {**stats, "fingerprint": fp}


def _answered(rec: dict, request: dict) -> bool:
    return rec.get("prompt") == request["prompt"] and isinstance(rec.get("response"), str)


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
