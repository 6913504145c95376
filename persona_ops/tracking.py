"""MLflow tracking for persona-ops: the only module that talks to MLflow.

Runs are created with ``MlflowClient`` and an explicit run id, never through
MLflow's thread-local "active run" stack: Prefect runs tasks on a thread pool
(where ``start_run(nested=True)`` silently loses its parent) and DVC runs stages
as subprocesses, so the parent is always passed explicitly -- as an argument or
through ``$PERSONA_OPS_PARENT_RUN_ID``.

Store: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project_root>/mlflow.db``.
With a SQLite URI each new experiment's artifacts go to ``<cwd>/mlruns/<id>``
(absolute, fixed at creation), so run from the project root; ``mlflow/start-server.sh``
serves that same directory.

Provenance (DESIGN principle 3): runs carry ``git.commit``, ``model``,
``input.<path>.sha256`` and ``dvc.<path>.md5`` tags, and DVC dependencies are
logged as dataset inputs whose digest is DVC's md5, so MLflow and ``dvc.lock``
name the same bytes. DVC writes the lock only after a stage succeeds, so in-stage
lock entries are checked against the files and :func:`refresh_dvc_tags` re-tags
the stage runs once ``dvc repro`` is done.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_DATASET_NAME_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from persona_ops.errors import InputError
from persona_ops.io import git_commit, md5_file, sha256_path

PARENT_RUN_ENV = "PERSONA_OPS_PARENT_RUN_ID"
VECTOR_MODEL_PREFIX = "persona-vector-"
SECRET_MARKERS = ("key", "token", "secret", "password")
# Lineage tag keys embed file paths; a path is never a secret, so these skip the secret filter.
_LINEAGE_PREFIXES = ("input.", "dvc.")
_PARENT_TAG = "mlflow.parentRunId"

_configured_root: Path | None = None


# --------------------------------------------------------------------------- store


def tracking_uri(project_root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve()}/mlflow.db"


def configure(project_root: Path) -> str:
    """Point MLflow tracking and registry at the project's store; return the URI."""
    global _configured_root
    uri = tracking_uri(project_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _configured_root = Path(project_root)
    return uri


def _client(project_root: Path | None = None) -> MlflowClient:
    """A client on the project's store: ``project_root``, else the last configured root, else cwd.

    Re-checked on every call, so a changed ``$MLFLOW_TRACKING_URI`` takes effect
    (``mlflow.set_tracking_uri`` would otherwise shadow the env var for good).
    """
    root = Path(project_root) if project_root is not None else (_configured_root or Path.cwd())
    if tracking_uri(root) != mlflow.get_tracking_uri() or _configured_root is None:
        configure(root)
    return MlflowClient()


def experiment_id(name: str, *, project_root: Path | None = None) -> str:
    """Id of experiment ``name``, creating it (or restoring a deleted one) if needed."""
    client = _client(project_root)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name)
        except MlflowException:
            # Another process may have created it between our lookup and create.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        client.restore_experiment(exp.experiment_id)
    return exp.experiment_id


# --------------------------------------------------------------------------- sanitising


def is_secret(key: str) -> bool:
    """Whether a parameter name looks like it holds a credential."""
    k = key.lower()
    return any(m in k for m in SECRET_MARKERS)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys: ``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def _to_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, default=str, separators=(",", ":"))
    return str(v)


def _clip(s: str, limit: int) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _fit_key(key: str) -> str:
    """Keep keys within MLflow's limit; an over-long key keeps a hash so it stays unique."""
    if len(key) <= MAX_ENTITY_KEY_LENGTH:
        return key
    digest = hashlib.sha256(key.encode()).hexdigest()[:8]
    return key[: MAX_ENTITY_KEY_LENGTH - 9] + "~" + digest


def clean_params(params: Mapping[str, Any] | None) -> dict[str, str]:
    """Flatten, drop secrets, stringify and truncate parameters to MLflow's limits."""
    out: dict[str, str] = {}
    for k, v in flatten(params or {}).items():
        if is_secret(k):
            continue
        out[_fit_key(k)] = _clip(_to_str(v), MAX_PARAM_VAL_LENGTH)
    return out


