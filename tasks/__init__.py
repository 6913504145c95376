"""Prefect tasks: thin wrappers over the stage runner (persona_ops.pipelines.runner)."""
