"""Every declared stage and pipeline, and what is derived from the declarations: items, resolved
paths, what runs before what, and ``dvc.yaml`` (code dependencies = the import closure).

A pipeline lists only its own stages; the stage items that make their inputs (another stage's
output, a ``{stage: ...}`` adapter, a path another stage writes) are added before them, as
``dvc repro`` would.
"""

from __future__ import annotations

import ast
import functools
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from persona_ops.errors import InputError
from persona_ops.models.refs import ModelRef, StageAdapter
from persona_ops.names import check_name
from persona_ops.pipelines import (
    backdoor,
    finetune,
    persona_space,
    persona_vectors,
    projection,
    steering,
    trait_finetune,
)
from persona_ops.pipelines.params import Params, field_exists
from persona_ops.pipelines.stage import AllOutputs, Item, Output, ParamPaths, Pipeline, Stage, fill, template_fields

PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # holds persona_ops/
PIPELINES: dict[str, Pipeline] = {p.name: p for p in (
    persona_vectors.PIPELINE, steering.PIPELINE, projection.PIPELINE, finetune.PIPELINE,
    persona_space.PIPELINE, persona_space.TRAJECTORY, trait_finetune.PIPELINE, backdoor.PIPELINE)}
STAGES: dict[str, Stage] = {s.name: s for p in PIPELINES.values() for s in p.stages}
ITEM_FIELD = "item"
METRICS = "metrics/{pipeline}/{item}/{stage}.json"


def stage_named(name: str) -> Stage:
    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}; expected one of {', '.join(STAGES)}")
    return STAGES[name]


def pipeline_named(name: str) -> Pipeline:
    if name not in PIPELINES:
        raise InputError(f"unknown pipeline {name!r}; expected one of {', '.join(PIPELINES)}")
    return PIPELINES[name]


# --- params access ------------------------------------------------------------------------------

def lookup(params: Any, key: str) -> Any:
    """The value at a dotted params key (``persona_vectors.traits.dir``)."""
    node = params
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


# --- items ----------------------------------------------------------------------------------------