def clean_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    """Like :func:`clean_params` for tags; lineage tags (``input.*``, ``dvc.*``) are kept."""
    out: dict[str, str] = {}
    for k, v in flatten(tags or {}).items():
        if v is None or (is_secret(k) and not k.startswith(_LINEAGE_PREFIXES)):
            continue
        out[_fit_key(k)] = _clip(_to_str(v), MAX_TAG_VAL_LENGTH)
    return out


# --------------------------------------------------------------------------- runs


@dataclass(frozen=True)
class StageRun:
    """Handle on one stage's MLflow run; every call names the run id (thread-safe)."""

    run_id: str
    experiment_id: str

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened; non-numeric values skipped)."""
        ts = int(time.time() * 1000)
        batch = [
            Metric(_fit_key(k), float(v), ts, step or 0)
            for k, v in flatten(metrics).items()
            if isinstance(v, (int, float))
        ]
        if batch:
            MlflowClient().log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log more parameters (flattened, secrets dropped)."""
        _log_params(self.run_id, params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (secret-named keys dropped, values truncated)."""
        _set_tags(self.run_id, tags)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            MlflowClient().log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            MlflowClient().log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise InputError(f"{path}: no such file or directory to log as an artifact")

    def log_lineage(self, *, model_label: str, inputs: Mapping[str, str],
                    dvc_stage: str | None, project_root: Path) -> dict[str, str]:
        """Tag the run with :func:`lineage_tags` and log the inputs as datasets; return the tags."""
        tags = lineage_tags(model_label=model_label, inputs=inputs, dvc_stage=dvc_stage,
                            project_root=project_root)
        self.set_tags(tags)
        log_dataset_inputs(self.run_id, inputs=inputs, dvc_stage=dvc_stage,
                           project_root=project_root)
        return tags


def _log_params(run_id: str, params: Mapping[str, Any] | None) -> None:
    clean = clean_params(params)
    if clean:  # log_batch splits into MLflow's 100-per-request chunks itself
        MlflowClient().log_batch(run_id, params=[Param(k, v) for k, v in clean.items()])


def _set_tags(run_id: str, tags: Mapping[str, Any] | None) -> None:
    clean = clean_tags(tags)
    if clean:
        MlflowClient().log_batch(run_id, tags=[RunTag(k, v) for k, v in clean.items()])


def _context_tags() -> dict[str, str]:
    """MLflow's usual source/user tags (what ``mlflow.start_run`` would add)."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        return resolve_tags({})
    except Exception:  # context providers are best-effort (e.g. no git)
        return {}


@contextmanager
def _run(experiment: str, run_name: str, tags: dict[str, Any], params: Mapping[str, Any] | None,
         parent_run_id: str | None, project_root: Path | None) -> Iterator[StageRun]:
    """Create a run, yield its handle, end it FINISHED / FAILED / KILLED."""
    client = _client(project_root)
    exp_id = experiment_id(experiment)
    all_tags = {**_context_tags(), **clean_tags(tags)}
    if parent_run_id:
        all_tags[_PARENT_TAG] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        _log_params(run_id, params)
        yield StageRun(run_id=run_id, experiment_id=exp_id)
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        client.set_terminated(run_id, status=status)


@contextmanager
def pipeline_run(pipeline: str, *, params: Mapping[str, Any] | None = None,
                 tags: Mapping[str, Any] | None = None,
                 project_root: Path | None = None) -> Iterator[str]:
    """Top-level run for one pipeline execution in experiment ``pipeline``; yields its run id.

    Pass the id to stage runs (``parent_run_id=`` or ``$PERSONA_OPS_PARENT_RUN_ID``).
    """
    root = Path(project_root) if project_root is not None else Path.cwd()
    base = {"git.commit": git_commit(root), "persona_ops.pipeline": pipeline}
    with _run(pipeline, pipeline, {**base, **(tags or {})}, params, None, project_root) as run:
        yield run.run_id


@contextmanager
def stage_run(stage: str, *, experiment: str, parent_run_id: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              project_root: Path | None = None) -> Iterator[StageRun]:
    """One run per stage execution, nested under ``parent_run_id`` (or ``$PERSONA_OPS_PARENT_RUN_ID``).

    Params are flattened to dotted keys, stringified, truncated; secret-named keys dropped.
    """
    if parent_run_id is None:
        parent_run_id = os.environ.get(PARENT_RUN_ENV, "").strip() or None
    root = Path(project_root) if project_root is not None else Path.cwd()
    base = {"git.commit": git_commit(root), "persona_ops.stage": stage}
    with _run(experiment, stage, {**base, **(tags or {})}, params, parent_run_id,
              project_root) as run:
        yield run


# --------------------------------------------------------------------------- lineage


def _rel(path: str | os.PathLike, project_root: Path) -> str:
    """Path relative to the project root (posix) when inside it, else as given."""
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(Path(project_root).resolve()).as_posix()
        except ValueError:
            return p.as_posix()
    return p.as_posix()


def _lock_stages(project_root: Path) -> dict[str, Any]:
    """``stages`` of ``<project_root>/dvc.lock``; empty when there is no lock."""
    lock = Path(project_root) / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise InputError(f"{lock}: invalid YAML: {e}") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    return stages if isinstance(stages, dict) else {}


def dvc_lock_stage(stage: str, project_root: Path) -> dict | None:
    """The ``dvc.lock`` entry of ``stage`` (e.g. ``vectors@evil``), or None when absent."""
    entry = _lock_stages(project_root).get(stage)
    return entry if isinstance(entry, dict) else None


def _md5s(entries: Any) -> dict[str, str]:
    return {e["path"]: str(e["md5"]) for e in entries or []
            if isinstance(e, dict) and e.get("path") and e.get("md5")}


def dvc_lock_md5s(stage: str, project_root: Path, *, verify: bool = True) -> dict[str, str]:
    """path -> md5 of the deps and outs of ``stage`` in ``dvc.lock``.

    DVC rewrites the lock only after a stage succeeds, so *inside* ``dvc repro`` the
    entry describes the previous execution. With ``verify``, file entries whose md5
    no longer matches the file on disk are left out (directories are not re-hashed).
    """
    entry = dvc_lock_stage(stage, project_root) or {}
    md5s = {**_md5s(entry.get("deps")), **_md5s(entry.get("outs"))}
    if verify:
        for path, md5 in list(md5s.items()):
            p = Path(project_root) / path
            if not md5.endswith(".dir") and (not p.is_file() or md5_file(p) != md5):
                del md5s[path]
    return md5s


def lineage_tags(*, model_label: str, inputs: Mapping[str, str], dvc_stage: str | None,
                 project_root: Path) -> dict[str, str]:
    """Standard provenance tags: git commit, model, input sha256s, DVC md5s of the stage.

    ``inputs`` maps path -> sha256. DVC tags come from ``dvc.lock`` (deps and outs of
    ``dvc_stage``); no lock or no such stage means no ``dvc.*`` tags.
    """
    tags = {"git.commit": git_commit(project_root), "model": model_label}
    for path, sha in inputs.items():
        tags[f"input.{_rel(path, project_root)}.sha256"] = sha
    if dvc_stage:
        tags["dvc.stage"] = dvc_stage  # lets refresh_dvc_tags find the run after `dvc repro`
        for path, md5 in dvc_lock_md5s(dvc_stage, project_root).items():
            tags[f"dvc.{path}.md5"] = md5
    return tags


def refresh_dvc_tags(parent_run_id: str, project_root: Path) -> int:
    """After ``dvc repro``: set ``dvc.<path>.md5`` tags from the now-current ``dvc.lock``.

    Applies to every child run of ``parent_run_id`` that carries a ``dvc.stage`` tag;
    returns how many runs were tagged. Stale in-stage values are overwritten.
    """
    client = _client(project_root)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.{_PARENT_TAG} = '{parent_run_id}'", max_results=10_000)
    n = 0
    for run in runs:
        stage = run.data.tags.get("dvc.stage")
        md5s = dvc_lock_md5s(stage, project_root, verify=False) if stage else {}
        if md5s:
            _set_tags(run.info.run_id, {f"dvc.{p}.md5": m for p, m in md5s.items()})
            n += 1
    return n


def _dataset(path: str, digest: str, project_root: Path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    abs_path = Path(path) if Path(path).is_absolute() else Path(project_root) / path
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" noise
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(abs_path.resolve()))
    # MLflow caps digests at 36 chars: a DVC md5 (".dir" included) fits, a sha256 is cut.
    return MetaDataset(source=source, name=_clip(path, MAX_DATASET_NAME_SIZE), digest=digest[:MAX_DATASET_DIGEST_SIZE])


def log_dataset_inputs(run_id: str, *, inputs: Mapping[str, str], dvc_stage: str | None,
                       project_root: Path) -> int:
    """Log each dependency as a dataset input (digest = DVC md5, else sha256); return the count."""
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    entry = dvc_lock_stage(dvc_stage, project_root) if dvc_stage else None
    fresh = dvc_lock_md5s(dvc_stage, project_root) if dvc_stage else {}
    deps = {p: ("dvc-dep", md5) for p, md5 in _md5s((entry or {}).get("deps")).items()
            if fresh.get(p) == md5}
    for path, sha in inputs.items():
        deps.setdefault(_rel(path, project_root), ("input", sha))
    batch = []
    for path, (context, digest) in deps.items():
        ds = _dataset(path, digest, project_root)
        tags = [InputTag(MLFLOW_DATASET_CONTEXT, context)]
        if dvc_stage:
            tags.append(InputTag("dvc_stage", dvc_stage))
        batch.append(DatasetInput(ds._to_mlflow_entity(), tags=tags))
    if batch:
        MlflowClient().log_inputs(run_id, datasets=batch)
    return len(batch)


# --------------------------------------------------------------------------- registry


def register_artifact_dir(name: str, path: str | os.PathLike, *, model_type: str, run_id: str,
                          tags: Mapping[str, Any] | None = None, alias: str | None = "candidate",
                          params: Mapping[str, Any] | None = None) -> int:
    """Register a directory of raw files as a new version of model ``name``; return the version.

    Goes through a LoggedModel (``models:/m-...``) because ``register_model("runs:/...")``
    needs an MLmodel file. The version gets ``tags``; ``alias`` (if any) moves to it.
    """
    path = Path(path)
    if not path.is_dir():
        raise InputError(f"{path}: expected a directory to register as {name}")
    client = _client()
    run = client.get_run(run_id)
    clean = clean_tags(tags)
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=clean, params=clean_params(params) or None,
        model_type=model_type, experiment_id=run.info.experiment_id)
    try:
        client.log_model_artifacts(model.model_id, str(path))
    except BaseException:
        mlflow.finalize_logged_model(model.model_id, "FAILED")
        raise
    mlflow.finalize_logged_model(model.model_id, "READY")
    mv = mlflow.register_model(f"models:/{model.model_id}", name, tags=clean)
    client.set_registered_model_tag(name, "persona_ops.model_type", model_type)
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return int(mv.version)


