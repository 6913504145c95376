"""Prefect flows, one per declared pipeline, generated from the stage declarations.

A flow takes ``params`` (a pydantic model of the params.yaml sections its stages read, with
params.yaml's values as defaults, so the Prefect UI renders a form), ``overrides`` (``-S
key=value`` strings) and ``root`` (the project). It locks the checkout, writes the run's
parameters into params.yaml (what differs from it), checks every input before a model loads,
opens the pipeline's MLflow run and runs each stage item as a task, in order, in this process:
models stay loaded across items, DVC skips what it has and records what ran. ``params`` equal to
the defaults (what a run started without parameters gets) means "params.yaml as it is".
"""

from pathlib import Path
from typing import Optional

from prefect import flow, get_run_logger
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import Field, create_model

from flows import artifacts
from persona_ops.errors import InputError
from persona_ops.pipelines import launch, registry, runner
from persona_ops.pipelines.dvc import Workspace
from persona_ops.pipelines.params import Params, TaskRunnerCfg, load_params
from persona_ops.pipelines.stage import Pipeline
from persona_ops.pipelines.workspace import workspace_lock
from tasks.stages import check_inputs, stage_task

PROJECT = Path(__file__).resolve().parents[1]


def _defaults() -> Params:
    for path in (Path.cwd() / "params.yaml", PROJECT / "params.yaml"):
        if path.is_file():
            try:
                return load_params(path)
            except InputError:
                break
    return Params()


DEFAULTS = _defaults()


def sections(pipeline: Pipeline, params: Params = DEFAULTS, root: Path = PROJECT) -> list[str]:
    """The params.yaml sections a pipeline's stage items read, in schema order."""
    try:
        tasks = registry.plan(pipeline, params, root)
    except InputError:  # e.g. role files elsewhere: fall back to the pipeline's own stages
        tasks = [registry.Task(s, None) for s in pipeline.stages]
    used = {key.split(".")[0] for t in tasks for key in t.stage.params + ((t.stage.per_item,) if t.stage.per_item
                                                                         else ())}
    return [name for name in Params.model_fields if name in used]


def params_model(pipeline: Pipeline):
    """The pydantic model of a pipeline's flow parameter: its sections, defaulting to params.yaml."""
    fields = {name: (Params.model_fields[name].annotation, Field(default=getattr(DEFAULTS, name)))
              for name in sections(pipeline)}
    title = "".join(part.capitalize() for part in pipeline.name.split("-")) + "Params"
    return create_model(title, __doc__=f"Parameters of the {pipeline.name} pipeline (see params.yaml).", **fields)


def run_pipeline(name: str, params=None, overrides: Optional[list[str]] = None, root: str = ".",
                 stages: Optional[list[str]] = None) -> dict:
    """Run a declared pipeline (see the module docstring), or only its ``stages`` (and what they
    need); returns what ran."""
    pipeline = registry.pipeline_named(name)
    root_path = Path(root).resolve()
    given = None
    if params is not None and params.model_dump() != params_model(pipeline)().model_dump():
        given = {k: getattr(params, k) for k in type(params).model_fields}
    with workspace_lock(root_path, name):
        with launch.restored_on_error(root_path):  # rejected parameters are not left behind
            run_params = launch.prepare(root_path, given, list(overrides or []))
            tasks = registry.plan(pipeline, run_params, root_path, stages)
            ctx = runner.Context(root_path, run_params, pipeline=name)
            check_inputs(tasks, ctx)
        states: dict[str, str] = {}
        with _pipeline_run(ctx, overrides) as parent:
            ctx.parent_run_id = parent
            ctx.workspace = Workspace(root_path)
            def report(outcome: runner.Outcome) -> None:
                states[outcome.task] = outcome.state
                get_run_logger().info(f"{outcome.task}: {outcome.state}")

            elsewhere = run_params.orchestration.task_runner.kind != "thread"
            try:
                outcomes = runner.run(tasks, ctx, lambda task, c: stage_task(task, c)(task, c), report,
                                      submit=(lambda task, c: stage_task(task, c).submit(task, c)) if elsewhere
                                      else None)
            finally:
                ctx.workspace.close()
            try:
                artifacts.publish(name, outcomes, ctx, parent)
            except Exception as e:  # the results stand; only their summary in the UI is missing
                get_run_logger().warning(f"the run's Prefect artifacts were not published ({type(e).__name__}: {e})")
    return {"pipeline": name, "stages": states, "pipeline_run_id": parent, "model_loads": ctx.pool.loads}


