"""Running stage items: the one execution path, whoever starts it (a Prefect flow, ``dvc repro``
through ``persona-ops stage``, or a test).

For one item the runner builds the stage's view of the params (per-item overrides merged, model
references resolved to directories), its resolved paths and a :class:`StageIO` over the run's
shared model pool; runs the stage inside an MLflow run (in the running pipeline's experiment,
nested under its run); writes the metrics file and one provenance record beside every output;
and registers the declared outputs. Tracking failures never change outputs or slow a stage down:
what MLflow does not take is kept in the project's outbox (``.persona-ops/tracking-outbox``),
with a warning, and replayed by ``persona-ops track sync`` or the next run. Given a DVC
:class:`~persona_ops.pipelines.dvc.Workspace`, an item DVC already has is skipped and a computed
item is committed to ``dvc.lock``.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from persona_ops.errors import InputError
from persona_ops.io import md5_file, write_json
from persona_ops.models.refs import REGISTRY_PREFIX, ModelRef, StageAdapter, slug
from persona_ops.names import registry_name
from persona_ops.pipelines import registry
from persona_ops.pipelines.params import Params
from persona_ops.pipelines.registry import Task
from persona_ops.pipelines.stage import Item, Stage, StageIO, View, fill
from persona_ops.provenance import make_record, relative, sidecar, write_sidecars

log = logging.getLogger(__name__)
PARENT_RUN_ENV = "PERSONA_OPS_PARENT_RUN_ID"
EXPERIMENT_ENV = "PERSONA_OPS_EXPERIMENT"


@dataclass
class Context:
    """What the stage items of one run share."""

    root: Path
    params: Params
    pool: Any = None  # persona_ops.models.pool.ModelPool, made on first use
    pipeline: str | None = None  # the running pipeline: the MLflow experiment (else the stage's own)
    parent_run_id: str | None = None
    workspace: Any = None  # persona_ops.pipelines.dvc.Workspace: skip what DVC has, commit what ran

    def __post_init__(self):
        self.root = Path(self.root)
        if self.pool is None:
            from persona_ops.models.pool import ModelPool

            self.pool = ModelPool()

    @property
    def tracking(self) -> bool:
        return self.params.tracking.enabled

    def __getstate__(self) -> dict:  # to a worker process: no models, no DVC (the flow commits)
        return {**self.__dict__, "pool": None, "workspace": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, pool=worker_pool())


_WORKER_POOL = None


def worker_pool():
    """The model pool of this worker process, shared by every item it runs."""
    global _WORKER_POOL
    if _WORKER_POOL is None:
        from persona_ops.models.pool import ModelPool

        _WORKER_POOL = ModelPool()
    return _WORKER_POOL


@dataclass
class Outcome:
    task: str
    state: str  # "ran" | "up to date"
    metrics: dict = field(default_factory=dict)
    run_id: str | None = None
    record: dict | None = None
    tracker: Any = field(default=None, repr=False, compare=False)  # the MLflow run, for the DVC md5 tags


# --- the stage's view of the params -------------------------------------------------------------

def _replace(obj: Any, key: str, value: Any) -> Any:
    """``obj`` (a pydantic model) with the value at dotted ``key`` replaced."""
    head, _, rest = key.partition(".")
    if isinstance(obj, dict):
        return {**obj, head: _replace(obj[head], rest, value) if rest else value}
    current = getattr(obj, head)
    return obj.model_copy(update={head: _replace(current, rest, value) if rest else value})


def _map_refs(value: Any, fn) -> Any:
    """``value`` with every ``ModelRef`` inside replaced by ``fn(ref)`` (others kept as they are)."""
    if isinstance(value, ModelRef):
        return fn(value)
    if isinstance(value, BaseModel):
        updates = {k: _map_refs(getattr(value, k), fn) for k in type(value).model_fields}
        changed = {k: v for k, v in updates.items() if v is not getattr(value, k)}
        return value.model_copy(update=changed) if changed else value
    if isinstance(value, dict):
        new = {k: _map_refs(v, fn) for k, v in value.items()}
        return new if any(new[k] is not value[k] for k in value) else value
    if isinstance(value, list):
        new = [_map_refs(v, fn) for v in value]
        return new if any(a is not b for a, b in zip(new, value)) else value
    return value


def resolve_ref(ref: ModelRef, where: str, params: Params, root: Path) -> ModelRef:
    """``ref`` with its adapter (a ``{stage: ...}``, a ``models:/`` URI or a project path) replaced
    by an absolute directory; ``adapter_source`` keeps the project path or the pinned URI."""
    if isinstance(ref.adapter, StageAdapter):
        from persona_ops.models.adapters import checkpoint_dir

        run_dir = registry.adapter_run_dir(ref, where, params, root)
        path = checkpoint_dir(run_dir, ref.adapter.checkpoint)
        return ref.resolved(str(path.resolve()), source=relative(path, root))
    if isinstance(ref.adapter, str) and not ref.needs_resolution and ref.adapter_source is None:
        path = Path(root) / ref.adapter
        return ref.resolved(str(path.resolve()), source=relative(path, root))
    if ref.needs_resolution:
        local, uri = registered_copy(ref.adapter, root)
        return ref.resolved(str(local.resolve()), source=uri)
    return ref


def registered_copy(uri: str, root: Path) -> tuple[Path, str]:
    """The local copy (under ``cache/registry/<name>/<version>``) of what a ``models:/`` URI names,
    and the URI pinned to its version (``models:/name/N``)."""
    from persona_ops.tracking.registry import resolve, version_of

    version = version_of(uri)
    target = Path(root) / "cache" / "registry" / version.name / str(version.version)
    if not target.exists():
        resolve(version.uri, dst=target)
    local = next(p for p in target.iterdir() if not p.name.endswith(".prov.json"))
    return local, version.uri


def registry_uris(value: Any) -> list[str]:
    """Every ``models:/`` URI string in a params value, outside model references (those are
    resolved as models)."""
    if isinstance(value, str):
        return [value] if value.startswith(REGISTRY_PREFIX) else []
    if isinstance(value, ModelRef):
        return []
    if isinstance(value, BaseModel):
        return [u for k in type(value).model_fields for u in registry_uris(getattr(value, k))]
    if isinstance(value, dict):
        return [u for v in value.values() for u in registry_uris(v)]
    if isinstance(value, (list, tuple)):
        return [u for v in value for u in registry_uris(v)]
    return []


def stage_view(stage: Stage, params: Params, item: Item | None, root: Path, resolve: bool = True
               ) -> tuple[View, Item | None]:
    """What the stage sees: the declared params (per-item overrides merged, model references
    resolved when ``resolve``) and its item (its value's model references resolved too)."""
    if stage.per_item and item is not None:
        section = stage.per_item.rsplit(".", 1)[0]
        params = _replace(params, section, registry.lookup(params, section).for_item(item.name))
    if resolve:
        for key in stage.params:
            value = registry.lookup(params, key)
            new = _map_refs(value, lambda r, k=key: resolve_ref(r, k, params, root))
            if new is not value:
                params = _replace(params, key, new)
        if item is not None and isinstance(item.value, BaseModel):
            where = f"{stage.items.each}.{item.name}"
            item = Item(item.name, _map_refs(item.value, lambda r: resolve_ref(r, where, params, root)))
    return View(params, stage.params), item


def declared_params(stage: Stage, view: View, item: Item | None) -> dict[str, Any]:
    """The declared params' values (JSON-ready): what MLflow and provenance record."""
    out = {}
    for key in stage.params:
        value = registry.lookup(view._obj, key)
        out[key] = value.model_dump(mode="json") if isinstance(value, BaseModel) else _jsonable(value)
    if item is not None:
        value = item.value
        out["item"] = value.model_dump(mode="json") if isinstance(value, BaseModel) else _jsonable(value)
    return out


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.model_dump(mode="json")
                                 if isinstance(v, BaseModel) else str(v)))


