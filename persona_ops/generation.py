"""Sampling parameters and the one local generation entry: rendered prompts -> answers.

Every local generation (persona-vector answers, role transcripts, steering sweeps, the model
server) runs on :mod:`persona_ops.engine` (static KV cache, per-row steering, one seeded
generator per call). Other backends (vLLM, OpenAI-compatible servers) are in
:mod:`persona_ops.backends`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int = 0


def generate(loaded, prompts: Sequence[str], sampling: SamplingParams, batch_size: int = 32,
             interventions: Sequence = (), progress: bool = True) -> list[str]:
    """Continue each rendered prompt on the engine; returns the decoded answers in input order.

    Prompts are length-sorted into batches of ``batch_size`` (left-padded); one generator
    seeded with ``sampling.seed`` drives all sampling, so the same inputs and parameters give
    the same outputs. ``interventions`` (:class:`persona_ops.interventions.Intervention`) steer
    prefill and decoding.
    """
    from persona_ops.engine import generate_text  # the engine imports SamplingParams from here

    return generate_text(loaded, list(prompts), sampling, interventions, batch_size=batch_size, progress=progress)
