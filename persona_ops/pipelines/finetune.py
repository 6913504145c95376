"""The fine-tuning stage: a LoRA SFT run on a chat dataset with adapter checkpoints every N steps.

Its checkpoints are what the trajectory pipeline replays transcripts through (the offline
default trajectory), and its final adapter is registered in MLflow as ``lora-adapter-<name>``.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.models.refs import ModelRef
from persona_ops.training.sft import TrainConfig


class FinetuneParams(BaseModel):
    """``finetune`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")
    name: str = "pirate"
    dataset: str = "data/finetune/pirate.jsonl"
    out: str = "outputs/finetune/pirate"
    model: ModelRef = Field(default_factory=ModelRef)
    train: TrainConfig = Field(default_factory=TrainConfig)


def finetune(params: FinetuneParams, root: Path):
    """Train the adapter; outputs ``<out>/checkpoint-<step>/`` and ``<out>/manifest.json``."""
    from persona_ops.data import load_chat_dataset
    from persona_ops.models.adapters import load_model_ref
    from persona_ops.pipelines.persona_vectors import StageResult
    from persona_ops.training.sft import train_lora

    root = Path(root)
    dataset_path = root / params.dataset
    dataset = load_chat_dataset(dataset_path)  # validated before the model is loaded
    loaded = load_model_ref(params.model)
    out = root / params.out
    result = train_lora(loaded, dataset, params.train, out, overwrite=True)
    losses = result.losses
    metrics = {"examples": result.num_examples, "dropped": result.num_dropped, "steps": len(losses),
               "first_loss": losses[0] if losses else float("nan"),
               "final_loss": losses[-1] if losses else float("nan"),
               "steps_per_second": result.steps_per_second, "checkpoints": len(result.checkpoints)}
    return StageResult(metrics, [dataset_path], [out],
                       register={f"lora-adapter-{params.name}": result.final_checkpoint})
