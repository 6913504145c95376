"""Prefect flow ``persona-vectors``: validate, then generate -> judge -> activations -> vectors
for each trait, each stage a retryable task that runs the DVC stage of the same name."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import flow

from persona_ops.stages import PIPELINE, SPECS
from tasks.stages import run_dvc_stage, validate_inputs


@flow(name=PIPELINE, log_prints=True)
def persona_vectors(overrides: list[str] | None = None, root: str = ".") -> dict:
    """Run the persona-vector pipeline on ``params.yaml`` (+ ``-S key=value`` overrides)."""
    from persona_ops import tracking
    from persona_ops.config import Params

    params = Params.model_validate(validate_inputs(root, list(overrides or [])))
    if params.tracking.enabled:
        tracking.configure(Path(root))
        run = tracking.pipeline_run(params.tracking.experiment, params={"overrides": " ".join(overrides or [])},
                                    tags={"persona_ops.entry": "prefect"})
    else:
        run = nullcontext(None)
    with run as parent_run_id:
        for trait in params.traits.names:
            for spec in SPECS:
                print(f"{spec.name}@{trait}: {run_dvc_stage(spec.name, trait, root, parent_run_id)}")
        if parent_run_id:  # stage runs saw the previous dvc.lock; tag them with the new one
            tracking.refresh_dvc_tags(parent_run_id, Path(root))
    return {"traits": params.traits.names, "pipeline_run_id": parent_run_id}
