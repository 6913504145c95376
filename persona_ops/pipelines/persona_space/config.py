"""``persona_space`` in params.yaml: persona space, the Assistant Axis, capping and trajectories."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from persona_ops.data import DEFAULT_ROLE
from persona_ops.inference.backends import GenerationCfg
from persona_ops.inference.sampling import SamplingParams
from persona_ops.judge.settings import JudgeCfg
from persona_ops.models.refs import ModelRef
from persona_ops.names import Name
from persona_ops.resumable import ChunkingCfg


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolesCfg(_Section):
    dir: str = "data/roles/instructions"
    questions: str = "data/roles/questions.jsonl"
    # the roles, ``default`` included (DVC runs one stage per name); None = every role file in dir,
    # which `persona-ops run` writes out into params.yaml (DVC's foreach needs the list)
    names: list[Name] | None = None
    instructions_limit: int | None = Field(None, ge=1)
    questions_limit: int | None = Field(None, ge=1)
    model_name: str | None = None  # fills {model_name} in default.json; None = derived from model.name

    @field_validator("names")
    @classmethod
    def _default_listed_once(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if DEFAULT_ROLE not in names:
            raise ValueError(f"must list {DEFAULT_ROLE!r} (the Assistant Axis needs the default role, "
                             f"and DVC runs one stage per listed role), e.g. [{DEFAULT_ROLE}, pirate, ...]")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return names


class TranscriptsCfg(GenerationCfg, ChunkingCfg):
    """Role transcripts: ``rollouts`` answers per (instruction, question), generated and appended
    in chunks of ``chunk_size`` records (resumable: ``resume``)."""

    sampling: SamplingParams = Field(default_factory=lambda: SamplingParams(512, 0.7, 0.9, 0))
    rollouts: int = Field(1, ge=1)


class RoleActivationsCfg(_Section):
    layers: list[int] | None = None  # None = [space.layer] (the middle layer when that is None)
    all_layers: bool = False
    batch_size: int = Field(16, ge=1)
    chunk_size: int = Field(256, ge=1)  # records per capture call (bounds host memory)
    resume: bool = True


class RoleVectorsCfg(_Section):
    score_field: Literal["label", "score"] = "label"  # label = most likely integer; score = expected value
    threshold: float = 3.0  # keep samples with score >= threshold (3 = fully plays the role)
    min_count: int = Field(50, ge=1)  # fewer qualifying samples: the role is dropped


class SpaceCfg(_Section):
    layer: int | None = None  # None = num_layers // 2 (assistant-axis' default is one deeper)


class CheckpointCfg(_Section):
    """One checkpoint of a trajectory (its label is its key in ``trajectory.checkpoints``)."""

    model: ModelRef
    step: float | None = None
    family: Name | None = None  # families are compared side by side


class TrajectoryCfg(_Section):
    """Checkpoints replaying the reference transcripts, ``label: {step, model, family}`` in order.
    A plain mapping is one family; with ``family`` on every checkpoint the report draws one
    trajectory per family (labels stay unique)."""

    checkpoints: dict[Name, CheckpointCfg] = Field(default_factory=dict)
    n_pcs: int = Field(3, ge=1)
    label_roles: list[str] | None = None  # roles labelled in scatter plots; None = all

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _mapping(cls, value):
        if isinstance(value, list):
            raise ValueError("expected a mapping label -> {step, model, family} (write `base: {step: 0, model: "
                             "...}` instead of `- {label: base, ...}`; labels name DVC stages and directories)")
        return value

    @field_validator("checkpoints")
    @classmethod
    def _families_consistent(cls, checkpoints: dict[str, CheckpointCfg]) -> dict[str, CheckpointCfg]:
        if len({c.family is None for c in checkpoints.values()}) > 1:
            raise ValueError("give every checkpoint a family, or none (a plain mapping is one family); "
                             f"without one: {[k for k, c in checkpoints.items() if c.family is None]}")
        return checkpoints

    def families(self) -> dict[str | None, list[tuple[str, CheckpointCfg]]]:
        """Checkpoints by family, in order of first appearance (``{None: all}`` without families)."""
        out: dict[str | None, list[tuple[str, CheckpointCfg]]] = {}
        for label, c in self.checkpoints.items():
            out.setdefault(c.family, []).append((label, c))
        return out


class CappingCfg(_Section):
    """Activation capping along this persona space's Assistant Axis (``persona_ops.interp.capping``):
    at each layer the axis projection is floored at ``percentile`` of the default Assistant's."""

    layers: list[int] | None = None  # [first, last] hidden_states indices, inclusive; None = the space layer
    percentile: float = Field(25.0, ge=0, le=100)  # the paper's 25th percentile

    @field_validator("layers")
    @classmethod
    def _first_last(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (len(layers) != 2 or not 1 <= layers[0] <= layers[1]):
            raise ValueError("expected [first, last] with 1 <= first <= last (hidden_states indices)")
        return layers


class PersonaSpaceParams(_Section):
    """All parameters of the persona-space and trajectory pipelines."""

    model: ModelRef = Field(default_factory=ModelRef)
    roles: RolesCfg = Field(default_factory=RolesCfg)
    transcripts: TranscriptsCfg = Field(default_factory=TranscriptsCfg)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)
    activations: RoleActivationsCfg = Field(default_factory=RoleActivationsCfg)
    vectors: RoleVectorsCfg = Field(default_factory=RoleVectorsCfg)
    space: SpaceCfg = Field(default_factory=SpaceCfg)
    trajectory: TrajectoryCfg = Field(default_factory=TrajectoryCfg)
    capping: CappingCfg = Field(default_factory=CappingCfg)
