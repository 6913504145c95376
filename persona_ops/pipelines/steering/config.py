"""``steering`` in params.yaml: the steering sweep."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.inference.sampling import SamplingParams
from persona_ops.names import Name
from persona_ops.pipelines.evaluate import BootstrapCfg


class SteeringParams(BaseModel):
    """Layers x coefficients x kind of steering with each trait's persona vector; every point
    answers the trait's eval questions, all points in one generation batch."""

    model_config = ConfigDict(extra="forbid")
    traits: list[Name] = Field(default_factory=lambda: ["evil"], min_length=1)
    aggregate: Literal["response_avg", "prompt_avg", "prompt_last"] = "response_avg"
    layers: list[int] = Field(default_factory=lambda: [10, 20], min_length=1)  # hidden_states index
    coefs: list[float] = Field(default_factory=lambda: [0.0, 4.0, 8.0], min_length=1)
    kinds: list[Literal["add", "ablate"]] = Field(default_factory=lambda: ["add"], min_length=1)
    positions: Literal["prompt", "response", "all"] = "response"
    questions_limit: int | None = Field(None, ge=1)
    n_per_question: int = Field(1, ge=1)
    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(max_new_tokens=64))
    batch_size: int = Field(256, ge=1)
    coherence_min: float = 50.0  # the best point must keep mean coherence at least this high
    bootstrap: BootstrapCfg = Field(default_factory=BootstrapCfg)
