"""Prefect flows: ``persona-vectors``, ``steering-sweep``, ``projection``, ``persona-space``, ``trajectory``.

Each validates its inputs, opens an MLflow pipeline run, and runs its stages in order as
retryable tasks, each reproducing the DVC stage of the same name. Stages that run per item
(traits, roles, checkpoints) are mapped tasks (``role_transcripts@pirate``, ...). They run
one at a time: DVC holds one lock per workspace, and the stages of one workspace share its cache.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

from prefect import flow, unmapped
from prefect.task_runners import ThreadPoolTaskRunner

from persona_ops.stages import dvc_name, pipeline_stages, stage_items
from tasks.stages import run_dvc_stage, validate_inputs


def run_pipeline(pipeline: str, overrides: list[str] | None, root: str) -> dict:
    """Validate, then run every stage of ``pipeline`` through DVC inside one MLflow pipeline run."""
    from persona_ops import tracking
    from persona_ops.config import Params

    params = Params.model_validate(validate_inputs(root, list(overrides or []), pipeline))
    if params.tracking.enabled:
        tracking.configure(Path(root))
        run = tracking.pipeline_run(pipeline, params={"overrides": " ".join(overrides or [])},
                                    tags={"persona_ops.entry": "prefect"})
    else:
        run = nullcontext(None)
    states: dict[str, str] = {}
    with run as parent_run_id:
        specs = pipeline_stages(pipeline)
        if pipeline == "persona-vectors":  # trait by trait: each trait's vector is ready early
            targets = [dvc_name(s, params, t) for t in params.traits.names for s in specs]
            for target in targets:
                states[target] = run_dvc_stage(target, root, parent_run_id)
        else:
            for spec in specs:
                targets = [dvc_name(spec, params, item) for item in stage_items(spec, params, Path(root))]
                results = run_dvc_stage.map(targets, unmapped(root), unmapped(parent_run_id)).result()
                states.update(zip(targets, results))
        for target, state in states.items():
            print(f"{target}: {state}")
        if parent_run_id:  # stage runs saw the previous dvc.lock; tag them with the new one
            tracking.refresh_dvc_tags(parent_run_id, Path(root))
    return {"pipeline": pipeline, "stages": states, "pipeline_run_id": parent_run_id,
            "traits": params.traits.names}


_RUNNER = ThreadPoolTaskRunner(max_workers=1)


@flow(name="persona-vectors", log_prints=True, task_runner=_RUNNER)
def persona_vectors(overrides: list[str] | None = None, root: str = ".") -> dict:
    """Persona vectors: generate -> judge -> activations -> vectors for each trait."""
    return run_pipeline("persona-vectors", overrides, root)


@flow(name="persona-space", log_prints=True, task_runner=_RUNNER)
def persona_space(overrides: list[str] | None = None, root: str = ".") -> dict:
    """Persona space and the Assistant Axis from the reference model's role transcripts."""
    return run_pipeline("persona-space", overrides, root)


@flow(name="trajectory", log_prints=True, task_runner=_RUNNER)
def trajectory(overrides: list[str] | None = None, root: str = ".") -> dict:
    """The persona space, then every checkpoint's activations on the same transcripts and the report."""
    return run_pipeline("trajectory", overrides, root)


@flow(name="steering-sweep", log_prints=True, task_runner=_RUNNER)
def steering_sweep(overrides: list[str] | None = None, root: str = ".") -> dict:
    """Persona vectors, then layers x coefficients x kind of steering for ``steering.traits``."""
    return run_pipeline("steering-sweep", overrides, root)


@flow(name="projection", log_prints=True, task_runner=_RUNNER)
def projection(overrides: list[str] | None = None, root: str = ".") -> dict:
    """Persona vectors, then projections of ``projection.inputs`` onto them (+ finetuning shift)."""
    return run_pipeline("projection", overrides, root)


FLOWS = {"persona-vectors": persona_vectors, "steering-sweep": steering_sweep, "projection": projection,
         "persona-space": persona_space, "trajectory": trajectory}
