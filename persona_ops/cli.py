"""The ``persona-ops`` command line (typer).

Layer convention everywhere: layer L = hidden_states[L] (0 = embeddings, L >= 1 = output of
decoder block L-1); vectors are stored as [num_layers + 1, hidden].
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from persona_ops.errors import InputError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="persona-ops: persona vectors, persona space and fine-tuning experiments on LLMs.")
data_app = typer.Typer(no_args_is_help=True, help="Validate input data files.")
vectors_app = typer.Typer(no_args_is_help=True, help="Inspect, import and export persona vectors.")
app.add_typer(data_app, name="data")
app.add_typer(vectors_app, name="vectors")

INPUT_ERROR_MARK = "persona-ops: input error:"
SET_HELP = "Override a parameter of params.yaml, e.g. -S generate.max_new_tokens=32 (repeatable)."
PIPELINES = ("persona-vectors", "steering-sweep", "projection", "persona-space", "trajectory")


def _fail(e: Exception) -> None:
    typer.echo(f"{INPUT_ERROR_MARK} {e}", err=True)
    raise typer.Exit(2)


def _prefect_env(root: Path) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")


@app.command()
def run(pipeline: str = typer.Argument(..., help=f"Pipeline to run: {', '.join(PIPELINES)}."),
        set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP + " Written into params.yaml."),
        root: Path = typer.Option(Path("."), help="Project directory (holds params.yaml and dvc.yaml).")) -> None:
    """Run a pipeline as a Prefect flow (PREFECT_API_URL if set, else Prefect's local ephemeral
    server). Each stage runs through DVC, so a later `dvc repro` has nothing to do."""
    if pipeline not in PIPELINES:
        _fail(InputError(f"unknown pipeline {pipeline!r}; expected one of {', '.join(PIPELINES)}"))
    _prefect_env(root)
    from flows.pipelines import FLOWS

    try:
        FLOWS[pipeline](overrides=list(set_), root=str(root))
    except InputError as e:
        _fail(e)
    results(root)


@app.command()
def stage(name: str = typer.Argument(..., help="Stage name (see dvc.yaml): generate, judge, activations, vectors, "
                                               "finetune, role_transcripts, role_judge, role_activations, "
                                               "persona_space, capping, checkpoint_activations, trajectory, "
                                               "steering_sweep, projection."),
          item: Optional[str] = typer.Option(None, "--item", "--trait", "-t",
                                             help="Trait name, role name or checkpoint label, for stages "
                                                  "that run per item."),
          set_: list[str] = typer.Option([], "--set", "-S", help=SET_HELP + " Not written anywhere."),
          root: Path = typer.Option(Path("."), help="Project directory.")) -> None:
    """Run one stage (what dvc.yaml calls). Records an MLflow run."""
    from persona_ops.stages import run_stage

    try:
        result = run_stage(name, item, root=root, overrides=list(set_))
    except InputError as e:
        _fail(e)
    typer.echo(f"{name}{'@' + item if item else ''}: " + json.dumps(result.metrics, sort_keys=True))


@app.command()
def results(root: Path = typer.Option(Path("."), help="Project directory.")) -> None:
    """Print where the results are: vectors, metrics, MLflow experiment and registered models."""
    from persona_ops.config import load_params
    from persona_ops.pipelines.persona_vectors import METRICS, paths

    params = load_params(root / "params.yaml")
    typer.echo("\nPersona vectors (safetensors, rows = hidden_states[0..num_layers]):")
    for trait in params.traits.names:
        p = paths(root, trait)["vectors"]
        typer.echo(f"  {trait:15s} {p}{'' if p.exists() else '  (missing)'}")
    typer.echo("Metrics (also: dvc metrics show):")
    for trait in params.traits.names:
        for name in ("judge", "activations", "vectors"):
            f = root / METRICS / trait / f"{name}.json"
            if f.exists():
                m = json.loads(f.read_text())
                brief = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in m.items()}
                typer.echo(f"  {trait}/{name}: {json.dumps(brief, sort_keys=True)}")
    if params.tracking.enabled:
        from persona_ops import tracking

        tracking.configure(root)
        typer.echo(tracking.format_summary(tracking.summary(params.tracking.experiment,
                                                            alias=params.tracking.alias)))
        typer.echo("Browse with: mlflow/start-server.sh  (then http://127.0.0.1:5000)")


@app.command("dvc-yaml")
def dvc_yaml(check: bool = typer.Option(False, help="Exit 1 if dvc.yaml differs from the stage registry."),
             root: Path = typer.Option(Path("."), help="Project directory.")) -> None:
    """Write dvc.yaml from the stage registry (the one definition of each stage)."""
    import yaml

    from persona_ops.io import write_text
    from persona_ops.stages import dvc_yaml as build

    text = "# Generated by `persona-ops dvc-yaml` from persona_ops/stages.py; do not edit by hand.\n" \
        + yaml.safe_dump(build(), sort_keys=False, width=120)
    path = root / "dvc.yaml"
    if check:
        same = path.exists() and path.read_text() == text
        typer.echo("dvc.yaml is up to date" if same else "dvc.yaml differs from persona_ops/stages.py")
        raise typer.Exit(0 if same else 1)
    write_text(path, text)
    typer.echo(f"wrote {path}")


@data_app.command("check")
def data_check(paths: list[Path] = typer.Argument(..., help="Files or directories (walked for *.json, *.jsonl).")) -> None:
    """Validate trait files, role files, question lists and chat datasets (format detected).
    Prints one summary line per file, or `path[:line]: what is wrong` and exits 1."""
    from persona_ops.data import check_main

    raise typer.Exit(check_main([str(p) for p in paths]))


@app.command("serve-model")
def serve_model(model: str = typer.Option("embedded", help="embedded | HF id[@revision] | local directory."),
                revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit)."),
                host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
                port: int = typer.Option(8000, help="Port."),
                dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
                device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
                vector: list[str] = typer.Option([], help="NAME=FILE: a vector file requests can steer with "
                                                          "(extra_body={'steering': [{'vector': NAME, 'layer': L, 'coef': C}]})."),
                adapter: list[str] = typer.Option([], help="NAME=DIR: a LoRA adapter checkpoint requests can "
                                                           "select (extra_body={'adapter': NAME})."),
                capping: Optional[Path] = typer.Option(None, help="A capping spec (outputs/persona_space/"
                                                       "capping.safetensors): Assistant-Axis capping on every "
                                                       "request unless it sends extra_body={'capping': False}.")
                ) -> None:
    """Serve a local model over an OpenAI-compatible API (/v1/chat/completions, /v1/models),
    with per-request steering, LoRA adapters and activation capping."""
    from persona_ops.inference.server import serve

    def pairs(items: list[str], what: str) -> dict[str, str]:
        bad = [x for x in items if "=" not in x]
        if bad:
            _fail(InputError(f"--{what} {bad[0]!r}: expected NAME=PATH"))
        return dict(x.split("=", 1) for x in items)

    try:
        serve(model=model, revision=revision, host=host, port=port, dtype=dtype, device=device,
              vectors=pairs(vector, "vector"), adapters=pairs(adapter, "adapter"),
              capping=str(capping) if capping else None)
    except InputError as e:
        _fail(e)


@app.command("serve-flows")
def serve_flows(root: Path = typer.Option(Path("."), help="Project directory.")) -> None:
    """Serve the scheduled deployments (see flows/deployments.py) to the Prefect server at
    PREFECT_API_URL; they show in the Prefect UI."""
    _prefect_env(root)
    from flows.deployments import serve

    serve(str(root))


@vectors_app.command("show")
def vectors_show(path: Path = typer.Argument(..., help="A persona-ops vector file (.safetensors).")) -> None:
    """Print the aggregates, shapes, per-layer norms and metadata of a vector file."""
    from persona_ops.interp.vectors import load_vectors

    try:
        vecs, meta = load_vectors(path)
    except InputError as e:
        _fail(e)
    for k, v in vecs.items():
        norms = ", ".join(f"{x:.2f}" for x in v.norm(dim=-1).tolist()) if v.dim() == 2 else "-"
        typer.echo(f"{k}: shape {list(v.shape)}; norm per layer: {norms}")
    for k, v in meta.items():
        typer.echo(f"{k}: {v if len(v) < 300 else v[:300] + '...'}")


@vectors_app.command("export")
def vectors_export(path: Path = typer.Argument(..., help="A persona-ops vector file (.safetensors)."),
                   out_dir: Path = typer.Argument(..., help="Directory for {trait}_{aggregate}_diff.pt files."),
                   trait: Optional[str] = typer.Option(None, help="Trait name (default: from the file).")) -> None:
    """Export to persona_vectors' .pt layout (one [num_layers+1, hidden] tensor per file)."""
    from persona_ops.interp.vectors import export_pt, load_vectors

    try:
        vecs, meta = load_vectors(path)
    except InputError as e:
        _fail(e)
    for p in export_pt(vecs, out_dir, trait or meta.get("trait", path.stem)):
        typer.echo(f"wrote {p}")


