"""Batched, seeded text generation with HF transformers (left padding, length-sorted batches)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from persona_ops.chat import encode
from persona_ops.models import LoadedModel


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _stop_ids(tokenizer, model) -> list[int]:
    ids = set()
    for tid in (tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        if isinstance(tid, int):
            ids.add(tid)
        elif isinstance(tid, (list, tuple)):
            ids.update(tid)
    return sorted(ids)


@torch.inference_mode()
def generate(loaded: LoadedModel, prompts: list[str], sampling: SamplingParams, batch_size: int = 32,
             desc: str = "generate") -> list[str]:
    """Continue each rendered prompt; returns the decoded answers in input order.

    Prompts are sorted by length so each batch pads little; the global seed is set once
    per call so the same inputs and parameters give the same outputs.
    """
    tok, model = loaded.tokenizer, loaded.model
    ids = [encode(tok, p) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    answers: list[str] = [""] * len(ids)
    torch.manual_seed(sampling.seed)
    stop = _stop_ids(tok, model)
    do_sample = sampling.temperature > 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        chunk = order[start:start + batch_size]
        width = max(len(ids[i]) for i in chunk)
        input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):  # left padding
            input_ids[row, width - len(ids[i]):] = torch.tensor(ids[i])
            mask[row, width - len(ids[i]):] = 1
        out = model.generate(
            input_ids=input_ids.to(loaded.device), attention_mask=mask.to(loaded.device),
            max_new_tokens=sampling.max_new_tokens, do_sample=do_sample,
            temperature=sampling.temperature if do_sample else None,
            top_p=sampling.top_p if do_sample else None, top_k=None,
            eos_token_id=stop, pad_token_id=tok.pad_token_id)
        for row, i in enumerate(chunk):
            answers[i] = tok.decode(out[row, width:], skip_special_tokens=True).strip()
    return answers
