"""``params.yaml``: one section per pipeline, validated by each pipeline's own config types.

``-S key=value`` overrides (the syntax of ``dvc exp run -S``) are parsed with YAML, so
``-S persona_vectors.generate.sampling.max_new_tokens=32`` and ``-S persona_vectors.traits.names=[evil]``
both work; ``key=@file.yaml`` reads the value from a file (a preset). An unknown key is an
error naming the nearest valid key. ``persona-ops run`` writes its overrides into params.yaml
in place (comments kept), as ``dvc exp run -S`` does, so ``dvc repro`` reproduces the run.
"""

from __future__ import annotations

import copy
import difflib
import io
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from persona_ops.errors import InputError
from persona_ops.io import write_text
from persona_ops.pipelines.backdoor.config import BackdoorParams
from persona_ops.pipelines.finetune.config import FinetuneParams
from persona_ops.pipelines.persona_space.config import PersonaSpaceParams
from persona_ops.pipelines.persona_vectors.config import PersonaVectorsParams
from persona_ops.pipelines.projection.config import ProjectionParams
from persona_ops.pipelines.steering.config import SteeringParams
from persona_ops.pipelines.trait_finetune.config import TraitFinetuneParams


class TrackingCfg(BaseModel):
    """MLflow: a run per stage execution, registered versions with an alias on the newest."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = True
    register_outputs: bool = True  # declared outputs become registry versions
    alias: str = "candidate"


class ScheduleCfg(BaseModel):
    """A deployment's schedule in the Prefect UI (``persona-ops serve-flows``)."""

    model_config = ConfigDict(extra="forbid")
    cron: str
    timezone: str = "UTC"
    active: bool = True


class TaskRunnerCfg(BaseModel):
    """Where a flow's stage items run. ``thread``: in the flow's process, one at a time (each model
    loaded once). ``dask`` (``pip install prefect-dask``) / ``ray`` (``pip install prefect-ray``): the
    items of a stage concurrently on workers (each worker process loads its own models), on a local
    cluster of ``workers`` processes or the cluster at ``address``; ``cluster_class`` (dask) picks
    another local cluster, e.g. ``dask_cuda.LocalCUDACluster`` (one worker per GPU). The flow's
    process alone commits to DVC."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["thread", "dask", "ray"] = "thread"
    workers: int = Field(2, ge=1)
    address: str | None = None
    cluster_class: str | None = None


class OrchestrationCfg(BaseModel):
    """Prefect: retries of transient failures (rate limits, a busy DVC lock), schedules, the task runner."""

    model_config = ConfigDict(extra="forbid")
    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(10.0, ge=0)
    schedules: dict[str, ScheduleCfg] = Field(default_factory=dict)
    task_runner: TaskRunnerCfg = Field(default_factory=TaskRunnerCfg)
    # a Prefect global concurrency limit each stage item holds a slot of while it runs (e.g. `gpu` with a
    # slot per GPU: `prefect gcl create gpu --limit 2`); a limit the server does not have is an error
    concurrency_limit: str | None = None


class Params(BaseModel):
    """Every parameter: see params.yaml for the values and what they mean."""

    model_config = ConfigDict(extra="forbid")
    persona_vectors: PersonaVectorsParams = Field(default_factory=PersonaVectorsParams)
    steering: SteeringParams = Field(default_factory=SteeringParams)
    projection: ProjectionParams = Field(default_factory=ProjectionParams)
    finetune: FinetuneParams = Field(default_factory=FinetuneParams)
    persona_space: PersonaSpaceParams = Field(default_factory=PersonaSpaceParams)
    trait_finetune: TraitFinetuneParams = Field(default_factory=TraitFinetuneParams)
    backdoor: BackdoorParams = Field(default_factory=BackdoorParams)
    tracking: TrackingCfg = Field(default_factory=TrackingCfg)
    orchestration: OrchestrationCfg = Field(default_factory=OrchestrationCfg)


# --- the schema ------------------------------------------------------------------------------------

def _unwrap(tp: Any) -> Any:
    """``X | None`` -> ``X``; ``Annotated[X, ...]`` -> ``X``."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            tp = models[0] if models else args[0]
        else:
            return tp


def field_type(key: str, model: type[BaseModel] = Params) -> Any:
    """The type at a dotted key of the schema (``None`` when the key does not exist). Inside a
    mapping (``dict[str, X]``) any key leads to ``X``."""
    tp: Any = model
    for part in key.split("."):
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            if part not in tp.model_fields:
                return None
            tp = tp.model_fields[part].annotation
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return None
    return tp


