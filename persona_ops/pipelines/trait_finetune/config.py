"""``trait_finetune`` in params.yaml: one experiment of LoRA fine-tunes, traits x strengths, each cell
evaluated on every trait (or ``experiments/<name>.yaml``, the same keys, selected by name)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from persona_ops.inference.sampling import SamplingParams
from persona_ops.judge.settings import JudgeCfg
from persona_ops.models.refs import ModelRef
from persona_ops.names import Name
from persona_ops.pipelines.evaluate import BootstrapCfg
from persona_ops.training.openai_ft import OpenAIFineTuneCfg
from persona_ops.training.sft import TrainConfig

STRENGTHS = ("normal", "misaligned_1", "misaligned_2")  # persona_vectors' baseline, mild, severe


class TrainingSteering(BaseModel):
    """Steering during training: ``steer`` adds ``coef x v`` (preventative steering), ``ablate``
    projects ``v`` out (CAFT), at ``layers`` (``hidden_states`` indices) and ``positions``.
    ``vector``: ``models:/persona-vector-evil@champion`` or a vectors file (``[layers + 1, hidden]``)."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["steer", "ablate"] = "steer"
    vector: str = Field(min_length=1)
    aggregate: str = "response_avg"
    layers: list[int] = Field(min_length=1)
    coef: float = 5.0  # steer only
    positions: Literal["prompt", "response", "all"] = "all"  # persona_vectors: every position


class TrainingCfg(BaseModel):
    """How every cell is trained: ``local`` (LoRA SFT: TRL + PEFT), ``openai`` (the fine-tuning API)
    or ``dummy`` (no training: a dry run of the plumbing; the cell is evaluated as the base model)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "openai", "dummy"] = "local"
    model: ModelRef = Field(default_factory=ModelRef)  # local: the base model (evaluation loads it too)
    train: TrainConfig = Field(default_factory=TrainConfig)
    steering: TrainingSteering | None = None
    openai: OpenAIFineTuneCfg | None = None  # backend openai | dummy: the job (its endpoint serves the result)

    @model_validator(mode="after")
    def _backend_settings(self) -> "TrainingCfg":
        if self.backend != "local" and self.openai is None:
            raise ValueError(f"backend {self.backend} needs training.openai (at least its base model: "
                             "{model: gpt-4.1-mini-2025-04-14})")
        if self.backend != "local" and self.steering is not None:
            raise ValueError("training.steering needs backend local (the API trains without hooks)")
        if self.model.adapter:
            raise ValueError("training.model.adapter: training starts from a base model; set it to null")
        return self


class EvaluationCfg(BaseModel):
    """Every cell (and the base model) answers each trait's eval questions, judged for the trait and
    coherence, projected on each trait's persona vector at ``layer`` (and the finetuning shift)."""

    model_config = ConfigDict(extra="forbid")
    traits: list[Name] = Field(default_factory=lambda: ["evil", "sycophantic", "hallucinating"], min_length=1)
    questions: str = "data/traits/eval"  # <questions>/<trait>.json: the trait files' eval questions
    questions_limit: int | None = Field(None, ge=1)
    n_samples: int = Field(1, ge=1)
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    batch_size: int = Field(64, ge=1)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)
    vectors: dict[Name, str] = Field(default_factory=dict)  # trait -> vectors file
    aggregate: str = "response_avg"
    layer: int = Field(20, ge=0)
    checkpoints: Literal["final", "all"] = "final"  # all = every saved checkpoint (curves against step)
    bootstrap: BootstrapCfg = Field(default_factory=BootstrapCfg)

    @model_validator(mode="after")
    def _vector_per_trait(self) -> "EvaluationCfg":
        missing = [t for t in self.traits if t not in self.vectors]
        if missing:
            raise ValueError(f"evaluation.vectors: no persona vector for {', '.join(missing)} "
                             "(trait: vectors file, e.g. outputs/persona_vectors/evil/vectors.safetensors)")
        return self


class TraitFinetuneParams(BaseModel):
    """One experiment: a cell per (trait, strength), trained on ``<dataset_dir>/<trait>/<strength>.jsonl``
    (persona_vectors' dataset layout) and registered as ``lora-adapter-<name>-<trait>-<strength>``."""

    model_config = ConfigDict(extra="forbid")
    name: Name = "traits"
    dataset_dir: str = "data/trait_datasets"
    traits: list[Name] = Field(default_factory=lambda: ["evil", "sycophantic", "hallucinating"], min_length=1)
    strengths: list[Name] = Field(default_factory=lambda: list(STRENGTHS), min_length=1)
    training: TrainingCfg = Field(default_factory=TrainingCfg)
    evaluation: EvaluationCfg = Field(default_factory=lambda: EvaluationCfg(vectors={
        t: f"outputs/persona_vectors/{t}/vectors.safetensors" for t in ("evil", "sycophantic", "hallucinating")}))

    @model_validator(mode="after")
    def _known_strengths(self) -> "TraitFinetuneParams":
        unknown = [s for s in self.strengths if s not in STRENGTHS]
        if unknown:
            raise ValueError(f"strengths: unknown {', '.join(unknown)}; expected some of {', '.join(STRENGTHS)}")
        return self
