"""The stage registry: one definition per stage, used by the CLI, DVC and the Prefect flows.

``persona-ops stage NAME [--item ITEM]`` runs a stage inside an MLflow run; ``dvc.yaml`` is
generated from the same definitions (``persona-ops dvc-yaml``) and a test keeps the
committed file equal to the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pydantic import BaseModel

from persona_ops.config import Params, load_params
from persona_ops.data import DEFAULT_ROLE
from persona_ops.pipelines import finetune as ft
from persona_ops.pipelines import monitoring as mon
from persona_ops.pipelines import persona_space as ps
from persona_ops.pipelines import persona_vectors as pv

ITEM = "${item}"
_PV_STAGES = ("generate", "judge", "activations", "vectors")
_PS_STAGES = ("finetune", "role_transcripts", "role_judge", "role_activations", "persona_space", "capping")
PIPELINE_STAGES = {  # what each flow runs, in order (DVC skips what is up to date)
    "persona-vectors": _PV_STAGES,
    "steering-sweep": _PV_STAGES + ("steering_sweep",),
    "projection": _PV_STAGES + ("finetune", "projection"),
    "persona-space": _PS_STAGES,
    "trajectory": _PS_STAGES + ("checkpoint_activations", "trajectory"),
}
PIPELINES = tuple(PIPELINE_STAGES)


@dataclass(frozen=True)
class StageSpec:
    """A stage: how to run it, its DVC deps (code and data), tracked params, outs and metrics."""

    name: str
    pipeline: str
    config: Callable[[Params, str | None], BaseModel]  # the parameters the stage sees
    run: Callable[[BaseModel, str | None, Path], "pv.StageResult"]
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]
    foreach: str | None = None  # params key listing the items the stage runs for
    item_key: str = ITEM  # how an item names its outputs (e.g. ${item.label})
    persist: bool = False  # keep outs when rerunning (stages that resume)

    @property
    def metrics(self) -> str:
        base = f"metrics/{self.pipeline.replace('-', '_')}"
        return f"{base}/{self.item_key}/{self.name}.json" if self.foreach else f"{base}/{self.name}.json"


# --- persona vectors (foreach trait) ----------------------------------------------------------

def _p(key: str) -> str:
    return str(pv.paths(Path("."), ITEM)[key])


def _trait(params: Params, item: str | None):
    return params.for_trait(item)


def _pv(fn):
    return lambda tp, item, root: fn(tp, root)


_TRAIT_FILE = f"${{traits.dir}}/${{traits.extract_subdir}}/{ITEM}.json"
_PER_TRAIT = f"traits.per_trait.{ITEM}"
_PV_CODE = "persona_ops/pipelines/persona_vectors.py"
_PV = dict(pipeline="persona-vectors", config=_trait, foreach="traits.names")

# --- persona space and trajectory -----------------------------------------------------------

_PS_OUT = "${persona_space.out}"
_PS_CODE = "persona_ops/pipelines/persona_space.py"
_PS = dict(pipeline="persona-space", config=lambda params, item: params.persona_space)
_PER_ROLE = dict(_PS, foreach="persona_space.roles.names")  # role stages: only what one role depends on
_ROLE_FILE = f"${{persona_space.roles.dir}}/{ITEM}.json"
_TRANSCRIPT = f"{_PS_OUT}/transcripts/{ITEM}.jsonl"
_FT = dict(pipeline="trajectory", config=lambda params, item: params.finetune)
_TRAJ = dict(pipeline="trajectory", config=lambda params, item: params.persona_space)
_PS_PARAMS = ("persona_space.model", "persona_space.roles")

SPECS: tuple[StageSpec, ...] = (
    StageSpec("generate", run=_pv(pv.generate), **_PV,
              deps=(_TRAIT_FILE, _PV_CODE, "persona_ops/inference/sampling.py", "persona_ops/inference/backends.py",
                    "persona_ops/inference/engine.py", "persona_ops/chat.py"),
              params=("model", "generate", "traits.dir", "traits.extract_subdir", "traits.neg_assistant_name",
                      _PER_TRAIT),
              outs=(_p("generations"), _p("generations").replace(".jsonl", ".provenance.json"))),
    StageSpec("judge", run=_pv(pv.judge), **_PV,
              deps=(_p("generations"), _TRAIT_FILE, "persona_ops/judge"),
              params=("judge", _PER_TRAIT),
              outs=(_p("judgements"), _p("judgements").replace(".jsonl", ".provenance.json"))),
    StageSpec("activations", run=_pv(pv.activations), **_PV,
              deps=(_p("generations"), _p("judgements"), "persona_ops/interp/capture.py"),
              params=("model", "filter", "activations", _PER_TRAIT),
              outs=(_p("activations"),)),
    StageSpec("vectors", run=_pv(pv.vectors), **_PV,
              deps=(_p("activations"), "persona_ops/interp/vectors.py"),
              params=(_PER_TRAIT,),
              outs=(_p("vectors"),)),
    StageSpec("steering_sweep", pipeline="steering-sweep", config=lambda params, item: params,
              run=lambda c, item, root: mon.steering_sweep(c, item, root), foreach="steering.traits",
              deps=(f"${{traits.dir}}/eval/{ITEM}.json", _p("vectors"), "persona_ops/pipelines/monitoring.py",
                    "persona_ops/inference/sampling.py", "persona_ops/inference/engine.py", "persona_ops/interp/interventions.py"),
              params=("model", "judge", "steering"),
              outs=(f"{mon.SWEEP_OUT}/{ITEM}",)),
    StageSpec("finetune", run=lambda c, item, root: ft.finetune(c, root), **_FT,
              deps=("${finetune.dataset}", "persona_ops/training/sft.py", "persona_ops/pipelines/finetune.py"),
              params=("finetune",),
              outs=("${finetune.out}",)),
    # per role: a new role or a changed role file reruns only that role's three stages
    StageSpec("role_transcripts", run=lambda c, item, root: ps.transcripts(c, root, role=item), **_PER_ROLE,
              deps=(_ROLE_FILE, "${persona_space.roles.questions}", "${finetune.out}",
                    _PS_CODE, "persona_ops/inference/sampling.py", "persona_ops/inference/backends.py", "persona_ops/inference/engine.py"),
              params=("persona_space.model", "persona_space.roles.instructions_limit",
                      "persona_space.roles.questions_limit", "persona_space.roles.model_name",
                      "persona_space.transcripts"),
              outs=(_TRANSCRIPT, f"{_PS_OUT}/transcripts/{ITEM}.provenance.json"), persist=True),
    StageSpec("role_judge", run=lambda c, item, root: ps.judge_roles(c, root, role=item), **_PER_ROLE,
              deps=(_TRANSCRIPT, _ROLE_FILE, "persona_ops/judge"),
              params=("persona_space.judge",),
              outs=(f"{_PS_OUT}/scores/{ITEM}.scores.jsonl", f"{_PS_OUT}/scores/{ITEM}.scores.provenance.json")),
    StageSpec("role_activations", run=lambda c, item, root: ps.role_activations(c, root, role=item), **_PER_ROLE,
              deps=(_TRANSCRIPT, "persona_ops/interp/capture.py"),
              params=("persona_space.model", "persona_space.activations", "persona_space.space"),
              outs=(f"{_PS_OUT}/activations/{ITEM}_activations.safetensors",
                    f"{_PS_OUT}/activations/{ITEM}_metadata.json"), persist=True),
    StageSpec("persona_space", run=lambda c, item, root: ps.persona_space(c, root), **_PS,
              deps=(f"{_PS_OUT}/activations", f"{_PS_OUT}/scores", "persona_ops/interp/space.py"),
              params=_PS_PARAMS + ("persona_space.vectors", "persona_space.space"),
              outs=(f"{_PS_OUT}/persona_space.safetensors", f"{_PS_OUT}/role_vectors.safetensors",
                    f"{_PS_OUT}/persona_space.metrics.json")),
    StageSpec("capping", run=lambda c, item, root: ps.capping(c, root), **_PS,
              deps=(f"{_PS_OUT}/persona_space.safetensors",
                    f"{_PS_OUT}/activations/{DEFAULT_ROLE}_activations.safetensors", "persona_ops/interp/capping.py"),
              params=("persona_space.capping",),
              outs=(f"{_PS_OUT}/capping.safetensors", f"{_PS_OUT}/capping.json")),
    # persist: a role or checkpoint added later captures only what is new (files are checked
    # against their transcripts and model before being reused)
    StageSpec("checkpoint_activations", run=lambda c, item, root: ps.role_activations(c, root, checkpoint=item),
              **_TRAJ, foreach="persona_space.trajectory.checkpoints", item_key="${item.label}",
              deps=(f"{_PS_OUT}/transcripts", "${finetune.out}", "persona_ops/interp/capture.py"),
              params=_PS_PARAMS + ("persona_space.activations", "persona_space.space",
                                   "persona_space.trajectory.checkpoints"),
              outs=(f"{_PS_OUT}/checkpoints/${{item.label}}/activations",), persist=True),
    StageSpec("trajectory", run=lambda c, item, root: ps.trajectory(c, root), **_TRAJ,
              deps=(f"{_PS_OUT}/persona_space.safetensors", f"{_PS_OUT}/checkpoints", _PS_CODE,
                    "persona_ops/reports/trajectory.py"),
              params=_PS_PARAMS + ("persona_space.vectors", "persona_space.trajectory"),
              outs=(f"{_PS_OUT}/trajectory",)),
    StageSpec("projection", pipeline="projection", config=lambda params, item: params.projection,
              run=lambda c, item, root: mon.projection(c, root),
              # the default inputs and vectors live under these; list other input files here too
              deps=(str(pv.OUT), "${finetune.out}", "persona_ops/interp/projection.py"),
              params=("projection",),
              outs=("${projection.out}",)),
)
STAGES = {s.name: s for s in SPECS}


def pipeline_stages(pipeline: str) -> list[StageSpec]:
    """The stages a pipeline's flow runs, in order."""
    return [STAGES[name] for name in PIPELINE_STAGES[pipeline]]


