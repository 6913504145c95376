"""Judge settings shared by every pipeline that judges (``judge`` sections of params.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.inference.backends import EndpointCfg
from persona_ops.models.refs import ModelRef


class JudgeCfg(BaseModel):
    """Which judge scores answers, and how (``persona_ops.judge.make_judge``).

    ``local``: ``model`` (an HF id[@revision], a local directory or ``embedded``) scores every
    number as a whole continuation; ``openai``: the served model ``openai.model`` at
    ``openai.base_url`` is read through its top-20 logprobs. ``coherence_prompt``: a text file
    with ``{question}`` and ``{answer}`` replacing the project's own coherence prompt (e.g. a
    paper's exact wording)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "openai"] = "local"
    model: str = "embedded"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = Field(8, ge=1)
    answer_prefix: str = ""  # local backend only: prefilled answer text before the number
    coherence_prompt: str | None = None
    cache: str = "cache/judge.sqlite"
    openai: EndpointCfg = Field(default_factory=lambda: EndpointCfg(timeout=60.0))

    def model_ref(self) -> ModelRef:
        """The local judge model as a model reference (what the model pool loads)."""
        return ModelRef(name=self.model, revision=self.revision, dtype=self.dtype, device=self.device)
