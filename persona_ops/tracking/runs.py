"""MLflow runs: a pipeline run and one nested run per stage execution, created with explicit
run ids (never MLflow's thread-local active run: Prefect runs tasks on threads and DVC runs
stages as subprocesses, so the parent is passed as an argument or ``$PERSONA_OPS_PARENT_RUN_ID``).

Parameters and tags are cleaned (:mod:`persona_ops.tracking.clean`: no credentials). A run never waits on or fails
for MLflow: what it cannot send is kept in the project's outbox and replayed later
(:mod:`persona_ops.tracking.sync`). Every run is tagged with its process (host, pid, start time),
so a run left RUNNING by a killed process can be ended.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow.entities import RunStatus

from persona_ops.errors import InputError
from persona_ops.tracking import outbox
from persona_ops.tracking.clean import _fit_key, clean_params, clean_tags, flatten, is_secret  # noqa: F401
from persona_ops.tracking.ops import ENDED_BY_TAG, RECORD, UID_TAG, apply, process_tags  # noqa: F401
from persona_ops.tracking.store import client, experiment_id, root_of

log = logging.getLogger(__name__)
PARENT_RUN_ENV = "PERSONA_OPS_PARENT_RUN_ID"
EXPERIMENT_ENV = "PERSONA_OPS_EXPERIMENT"
PARENT_TAG = "mlflow.parentRunId"


class StageRun:
    """Handle on one MLflow run; every call names the run id (thread-safe).

    A call MLflow does not take (the store is down, or goes away mid-run) moves the handle to the
    outbox (:mod:`persona_ops.tracking.outbox`): that call and every later one are kept there for
    a replay, and nothing more is sent, so a stage pays for one failed call, not for each."""

    def __init__(self, run_id: str | None, experiment_id: str = "", *, spec: dict | None = None,
                 root: Path | None = None):
        self.run_id, self.experiment_id = run_id, experiment_id
        self._spec = spec  # how to create the run (None: a handle on a run that exists)
        self._root = root_of(root)
        self._entry: outbox.Entry | None = None
        self._dropping = False  # not even the outbox could be written
        self._ended: tuple[str, int] | None = None
        self._lock = threading.RLock()

    def __getstate__(self) -> dict:  # results cross process boundaries (Prefect): the lock stays here
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.RLock())

    @property
    def uid(self) -> str | None:
        return self._spec["uid"] if self._spec else None

    @property
    def kept_in(self) -> Path | None:
        """The outbox entry holding what MLflow did not take (None while all was sent)."""
        return self._entry.path if self._entry else None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log numeric metrics (nested dicts flattened; non-numeric values skipped)."""
        ts = outbox.now_ms()
        batch = [[_fit_key(k), float(v), ts, step or 0] for k, v in flatten(metrics).items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if batch:
            self._send({"op": "metrics", "metrics": batch})

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters (flattened, secrets dropped)."""
        clean = clean_params(params)
        if clean:
            self._send({"op": "params", "params": clean})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set tags (secret-named keys dropped, values truncated)."""
        clean = clean_tags(tags)
        if clean:
            self._send({"op": "tags", "tags": clean})

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Copy a file, or a directory's contents, into the run's artifacts."""
        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such file or directory to log as an artifact")
        self._send({"op": "artifact", "path": str(path.resolve()), "artifact_path": artifact_path})

    def log_json(self, obj: Any, name: str) -> None:
        """Store a JSON document as the run artifact ``name`` (``provenance.json``: the record,
        whose run id and registered versions a replay fills in)."""
        self._send({"op": "json", "name": name, "obj": obj})

    def log_inputs(self, inputs: list[dict], root: Path, context: str = "input") -> int:
        """Log files as dataset inputs (``{path, sha256}`` entries; digest = DVC's md5 when known)."""
        batch = [{k: e[k] for k in ("path", "sha256", "md5") if e.get(k)} for e in inputs]
        if batch:
            self._send({"op": "inputs", "inputs": batch, "context": context, "root": str(Path(root).resolve())})
        return len(batch)

    def register(self, name: str, path: str | os.PathLike, *, kind: str, source_path: str, model: str | None = None,
                 sidecar: str | os.PathLike | None = None, alias: str | None = "candidate",
                 tags: Mapping[str, Any] | None = None, output: str | None = None) -> int | None:
        """Register ``path`` as a new version of ``name`` made by this run (see
        :func:`persona_ops.tracking.registry.register`); the version, or None when it was kept
        for a replay."""
        from persona_ops.tracking.registry import version_tags

        path = Path(path)
        if not path.exists():
            raise InputError(f"{path}: no such output to register as {name}")
        op = {"op": "register", "name": name, "kind": kind, "alias": alias, "output": output,
              "tags": version_tags(path, kind=kind, source_path=source_path, model=model, tags=tags),
              "registered_at": outbox.now_ms(), "path": str(path.resolve()),
              "sidecar": str(Path(sidecar).resolve()) if sidecar and Path(sidecar).is_file() else None}
        return self._send(op)

    def end(self, status: str) -> None:
        """End the run (``FINISHED``, ``FAILED`` or ``KILLED``) now; kept when MLflow is away."""
        with self._lock:
            self._ended = (status, outbox.now_ms())
            if self._entry is None and self.run_id is not None:
                try:
                    client(self._root).set_terminated(self.run_id, status=status, end_time=self._ended[1])
                    return
                except Exception as e:
                    self._go_offline("ending the run", e)
            if self._entry is not None and not self._dropping:
                self._save(lambda: self._entry.close(*self._ended))

    # --- sending, or keeping ---------------------------------------------------------------------

    def _send(self, op: dict) -> Any:
        with self._lock:
            if self._entry is None and not self._dropping and self.run_id is not None:
                try:
                    return apply(op, self.run_id, self._root, uid=self.uid)
                except Exception as e:
                    self._go_offline(f"{op['op']} of {self.run_id}", e)
            if not self._dropping:
                self._save(lambda: self._keep(op))
            return None

    def _go_offline(self, what: str, error: Exception) -> None:
        from persona_ops.tracking.store import tracking_uri

        spec = self._spec or {"uid": uuid.uuid4().hex, "experiment": None, "name": self.run_id,
                              "parent_run_id": None, "tags": {}, "start_time": outbox.now_ms()}
        reason = outbox.redact(f"{type(error).__name__}: {error}")
        entry = outbox.Entry.new(self._root, {**spec, "run_id": self.run_id, "experiment_id": self.experiment_id})
        entry.data["error"] = reason[:2000]
        if self._spec is None:  # a run that exists and is not this handle's to end
            entry.data.update(state="closed", status=None)
        self._entry = entry
        if self._save(entry.save):
            log.warning("MLflow at %s: %s failed (%s); %s is kept in %s and sent by `persona-ops track sync` "
                        "or the next run", outbox.redact(tracking_uri(self._root)), what, reason.splitlines()[0][:300],
                        spec["name"], entry.path)

    def _save(self, write) -> bool:
        try:
            with outbox.locked(self._entry):
                write()
            return True
        except Exception as e:  # the outbox itself cannot be written: what remains is lost
            log.warning("MLflow: keeping tracking records in %s failed (%s); this run's records are lost",
                        self._entry.path, e)
            self._dropping = True
            return False

    def _keep(self, op: dict) -> None:
        entry = self._entry
        if entry.data["state"] == "closed" and not entry.path.exists():  # a replay took it meanwhile
            self._entry = entry = entry.successor(self._ended)
        n = len(entry.data["ops"])
        if op["op"] == "artifact":
            path = Path(op.pop("path"))
            op.update(entry.keep(path, f"{n}/{path.name}"))
        elif op["op"] == "register":
            from persona_ops.tracking.registry import stage_files

            path, sidecar = Path(op.pop("path")), op.pop("sidecar")
            target = entry.files / str(n)
            shutil.rmtree(target, ignore_errors=True)
            stage_files(path, sidecar, target)
            op.update(file=str(n), staged=path.name)
        entry.add(op)


def _context_tags() -> dict[str, str]:
    """MLflow's usual source/user tags (what ``mlflow.start_run`` would add)."""
    from mlflow.tracking.context.registry import resolve_tags

    try:
        return resolve_tags({})
    except Exception:  # context providers are best-effort (e.g. no git)
        return {}


def open_run(experiment: str, name: str, *, parent_run_id: str | None = None,
             tags: Mapping[str, Any] | None = None, project_root: Path | None = None) -> StageRun:
    """A new run in ``experiment`` (nested under ``parent_run_id``), or, when MLflow cannot be
    reached, a handle that keeps everything in the outbox. Once MLflow answers, what earlier runs
    kept is replayed first (and a top-level run ends runs whose process died)."""
    root = root_of(project_root)
    uid = uuid.uuid4().hex
    all_tags = {**_context_tags(), **clean_tags(tags), **process_tags(), UID_TAG: uid}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    spec = {"uid": uid, "experiment": experiment, "name": name, "parent_run_id": parent_run_id, "tags": all_tags,
            "start_time": outbox.now_ms()}
    run = StageRun(None, "", spec=spec, root=root)
    try:
        exp_id = experiment_id(experiment, project_root=root)
        run.run_id = client(root).create_run(exp_id, run_name=name, tags=all_tags,
                                             start_time=spec["start_time"]).info.run_id
        run.experiment_id = exp_id
    except Exception as e:
        run._go_offline(f"creating run {name}", e)
        return run
    from persona_ops.tracking import sync

    sync.catch_up(root, reap=parent_run_id is None)
    return run


@contextmanager
def start_run(experiment: str, name: str, *, parent_run_id: str | None = None,
              params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
              project_root: Path | None = None) -> Iterator[StageRun]:
    """A run in ``experiment`` (nested under ``parent_run_id`` when given), ended FINISHED, FAILED
    or KILLED. Tracking failures never raise here: what was not sent is kept in the outbox."""
    run = open_run(experiment, name, parent_run_id=parent_run_id, tags=tags, project_root=project_root)
    status = RunStatus.to_string(RunStatus.FAILED)
    try:
        if params:
            run.log_params(params)
        yield run
        status = RunStatus.to_string(RunStatus.FINISHED)
    except (KeyboardInterrupt, SystemExit):
        status = RunStatus.to_string(RunStatus.KILLED)
        raise
    finally:
        run.end(status)


def children(parent_run_id: str) -> list:
    """The runs nested under ``parent_run_id``, in every experiment."""
    c = client()
    experiments = [e.experiment_id for e in c.search_experiments()]
    return c.search_runs(experiments, filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=10_000)


def run_record(run_id: str) -> dict | None:
    """The provenance record a stage run stored (None for runs without one)."""
    import mlflow

    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{RECORD}")
    except Exception:  # no such artifact
        return None


