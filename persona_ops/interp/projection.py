"""Projections of responses onto persona vectors (persona_vectors' monitoring metrics).

For a vector ``v`` at layer ``L`` (row ``L`` = ``hidden_states[L]``):

- ``proj``             = <mean response activation, v> / |v|
- ``prompt_avg_proj``  = <mean prompt activation, v> / |v|
- ``prompt_last_proj`` = <last prompt token's activation, v> / |v|
- ``cos_sim``          = cosine(mean response activation, v)

All (vector, layer, type) columns come from one capture pass. The finetuning shift is the
same projection on a fine-tuned model minus on its base, on the same texts (linear types only).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Mapping, Sequence

import torch

from persona_ops.errors import InputError

TYPES = ("proj", "prompt_avg_proj", "prompt_last_proj", "cos_sim")
_SOURCE = {"proj": "response_avg", "cos_sim": "response_avg", "prompt_avg_proj": "prompt_avg",
           "prompt_last_proj": "prompt_last"}
LINEAR = ("proj", "prompt_avg_proj", "prompt_last_proj")


def column(vector: str, kind: str, layer: int) -> str:
    return f"{vector}_{kind}_layer{layer}"


def project(loaded, prompts: Sequence[str], answers: Sequence[str], vectors: Mapping[str, torch.Tensor],
            layers: Sequence[int], types: Sequence[str] = TYPES, token_budget: int = 16384) -> dict[str, list[float]]:
    """Columns ``{vector}_{type}_layer{L}`` -> one value per (prompt, answer)."""
    from persona_ops.interp.capture import capture

    bad = [t for t in types if t not in TYPES]
    if bad:
        raise InputError(f"projection types {bad}: expected some of {TYPES}")
    layers = sorted(set(layers))
    for name, v in vectors.items():
        if v.dim() != 2 or max(layers) >= v.shape[0]:
            raise InputError(f"vector {name}: shape {list(v.shape)} has no layer {max(layers)} "
                             "(expected [num_layers + 1, hidden])")
    aggregates = sorted({_SOURCE[t] for t in types})
    caps = capture(loaded, list(prompts), list(answers), layers=layers, aggregates=aggregates,
                   token_budget=token_budget, desc="projection").means
    out: dict[str, list[float]] = {}
    for name, vec in vectors.items():
        for i, layer in enumerate(layers):
            v = vec[layer].float()
            unit = v / v.norm().clamp(min=1e-12)
            for kind in types:
                h = caps[_SOURCE[kind]][:, i]
                values = (torch.nn.functional.cosine_similarity(h, v[None], dim=-1) if kind == "cos_sim"
                          else h @ unit)
                out[column(name, kind, layer)] = values.tolist()
    return out


def shift(finetuned: Mapping[str, list[float]], base: Mapping[str, list[float]]) -> dict[str, list[float]]:
    """Finetuning shift columns ``<column>_shift`` for the linear projection types."""
    return {f"{c}_shift": [a - b for a, b in zip(finetuned[c], base[c])]
            for c in finetuned if any(f"_{t}_layer" in c for t in LINEAR)}


def load_texts(path: str | Path, tokenizer) -> tuple[list[dict], list[str], list[str]]:
    """Records, rendered prompts and answers from: persona-ops generations (``prompt``/``answer``),
    chat JSONL (``messages``; the last message is the answer) or CSV with prompt/answer columns."""
    from persona_ops.chat import render_prompt
    from persona_ops.io import read_jsonl

    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if rows and not {"prompt", "answer"} <= set(rows[0]):
            raise InputError(f"{path}: a CSV needs 'prompt' and 'answer' columns, has {sorted(rows[0])}")
        return rows, [r["prompt"] for r in rows], [r["answer"] for r in rows]
    records = read_jsonl(path)
    prompts, answers = [], []
    for i, rec in enumerate(records, 1):
        if "messages" in rec:
            msgs = rec["messages"]
            if not msgs or msgs[-1].get("role") != "assistant":
                raise InputError(f"{path}:{i}: messages: the last message must be the assistant's answer")
            prompts.append(render_prompt(tokenizer, msgs[:-1]))
            answers.append(msgs[-1]["content"])
        elif "prompt" in rec and "answer" in rec:
            prompts.append(rec["prompt"])
            answers.append(rec["answer"])
        else:
            raise InputError(f"{path}:{i}: expected 'messages' or 'prompt' and 'answer' fields, got {sorted(rec)}")
    return records, prompts, answers
