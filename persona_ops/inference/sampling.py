"""Sampling parameters, and next-token sampling on fp32 logits: greedy, temperature, nucleus
(top-p); seeded by a generator."""

from __future__ import annotations

import torch
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class SamplingParams:
    """How one generation call samples (also the ``sampling`` sections of params.yaml)."""

    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)  # 0 = greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Set to ``-inf`` the logits outside the smallest set whose probability reaches ``top_p``
    (the most likely token always stays)."""
    sorted_logits, idx = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    drop = probs.cumsum(-1) - probs > top_p  # mass before this token already reaches top_p
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, idx, sorted_logits)


def exponential_race(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``argmax p_i / E_i`` with ``E_i ~ Exp(1)`` picks ``i`` with probability ``p_i``: one draw
    per entry, no cumulative sums; cheap where random numbers are (GPUs)."""
    return (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(-1)


def inverse_cdf(probs: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One uniform draw per row located in the fp64 cumulative sum of ``probs`` (an entry of
    probability 0 is never picked). On a CPU core, drawing an exponential per logit costs
    40 ms a step at a 49k vocabulary and 40 rows; this costs ~5 ms."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=cdf.shape[-1] - 1)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float = 1.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of ``logits`` ``[B, V]`` (cast to fp32); ``temperature <= 0`` is greedy.
    No host sync: :func:`exponential_race` on CUDA, :func:`inverse_cdf` elsewhere."""
    logits = logits.float()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    probs = logits.softmax(-1)
    return (exponential_race if probs.is_cuda else inverse_cdf)(probs, generator)
