"""Commands that run and inspect pipelines: ``run``, ``stage``, ``results``, ``dvc-yaml``,
``lineage`` and ``serve-flows``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from persona_ops.cli.common import fail, prefect_env, quiet_input_errors
from persona_ops.errors import InputError
from persona_ops.pipelines import registry

SET_HELP = "Override a parameter of params.yaml, e.g. -S persona_vectors.generate.batch_size=8 (repeatable)."
ROOT_HELP = "Project directory (holds params.yaml and dvc.yaml)."
POOL_HELP = ("Create or update the deployments on this process work pool (created if missing) and exit, "
             "instead of serving them; `prefect worker start --pool NAME` runs their flow runs.")


def register(app: typer.Typer) -> None:
    for fn in (run, stage, results, dvc_yaml, lineage, serve_flows):
        app.command(fn.__name__.replace("_", "-"))(fn)


def run(pipeline: str = typer.Argument(..., help=f"Pipeline: {', '.join(registry.PIPELINES)}."),
        set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP + " Written into params.yaml."),
        root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Run a pipeline as a Prefect flow (PREFECT_API_URL if set, else Prefect's local ephemeral
    server): its stages and every stage item that makes their inputs, in one process (each model
    loaded once), skipping what DVC has up to date and committing what ran, so a later
    `dvc repro` has nothing to do. One run per checkout at a time."""
    run_flow(pipeline, list(set_), root)
    results(pipeline, root)


def run_flow(pipeline: str, overrides: list[str], root: Path, stages: list[str] | None = None) -> dict:
    """Check everything, then run the pipeline's flow (only ``stages`` and what they need, when given)."""
    from persona_ops.pipelines import launch, runner
    from persona_ops.pipelines.workspace import workspace_lock

    try:  # busy workspace, bad parameters, missing inputs: one line, before Prefect starts
        p = registry.pipeline_named(pipeline)
        with workspace_lock(root, pipeline):  # (the flow locks again)
            params = launch.prepare(root, None, overrides, write=False)
            runner.check(registry.plan(p, params, root, stages), runner.Context(root, params, pipeline=pipeline))
    except InputError as e:
        fail(e)
    prefect_env()
    from flows.pipelines import FLOWS, task_runner

    quiet_input_errors()

    try:
        flow = FLOWS[pipeline].with_options(task_runner=task_runner(params.orchestration.task_runner))
        outcome = flow(params=None, overrides=overrides, root=str(root), stages=stages)
    except InputError as e:
        fail(e)
    ran = sum(s == "ran" for s in outcome["stages"].values())
    typer.echo(f"{pipeline}: {ran} stage items ran, {len(outcome['stages']) - ran} up to date; "
               f"{outcome['model_loads']} model loads")
    return outcome