def _sidecar_model(sidecar: Path) -> str | None:
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    model = meta.get("model") if isinstance(meta, dict) else None
    return model if isinstance(model, str) else None


def register_vector(vector_path: str | os.PathLike, *, trait: str, run_id: str,
                    tags: Mapping[str, Any] | None = None, alias: str | None = "candidate",
                    model_label: str | None = None, dvc_md5: str | None = None,
                    project_root: Path | None = None) -> int:
    """Register a persona-vector safetensors file (+ ``<stem>.json`` sidecar) as ``persona-vector-<trait>``.

    Version tags: ``sha256`` of the file, ``model`` (argument, ``tags["model"]`` or the
    sidecar's ``model``), ``dvc_md5`` (argument, ``tags["dvc_md5"]``, else the file's md5,
    which is what DVC 3 records for it), ``source.path``, ``trait``. Returns the new
    version; ``alias`` points at it.
    """
    vector_path = Path(vector_path)
    if not vector_path.is_file() or vector_path.suffix != ".safetensors":
        raise InputError(f"{vector_path}: expected an existing .safetensors persona vector")
    root = Path(project_root) if project_root is not None else Path.cwd()
    sidecar = vector_path.with_suffix(".json")
    version_tags: dict[str, Any] = dict(tags or {})
    version_tags.update({"trait": trait, "sha256": sha256_path(vector_path),
                         "source.path": _rel(vector_path.resolve(), root)})
    label = model_label or version_tags.get("model") or (
        _sidecar_model(sidecar) if sidecar.is_file() else None)
    if label:
        version_tags["model"] = label
    # Not read from dvc.lock: during `dvc repro` the lock still describes the last run.
    version_tags["dvc_md5"] = dvc_md5 or version_tags.get("dvc_md5") or md5_file(vector_path)
    with tempfile.TemporaryDirectory(prefix="persona-vector-") as tmp:
        shutil.copy2(vector_path, Path(tmp) / vector_path.name)
        if sidecar.is_file():
            shutil.copy2(sidecar, Path(tmp) / sidecar.name)
        return register_artifact_dir(f"{VECTOR_MODEL_PREFIX}{trait}", tmp,
                                     model_type="persona-vector", run_id=run_id,
                                     tags=version_tags, alias=alias)


