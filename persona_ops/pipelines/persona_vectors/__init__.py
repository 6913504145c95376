"""The persona-vector pipeline: its parameters (config.py) and stages (stages.py)."""

from persona_ops.pipelines.persona_vectors.stages import PIPELINE

__all__ = ["PIPELINE"]