def make_io(task: Task, ctx: Context, resolve: bool = True) -> tuple[View, StageIO]:
    """The stage's view and io for one item (paths resolved, the run's model pool)."""
    view, item = stage_view(task.stage, ctx.params, task.item, ctx.root, resolve)
    io = StageIO(task.stage, item, ctx.root, registry.input_paths(task.stage, ctx.params, task.item, ctx.root),
                 registry.outputs(task.stage, ctx.params, task.item, ctx.root), ctx.pool)
    for key in task.stage.params:  # registered files named in params (e.g. a steering vector)
        for uri in registry_uris(registry.lookup(ctx.params, key)):
            try:
                local, pinned = registered_copy(uri, ctx.root)
            except InputError as e:
                raise InputError(f"{key}: {e}") from None
            io.registered[uri] = local
            io.used.append((pinned, local))
            io.extra.setdefault("registry", {})[uri] = pinned
    return view, io


# --- checks before anything runs ----------------------------------------------------------------------

def check(tasks: list[Task], ctx: Context) -> None:
    """Every input of every task exists or is made by an earlier task, every model reference
    resolves, and each stage's own input check passes; before any model is loaded."""
    made: set[Path] = set()

    def will_exist(p: Path) -> bool:
        p = p.resolve()
        return p.exists() or any(p == m or m in p.parents for m in made)

    for task in tasks:
        view, io = make_io(task, ctx, resolve=False)
        paths = [p for v in io._inputs.values() for p in (v.values() if isinstance(v, dict) else
                                                           v if isinstance(v, list) else [v])]
        for p in paths:
            if not will_exist(p):
                raise InputError(f"stage {task.name}: input {relative(p, ctx.root)} does not exist and no "
                                 "earlier stage of this run makes it")
        for where, ref in registry.model_refs(task.stage, ctx.params, task.item):
            try:
                ctx.pool.config(ref.base)  # the base model exists (its config, not its weights)
            except InputError as e:
                raise InputError(f"stage {task.name}: {where}: {e}") from None
            if isinstance(ref.adapter, StageAdapter):
                run_dir = registry.adapter_run_dir(ref, where, ctx.params, ctx.root)
                if not will_exist(run_dir):
                    raise InputError(f"{where}.adapter: stage {ref.adapter.stage} has not made "
                                     f"{relative(run_dir, ctx.root)} and does not run before this stage")
            elif ref.needs_resolution:  # fetched now (the stage uses the same copy): it must fit the model
                from persona_ops.models.adapters import check_fits

                local, uri = registered_copy(ref.adapter, ctx.root)
                try:
                    check_fits(local, ctx.pool.config(ref.base))
                except InputError as e:
                    raise InputError(f"stage {task.name}: {where}.adapter {uri}: {e}") from None
            elif ref.adapter and not will_exist(ctx.root / ref.adapter):
                raise InputError(f"{where}.adapter: {ref.adapter} does not exist and no earlier stage of this "
                                 "run makes it")
            elif ref.adapter and (ctx.root / ref.adapter).exists():
                from persona_ops.models.adapters import check_checkpoint, check_fits

                try:
                    check_fits(check_checkpoint(ctx.root / ref.adapter), ctx.pool.config(ref.base))
                except InputError as e:
                    raise InputError(f"stage {task.name}: {where}.adapter: {e}") from None
        if task.stage.check is not None:
            try:
                task.stage.check(view, io)
            except InputError as e:
                raise InputError(f"stage {task.name}: {e}") from None
        made.update(p.resolve() for p in registry.outputs(task.stage, ctx.params, task.item, ctx.root).values())