def stage(name: str = typer.Argument(..., help=f"Stage (see dvc.yaml): {', '.join(registry.STAGES)}."),
          item: Optional[str] = typer.Option(None, "--item", "-i", help="The item (trait, role, checkpoint "
                                                                            "label) of a stage that runs per item."),
          all_items: bool = typer.Option(False, "--all", help="Every item of the stage in this process (each model "
                                         "loaded once), skipping what DVC has, committing what ran."),
          set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP + " Not written anywhere."),
          root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Run one stage item (what dvc.yaml calls), recorded in MLflow; or with --all every item."""
    from persona_ops.pipelines import runner
    from persona_ops.pipelines.params import load_params

    try:
        params = load_params(root / "params.yaml", list(set_))
        s = registry.stage_named(name)
        if all_items:
            from persona_ops.pipelines.dvc import Workspace

            tasks = [registry.Task(s, i) for i in registry.items(s, params, root)]
            ctx = runner.Context(root, params, workspace=Workspace(root))
            runner.check(tasks, ctx)
            runner.run(tasks, ctx, report=lambda o: typer.echo(f"{o.task}: {o.state}"))
            return
        if not set_:
            _check_dvc_yaml(params, root)
        task = registry.Task(s, registry.item_named(s, params, item, root))
        ctx = runner.Context(root, params)
        runner.check([task], ctx)
        outcome = runner.execute(task, ctx)
    except InputError as e:
        fail(e)
    typer.echo(f"{outcome.task}: " + json.dumps(outcome.metrics, sort_keys=True, default=str))


def _check_dvc_yaml(params, root: Path) -> None:
    path = root / "dvc.yaml"
    if path.exists() and path.read_text(encoding="utf-8") != registry.dvc_yaml_text(params, root):
        raise InputError(f"{path} is out of date with the stage declarations and params.yaml (e.g. after "
                         "editing an adapter or an input list by hand): run `persona-ops dvc-yaml`, then `dvc repro`")


def results(pipeline: str = typer.Argument("persona-vectors", help="Pipeline whose results to show."),
            root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Where a pipeline's results are: its outputs, metrics, MLflow experiment and registered models."""
    from persona_ops.pipelines.params import load_params

    try:
        params = load_params(root / "params.yaml")
        p = registry.pipeline_named(pipeline)
        tasks = registry.plan(p, params, root)
    except InputError as e:
        fail(e)
    own = {s.name for s in p.stages}
    typer.echo(f"\n{pipeline} (layers: row L = hidden_states[L]):")
    for task in tasks:
        if task.stage.name not in own:
            continue
        outs = registry.outputs(task.stage, params, task.item, root)
        for out_name, path in outs.items():
            typer.echo(f"  {task.name:32s} {path.relative_to(root) if path.is_relative_to(root) else path}"
                       f"{'' if path.exists() else '  (missing)'}")
        metrics = registry.metrics_path(task.stage, task.item, root)
        if metrics.exists():
            m = json.loads(metrics.read_text())
            brief = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in list(m.items())[:8]}
            typer.echo(f"  {'':32s} metrics: {json.dumps(brief, sort_keys=True)}")
    if params.tracking.enabled:
        from persona_ops.tracking import registry as models
        from persona_ops.tracking import store

        try:
            store.configure(root)
            typer.echo(models.format_summary(models.summary(pipeline, alias=params.tracking.alias)))
        except Exception as e:  # the outputs are complete; only the registry listing is missing
            typer.echo(f"MLflow is unavailable ({type(e).__name__}); registered versions not shown "
                       "(what could not be sent is replayed by `persona-ops track sync`)")
            return
        typer.echo("Browse with: persona-ops ui  (the MLflow and Prefect UIs); "
                   "lineage of a result: persona-ops lineage models:/NAME@" + params.tracking.alias)


def dvc_yaml(check: bool = typer.Option(False, help="Exit 1 if dvc.yaml differs from the declarations."),
             root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Write dvc.yaml from the stage declarations and params.yaml (code deps = import closures)."""
    from persona_ops.pipelines.launch import write_dvc_yaml
    from persona_ops.pipelines.params import load_params

    try:
        params = load_params(root / "params.yaml")
        if check:
            _check_dvc_yaml(params, root)
            typer.echo("dvc.yaml is up to date")
            return
        changed = write_dvc_yaml(root, params)
    except InputError as e:
        if check:
            typer.echo(str(e), err=True)
            raise typer.Exit(1)
        fail(e)
    typer.echo(f"{'wrote' if changed else 'unchanged:'} {root / 'dvc.yaml'}")


def lineage(ref: str = typer.Argument(..., help="models:/NAME@ALIAS, models:/NAME/N, an MLflow run id, "
                                                "or an output path."),
            format: str = typer.Option("text", "--format", "-f", help="text | mermaid | dot | json | html."),
            out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write there instead of printing."),
            root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """The graph of a result: data files -> stage runs (params, code version) -> artifacts ->
    registered versions -> metrics, built only from recorded provenance and MLflow."""
    from persona_ops.reports.lineage import render
    from persona_ops.tracking.lineage import graph_of

    try:
        text = render(graph_of(ref, root), format)
    except InputError as e:
        fail(e)
    if out is None:
        typer.echo(text)
        return
    from persona_ops.io import write_text

    write_text(out, text)
    typer.echo(f"wrote {out}")


def serve_flows(root: Path = typer.Option(Path("."), help=ROOT_HELP),
                pool: str | None = typer.Option(None, "--pool", help=POOL_HELP)) -> None:
    """Serve a deployment of every pipeline (schedules from params.yaml) to the Prefect server at
    PREFECT_API_URL; they show in the Prefect UI with their parameter forms. With --pool, register
    them on a work pool for a worker to run, and exit."""
    prefect_env()
    if pool:
        from flows.deployments import register

        ids = register(str(root), pool)
        typer.echo(f"{len(ids)} deployments on work pool {pool!r}")
        return
    from flows.deployments import serve

    serve(str(root))


