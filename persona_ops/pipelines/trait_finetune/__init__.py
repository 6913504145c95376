"""The trait fine-tuning matrix: its parameters (config.py) and stages (stages.py)."""

from persona_ops.pipelines.trait_finetune.stages import PIPELINE

__all__ = ["PIPELINE"]
