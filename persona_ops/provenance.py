"""One provenance record per stage execution, and a sidecar per output: what made each file.

A record names the stage and item, the MLflow run (when tracked), the parameters the stage
declared, every input with its sha256 and the stage run that produced it, every output with
its sha256, the models (id, revision, adapter and its hash) and the code version::

    {"schema": "persona-ops/provenance/1", "stage": "vectors", "item": "evil",
     "pipeline": "persona-vectors", "run_id": "…", "params": {"persona_vectors.filter": {…}, …},
     "inputs": [{"name": "activations", "path": "outputs/…/activations.safetensors", "sha256": "…",
                 "producer": {"stage": "activations", "item": "evil", "run_id": "…"}}],
     "outputs": [{"name": "vectors", "path": "outputs/…/vectors.safetensors", "sha256": "…"}],
     "models": [{"id": "…", "revision": "…", "adapter": null, "adapter_sha256": null, "label": "…"}],
     "code": {"version": "0.1.0", "git_commit": "…", "dirty_files": []}, "created_at": "…"}

Each output ``P`` gets the record in ``P.prov.json`` (a directory output: beside it). An
input's producer is read from the input's own sidecar (or that of the directory holding it)
when the sidecar's recorded hash is the input's current hash, so records chain back to raw
data without guessing. Paths are relative to the project root.
"""

from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path
from typing import Any, Iterable

from persona_ops import __version__
from persona_ops.io import code_state, read_json, sha256_path, write_json

SCHEMA = "persona-ops/provenance/1"
SUFFIX = ".prov.json"


EVALUATES_TAG = "persona_ops.evaluates"  # MLflow tag of a run that evaluated a registered version: name/version

def sidecar(path: str | os.PathLike) -> Path:
    """Where the provenance of ``path`` lives: ``<path>.prov.json``."""
    path = Path(path)
    return path.with_name(path.name + SUFFIX)


def relative(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` (posix) when inside it, else absolute."""
    p = Path(path).resolve()
    try:
        return p.relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return p.as_posix()


def producer_of(path: Path, root: Path, sha256: str | None = None) -> dict | None:
    """The record that made ``path`` (its sidecar, or the sidecar of a directory under ``root``
    holding it), if that record's output hash is the current one; else None."""
    path, root = Path(path).resolve(), Path(root).resolve()
    for candidate in (path, *path.parents):
        if candidate == root or root not in candidate.parents:
            return None
        side = sidecar(candidate)
        if not side.is_file():
            continue
        try:
            record = read_json(side)
        except Exception:  # an unreadable sidecar names no producer
            return None
        out = record.get("output") or {}
        current = sha256 if candidate == path and sha256 else sha256_path(candidate)
        return record if out.get("sha256") == current else None
    return None


def input_entry(name: str, path: Path, root: Path) -> dict:
    """One input of a record: path, content hash, and the stage run that produced it (if any)."""
    sha = sha256_path(path)
    made = producer_of(path, root, sha)
    producer = None
    if made is not None:
        producer = {k: made.get(k) for k in ("stage", "item", "run_id")}
    return {"name": name, "path": relative(path, root), "sha256": sha, "producer": producer}


def make_record(*, stage: str, item: str | None, pipeline: str, run_id: str | None, params: dict,
                inputs: Iterable[tuple[str, Path]], outputs: Iterable[tuple[str, Path]], models: list[dict],
                root: Path, extra: dict | None = None) -> dict:
    """The provenance record of one stage execution (inputs and outputs hashed now)."""
    return {
        "schema": SCHEMA, "stage": stage, "item": item, "pipeline": pipeline, "run_id": run_id,
        "params": params,
        "inputs": [input_entry(name, Path(p), root) for name, p in inputs],
        "outputs": [{"name": name, "path": relative(p, root), "sha256": sha256_path(p)} for name, p in outputs],
        "models": models,
        "code": {"version": __version__, **code_state(root)},
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def write_sidecars(record: dict, root: Path) -> list[Path]:
    """Write the record beside each of its outputs (``output`` names the file it describes)."""
    written = []
    for out in record["outputs"]:
        path = sidecar(Path(root) / out["path"])
        write_json(path, {**record, "output": out})
        written.append(path)
    return written


def read_sidecar(path: str | os.PathLike) -> dict[str, Any] | None:
    """The provenance record of ``path``, or None when it has none."""
    side = sidecar(path)
    return read_json(side) if side.is_file() else None


def registered_version(path: str | os.PathLike) -> str | None:
    """``name/version`` of the registry version made from output ``path`` (its provenance record),
    or None when it was not registered (yet)."""
    entries = (read_sidecar(path) or {}).get("registered")
    return f"{entries[0]['name']}/{entries[0]['version']}" if entries else None


def model_label(path: str | os.PathLike) -> str:
    """The label of the first model that made output ``path`` (``unknown`` without provenance)."""
    models = (read_sidecar(path) or {}).get("models") or []
    return models[0]["label"] if models else "unknown"
