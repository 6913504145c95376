"""One LoRA fine-tune: its parameters (config.py) and stage (stages.py)."""

from persona_ops.pipelines.finetune.stages import PIPELINE

__all__ = ["PIPELINE"]