def stage_items(spec: StageSpec, params: Params, root: Path = Path(".")) -> list[str | None]:
    """The items a stage runs for: trait names, role names, checkpoint labels, or ``[None]``.
    Roles: ``persona_space.roles.names``, or every role file in ``roles.dir`` when it is null."""
    if spec.foreach is None:
        return [None]
    if spec.foreach == "traits.names":
        return list(params.traits.names)
    if spec.foreach == "steering.traits":
        return list(params.steering.traits)
    if spec.foreach == "persona_space.roles.names":
        return list(ps.role_names(params.persona_space, root))
    return [c.label for c in params.persona_space.trajectory.checkpoints]


def dvc_name(spec: StageSpec, params: Params, item: str | None) -> str:
    """DVC's name of one stage instance (``generate@evil``, ``checkpoint_activations@0``)."""
    if item is None:
        return spec.name
    if spec.item_key == ITEM:
        return f"{spec.name}@{item}"
    return f"{spec.name}@{stage_items(spec, params).index(item)}"


def dvc_yaml() -> dict:
    """The ``dvc.yaml`` content."""
    stages = {}
    for s in SPECS:
        body = {
            "cmd": f"persona-ops stage {s.name}" + (f" --item {s.item_key}" if s.foreach else ""),
            "deps": list(s.deps),
            "params": list(s.params),
            "outs": [{o: {"persist": True}} for o in s.outs] if s.persist else list(s.outs),
            "metrics": [{s.metrics: {"cache": False}}],
        }
        stages[s.name] = {"foreach": f"${{{s.foreach}}}", "do": body} if s.foreach else body
    return {"stages": stages}