# --- running ---------------------------------------------------------------------------------------

class _Untracked:
    """The run of a stage with tracking off (or MLflow not installed): every call does nothing."""

    run_id = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


@contextmanager
def _tracked(task: Task, ctx: Context, params: dict) -> Iterator[Any]:
    """The stage's MLflow run. It never fails or waits on MLflow: what the store does not take
    (down, or gone mid-stage) is kept in the project's outbox for ``persona-ops track sync``."""
    if not ctx.tracking:
        yield _Untracked()
        return
    try:
        from persona_ops.tracking import runs
    except ImportError:  # a bare GPU box
        yield _Untracked()
        return
    experiment = ctx.pipeline or os.environ.get(EXPERIMENT_ENV) or task.stage.pipeline
    parent = ctx.parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    tags = {"persona_ops.stage": task.stage.name, "persona_ops.item": task.item.name if task.item else "",
            "persona_ops.pipeline": experiment, "dvc.stage": task.name}
    with runs.start_run(experiment, task.name, parent_run_id=parent, params=params, tags=tags,
                        project_root=ctx.root) as run:
        yield run


def _all_inputs(io: StageIO) -> list[tuple[str, Path]]:
    out = []
    for name, value in io._inputs.items():
        if isinstance(value, dict):
            out += [(f"{name}[{k}]", p) for k, p in value.items()]
        elif isinstance(value, list):
            out += [(name, p) for p in value]
        else:
            out.append((name, value))
    return [(n, p) for n, p in out + io.used if p.exists()]


