"""The stage registry: one definition per stage, used by the CLI, DVC and the Prefect flows.

``persona-ops stage NAME --trait T`` runs a stage inside an MLflow run; ``dvc.yaml`` is
generated from the same definitions (``persona-ops dvc-yaml``) and a test keeps the
committed file equal to the generated one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from persona_ops.config import TraitParams, load_params
from persona_ops.pipelines import persona_vectors as pv

PIPELINE = "persona-vectors"
ITEM = "${item}"


@dataclass(frozen=True)
class StageSpec:
    """A stage: its function, DVC deps (code and data), tracked params, outs and metrics file."""

    name: str
    fn: Callable[[TraitParams, Path], "pv.StageResult"]
    deps: tuple[str, ...]
    params: tuple[str, ...]
    outs: tuple[str, ...]

    @property
    def metrics(self) -> str:
        return f"{pv.METRICS}/{ITEM}/{self.name}.json"


def _p(key: str) -> str:
    return str(pv.paths(Path("."), ITEM)[key])


_TRAIT_FILE = f"${{traits.dir}}/${{traits.extract_subdir}}/{ITEM}.json"
_PER_TRAIT = f"traits.per_trait.{ITEM}"
_CORE = "persona_ops/pipelines/persona_vectors.py"

SPECS: tuple[StageSpec, ...] = (
    StageSpec("generate", pv.generate,
              deps=(_TRAIT_FILE, _CORE, "persona_ops/generation.py", "persona_ops/chat.py"),
              params=("model", "generate", "traits.dir", "traits.extract_subdir", "traits.neg_assistant_name",
                      _PER_TRAIT),
              outs=(_p("generations"), _p("generations").replace(".jsonl", ".provenance.json"))),
    StageSpec("judge", pv.judge,
              deps=(_p("generations"), _TRAIT_FILE, "persona_ops/judge"),
              params=("judge", _PER_TRAIT),
              outs=(_p("judgements"), _p("judgements").replace(".jsonl", ".provenance.json"))),
    StageSpec("activations", pv.activations,
              deps=(_p("generations"), _p("judgements"), "persona_ops/activations.py"),
              params=("model", "filter", "activations", _PER_TRAIT),
              outs=(_p("activations"),)),
    StageSpec("vectors", pv.vectors,
              deps=(_p("activations"), "persona_ops/vectors.py"),
              params=(_PER_TRAIT,),
              outs=(_p("vectors"),)),
)
STAGES = {s.name: s for s in SPECS}


def dvc_yaml() -> dict:
    """The ``dvc.yaml`` content: one foreach stage per spec over ``traits.names``."""
    stages = {}
    for s in SPECS:
        stages[s.name] = {
            "foreach": "${traits.names}",
            "do": {
                "cmd": f"persona-ops stage {s.name} --trait {ITEM}",
                "deps": list(s.deps),
                "params": list(s.params),
                "outs": list(s.outs),
                "metrics": [{s.metrics: {"cache": False}}],
            },
        }
    return {"stages": stages}


def run_stage(name: str, trait: str, *, root: Path = Path("."), params_file: str = "params.yaml",
              overrides: list[str] = ()) -> "pv.StageResult":
    """Run one stage for one trait, record it in MLflow (when enabled) and write its metrics."""
    from persona_ops.errors import InputError
    from persona_ops.io import md5_file, sha256_path, write_json

    if name not in STAGES:
        raise InputError(f"unknown stage {name!r}; expected one of {sorted(STAGES)}")
    params = load_params(root / params_file, overrides)
    if trait not in params.traits.names:
        raise InputError(f"trait {trait!r} is not in traits.names={params.traits.names}")
    tp = params.for_trait(trait)
    spec = STAGES[name]
    metrics_path = root / spec.metrics.replace(ITEM, trait)
    if not params.tracking.enabled:
        result = spec.fn(tp, root)
        write_json(metrics_path, result.metrics)
        return result

    from persona_ops import tracking
    from persona_ops.models import model_label

    tracking.configure(root)
    run_params = {"stage": name, "trait": trait, **tp.params.model_dump(), "assistant_name": tp.assistant_name}
    with tracking.stage_run(f"{name}@{trait}", experiment=params.tracking.experiment, parent_run_id=None,
                            params=run_params, tags={"persona_ops.stage": name, "persona_ops.trait": trait}) as run:
        result = spec.fn(tp, root)
        write_json(metrics_path, result.metrics)
        run.log_metrics(result.metrics)
        tags = tracking.lineage_tags(model_label=model_label(tp.params.model.name, tp.params.model.revision),
                                     inputs={str(p.relative_to(root)): sha256_path(p) for p in result.inputs},
                                     dvc_stage=f"{name}@{trait}", project_root=root)
        tags.update({f"dvc.{p.relative_to(root)}.md5": md5_file(p) for p in result.outputs})
        run.set_tags(tags)
        run.log_artifact(metrics_path)
        if params.tracking.register_vectors:
            for reg_name, path in result.register.items():
                version = tracking.register_vector(path, trait=trait, run_id=run.run_id,
                                                   model_label=tags.get("model"), dvc_md5=md5_file(path),
                                                   alias=params.tracking.alias, project_root=root)
                run.set_tags({f"registered.{reg_name}": str(version)})
    return result
