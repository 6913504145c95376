"""Projection of texts onto persona vectors: its parameters (config.py) and stage (stages.py)."""

from persona_ops.pipelines.projection.stages import PIPELINE

__all__ = ["PIPELINE"]
