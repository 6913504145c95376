"""The steering sweep: its parameters (config.py) and stage (stages.py)."""

from persona_ops.pipelines.steering.stages import PIPELINE

__all__ = ["PIPELINE"]