def execute(task: Task, ctx: Context, **stage_kwargs) -> Outcome:
    """Run one stage item now (no DVC check): the stage, its metrics file, provenance, MLflow."""
    stage = task.stage
    view, io = make_io(task, ctx)
    metrics_path = registry.metrics_path(stage, task.item, ctx.root)
    params = declared_params(stage, view, io.item)
    with _tracked(task, ctx, params) as run:
        metrics = stage.fn(view, io, **stage_kwargs) or {}
        missing = [n for n, p in io._outputs.items() if not p.exists()]
        if missing:
            raise RuntimeError(f"stage {task.name} did not write its declared outputs {missing}")
        write_json(metrics_path, metrics)
        record = make_record(stage=stage.name, item=task.item.name if task.item else None,
                             pipeline=ctx.pipeline or stage.pipeline, run_id=run.run_id, params=params,
                             inputs=_all_inputs(io), outputs=list(io._outputs.items()), models=io.models,
                             root=ctx.root, extra=io.extra)
        write_sidecars(record, ctx.root)
        model = io.labels[0] if io.labels else None
        run.log_metrics(metrics)
        run.set_tags({"model": model, "git.commit": record["code"]["git_commit"], **io.tags,
                      **{f"input.{e['path']}.sha256": e["sha256"] for e in record["inputs"]},
                      **{f"dvc.{o['path']}.md5": md5_file(ctx.root / o["path"]) for o in record["outputs"]
                         if (ctx.root / o["path"]).is_file()}})
        run.log_inputs(record["inputs"], ctx.root)
        run.log_artifact(metrics_path)
        try:
            record["registered"] = _register(task, ctx, view, io, run, _lineage_tags(record, ctx.root))
        except Exception as e:  # the outputs stand; registering is tracking
            record["registered"] = []
            log.warning("MLflow: registering the outputs of %s failed (%s: %s)", task.name, type(e).__name__, e)
        if record["registered"]:  # the sidecars name the versions (the registered copies cannot)
            write_sidecars(record, ctx.root)
        run.log_json(record, "provenance.json")
    return Outcome(task.name, "ran", metrics, run.run_id, record, tracker=run)


def _lineage_tags(record: dict, root: Path) -> dict[str, str]:
    """What a registered version is tagged with beyond its own hash: its code version, the hash of
    every input (datasets, adapters, vectors) and the registry versions its params named."""
    return {"git.commit": record["code"]["git_commit"],
            **{f"input.{e['path']}.sha256": e["sha256"] for e in record["inputs"]},
            **{f"input.{e['path']}.md5": md5_file(root / e["path"]) for e in record["inputs"]
               if (root / e["path"]).is_file()},  # what DVC records for a file
            **{_uses_key(uri): pinned for uri, pinned in record.get("registry", {}).items()}}


def _uses_key(uri: str) -> str:
    """The tag key naming a registry URI (MLflow keys take no ``:`` or ``@``): ``uses.NAME/alias/ALIAS``."""
    return "uses." + uri.removeprefix(REGISTRY_PREFIX).replace("@", "/alias/")


