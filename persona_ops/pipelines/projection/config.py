"""``projection`` in params.yaml: projections of texts onto persona vectors."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.models.refs import ModelRef
from persona_ops.names import Name


class ProjectionInput(BaseModel):
    """Texts to project (persona-ops generations, chat JSONL or CSV with prompt/answer) and,
    optionally, their judged scores (``{id, trait}`` JSONL, e.g. a judge stage's output):
    projections are then correlated with the scores."""

    model_config = ConfigDict(extra="forbid")
    texts: str
    scores: str | None = None


class ProjectionParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inputs: list[ProjectionInput] = Field(default_factory=list)
    vectors: dict[Name, str] = Field(default_factory=dict)  # name -> vector file
    aggregate: Literal["response_avg", "prompt_avg", "prompt_last"] = "response_avg"
    layers: list[int] = Field(default_factory=lambda: [10, 20], min_length=1)
    types: list[str] = Field(default_factory=lambda: ["proj", "prompt_avg_proj", "prompt_last_proj", "cos_sim"])
    model: ModelRef = Field(default_factory=ModelRef)
    base_model: ModelRef | None = None  # set: also the finetuning shift (model minus base_model)
