"""The model registry: stage outputs registered as versions of a named model of a kind.

Kinds: ``persona-vector``, ``persona-space``, ``capping-spec``, ``lora-adapter``. A version holds
the output (a file, or a directory's files) with its provenance sidecar, and is tagged with the
kind, the run that made it, the output's sha256 (and DVC md5 for a file), its path and model;
the alias (``candidate``) moves to the newest, by when the stage registered it (a version
replayed from the outbox later does not take the alias from a newer one). ``models:/name@alias``
and ``models:/name/N`` resolve to a local copy (:func:`resolve`).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mlflow.exceptions import MlflowException

import mlflow
from persona_ops.errors import InputError
from persona_ops.io import md5_file, sha256_path
from persona_ops.provenance import EVALUATES_TAG
from persona_ops.tracking.clean import clean_tags
from persona_ops.tracking.outbox import link_or_copy, now_ms
from persona_ops.tracking.store import client

KIND_TAG = "persona_ops.kind"
URI = re.compile(r"^models:/(?P<name>[^@/]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")


UID_TAG = "persona_ops.run_uid"  # the run's own id, known before MLflow gives it one (see tracking.ops)
OUTPUT_TAG, REGISTERED_AT_TAG = "persona_ops.output", "persona_ops.registered_at"


def _log_dir(name: str, directory: Path, *, kind: str, run_id: str, tags: dict) -> int:
    """A new version of ``name`` holding ``directory``'s files, through a LoggedModel (a plain
    ``register_model("runs:/...")`` needs an MLmodel file)."""
    c = client()
    run = c.get_run(run_id)
    model = mlflow.initialize_logged_model(name=name, source_run_id=run_id, tags=tags, model_type=kind,
                                           experiment_id=run.info.experiment_id)
    try:
        c.log_model_artifacts(model.model_id, str(directory))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    return int(mlflow.register_model(f"models:/{model.model_id}", name, tags=tags).version)


def version_tags(path: Path, *, kind: str, source_path: str, model: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> dict[str, str]:
    """What a version of ``path`` is tagged with (its run's id is added when it is made)."""
    out = {**(tags or {}), "kind": kind, "sha256": sha256_path(path), "source.path": source_path}
    if model:
        out["model"] = model
    if path.is_file():
        out["dvc_md5"] = md5_file(path)  # what DVC 3 records for a file
    return clean_tags(out)


def stage_files(path: Path, sidecar: str | os.PathLike | None, into: Path) -> None:
    """What a version holds, laid out in ``into``: the output (file or directory) and its sidecar."""
    into.mkdir(parents=True, exist_ok=True)
    link_or_copy(path, into / path.name)
    if sidecar and Path(sidecar).is_file():
        shutil.copy2(sidecar, into / Path(sidecar).name)


def publish(name: str, directory: Path, *, kind: str, run_id: str, tags: Mapping[str, str],
            alias: str | None, run_uid: str | None = None, output: str | None = None,
            registered_at: int | None = None) -> int:
    """The version of ``name`` holding ``directory`` (staged by :func:`stage_files`), made by
    ``run_id``. With ``run_uid`` it is made once: a version that run (``output``) made already is
    returned, so a replay registers nothing twice. ``alias`` moves to it unless a version
    registered later holds it."""
    c = client()
    registered_at = registered_at or now_ms()
    tags = clean_tags({**tags, "run_id": run_id, UID_TAG: run_uid, OUTPUT_TAG: output,
                       REGISTERED_AT_TAG: registered_at})
    version = _made_by(name, run_uid, output) if run_uid else None
    if version is None:
        version = _log_dir(name, directory, kind=kind, run_id=run_id, tags=tags)
    c.set_registered_model_tag(name, KIND_TAG, kind)
    if alias and _alias_is_older(name, alias, registered_at):
        c.set_registered_model_alias(name, alias, version)
    return version


def _made_by(name: str, run_uid: str, output: str | None) -> int | None:
    found = [mv for mv in client().search_model_versions(f"name = '{name}' and tags.`{UID_TAG}` = '{run_uid}'")
             if mv.tags.get(OUTPUT_TAG) == output]
    return min(int(mv.version) for mv in found) if found else None


def _alias_is_older(name: str, alias: str, registered_at: int) -> bool:
    """Whether ``alias`` of ``name`` is unset or on a version registered before ``registered_at``."""
    try:
        mv = client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return True
    return int(mv.tags.get(REGISTERED_AT_TAG) or mv.creation_timestamp) <= registered_at


def register(name: str, path: str | os.PathLike, *, kind: str, run_id: str, source_path: str,
             model: str | None = None, sidecar: str | os.PathLike | None = None,
             alias: str | None = "candidate", tags: Mapping[str, Any] | None = None) -> int:
    """Register ``path`` (a file or a directory) as a new version of ``name`` of ``kind``; return
    the version number. ``sidecar`` (the output's provenance) is stored with it."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such output to register as {name}")
    vtags = version_tags(path, kind=kind, source_path=source_path, model=model, tags=tags)
    with tempfile.TemporaryDirectory(prefix="persona-ops-register-") as tmp:
        stage_files(path, sidecar, Path(tmp))
        return publish(name, Path(tmp), kind=kind, run_id=run_id, tags=vtags, alias=alias)


@dataclass(frozen=True)
class Version:
    """A registered version: ``uri`` pins its number (``models:/name/N``)."""

    name: str
    version: int
    tags: dict
    aliases: tuple[str, ...]
    run_id: str | None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


def version_of(uri: str) -> Version:
    """The version a ``models:/name@alias`` or ``models:/name/N`` URI names."""
    m = URI.match(uri)
    if m is None:
        raise InputError(f"{uri!r}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    c = client()
    try:
        mv = (c.get_model_version_by_alias(m["name"], m["alias"]) if m["alias"]
              else c.get_model_version(m["name"], m["version"]))
    except MlflowException as e:
        raise InputError(f"{uri}: not in the registry at {mlflow.get_registry_uri()} ({e.message})") from None
    return Version(mv.name, int(mv.version), dict(mv.tags), tuple(mv.aliases or ()), mv.tags.get("run_id") or mv.run_id)


def evaluations_of(name: str, version: int) -> list[str]:
    """The ids of the finished runs that evaluated version ``version`` of ``name`` (tagged
    ``persona_ops.evaluates = name/version``), oldest first."""
    c = client()
    query = f"tags.`{EVALUATES_TAG}` = '{name}/{version}' and attributes.status = 'FINISHED'"
    runs = c.search_runs([e.experiment_id for e in c.search_experiments()], filter_string=query,
                         order_by=["attributes.start_time ASC"])
    return [r.info.run_id for r in runs]


def resolve(uri: str, dst: str | os.PathLike | None = None) -> tuple[Path, Version]:
    """Download a registered version; returns the local path of its output (the file or
    directory that was registered, without its sidecar) and the version."""
    version = version_of(uri)
    try:
        local = Path(mlflow.artifacts.download_artifacts(version.uri, dst_path=str(dst) if dst else None))
    except MlflowException as e:
        raise InputError(f"{uri}: cannot download ({e.message})") from None
    name = Path(version.tags.get("source.path", "")).name
    candidate = local / name if name else None
    if candidate is not None and candidate.exists():
        return candidate, version
    files = [p for p in local.iterdir() if not p.name.endswith(".prov.json")]
    if len(files) != 1:
        raise InputError(f"{uri}: expected one registered output, found {sorted(p.name for p in files)}")
    return files[0], version


def summary(experiment: str, *, alias: str = "candidate", names: list[str] | None = None) -> dict[str, Any]:
    """What to print after a pipeline: the store, the experiment and the registered models at
    ``alias`` (only ``names`` when given)."""
    c = client()
    uri = mlflow.get_tracking_uri()
    exp = c.get_experiment_by_name(experiment)
    exp_info = None
    if exp is not None:
        where = (f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}"
                 if uri.startswith(("http://", "https://")) else exp.artifact_location)
        exp_info = {"name": exp.name, "id": exp.experiment_id, "location": where}
    models = []
    for rm in c.search_registered_models():
        if names is not None and rm.name not in names:
            continue
        entry: dict[str, Any] = {"name": rm.name, "alias": alias, "version": None,
                                 "kind": (rm.tags or {}).get(KIND_TAG)}
        if alias in (rm.aliases or {}):
            mv = c.get_model_version_by_alias(rm.name, alias)
            entry.update(version=int(mv.version), run_id=mv.tags.get("run_id"), source_path=mv.tags.get("source.path"),
                         sha256=mv.tags.get("sha256"))
        models.append(entry)
    return {"tracking_uri": uri, "experiment": exp_info, "registered_models": models}


def format_summary(s: Mapping[str, Any]) -> str:
    """Human-readable lines for :func:`summary`'s result."""
    lines = [f"MLflow: {s['tracking_uri']}"]
    if s.get("experiment"):
        e = s["experiment"]
        lines.append(f"experiment {e['name']} (id {e['id']}): {e['location']}")
    for m in s.get("registered_models", []):
        if m.get("version") is None:
            lines.append(f"  {m['name']}: no @{m['alias']}")
        else:
            lines.append(f"  models:/{m['name']}@{m['alias']} = v{m['version']} ({m.get('source_path')})")
    return "\n".join(lines)