def field_exists(key: str) -> bool:
    return field_type(key) is not None


def _fields_at(loc: tuple) -> list[str]:
    tp = field_type(".".join(str(p) for p in loc)) if loc else Params
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return list(tp.model_fields)
    return []


def describe(e: ValidationError, where: str = "") -> str:
    """The first validation error as ``where: key: what is wrong`` (unknown keys: the nearest one)."""
    err = e.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    prefix = f"{where}: " if where else ""
    if err["type"] == "extra_forbidden":
        parent = tuple(p for p in loc[:-1] if isinstance(p, str))
        near = difflib.get_close_matches(str(loc[-1]), _fields_at(parent), n=1, cutoff=0.5)
        hint = f"; did you mean {'.'.join(map(str, (*loc[:-1], near[0])))}?" if near else \
            (f"; expected one of {', '.join(_fields_at(parent))}" if _fields_at(parent) else "")
        return f"{prefix}{key}: unknown key{hint}"
    got = err.get("input")
    head = f"{prefix}{key}: " if key else prefix
    msg = err["msg"].removeprefix("Value error, ")
    return f"{head}{msg} (got {got!r})" if not isinstance(got, dict) else f"{head}{msg}"


# --- reading, overriding, writing ----------------------------------------------------------------------

def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a","b","c"], yaml-parsed value); ``a.b=@file.yaml`` reads the value
    from a YAML file (e.g. a trajectory preset)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"-S {text!r}: expected key=value, e.g. -S persona_vectors.generate.batch_size=8")
    value = value.strip()
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return key.strip().split("."), yaml.safe_load(path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise InputError(f"-S {text!r}: cannot read {path}: {e}") from None
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError as e:
        raise InputError(f"-S {text!r}: the value is not valid YAML: {e}") from None
    return key.strip().split("."), parsed


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise InputError(f"-S {text!r}: {k} is not a section")
        node[keys[-1]] = _like(node.get(keys[-1]), value)
    return data


def read_params_data(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a mapping of sections, got {type(data).__name__}")
    return data


def validate_params(data: dict, where: str = "params.yaml") -> Params:
    try:
        return Params.model_validate(data)
    except ValidationError as e:
        raise InputError(describe(e, where)) from None


def load_params(path: str | Path = "params.yaml", overrides: list[str] = ()) -> Params:
    """Read and validate params.yaml (a missing file = all defaults), then apply ``-S`` overrides."""
    return validate_params(apply_overrides(read_params_data(path), list(overrides)), str(path))


def _yaml():
    from ruamel.yaml import YAML

    y = YAML()
    y.preserve_quotes = True
    y.width = 4096  # never re-wrap a line
    y.indent(mapping=2, sequence=4, offset=2)
    y.representer.add_representer(type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return y


def _like(old: Any, value: Any) -> Any:
    """``value`` as a ruamel node in the flow style ``old`` had (``[a, b]`` stays on one line)."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    flow = getattr(getattr(old, "fa", None), "flow_style", lambda: None)()
    if isinstance(value, list):
        node = CommentedSeq(_like(None, v) for v in value)
    elif isinstance(value, dict):
        node = CommentedMap((k, _like(old.get(k) if isinstance(old, dict) else None, v)) for k, v in value.items())
    else:
        return value
    if flow or (flow is None and old is None and all(not isinstance(v, (list, dict)) for v in value)):
        node.fa.set_flow_style()
    return node


def edit_params_file(path: str | Path, changes: list[tuple[list[str], Any]]) -> bool:
    """Set ``keys -> value`` in params.yaml in place, keeping its comments and layout; return
    whether the file changed. The result must validate."""
    path = Path(path)
    y = _yaml()
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    doc = y.load(text) if text.strip() else None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()
    for keys, value in changes:
        node = doc
        for k in keys[:-1]:
            if k not in node or not isinstance(node[k], dict):
                node[k] = {}
            node = node[k]
        node[keys[-1]] = _like(node.get(keys[-1]), value)
    out = io.StringIO()
    y.dump(doc, out)
    new = out.getvalue()
    validate_params(yaml.safe_load(new) or {}, str(path))
    if new == text:
        return False
    write_text(path, new)
    return True