def run_stage(name: str, item: str | None = None, *, root: Path = Path("."), params_file: str = "params.yaml",
              overrides: list[str] = ()) -> "pv.StageResult":
    """Run one stage (for one item), record it in MLflow (when enabled) and write its metrics."""
    from persona_ops.errors import InputError
    from persona_ops.io import md5_file, sha256_path, write_json

    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    spec = STAGES[name]
    params = load_params(root / params_file, overrides)
    items = stage_items(spec, params, root)
    if spec.foreach and item not in items:
        raise InputError(f"stage {name} needs --item, one of {spec.foreach}={items} (got {item!r})")
    config = spec.config(params, item)
    metrics_path = root / spec.metrics.replace(spec.item_key, str(item))
    if not params.tracking.enabled:
        result = spec.run(config, item, root)
        write_json(metrics_path, result.metrics)
        return result

    from persona_ops import tracking

    tracking.configure(root)
    run_name = dvc_name(spec, params, item)
    model = getattr(config, "params", config).model  # persona vectors: TraitParams.params.model
    label = _model_label(model)
    run_params = {"stage": name, "item": item, **config.model_dump(mode="json")}
    with tracking.stage_run(run_name, experiment=spec.pipeline, parent_run_id=None, params=run_params,
                            tags={"persona_ops.stage": name, "persona_ops.item": str(item)}) as run:
        result = spec.run(config, item, root)
        write_json(metrics_path, result.metrics)
        run.log_metrics(result.metrics)
        tags = tracking.lineage_tags(model_label=label,
                                     inputs={_rel(p, root): sha256_path(p) for p in result.inputs if p.exists()},
                                     dvc_stage=run_name, project_root=root)
        tags.update({f"dvc.{_rel(p, root)}.md5": md5_file(p) for p in result.outputs if p.is_file()})
        run.set_tags(tags)
        run.log_artifact(metrics_path)
        if params.tracking.register_vectors:
            for reg_name, path in result.register.items():
                version = tracking.register_path(reg_name, path, run_id=run.run_id, model_label=label,
                                                 alias=params.tracking.alias, project_root=root)
                run.set_tags({f"registered.{reg_name}": str(version)})
    return result


def _model_label(model) -> str:
    from persona_ops.models.loading import model_label

    label = model_label(model.name, model.revision)
    adapter = getattr(model, "adapter", None)
    return f"{label}+{adapter}" if adapter else label


def _rel(path: Path, root: Path) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path(root).resolve()))
    except ValueError:
        return str(path)
