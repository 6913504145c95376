"""Commands on files and models: ``data check``, ``vectors ...`` and ``serve-model``.

Layer convention everywhere: layer L = hidden_states[L] (0 = embeddings, L >= 1 = output of
decoder block L-1); vectors are stored as [num_layers + 1, hidden].
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from persona_ops.cli.common import fail
from persona_ops.errors import InputError

data_app = typer.Typer(no_args_is_help=True, help="Validate input data files.")
vectors_app = typer.Typer(no_args_is_help=True, help="Inspect, import and export persona vectors.")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
    app.add_typer(vectors_app, name="vectors")
    app.command("serve-model")(serve_model)


@data_app.command("check")
def data_check(paths: list[Path] = typer.Argument(..., help="Files or directories (walked for *.json, *.jsonl)."),
               ) -> None:
    """Validate trait files, role files, question lists and chat datasets (format detected).
    Prints one summary line per file, or `path[:line]: what is wrong` and exits 1."""
    from persona_ops.data import check_main

    raise typer.Exit(check_main([str(p) for p in paths]))


def serve_model(model: str = typer.Option("embedded", help="embedded | HF id[@revision] | local directory."),
                revision: Optional[str] = typer.Option(None, help="Model revision (branch, tag or commit)."),
                host: str = typer.Option("127.0.0.1", help="Bind address (loopback by default)."),
                port: int = typer.Option(8000, help="Port."),
                dtype: str = typer.Option("auto", help="auto | float32 | bfloat16 | float16."),
                device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N."),
                vector: list[str] = typer.Option([], help="NAME=FILE: a vector file requests can steer with or monitor "
                                                          "(extra_body={'steering': [{'vector': NAME, 'layer': L, "
                                                          "'coef': C}]}); checked against the model's layers and "
                                                          "hidden size."),
                adapter: list[str] = typer.Option([], help="NAME=DIR: a LoRA adapter checkpoint requests can "
                                                           "select (model=NAME or extra_body={'adapter': NAME})."),
                capping: Optional[Path] = typer.Option(None, help="A capping spec (outputs/persona_space/"
                                                       "capping.safetensors): Assistant-Axis capping on every "
                                                       "request unless it sends extra_body={'capping': False}."),
                api_key: Optional[str] = typer.Option(None, envvar="PERSONA_OPS_SERVER_API_KEY", show_default=False,
                                                      help="A key every request must send (Authorization: Bearer "
                                                           "KEY). Safer in the environment variable "
                                                           "PERSONA_OPS_SERVER_API_KEY than here: a command-line "
                                                           "argument is visible to every user of the machine (ps)."),
                served_model_name: Optional[str] = typer.Option(None, help="The model's id in /v1/models, which "
                                                                "requests name (default: id@revision)."),
                axis: list[str] = typer.Option([], help="NAME=FILE: a persona space (outputs/persona_space/persona_"
                                                        "space.safetensors) whose Assistant Axis requests can "
                                                        "monitor (extra_body={'monitor': [{'axis': NAME}]})."),
                max_batch: int = typer.Option(32, min=1, help="Completions decoded together (continuous "
                                                              "batching: requests join and leave between steps)."),
                max_queue: int = typer.Option(16, min=0, help="Requests waiting beyond those the batch holds; "
                                                              "more are refused with 429."),
                max_request_tokens: int = typer.Option(32768, min=1, help="The most n x (prompt + max_tokens) "
                                                                          "one request may take (its KV cache); "
                                                                          "more is refused with 400.")
                ) -> None:
    """Serve a local model over an OpenAI-compatible API (/v1/chat/completions, /v1/completions,
    /v1/models; streaming; continuous batching), with per-request steering, LoRA adapters,
    activation capping and per-token monitoring of persona vectors and the Assistant Axis."""
    from persona_ops.inference.server import ServerLimits, serve

    def pairs(items: list[str], what: str) -> dict[str, str]:
        bad = [x for x in items if "=" not in x]
        if bad:
            fail(InputError(f"--{what} {bad[0]!r}: expected NAME=PATH"))
        return dict(x.split("=", 1) for x in items)

    try:
        serve(model=model, revision=revision, host=host, port=port, dtype=dtype, device=device,
              vectors=pairs(vector, "vector"), adapters=pairs(adapter, "adapter"),
              capping=str(capping) if capping else None, axes=pairs(axis, "axis"), api_key=api_key or None,
              served_name=served_model_name,
              limits=ServerLimits(max_batch=max_batch, max_queue=max_queue, max_request_tokens=max_request_tokens))
    except InputError as e:
        fail(e)


@vectors_app.command("show")
def vectors_show(path: Path = typer.Argument(..., help="A persona-ops vector file (.safetensors).")) -> None:
    """Print the aggregates, shapes, per-layer norms and metadata of a vector file."""
    from persona_ops.interp.vectors import load_vector_file
    from persona_ops.names import printable

    try:
        vecs, meta = load_vector_file(path)
    except InputError as e:
        fail(e)
    for k, v in vecs.items():
        norms = ", ".join(f"{x:.2f}" for x in v.norm(dim=-1).tolist())
        typer.echo(printable(f"{k}: shape {list(v.shape)}; norm per layer: {norms}"))
    for k, v in meta.items():
        typer.echo(printable(f"{k}: {v if len(v) < 300 else v[:300] + '...'}"))


@vectors_app.command("export")
def vectors_export(path: Path = typer.Argument(..., help="A persona-ops vector file (.safetensors)."),
                   out_dir: Path = typer.Argument(..., help="Directory for {trait}_{aggregate}_diff.pt files."),
                   trait: Optional[str] = typer.Option(None, help="Trait name (default: from the file).")) -> None:
    """Export to persona_vectors' .pt layout (one [num_layers+1, hidden] tensor per file).
    The trait and aggregate names must be safe names: they become file names inside OUT_DIR."""
    from persona_ops.interp.vectors import export_pt, load_vector_file
    from persona_ops.names import check_name

    try:
        vecs, meta = load_vector_file(path)
        if trait is not None:
            check_name(trait, "trait", "--trait")
        written = export_pt(vecs, out_dir, trait or meta.get("trait", path.stem), source=path)
    except InputError as e:
        fail(e)
    for p in written:
        typer.echo(f"wrote {p}")


@vectors_app.command("import")
def vectors_import(pt_files: list[Path] = typer.Argument(..., help="persona_vectors *_diff.pt files."),
                   out: Path = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
                   trait: str = typer.Option(..., help="Trait name recorded in the file.")) -> None:
    """Import persona_vectors .pt files (read with torch.load(weights_only=True)) into one file."""
    from persona_ops.interp.vectors import import_pt, save_vectors
    from persona_ops.names import check_name

    try:
        check_name(trait, "trait", "--trait")
        vecs = import_pt(pt_files)
    except InputError as e:
        fail(e)
    save_vectors(out, vecs, {"trait": trait, "imported_from": [str(p) for p in pt_files]})
    typer.echo(f"wrote {out} ({', '.join(vecs)})")


@vectors_app.command("report")
def vectors_report(paths: list[Path] = typer.Argument(..., help="Vector files (.safetensors), e.g. "
                                                                "outputs/persona_vectors/*/vectors.safetensors."),
                   out_dir: Path = typer.Option(Path("outputs/reports/geometry"), "--out", "-o",
                                                help="Output directory."),
                   layer: int = typer.Option(20, help="Layer for the cosine matrix (hidden_states index)."),
                   aggregate: str = typer.Option("response_avg", help="prompt_avg | response_avg | prompt_last."),
                   ) -> None:
    """Cosine-similarity matrix and per-layer norms of several vectors: HTML (plotly) + PNGs."""
    from persona_ops.interp.vectors import load_vector_file
    from persona_ops.names import check_name
    from persona_ops.reports.geometry import vector_geometry_report

    vectors: dict = {}
    sources: dict[str, Path] = {}
    try:
        for p in paths:
            tensors, meta = load_vector_file(p)
            if aggregate not in tensors:
                raise InputError(f"{p}: no {aggregate!r} tensor (has {sorted(tensors)})")
            vector = tensors[aggregate]
            name = check_name(meta.get("trait", p.stem), "trait", str(p))
            if name in sources:
                raise InputError(f"{p}: trait {name!r} is also the trait of {sources[name]}, expected one file "
                                 "per trait")
            first = next(iter(sources), None)
            if first is not None and vector.shape != vectors[first].shape:
                raise InputError(f"{p}: {aggregate} shape {list(vector.shape)} differs from {sources[first]}'s "
                                 f"{list(vectors[first].shape)}, expected vectors of one model")
            vectors[name], sources[name] = vector, p
        rows = next(iter(vectors.values())).shape[0]
        if not 0 <= layer < rows:
            raise InputError(f"--layer {layer}: expected 0..{rows - 1}")
    except InputError as e:
        fail(e)
    for kind, p in vector_geometry_report(vectors, out_dir, layer).items():
        typer.echo(f"{kind}: {p}")
