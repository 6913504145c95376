"""MLflow runs: a pipeline run and one nested run per stage execution, created with explicit
run ids (never MLflow's thread-local active run: Prefect runs tasks on threads and DVC runs
stages as subprocesses, so the parent is passed as an argument or ``$PERSONA_OPS_PARENT_RUN_ID``).

Parameters and tags are flattened, stringified and clipped to MLflow's limits; names that look
like credentials (key, token, secret, password) never reach MLflow.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.utils.validation import (
    MAX_DATASET_DIGEST_SIZE,
    MAX_DATASET_NAME_SIZE,
    MAX_ENTITY_KEY_LENGTH,
    MAX_PARAM_VAL_LENGTH,
    MAX_TAG_VAL_LENGTH,
)

from mlflow import MlflowClient
from persona_ops.errors import InputError
from persona_ops.tracking.store import client, experiment_id

PARENT_RUN_ENV = "PERSONA_OPS_PARENT_RUN_ID"
EXPERIMENT_ENV = "PERSONA_OPS_EXPERIMENT"
SECRET_MARKERS = ("key", "token", "secret", "password")
# Lineage tag keys embed file paths; a path is never a secret, so these skip the secret filter.
_LINEAGE_PREFIXES = ("input.", "dvc.")
PARENT_TAG = "mlflow.parentRunId"


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


@dataclass(frozen=True)
class StageRun:
    """Handle on one MLflow run; every call names the run id (thread-safe)."""

    run_id: str
    experiment_id: str

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened; non-numeric values skipped)."""
        ts = int(time.time() * 1000)
        batch = [Metric(_fit_key(k), float(v), ts, step or 0) for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            MlflowClient().log_batch(self.run_id, metrics=batch)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (flattened, secrets dropped)."""
        clean = clean_params(params)
        if clean:  # log_batch splits into MLflow's 100-per-request chunks itself
            MlflowClient().log_batch(self.run_id, params=[Param(k, v) for k, v in clean.items()])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (secret-named keys dropped, values truncated)."""
        clean = clean_tags(tags)
        if clean:
            MlflowClient().log_batch(self.run_id, tags=[RunTag(k, v) for k, v in clean.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            MlflowClient().log_artifacts(self.run_id, str(path), artifact_path)
        elif path.is_file():
            MlflowClient().log_artifact(self.run_id, str(path), artifact_path)
        else:
            raise InputError(f"{path}: no such file or directory to log as an artifact")

    def log_json(self, obj: Any, name: str) -> None:
        """Store a JSON document as the run artifact ``name``."""
        MlflowClient().log_dict(self.run_id, obj, name)

    def log_inputs(self, inputs: list[dict], root: Path, context: str = "input") -> int:
        """Log files as dataset inputs (``{path, sha256}`` entries; digest = DVC's md5 when known)."""
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        batch = [DatasetInput(_dataset(e["path"], e.get("md5") or e["sha256"], root)._to_mlflow_entity(),
                              tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)]) for e in inputs]
        if batch:
            MlflowClient().log_inputs(self.run_id, datasets=batch)
        return len(batch)


def _context_tags() -> dict[str, str]:
    """MLflow's usual source/user tags (what ``mlflow.start_run`` would add)."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        return resolve_tags({})
    except Exception:  # context providers are best-effort (e.g. no git)
        return {}


@contextmanager
def start_run(experiment: str, name: str, *, parent_run_id: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              project_root: Path | None = None) -> Iterator[StageRun]:
    """A run in ``experiment`` (nested under ``parent_run_id`` when given), ended FINISHED, FAILED
    or KILLED."""
    c = client(project_root)
    exp_id = experiment_id(experiment)
    all_tags = {**_context_tags(), **clean_tags(tags)}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run_id = c.create_run(exp_id, run_name=name, tags=all_tags).info.run_id
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        handle = StageRun(run_id=run_id, experiment_id=exp_id)
        if params:
            handle.log_params(params)
        yield handle
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        c.set_terminated(run_id, status=status)


def children(parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id``, in every experiment."""
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(experiments, filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)


RECORD = "provenance.json"


def run_record(run_id: str) -> dict | None:
    """The provenance record a stage run stored (None for runs without one)."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{RECORD}")
    except Exception:  # no such artifact
        return None


def _dataset(path: str, digest: str, root: Path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    abs_path = Path(path) if Path(path).is_absolute() else Path(root) / path
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" noise
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(abs_path.resolve()))
    # MLflow caps digests at 36 chars: a DVC md5 (".dir" included) fits, a sha256 is cut.
    return MetaDataset(source=source, name=_clip(path, MAX_DATASET_NAME_SIZE), digest=digest[:MAX_DATASET_DIGEST_SIZE])