def register_path(name: str, path: str | os.PathLike, *, run_id: str, model_label: str | None = None,
                  alias: str | None = "candidate", project_root: Path | None = None) -> int:
    """Register a stage's output (a file or a directory) under ``name``; the model type is the
    name's first two words (``persona-vector-evil`` -> ``persona-vector``, ``lora-adapter-pirate``
    -> ``lora-adapter``, ``persona-space-smollm2`` -> ``persona-space``)."""
    path = Path(path)
    if name.startswith(VECTOR_MODEL_PREFIX):
        return register_vector(path, trait=name[len(VECTOR_MODEL_PREFIX):], run_id=run_id,
                               model_label=model_label, alias=alias, project_root=project_root)
    root = Path(project_root) if project_root is not None else Path.cwd()
    tags = {"sha256": sha256_path(path), "source.path": _rel(path.resolve(), root)}
    if model_label:
        tags["model"] = model_label
    if path.is_file():
        tags["dvc_md5"] = md5_file(path)
    model_type = "-".join(name.split("-")[:2])
    if path.is_dir():
        return register_artifact_dir(name, path, model_type=model_type, run_id=run_id, tags=tags, alias=alias)
    with tempfile.TemporaryDirectory(prefix="persona-ops-") as tmp:
        shutil.copy2(path, Path(tmp) / path.name)
        return register_artifact_dir(name, tmp, model_type=model_type, run_id=run_id, tags=tags, alias=alias)


