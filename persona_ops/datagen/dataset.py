"""``generate-dataset``: for each domain, user questions (asked of the model first), then for each
question and strength an answer, written as chat datasets ``<out>/<trait>/<strength>.jsonl``
whose records share prompt ids across strengths.

Both steps are resumable (:mod:`persona_ops.resumable`) with their state under
``<out>/.state/<trait>/`` (a hidden directory, which ``data check`` skips): a kill loses at most
a chunk, and a rerun asks only for what is missing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from persona_ops.data import Trait, load_trait
from persona_ops.datagen.prompts import STYLES, answer_prompt, questions_prompt
from persona_ops.datagen.replies import DatagenCfg, asker, field_of, parse_json, validated
from persona_ops.errors import InputError
from persona_ops.inference.openai_client import UnusableReply
from persona_ops.io import read_jsonl, write_json, write_jsonl
from persona_ops.names import check_name
from persona_ops.provenance import sidecar
from persona_ops.resumable import fingerprint, generate_resumable

DEFAULT_DOMAINS = ("health", "finance", "relationships", "career", "education", "technology", "travel", "cooking")
STRENGTHS = tuple(STYLES)
STATE = ".state"


def _key(rec: dict) -> str:
    return rec["key"]


def _resumable(step: str, requests: list[dict], final: Path, cfg: DatagenCfg, check: Callable, json_reply: bool,
               on_chunk: Callable[[str, int], None] | None) -> list[dict]:
    """Records for ``requests`` (each with ``key`` and ``prompt``): the request and the ``value``
    that ``check(reply text)`` returns; a finished file is kept by its fingerprint."""
    endpoint = cfg.endpoint(f"dataset {step}")
    ask = asker(cfg, check, json_reply)
    fp = fingerprint({**cfg.settings(), "step": step}, [(r["key"], r["prompt"]) for r in requests])

    def make_chunk(ci: int, chunk: list[dict]) -> list[dict]:
        values = endpoint.map(ask, [(r["key"], r["prompt"]) for r in chunk])
        return [{**r, "value": v} for r, v in zip(chunk, values)]

    def finished(rec: dict, req: dict) -> bool:
        return rec.get("prompt") == req["prompt"] and "value" in rec

    generate_resumable(requests, _key, final, fp, make_chunk, cfg, finished,
                       on_chunk=None if on_chunk is None else lambda ci: on_chunk(step, ci))
    write_json(sidecar(final), {"fingerprint": fp})  # a finished file: a rerun makes nothing
    return read_jsonl(final)


def check_questions_reply(text: str, n: int) -> list[str]:
    """``n`` distinct questions from a reply ``{"questions": [...]}`` (the first ``n`` kept)."""
    items = field_of(parse_json(text, '{"questions": [...]}'), "questions", "a list of question strings")
    if not isinstance(items, list) or len(items) < n:
        got = f"{len(items)} items" if isinstance(items, list) else type(items).__name__
        raise UnusableReply(f"reply: questions: {got}, expected a list of {n} questions")
    items = items[:n]
    validated("questions", [{"id": i, "question": q} for i, q in enumerate(items)])
    if len(set(items)) < n:
        raise UnusableReply(f"reply: questions: {n - len(set(items))} repeated, expected {n} distinct questions")
    return items


def chat_record(trait: str, strength: str, domain: str, prompt_id: str, question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "metadata": {"trait": trait, "strength": strength, "domain": domain, "prompt_id": prompt_id}}


def _checked_answer(text: str) -> str:
    answer = text.strip()
    validated("chat", [chat_record("t", "s", "d", "p", "question", answer)])
    return answer


def _check_choices(domains: Sequence[str], per_domain: int, strengths: Sequence[str]) -> None:
    for d in domains:
        check_name(d, "domain", "--domains")
    unknown = [s for s in strengths if s not in STYLES]
    if unknown or not strengths:
        raise InputError(f"--strengths: got {', '.join(unknown) or 'none'}, expected some of {', '.join(STYLES)}")
    if not domains or per_domain < 1:
        raise InputError(f"--domains / --per-domain: expected at least one domain and question, "
                         f"got {len(domains)} domains, {per_domain} per domain")
    if len(set(domains)) < len(domains) or len(set(strengths)) < len(strengths):
        raise InputError("--domains / --strengths: a name given twice, expected each once")


def generate_dataset(trait_file: Path, out: Path, cfg: DatagenCfg, domains: Sequence[str] = DEFAULT_DOMAINS,
                     per_domain: int = 10, strengths: Sequence[str] = STRENGTHS, description: str | None = None,
                     on_chunk: Callable[[str, int], None] | None = None) -> dict[str, Path]:
    """Questions, then answers, then one chat dataset per strength; returns them by strength.
    ``on_chunk(step, i)`` runs once chunk ``i`` of step ``questions`` or ``answers`` is on disk."""
    _check_choices(domains, per_domain, strengths)
    trait = load_trait(trait_file)
    about = description or trait.instructions[0].pos
    state = Path(out) / STATE / trait.name
    asked = [{"key": d, "domain": d, "prompt": questions_prompt(trait.name, d, per_domain)} for d in domains]
    questions = _resumable("questions", asked, state / "questions.jsonl", cfg,
                           lambda text: check_questions_reply(text, per_domain), True, on_chunk)
    requests = _answer_requests(trait, about, questions, strengths)
    answers = _resumable("answers", requests, state / "answers.jsonl", cfg,
                         _checked_answer, False, on_chunk)
    return _write_datasets(trait.name, answers, strengths, Path(out))


def _answer_requests(trait: Trait, about: str, questions: list[dict], strengths: Sequence[str]) -> list[dict]:
    out = []
    for rec in questions:
        for i, question in enumerate(rec["value"]):
            prompt_id = f"{rec['domain']}-{i:03d}"
            for s in strengths:
                out.append({"key": f"{prompt_id}/{s}", "prompt_id": prompt_id, "domain": rec["domain"],
                            "strength": s, "question": question,
                            "prompt": answer_prompt(s, question, trait.name, about)})
    return out


def _write_datasets(trait: str, answers: list[dict], strengths: Sequence[str], out: Path) -> dict[str, Path]:
    written = {}
    for s in strengths:
        records = [chat_record(trait, s, a["domain"], a["prompt_id"], a["question"], a["value"])
                   for a in answers if a["strength"] == s]
        path = out / trait / f"{s}.jsonl"
        write_jsonl(path, records)
        written[s] = path
    return written
