"""``finetune`` in params.yaml: one LoRA fine-tune (the offline trajectory replays its checkpoints)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.models.refs import ModelRef
from persona_ops.names import Name
from persona_ops.training.sft import TrainConfig


class FinetuneParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name = "pirate"  # outputs/finetune/<name>/, registered as lora-adapter-<name>
    dataset: str = "data/finetune/pirate.jsonl"
    model: ModelRef = Field(default_factory=ModelRef)
    train: TrainConfig = Field(default_factory=TrainConfig)