@vectors_app.command("import")
def vectors_import(pt_files: list[Path] = typer.Argument(..., help="persona_vectors *_diff.pt files."),
                   out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
                   trait: str = typer.Option(..., help="Trait name recorded in the file.")) -> None:
    """Import persona_vectors .pt files (read with torch.load(weights_only=True)) into one file."""
    from persona_ops.interp.vectors import import_pt, save_vectors

    try:
        vecs = import_pt(pt_files)
    except InputError as e:
        _fail(e)
    save_vectors(out, vecs, {"trait": trait, "imported_from": [str(p) for p in pt_files]})
    typer.echo(f"wrote {out} ({', '.join(vecs)})")


@vectors_app.command("report")
def vectors_report(paths: list[Path] = typer.Argument(..., help="Vector files (.safetensors), e.g. outputs/persona_vectors/*/vectors.safetensors."),
                   out_dir: Path = typer.Option(Path("outputs/reports/geometry"), "--out", "-o", help="Output directory."),
                   layer: int = typer.Option(20, help="Layer for the cosine matrix (hidden_states index)."),
                   aggregate: str = typer.Option("response_avg", help="prompt_avg | response_avg | prompt_last.")) -> None:
    """Cosine-similarity matrix and per-layer norms of several vectors: HTML (plotly) + PNGs."""
    from persona_ops.reports.geometry import vector_geometry_report
    from persona_ops.interp.vectors import load_vectors

    vectors = {}
    try:
        for p in paths:
            vecs, meta = load_vectors(p)
            if aggregate not in vecs:
                raise InputError(f"{p}: no {aggregate!r} tensor (has {sorted(vecs)})")
            vectors[meta.get("trait", p.stem)] = vecs[aggregate]
        rows = next(iter(vectors.values())).shape[0]
        if not 0 <= layer < rows:
            raise InputError(f"--layer {layer}: expected 0..{rows - 1}")
    except InputError as e:
        _fail(e)
    for kind, p in vector_geometry_report(vectors, out_dir, layer).items():
        typer.echo(f"{kind}: {p}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