def items(stage: Stage, params: Params, root: Path = Path(".")) -> list[Item | None]:
    """The items a stage runs for (``[None]`` for a stage without items). Every name is checked
    against the safe-name pattern: names become DVC stage names, directories and shell words."""
    spec = stage.items
    if spec is None:
        return [None]
    if spec.matrix:
        keys = list(spec.matrix)
        lists = [[str(v) for v in lookup(params, spec.matrix[k])] for k in keys]
        out = [Item("-".join(combo), dict(zip(keys, combo))) for combo in itertools.product(*lists)]
    else:
        value = lookup(params, spec.each)
        if value is None and spec.default is not None:
            value = spec.default(params, Path(root))
        if isinstance(value, dict):
            out = [Item(str(k), v) for k, v in value.items()]
        else:
            out = [Item(str(v), str(v)) for v in value or []]
    names = [i.name for i in out]
    for name in names:
        check_name(name, "item", f"stage {stage.name} ({spec.each or ', '.join(spec.matrix.values())})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"stage {stage.name}: items named more than once: {', '.join(dup)}")
    return out


def item_named(stage: Stage, params: Params, name: str | None, root: Path = Path(".")) -> Item | None:
    """The item of ``stage`` called ``name`` (an InputError lists the valid ones)."""
    all_items = items(stage, params, root)
    if all_items == [None]:
        if name is not None:
            raise InputError(f"stage {stage.name} runs once; it takes no item (got {name!r})")
        return None
    for item in all_items:
        if item.name == name:
            return item
    raise InputError(f"stage {stage.name} needs an item, one of: {', '.join(i.name for i in all_items)} "
                     f"(got {name!r})")


# --- paths ------------------------------------------------------------------------------------------

def _values(params: Params, item: Item | None):
    def get(field: str) -> Any:
        if field == ITEM_FIELD:
            if item is None:
                raise ValueError("a template of a stage without items uses {item}")
            return item.name
        if field.startswith(ITEM_FIELD + "."):
            return item.value[field.split(".", 1)[1]]
        return lookup(params, field)
    return get


def output_path(stage: Stage, name: str, params: Params, item: Item | None, root: Path) -> Path:
    return Path(root) / fill(stage.outputs[name], _values(params, item))


def outputs(stage: Stage, params: Params, item: Item | None, root: Path) -> dict[str, Path]:
    return {name: output_path(stage, name, params, item, root) for name in stage.outputs}


def metrics_path(stage: Stage, item: Item | None, root: Path) -> Path:
    rel = METRICS.format(pipeline=stage.pipeline.replace("-", "_"), item=item.name if item else "", stage=stage.name)
    return Path(root) / rel.replace("//", "/")


def _producer_item(producer: Stage, template: str, params: Params, item: Item | None, root: Path) -> Item | None:
    name = fill(template, _values(params, item)) if producer.items else None
    return item_named(producer, params, name, root)


def input_paths(stage: Stage, params: Params, item: Item | None, root: Path) -> dict[str, Path | list[Path] | dict]:
    """Resolved inputs: a path, a list of paths (``ParamPaths``) or ``{item: path}`` (``AllOutputs``)."""
    out: dict[str, Any] = {}
    for name, spec in stage.inputs.items():
        if isinstance(spec, Output):
            producer = stage_named(spec.stage)
            out[name] = output_path(producer, spec.name, params, _producer_item(producer, spec.item, params, item,
                                                                                 root), root)
        elif isinstance(spec, AllOutputs):
            producer = stage_named(spec.stage)
            out[name] = {i.name: output_path(producer, spec.name, params, i, root)
                         for i in items(producer, params, root)}
        elif isinstance(spec, ParamPaths):
            out[name] = [Path(root) / p for p in _strings(lookup(params, spec.key))]
        else:
            out[name] = Path(root) / fill(spec, _values(params, item))
    return out


def _strings(value: Any) -> list[str]:
    """Every path string inside a params value (a list, a mapping's values, objects' fields)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    if hasattr(value, "model_dump"):
        return _strings(value.model_dump())
    return []


def model_refs(stage: Stage, params: Params, item: Item | None) -> list[tuple[str, ModelRef]]:
    """The model references a stage item reads: in its declared params and its item's value."""
    found = []

    def walk(where: str, value: Any) -> None:
        if isinstance(value, ModelRef):
            found.append((where, value))
        elif hasattr(value, "model_fields"):
            for k in type(value).model_fields:
                walk(f"{where}.{k}", getattr(value, k))
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(f"{where}.{k}", v)
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{where}[{i}]", v)

    for key in stage.params:
        walk(key, lookup(params, key))
    if item is not None and stage.items and stage.items.each:
        walk(f"{stage.items.each}.{item.name}", item.value)
    return found


def adapter_producer(ref: ModelRef, where: str) -> Stage:
    adapter = ref.adapter
    producer = stage_named(adapter.stage)
    if producer.adapter_output is None:
        raise InputError(f"{where}.adapter: stage {adapter.stage!r} makes no adapter")
    return producer


def adapter_run_dir(ref: ModelRef, where: str, params: Params, root: Path) -> Path:
    """The training-run directory a ``{stage: ...}`` adapter reference points at."""
    producer = adapter_producer(ref, where)
    item = item_named(producer, params, ref.adapter.item, root)
    return output_path(producer, producer.adapter_output, params, item, root)


# --- what runs before what -------------------------------------------------------------------------

@dataclass(frozen=True)
class Task:
    stage: Stage
    item: Item | None

    @property
    def name(self) -> str:
        """DVC's name of this stage instance: ``generate@evil``."""
        return f"{self.stage.name}@{self.item.name}" if self.item else self.stage.name

    @property
    def label(self) -> str:
        """How Prefect shows it: ``generate[evil]``."""
        return f"{self.stage.name}[{self.item.name}]" if self.item else self.stage.name


def _all_tasks(params: Params, root: Path) -> list[Task]:
    return [Task(s, i) for s in STAGES.values() for i in items(s, params, root)]


def _made_by(params: Params, root: Path) -> dict[Path, Task]:
    return {p.resolve(): t for t in _all_tasks(params, root)
            for p in outputs(t.stage, params, t.item, root).values()}


def _needs(task: Task, params: Params, root: Path, made: dict[Path, Task]) -> list[Task]:
    """The tasks that make ``task``'s inputs."""
    paths: list[Path] = []
    for value in input_paths(task.stage, params, task.item, root).values():
        paths += list(value.values()) if isinstance(value, dict) else (value if isinstance(value, list) else [value])
    for where, ref in model_refs(task.stage, params, task.item):
        if isinstance(ref.adapter, StageAdapter):
            paths.append(adapter_run_dir(ref, where, params, root))
        elif isinstance(ref.adapter, str) and not ref.needs_resolution:
            paths.append(Path(root) / ref.adapter)
    needs = []
    for p in paths:
        p = p.resolve()
        for candidate in (p, *p.parents):  # a file inside another stage's output directory
            if candidate in made and made[candidate] != task:
                needs.append(made[candidate])
                break
    return needs


def plan(pipeline: Pipeline, params: Params, root: Path = Path("."), stages: list[str] | None = None) -> list[Task]:
    """Every task a pipeline runs (only its ``stages`` when given, and what they need), each after
    the tasks that make its inputs; items of one stage kept together where the dependencies allow
    (the runner checks DVC and commits once per run of consecutive items of a stage)."""
    made = _made_by(params, root)
    names = [s.name for s in pipeline.stages]
    unknown = [n for n in stages or () if n not in names]
    if unknown:
        raise InputError(f"pipeline {pipeline.name} has no stage {unknown[0]!r} (its stages: {', '.join(names)})")
    own = [Task(s, i) for s in pipeline.stages if stages is None or s.name in stages for i in items(s, params, root)]
    done: list[Task] = []
    depth: dict[str, int] = {}  # 0 = needs nothing; else 1 + the deepest of what it needs

    def visit(task: Task, path: tuple[str, ...]) -> None:
        if task.name in depth:
            return
        if task.name in path:
            raise InputError(f"stages depend on each other in a circle: {' -> '.join(path + (task.name,))}")
        needs = _needs(task, params, root, made)
        for need in needs:
            visit(need, path + (task.name,))
        depth[task.name] = 1 + max((depth[n.name] for n in needs), default=-1)
        done.append(task)

    for task in own:
        visit(task, ())
    first = {}
    for t in done:
        first.setdefault(t.stage.name, len(first))
    return sorted(done, key=lambda t: (depth[t.name], first[t.stage.name]))


# --- dvc.yaml ----------------------------------------------------------------------------------------

def _dvc_template(template: str, stage: Stage) -> str:
    """A path template in DVC's syntax (``{item}`` -> ``${item}``/``${key}``; matrix keys -> ``${item.k}``)."""
    def one(field: str) -> str:
        if field == ITEM_FIELD:
            spec = stage.items
            if spec.matrix:
                return "-".join(f"${{item.{k}}}" for k in spec.matrix)
            return "${key}" if _mapping_items(stage) else "${item}"
        return f"${{{field}}}"
    return fill(template, one)


@functools.cache
def _mapping_items(stage: Stage) -> bool:
    """Whether the stage's ``each`` key holds a mapping (DVC's foreach over a dict: ``${key}``)."""
    spec = stage.items
    if not spec or not spec.each:
        return False
    from persona_ops.pipelines.params import field_type

    return getattr(field_type(spec.each), "__origin__", None) is dict


def _directory_of(template: str) -> str:
    """The directory holding every item's file of an output template."""
    head = template.split("{item", 1)[0]
    return head.rstrip("/") if head.endswith("/") else str(Path(head).parent)


def _static(value: Any) -> bool:
    return isinstance(value, str) and "{" not in value


def dvc_stage(stage: Stage, params: Params, root: Path) -> dict:
    """The ``dvc.yaml`` entry of a stage."""
    deps: list[str] = []
    for spec in stage.inputs.values():
        if isinstance(spec, Output):
            producer = stage_named(spec.stage)
            path = producer.outputs[spec.name]
            deps.append(_dvc_template(path.replace("{item}", spec.item) if spec.item != "{item}" else path,
                                      stage if spec.item == "{item}" else producer))
        elif isinstance(spec, AllOutputs):
            deps.append(_dvc_template(_directory_of(stage_named(spec.stage).outputs[spec.name]),
                                      stage_named(spec.stage)))
        elif isinstance(spec, ParamPaths):
            deps += _strings(lookup(params, spec.key))
        else:
            deps.append(_dvc_template(spec, stage))
    for item in items(stage, params, root):
        for where, ref in model_refs(stage, params, item):
            if isinstance(ref.adapter, StageAdapter):
                producer = adapter_producer(ref, where)
                dep = producer.outputs[producer.adapter_output]
                deps.append(_dvc_template(dep, producer) if "{item}" not in dep else
                            fill(dep, _values(params, item_named(producer, params, ref.adapter.item, root))))
            elif _static(ref.adapter) and not ref.needs_resolution:
                deps.append(ref.adapter)
    deps += code_deps(stage.module)
    tracked = list(stage.params)
    for spec in stage.inputs.values():  # which items an AllOutputs input covers is a parameter too
        producer = stage_named(spec.stage) if isinstance(spec, AllOutputs) else None
        if producer is not None and producer.items and producer.items.each and producer.items.each not in tracked:
            tracked.append(producer.items.each)
    if stage.per_item:
        tracked.append(f"{stage.per_item}.{_dvc_template('{item}', stage)}")
    if _mapping_items(stage):
        tracked.append(f"{stage.items.each}.${{key}}")
    outs = []
    for name, template in stage.outputs.items():
        for path in (template, template + ".prov.json"):
            path = _dvc_template(path, stage)
            outs.append({path: {"persist": True}} if name in stage.persist else path)
    metrics = METRICS.format(pipeline=stage.pipeline.replace("-", "_"),
                             item=_dvc_template("{item}", stage) if stage.items else "", stage=stage.name)
    item_arg = f" --item '{_dvc_template('{item}', stage)}'" if stage.items else ""
    body = {"cmd": f"persona-ops stage {stage.name}{item_arg}", "deps": list(dict.fromkeys(deps)),
            "params": tracked, "outs": outs, "metrics": [{metrics.replace("//", "/"): {"cache": False}}]}
    spec = stage.items
    if spec is None:
        return body
    if spec.matrix:
        return {"matrix": {k: f"${{{v}}}" for k, v in spec.matrix.items()}, **body}
    return {"foreach": f"${{{spec.each}}}", "do": body}


def dvc_yaml(params: Params, root: Path = Path(".")) -> dict:
    """The content of ``dvc.yaml``: one entry per declared stage."""
    return {"stages": {s.name: dvc_stage(s, params, root) for s in STAGES.values()}}


HEADER = ("# Generated by `persona-ops dvc-yaml` from the stage declarations (persona_ops/pipelines/) and\n"
          "# params.yaml; do not edit by hand.\n")


def dvc_yaml_text(params: Params, root: Path = Path(".")) -> str:
    import yaml

    return HEADER + yaml.safe_dump(dvc_yaml(params, root), sort_keys=False, width=120)


# --- code dependencies ---------------------------------------------------------------------------------

def _module_file(module: str) -> Path | None:
    base = PACKAGE_ROOT / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(path: Path, module: str) -> Iterator[str]:
    """Every ``persona_ops`` module ``path`` imports (at any depth of the file)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name == "persona_ops" or name.startswith("persona_ops."):
                yield name


@functools.cache
def code_deps(module: str) -> tuple[str, ...]:
    """The files of the import closure of ``module`` inside persona_ops (parent packages'
    ``__init__.py`` included: importing a module runs them), relative to the project root."""
    seen: set[str] = set()
    files: set[Path] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue  # a name imported from a module, not a module
        files.add(path)
        parts = name.split(".")
        todo += [".".join(parts[:i]) for i in range(1, len(parts))]
        todo += list(_imports(path, name))
    return tuple(sorted(p.relative_to(PACKAGE_ROOT).as_posix() for p in files))


# --- declaration checks ----------------------------------------------------------------------------------

def check_declarations() -> None:
    """Every params key and template field a declaration names exists in the params schema, every
    referenced stage and output exists; raises ``ValueError`` naming the first problem."""
    for s in STAGES.values():
        keys = list(s.params) + ([s.per_item] if s.per_item else [])
        if s.items:
            keys += [s.items.each] if s.items.each else list(s.items.matrix.values())
        templates = list(s.outputs.values()) + [v for v in s.inputs.values() if isinstance(v, str)]
        keys += [f for t in templates for f in template_fields(t) if f != ITEM_FIELD
                 and not f.startswith(ITEM_FIELD + ".")]
        keys += [v.key for v in s.inputs.values() if isinstance(v, ParamPaths)]
        for key in keys:
            if not field_exists(key):
                raise ValueError(f"stage {s.name}: unknown params key {key!r}")
        for v in s.inputs.values():
            if isinstance(v, (Output, AllOutputs)):
                if v.stage not in STAGES or v.name not in STAGES[v.stage].outputs:
                    raise ValueError(f"stage {s.name}: no output {v.name!r} of stage {v.stage!r}")


check_declarations()
