"""The one evaluation primitive: (model, prompt set, conditions) -> generated and judged rows.

A condition is how the model is asked: steering at some layers (``add``/``ablate`` with a
coefficient), a system prompt, or an explicit message builder (e.g. a trigger placed in the
user turn). Every condition x prompt x sample is answered in ONE generation batch (per-row
steering coefficients), then every answer is judged for each metric (a judge template with
``{question}`` and ``{answer}``). Rows share one schema::

    {"condition": "add/L10/c4.0", **condition.fields, "prompt_id": "q0", "question": ...,
     "sample_idx": 0, "answer": ..., "scores": {"trait": 71.2, "coherence": 88.0}}

:func:`summarize` gives the mean of each metric per condition with a seeded bootstrap CI
(prompts, then samples, resampled: :mod:`persona_ops.stats`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from persona_ops.stats import bootstrap_mean_over


@dataclass(frozen=True)
class Steer:
    """One steering edit of a condition: ``vector`` is the ``[hidden]`` direction at ``layer``."""

    kind: str
    layer: int
    vector: torch.Tensor = field(repr=False)
    coef: float
    positions: str = "response"


@dataclass(frozen=True)
class Condition:
    name: str
    steering: tuple[Steer, ...] = ()
    system: str | None = None
    messages: Callable[[Any, str], list[dict]] | None = None  # (tokenizer, question) -> chat
    fields: dict = field(default_factory=dict)  # columns copied into each row


@dataclass(frozen=True)
class EvalPrompt:
    id: str
    question: str


class BootstrapCfg(BaseModel):
    """Seeded bootstrap confidence intervals (``bootstrap`` sections of params.yaml)."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(1000, ge=1)
    level: float = Field(0.95, gt=0, lt=1)
    seed: int = 0


def _chats(tokenizer, rows: list[dict], conditions: dict[str, Condition]) -> list[list[dict]]:
    from persona_ops.chat import chat_messages

    out = []
    for r in rows:
        c = conditions[r["condition"]]
        out.append(c.messages(tokenizer, r["question"]) if c.messages else
                   chat_messages(tokenizer, c.system, r["question"]))
    return out


def interventions_for(rows: list[dict], conditions: dict[str, Condition]) -> list:
    """One intervention per distinct (kind, layer, vector, positions), with per-row coefficients
    (0 on rows whose condition does not use it: a no-op for ``add`` and ``ablate``)."""
    from persona_ops.interp.interventions import Intervention

    specs: dict[tuple, list[float]] = {}
    for i, r in enumerate(rows):
        for s in conditions[r["condition"]].steering:
            key = (s.kind, s.layer, id(s.vector), s.positions)
            specs.setdefault(key, [0.0] * len(rows))[i] = s.coef
    vectors = {id(s.vector): s.vector for c in conditions.values() for s in c.steering}
    return [Intervention(kind, layer, vectors[vid], coef=torch.tensor(coefs), positions=positions)
            for (kind, layer, vid, positions), coefs in specs.items()]


def evaluate(loaded, prompts: Sequence[EvalPrompt], conditions: Sequence[Condition], sampling, *, judge,
             metrics: dict[str, str], n_samples: int = 1, batch_size: int = 256, scale: tuple[int, int] = (0, 100),
             generator=None, judged: Callable[[str], str] | None = None) -> list[dict]:
    """Answer every prompt under every condition ``n_samples`` times in one generation batch,
    then judge each answer for each metric (see the module docstring); rows in condition,
    prompt, sample order. ``generator`` (a :class:`~persona_ops.inference.backends.TextGenerator`,
    e.g. a served model; ``loaded`` then None) answers instead of the local engine, unsteered.
    ``judged(answer)``: what the judge sees of an answer (e.g. without a trigger's format markers)."""
    from persona_ops.chat import render_prompt
    from persona_ops.inference.engine import generate_text
    from persona_ops.judge import fill_template

    by_name = {c.name: c for c in conditions}
    if len(by_name) != len(conditions):
        raise ValueError("condition names must be unique")
    rows = [{"condition": c.name, **c.fields, "prompt_id": p.id, "question": p.question, "sample_idx": s}
            for c in conditions for p in prompts for s in range(n_samples)]
    if generator is not None:
        if any(c.steering for c in conditions):
            raise ValueError("steering conditions need the local model, not a generator")
        answers = generator.generate(_chats(generator.tokenizer, rows, by_name), sampling, batch_size=batch_size)
    else:
        tok = loaded.tokenizer
        texts = [render_prompt(tok, chat) for chat in _chats(tok, rows, by_name)]
        answers = generate_text(loaded, texts, sampling, interventions_for(rows, by_name), batch_size=batch_size,
                                progress=True)
    lo, hi = scale
    names = list(metrics)
    shown = [judged(a) for a in answers] if judged else answers
    filled = [fill_template(metrics[m], r["question"], a) for m in names for r, a in zip(rows, shown)]
    scores = judge.score(filled, lo=lo, hi=hi)
    n = len(rows)
    for i, (r, a) in enumerate(zip(rows, answers)):
        r["answer"] = a
        r["scores"] = {m: scores[k * n + i] for k, m in enumerate(names)}
    return rows


def summarize(rows: list[dict], metrics: Sequence[str], bootstrap: BootstrapCfg = BootstrapCfg(),
              unit: str | None = None) -> list[dict]:
    """Per condition (first-appearance order): its fields, ``n`` rows, and for each metric the
    mean over scored answers with its bootstrap interval (``None`` when nothing was scored).
    ``unit``: a row field (e.g. the training seed's point) resampled above the prompts."""
    out: dict[str, dict] = {}
    grouped: dict[str, dict[str, dict[tuple, list]]] = {}
    for r in rows:
        entry = out.setdefault(r["condition"], {"condition": r["condition"], "n": 0,
                                                **{k: v for k, v in r.items() if k not in _ROW_KEYS}})
        entry["n"] += 1
        key = (r[unit] if unit else None, r["prompt_id"])
        for m in metrics:
            grouped.setdefault(r["condition"], {}).setdefault(m, {}).setdefault(key, []).append(r["scores"].get(m))
    for name, entry in out.items():
        for m in metrics:
            units: dict = {}
            for (u, _), g in grouped[name][m].items():
                if any(v is not None for v in g):
                    units.setdefault(u, []).append(g)
            if not units:
                entry[m], entry[f"{m}_ci"] = None, None
                continue
            ci = bootstrap_mean_over(list(units.values()), n_boot=bootstrap.n, level=bootstrap.level,
                                     seed=bootstrap.seed)
            entry[m], entry[f"{m}_ci"] = ci.estimate, [ci.low, ci.high]
    return list(out.values())


_ROW_KEYS = {"condition", "prompt_id", "question", "sample_idx", "answer", "scores"}
