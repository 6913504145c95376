"""A reference to a model: what every ``model`` section of params.yaml holds."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ModelRef(BaseModel):
    """A model to load: ``embedded``, an HF id[@revision] or a local directory, optionally with a
    LoRA adapter checkpoint on top. Used by every pipeline (``model`` sections of params.yaml)."""

    model_config = ConfigDict(extra="forbid")

    name: str = "embedded"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    adapter: str | None = None  # a LoRA adapter checkpoint directory applied on top
