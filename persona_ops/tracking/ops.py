"""The records a run sends to MLflow, as operations (``{"op": "params", ...}``) that can wait in
the outbox, and sending one, live or replayed. Every operation is idempotent: params and tags
are set to the same values, a metric with the same key, value, time and step is stored once,
artifacts overwrite themselves, and a registration made by a run (its uid) and output is found
again instead of made twice.
"""

from __future__ import annotations

import functools
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.utils.validation import MAX_DATASET_DIGEST_SIZE, MAX_DATASET_NAME_SIZE

from persona_ops.tracking import outbox, registry
from persona_ops.tracking.clean import _clip
from persona_ops.tracking.store import client

RECORD = "provenance.json"
UID_TAG = registry.UID_TAG  # finds a replayed run (and its versions) again: a second replay makes nothing
PROCESS_PREFIX = "persona_ops.process."  # host, pid, started, boot, pidns of the run's process
ENDED_BY_TAG = "persona_ops.ended_by"  # why persona-ops, not the run's own process, ended it


def apply(op: dict, run_id: str, root: Path, *, files: Path | None = None, uid: str | None = None) -> Any:
    """Send one operation to MLflow (live, or replayed from an outbox entry whose files are in
    ``files``); a registration returns the version. Every operation is idempotent."""
    c = client(root)
    kind = op["op"]
    if kind == "params":  # log_batch splits into MLflow's 100-per-request chunks itself
        c.log_batch(run_id, params=[Param(k, v) for k, v in op["params"].items()])
    elif kind == "tags":
        c.log_batch(run_id, tags=[RunTag(k, v) for k, v in op["tags"].items()])
    elif kind == "metrics":  # same key, value, time and step: MLflow stores it once
        c.log_batch(run_id, metrics=[Metric(k, v, ts, step) for k, v, ts, step in op["metrics"]])
    elif kind == "inputs":
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        c.log_inputs(run_id, datasets=[DatasetInput(_dataset(e["path"], e.get("md5") or e["sha256"],
                                                             Path(op["root"]))._to_mlflow_entity(),
                                                    tags=[InputTag(MLFLOW_DATASET_CONTEXT, op["context"])])
                                       for e in op["inputs"]])
    elif kind == "artifact":
        path = files / op["file"] if files is not None else Path(op["path"])
        if path.is_dir():
            c.log_artifacts(run_id, str(path), op["artifact_path"])
        else:
            c.log_artifact(run_id, str(path), op["artifact_path"])
    elif kind == "json":
        c.log_dict(run_id, op["obj"], op["name"])
    elif kind == "register":
        publish = functools.partial(registry.publish, op["name"], kind=op["kind"], run_id=run_id, tags=op["tags"],
                                    alias=op["alias"], run_uid=uid, output=op["output"],
                                    registered_at=op["registered_at"])
        if files is not None:
            return publish(files / op["file"])
        with tempfile.TemporaryDirectory(prefix="persona-ops-register-") as tmp:
            registry.stage_files(Path(op["path"]), op["sidecar"], Path(tmp))
            return publish(Path(tmp))
    else:
        raise ValueError(f"unknown tracking operation {kind!r}")
    return None


def process_tags() -> dict[str, str]:
    """Which process a run belongs to (a RUNNING run whose process is gone gets ended)."""
    return {f"{PROCESS_PREFIX}{k}": str(v) for k, v in outbox.this_process().items() if v is not None}


def owner_of(tags: Mapping[str, str]) -> dict | None:
    """The process a run's tags name (None: a run without them)."""
    owner = {k[len(PROCESS_PREFIX):]: v for k, v in tags.items() if k.startswith(PROCESS_PREFIX)}
    if "host" not in owner or "pid" not in owner:
        return None
    return {**owner, "pid": int(owner["pid"]), "started": float(owner["started"]) if "started" in owner else None}


def _dataset(path: str, digest: str, root: Path):
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    abs_path = Path(path) if Path(path).is_absolute() else Path(root) / path
    with warnings.catch_warnings():  # "can be interpreted in multiple ways" noise
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(abs_path.resolve()))
    # MLflow caps digests at 36 chars: a DVC md5 (".dir" included) fits, a sha256 is cut.
    return MetaDataset(source=source, name=_clip(path, MAX_DATASET_NAME_SIZE), digest=digest[:MAX_DATASET_DIGEST_SIZE])