def _register(task: Task, ctx: Context, view: View, io: StageIO, run, tags: dict[str, str]) -> list[dict]:
    """Register the declared outputs; the versions made now (those kept for a replay are added to
    the record when it is replayed)."""
    if not ctx.params.tracking.register_outputs or not ctx.tracking:
        return []
    from persona_ops.models.adapters import is_checkpoint, list_checkpoints

    done = []
    for reg in task.stage.registers:
        path = io.output(reg.output)
        if reg.kind == "lora-adapter" and not is_checkpoint(path) and list_checkpoints(path):
            path = list_checkpoints(path)[-1][1]  # a training run: its final checkpoint (an API job: its record)
        refs = registry.model_refs(task.stage, view._obj, io.item)  # the stage's first declared model
        model_slug = slug(refs[0][1]) if refs else "model"
        name = registry_name(fill(reg.name, _registry_fields(task, ctx, model_slug)))
        version = run.register(name, path, kind=reg.kind, source_path=relative(path, ctx.root),
                               model=io.labels[0] if io.labels else None, sidecar=sidecar(io.output(reg.output)),
                               alias=ctx.params.tracking.alias, output=reg.output, tags=tags)
        if version is not None:
            done.append({"name": name, "version": version, "kind": reg.kind, "output": reg.output})
            run.set_tags({f"registered.{name}": str(version)})
    return done


def _registry_fields(task: Task, ctx: Context, model_slug: str):
    def get(field: str) -> Any:
        if field == "item":
            return task.item.name
        if field == "model":
            return model_slug
        return registry.lookup(ctx.params, field)
    return get


def run(tasks: list[Task], ctx: Context, execute_one=None, report=None, submit=None) -> list[Outcome]:
    """Run ``tasks`` in order, each stage's consecutive items as a group: the items DVC does not
    have up to date run (``execute_one(task, ctx)``, default :func:`execute`), then are committed
    to DVC together (also those done when a later one fails) and their MLflow runs tagged with the
    lock's md5s. ``report(outcome)`` is called after each item. Without a workspace every item runs.
    ``submit(task, ctx)``, instead of ``execute_one``, starts an item elsewhere and returns a future
    (``.result()``): a group's items then run concurrently (they never depend on each other)."""
    execute_one = execute_one or execute
    outcomes: list[Outcome] = []
    for group in _groups(tasks):
        names = [t.name for t in group]
        stale = ctx.workspace.stale(names) if ctx.workspace is not None else set(names)
        futures = {t.name: submit(t, ctx) for t in group if t.name in stale} if submit else {}
        ran: list[Outcome] = []
        try:
            for task in group:
                if task.name not in stale:
                    outcome = Outcome(task.name, "up to date")
                else:
                    outcome = futures[task.name].result() if submit else execute_one(task, ctx)
                (ran if outcome.state == "ran" else []).append(outcome)
                outcomes.append(outcome)
                if report is not None:
                    report(outcome)
        finally:
            for f in futures.values():  # a failed item: the others finish and are committed
                _settle(f, ran)
            _commit(ran, ctx)
    return outcomes


def _settle(future, ran: list[Outcome]) -> None:
    try:
        outcome = future.result()
    except BaseException:
        return
    if outcome.state == "ran" and all(o.task != outcome.task for o in ran):
        ran.append(outcome)


def _groups(tasks: list[Task]) -> list[list[Task]]:
    groups: list[list[Task]] = []
    for task in tasks:
        if groups and groups[-1][0].stage is task.stage:
            groups[-1].append(task)
        else:
            groups.append([task])
    return groups


def _commit(ran: list[Outcome], ctx: Context) -> None:
    if ctx.workspace is None or not ran:
        return
    from persona_ops.pipelines.dvc import md5s

    entries = ctx.workspace.commit([o.task for o in ran])
    for o in ran:
        if o.tracker is not None:  # sent, or kept with the run's other records
            o.tracker.set_tags({f"dvc.{p}.md5": m for p, m in md5s(entries[o.task]).items()})

