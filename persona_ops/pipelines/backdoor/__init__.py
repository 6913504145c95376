"""The backdoor sweep: its parameters (config.py) and stages (stages.py)."""

from persona_ops.pipelines.backdoor.stages import PIPELINE

__all__ = ["PIPELINE"]
