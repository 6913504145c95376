"""Configuration: ``params.yaml`` holds every default; pydantic validates it.

``-S key=value`` overrides (the same syntax as ``dvc exp run -S``) are parsed with YAML,
so ``-S generate.max_new_tokens=32`` and ``-S traits.names=[evil]`` both work.
Per-trait overrides live under ``traits.per_trait.<name>`` and are deep-merged over the
global sections; DVC tracks that key per trait, so changing one trait's parameter
reruns only that trait's stages.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from persona_ops.inference.backends import Backend, OpenAIGenerationCfg, VLLMCfg
from persona_ops.errors import InputError
from persona_ops.io import write_text
from persona_ops.judge.settings import JudgeCfg
from persona_ops.pipelines.finetune import FinetuneParams
from persona_ops.pipelines.monitoring import ProjectionParams, SteeringParams
from persona_ops.models.refs import ModelRef
from persona_ops.pipelines.persona_space import PersonaSpaceParams


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TraitsCfg(_Section):
    dir: str = "data/traits"
    extract_subdir: str = "extract"  # persona_vectors' own layout uses trait_data_extract
    names: list[str] = Field(default_factory=lambda: ["evil", "sycophantic", "hallucinating"], min_length=1)
    neg_assistant_name: str = "helpful"
    per_trait: dict[str, dict[str, Any]] = Field(default_factory=dict)


class GenerateCfg(_Section):
    backend: Backend = "hf"  # hf (the local model on the engine) | vllm | openai (see persona_ops.inference.backends)
    n_per_question: int = Field(1, ge=1)
    questions_limit: int | None = Field(None, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    batch_size: int = Field(32, ge=1)
    seed: int = 0
    openai: OpenAIGenerationCfg = Field(default_factory=OpenAIGenerationCfg)
    vllm: VLLMCfg = Field(default_factory=VLLMCfg)


class FilterCfg(_Section):
    pos_min: float = 50.0
    neg_max: float = 50.0
    coherence_min: float = 50.0
    min_pairs: int = Field(1, ge=1)


class ActivationsCfg(_Section):
    batch_size: int = Field(16, ge=1)


class TrackingCfg(_Section):
    enabled: bool = True
    experiment: str = "persona-vectors"
    register_vectors: bool = True
    alias: str = "candidate"


class Params(_Section):
    """All parameters (see params.yaml). The top-level sections up to ``tracking`` belong to the
    persona-vector pipeline; ``persona_space`` and ``finetune`` to the persona-space/trajectory one;
    ``steering`` and ``projection`` to the sweep and monitoring stages."""

    model: ModelRef = Field(default_factory=ModelRef)
    traits: TraitsCfg = Field(default_factory=TraitsCfg)
    generate: GenerateCfg = Field(default_factory=GenerateCfg)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)
    filter: FilterCfg = Field(default_factory=FilterCfg)
    activations: ActivationsCfg = Field(default_factory=ActivationsCfg)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    persona_space: PersonaSpaceParams = Field(default_factory=PersonaSpaceParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    steering: SteeringParams = Field(default_factory=SteeringParams)
    projection: ProjectionParams = Field(default_factory=ProjectionParams)

    @model_validator(mode="after")
    def _per_trait_known(self) -> "Params":
        overridable = {"model", "generate", "judge", "filter", "activations", "assistant_name"}
        for trait, over in self.traits.per_trait.items():
            bad = set(over) - overridable
            if bad:
                raise ValueError(f"traits.per_trait.{trait}: unknown keys {sorted(bad)}; "
                                 f"expected some of {sorted(overridable)}")
        return self

    def for_trait(self, trait: str) -> "TraitParams":
        """Global sections deep-merged with ``traits.per_trait.<trait>``."""
        over = copy.deepcopy(self.traits.per_trait.get(trait, {}))
        assistant_name = over.pop("assistant_name", trait)
        merged = _deep_merge(self.model_dump(), over)
        try:
            p = Params.model_validate(merged)
        except ValidationError as e:
            raise InputError(f"traits.per_trait.{trait}: {_first_error(e)}") from None
        return TraitParams(trait=trait, assistant_name=assistant_name, params=p)

    def dvc_view(self) -> dict:
        """What params.yaml stores: every per-trait entry present so DVC can track it."""
        data = self.model_dump(mode="json")
        for name in self.traits.names:
            data["traits"]["per_trait"].setdefault(name, {"assistant_name": name})
        return data


class TraitParams(BaseModel):
    trait: str
    assistant_name: str
    params: Params


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(x) for x in err["loc"])
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value); ``a.b=@file.yaml`` reads the value
    from a YAML file (e.g. a trajectory preset)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"-S {text!r}: expected key=value, e.g. -S generate.max_new_tokens=32")
    value = value.strip()
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return key.strip().split("."), yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"-S {text!r}: cannot read {path}: {e}") from None
    return key.strip().split("."), yaml.safe_load(value) if value else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError(f"-S {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return data


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read and validate params.yaml (missing file = all defaults), then apply ``-S`` overrides."""
    path = Path(path)
    data = {}
    if path.exists():
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise InputError(f"{path}: invalid YAML: {e}") from None
    data = apply_overrides(data, list(overrides))
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise InputError(f"{path}: {_first_error(e)}") from None


def save_params(params: Params, path: str | Path = "params.yaml") -> None:
    """Write params.yaml atomically, keeping the header comment of an existing file."""
    path = Path(path)
    header = ""
    if path.exists():
        lines = path.read_text().splitlines(keepends=True)
        header = "".join(line for line in lines[: next((i for i, l in enumerate(lines) if not l.startswith("#")), 0)])
    write_text(path, header + yaml.safe_dump(params.dvc_view(), sort_keys=False))
