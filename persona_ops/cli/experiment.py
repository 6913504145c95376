"""``persona-ops experiment train | status | evaluate | results [NAME]``: the trait fine-tuning matrix.

Without NAME the experiment is params.yaml's ``trait_finetune`` section; with NAME it is
``experiments/NAME.yaml`` (the same keys; ``name`` defaults to NAME), written into params.yaml as
``persona-ops run -S`` does, so ``dvc repro`` reproduces the last run. Each step is the
``trait-finetune`` flow restricted to its stages (and what they need, which DVC skips when it has it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from persona_ops.cli.common import fail
from persona_ops.cli.pipelines import ROOT_HELP, SET_HELP, run_flow
from persona_ops.errors import InputError

PIPELINE = "trait-finetune"
NAME_HELP = "Experiment: experiments/NAME.yaml (default: params.yaml's trait_finetune section)."


def register(app: typer.Typer) -> None:
    group = typer.Typer(no_args_is_help=True, help="The trait fine-tuning matrix: traits x strengths LoRA "
                        "fine-tunes, each evaluated on every trait (params.yaml: trait_finetune).")
    for fn in (train, status, evaluate, results):
        group.command(fn.__name__)(fn)
    app.add_typer(group, name="experiment")


def overrides(name: str | None, set_: list[str], root: Path) -> list[str]:
    """The ``-S`` overrides selecting experiment ``name`` (then the user's own)."""
    if name is None:
        return list(set_)
    from persona_ops.pipelines.params import read_params_data

    path = root / "experiments" / f"{name}.yaml"
    if not path.is_file():
        have = sorted(p.stem for p in (root / "experiments").glob("*.yaml"))
        raise InputError(f"experiment {name!r}: no {path} (experiments: {', '.join(have) or 'none'})")
    return [f"trait_finetune={json.dumps(experiment_section(name, read_params_data(path), path))}", *set_]


def experiment_section(name: str, data: dict, path: Path) -> dict:
    """The whole ``trait_finetune`` section of experiment ``name``: the file's keys over the defaults,
    every key spelled out (dvc.yaml's templates read params.yaml itself)."""
    from pydantic import ValidationError

    from persona_ops.pipelines.params import describe
    from persona_ops.pipelines.trait_finetune.config import TraitFinetuneParams

    try:
        return TraitFinetuneParams.model_validate({"name": name, **data}).model_dump(mode="json")
    except ValidationError as e:
        raise InputError(describe(e, str(path))) from None


def _step(stages: list[str], name: str | None, set_: list[str], root: Path) -> dict:
    try:
        given = overrides(name, set_, root)
    except InputError as e:
        fail(e)
    return run_flow(PIPELINE, given, root, stages)


def train(name: Optional[str] = typer.Argument(None, help=NAME_HELP),
          set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP),
          root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Train every cell not trained yet from the same inputs (a rerun retrains nothing, also after
    a crash mid-matrix or from another process) and register each adapter."""
    _step(["ft_train"], name, set_, root)
    status(name, set_, root)


def evaluate(name: Optional[str] = typer.Argument(None, help=NAME_HELP),
             set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP),
             root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Evaluate the base model and every trained cell on every trait (training only what is missing)."""
    _step(["ft_base", "ft_eval"], name, set_, root)
    status(name, set_, root)


def results(name: Optional[str] = typer.Argument(None, help=NAME_HELP),
            set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP),
            root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Write eval_results.json, table.txt and report.html (evaluating what is missing); print the table."""
    from persona_ops.pipelines import registry

    _step(["ft_results"], name, set_, root)
    params = _params(name, set_, root)
    stage = registry.stage_named("ft_results")
    out = registry.outputs(stage, params, None, root)["results"]
    typer.echo((out / "table.txt").read_text(encoding="utf-8"))
    typer.echo(f"report: {out / 'report.html'}\nresults: {out / 'eval_results.json'}")


def status(name: Optional[str] = typer.Argument(None, help=NAME_HELP),
           set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP),
           root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Each cell: pending, running, succeeded or failed; its backend, job id or adapter; evaluated or not."""
    params = _params(name, set_, root)
    typer.echo(format_status(cell_status(params, root), params.trait_finetune.name))


def _params(name: str | None, set_: list[str], root: Path):
    from persona_ops.pipelines import launch

    try:
        return launch.prepare(root, None, overrides(name, set_, root), write=False)
    except InputError as e:
        fail(e)


def cell_status(params, root: Path) -> list[dict]:
    """One entry per cell: its state (see :mod:`persona_ops.training.cells`), backend,
    job id, adapter (a registry URI once registered, else the checkpoint's path) and evaluation."""
    from persona_ops.io import read_json
    from persona_ops.models.adapters import list_checkpoints
    from persona_ops.pipelines import registry
    from persona_ops.provenance import registered_version, relative
    from persona_ops.training import cells

    train, ev = registry.stage_named("ft_train"), registry.stage_named("ft_eval")
    out = []
    for item in registry.items(train, params, root):
        train_dir = registry.outputs(train, params, item, root)["model"]
        record = read_json(train_dir / cells.CELL) if (train_dir / cells.CELL).is_file() else {}
        job = read_json(train_dir / "job.json") if (train_dir / "job.json").is_file() else {}
        registered = registered_version(train_dir)
        found = list_checkpoints(train_dir)
        adapter = (f"models:/{registered}" if registered else
                   relative(found[-1][1], root) if found else record.get("model"))
        evaluated = (registry.outputs(ev, params, item, root)["eval"] / "summary.json").is_file()
        out.append({"cell": item.name, **cells.state(train_dir), "backend": record.get("backend"),
                    "job_id": job.get("job_id"), "adapter": adapter, "evaluated": evaluated})
    return out


def format_status(rows: list[dict], experiment: str) -> str:
    lines = [f"experiment {experiment}: {sum(r['state'] == 'succeeded' for r in rows)}/{len(rows)} cells trained, "
             f"{sum(r['evaluated'] for r in rows)} evaluated",
             f"  {'cell':30s} {'state':10s} {'backend':8s} {'evaluated':9s} adapter / job"]
    for r in rows:
        where = r["adapter"] or r.get("job_id") or "-"
        if r.get("job_id") and r["adapter"] != r["job_id"]:
            where = f"{where} (job {r['job_id']})"
        lines.append(f"  {r['cell']:30s} {r['state']:10s} {r['backend'] or '-':8s} "
                     f"{'yes' if r['evaluated'] else 'no':9s} {where}")
        if r["state"] == "failed" and r.get("error"):
            lines.append(f"  {'':30s} {r['error'][:200]}")
    return "\n".join(lines)
