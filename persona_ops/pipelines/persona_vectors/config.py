"""``persona_vectors`` in params.yaml: the persona-vector pipeline's parameters."""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from persona_ops.inference.backends import GenerationCfg
from persona_ops.interp.vectors import FilterThresholds
from persona_ops.judge.settings import JudgeCfg
from persona_ops.models.refs import ModelRef
from persona_ops.names import Name
from persona_ops.resumable import ChunkingCfg


class TraitsCfg(BaseModel):
    """Trait files ``<dir>/<extract_subdir>/<name>.json`` (and ``<eval_subdir>`` for steering);
    persona_vectors' own layout is ``trait_data_extract`` / ``trait_data_eval``."""

    model_config = ConfigDict(extra="forbid")
    dir: str = "data/traits"
    extract_subdir: str = "extract"
    eval_subdir: str = "eval"
    names: list[Name] = Field(default_factory=lambda: ["evil", "sycophantic", "hallucinating"], min_length=1)
    assistant_name: str | None = None  # the pos system prompt's "You are a/an {name} assistant"; None = the trait
    neg_assistant_name: str = "helpful"


class GenerateCfg(GenerationCfg, ChunkingCfg):
    """pos and neg answers: ``n_per_question`` samples of the first ``questions_limit`` questions,
    generated in chunks of ``chunk_size`` (resumable: ``resume``)."""

    n_per_question: int = Field(1, ge=1)
    questions_limit: int | None = Field(None, ge=1)


class ActivationsCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: int = Field(16, ge=1)


class PersonaVectorsParams(BaseModel):
    """The persona-vector pipeline. ``per_trait.<trait>`` overrides any of these sections for one
    trait (deep-merged; DVC tracks it per trait, so changing it reruns only that trait)."""

    model_config = ConfigDict(extra="forbid")
    model: ModelRef = Field(default_factory=ModelRef)
    traits: TraitsCfg = Field(default_factory=TraitsCfg)
    per_trait: dict[Name, dict[str, Any]] = Field(default_factory=dict)
    generate: GenerateCfg = Field(default_factory=GenerateCfg)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)
    filter: FilterThresholds = Field(default_factory=FilterThresholds)
    activations: ActivationsCfg = Field(default_factory=ActivationsCfg)

    @model_validator(mode="after")
    def _per_trait_merges(self) -> "PersonaVectorsParams":
        for trait, over in self.per_trait.items():
            if "per_trait" in over or "names" in (over.get("traits") or {}):
                raise ValueError(f"per_trait.{trait}: may not set per_trait or traits.names")
            try:
                self.for_item(trait)
            except ValidationError as e:
                err = e.errors()[0]
                loc = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"per_trait.{trait}.{loc}: {err['msg']}") from None
        return self

    def for_item(self, trait: str) -> "PersonaVectorsParams":
        """These parameters with ``per_trait.<trait>`` deep-merged in."""
        over = self.per_trait.get(trait)
        if not over:
            return self
        return type(self).model_validate(deep_merge(self.model_dump(exclude={"per_trait"}), copy.deepcopy(over)))


def deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