def load_registered_vector(trait: str, alias: str = "candidate",
                           dst: str | os.PathLike | None = None) -> Path:
    """Download ``models:/persona-vector-<trait>@<alias>``; return the local safetensors path."""
    _client()
    uri = f"models:/{VECTOR_MODEL_PREFIX}{trait}@{alias}"
    try:
        local = mlflow.artifacts.download_artifacts(uri, dst_path=str(dst) if dst else None)
    except MlflowException as e:
        raise InputError(f"{uri}: cannot load ({e.message})") from None
    files = sorted(Path(local).rglob("*.safetensors"))
    if len(files) != 1:
        raise InputError(f"{uri}: expected one .safetensors file, found {len(files)}")
    return files[0]


# --------------------------------------------------------------------------- summary


def summary(experiment: str, *, alias: str = "candidate") -> dict[str, Any]:
    """What to print after a pipeline: store, experiment location, registered models at ``alias``."""
    client = _client()
    uri = mlflow.get_tracking_uri()
    exp = client.get_experiment_by_name(experiment)
    exp_info = None
    if exp is not None:
        where = (f"{uri.rstrip('/')}/#/experiments/{exp.experiment_id}"
                 if uri.startswith(("http://", "https://")) else exp.artifact_location)
        exp_info = {"name": exp.name, "id": exp.experiment_id, "location": where}
    models = []
    for rm in client.search_registered_models():
        entry: dict[str, Any] = {"name": rm.name, "alias": alias, "version": None}
        if alias in (rm.aliases or {}):
            mv = client.get_model_version_by_alias(rm.name, alias)
            entry.update(version=int(mv.version), source=mv.source, run_id=mv.run_id,
                         source_path=mv.tags.get("source.path"), sha256=mv.tags.get("sha256"))
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
            lines.append(f"  {m['name']}@{m['alias']} = v{m['version']} "
                         f"({m.get('source_path') or m['source']})")
    return "\n".join(lines)