class _pipeline_run:
    """The pipeline's MLflow run (nothing when tracking is off or the store is down)."""

    def __init__(self, ctx: runner.Context, overrides):
        self.ctx, self.overrides, self.cm = ctx, overrides, None

    def __enter__(self) -> Optional[str]:
        if not self.ctx.tracking:
            return None
        try:
            from persona_ops.io import code_state
            from persona_ops.tracking import runs, store

            store.configure(self.ctx.root)
            self.cm = runs.start_run(self.ctx.pipeline, self.ctx.pipeline, project_root=self.ctx.root,
                                     params={"overrides": " ".join(self.overrides or [])},
                                     tags={"persona_ops.entry": "prefect", "persona_ops.pipeline": self.ctx.pipeline,
                                           "git.commit": code_state(self.ctx.root)["git_commit"]})
            return self.cm.__enter__().run_id
        except Exception as e:
            get_run_logger().warning(f"MLflow is unavailable ({type(e).__name__}: {e}); the pipeline runs untracked")
            self.cm = None
            return None

    def __exit__(self, *exc) -> None:
        if self.cm is not None:
            self.cm.__exit__(*exc)


def task_runner(cfg: TaskRunnerCfg):
    """The Prefect task runner ``orchestration.task_runner`` names (see :class:`TaskRunnerCfg`)."""
    if cfg.kind == "thread":
        return ThreadPoolTaskRunner(max_workers=1)
    package = f"prefect-{cfg.kind}"
    try:
        if cfg.kind == "dask":
            from prefect_dask import DaskTaskRunner
        else:
            from prefect_ray import RayTaskRunner
    except ImportError:
        raise InputError(f"orchestration.task_runner.kind: {cfg.kind} needs {package}: pip install {package}") from None
    if cfg.kind == "ray":
        return RayTaskRunner(address=cfg.address, init_kwargs={"num_cpus": cfg.workers} if not cfg.address else None)
    if cfg.address:
        return DaskTaskRunner(address=cfg.address)
    # one thread per worker process: a stage item is one task, and torch uses the process's cores
    return DaskTaskRunner(cluster_class=cfg.cluster_class, cluster_kwargs={"n_workers": cfg.workers,
                                                                            "threads_per_worker": 1} |
                          ({} if cfg.cluster_class else {"processes": True}))


def make_flow(pipeline: Pipeline):
    """The Prefect flow of ``pipeline``, with a typed ``params`` parameter."""
    model = params_model(pipeline)

    def run(params=model(), overrides: Optional[list[str]] = None, root: str = ".",
            stages: Optional[list[str]] = None) -> dict:
        return run_pipeline(pipeline.name, params, overrides, root, stages)

    run.__name__ = run.__qualname__ = pipeline.name.replace("-", "_")
    run.__doc__ = pipeline.description
    run.__annotations__ = {"params": Optional[model], "overrides": Optional[list[str]], "root": str,
                           "stages": Optional[list[str]], "return": dict}
    # log_prints stays off: it patches print for the whole process, which breaks libraries that
    # capture their own prints (dill's code hashing in `datasets` logged whole disassemblies)
    try:
        runner_ = task_runner(DEFAULTS.orchestration.task_runner)
    except InputError:  # params.yaml names a runner this environment lacks: a run says so
        runner_ = ThreadPoolTaskRunner(max_workers=1)
    return flow(name=pipeline.name, task_runner=runner_)(run)


FLOWS = {name: make_flow(p) for name, p in registry.PIPELINES.items()}
globals().update({f.fn.__name__: f for f in FLOWS.values()})  # importable entrypoints (flows/pipelines.py:NAME)
