"""The MLflow store: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow.db``.

With a SQLite URI each new experiment's artifacts go to ``<cwd>/mlruns/<id>`` (absolute, fixed
at creation), so run from the project root; ``mlflow/start-server.sh`` serves that same store.

A server that is down costs a stage seconds, not MLflow's default minutes of HTTP retries: the
project bounds them (:data:`HTTP_BOUNDS`, unless set in the environment), and what a run could
not send waits in the outbox (``persona_ops.tracking.outbox``). A fresh SQLite store is created
(MLflow's schema migration) by one process at a time.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.exceptions import MlflowException

import mlflow
from mlflow import MlflowClient

_configured_root: Path | None = None
_initialised: set[str] = set()
# One retry, short backoff, 15 s per request: a dead server costs a run one failed call.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
               "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "15"}


def tracking_uri(project_root: Path) -> str:
    """``$MLFLOW_TRACKING_URI`` if set, else the project's SQLite store."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if env:
        return env
    return f"sqlite:///{Path(project_root).resolve()}/mlflow.db"


def root_of(given: Path | None = None) -> Path:
    """``given``, else the last configured project root, else the working directory."""
    return Path(given) if given is not None else (_configured_root or Path.cwd())


def configure(project_root: Path) -> str:
    """Point MLflow tracking and registry at the project's store (HTTP retries bounded, a fresh
    SQLite store created under a lock); return the URI."""
    global _configured_root
    _bound_http()
    uri = tracking_uri(project_root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    _configured_root = Path(project_root)
    if uri.startswith("sqlite:") and uri not in _initialised:
        _initialise_sqlite(uri)
    return uri


def _bound_http() -> None:
    for name, value in HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)


def _initialise_sqlite(uri: str) -> None:
    """Open the tracking and registry stores of ``uri`` (which creates and migrates the schema of
    a new database) under a lock, so concurrent first users do not migrate it at once."""
    from filelock import FileLock

    db = Path(os.path.abspath(uri.removeprefix("sqlite:///").split("?")[0]))
    lock = db.parent / ".persona-ops" / f"{db.name}.lock"  # beside the store (the project's is git-ignored)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock, timeout=600):
        c = MlflowClient(tracking_uri=uri, registry_uri=uri)
        c.search_experiments(max_results=1)
        c.search_registered_models(max_results=1)
    _initialised.add(uri)


def client(project_root: Path | None = None) -> MlflowClient:
    """A client on the project's store: ``project_root``, else the last configured root, else cwd.

    Re-checked on every call, so a changed ``$MLFLOW_TRACKING_URI`` takes effect
    (``mlflow.set_tracking_uri`` would otherwise shadow the env var for good).
    """
    root = root_of(project_root)
    _bound_http()
    uri = tracking_uri(root)
    if uri != mlflow.get_tracking_uri() or uri != mlflow.get_registry_uri() or _configured_root is None:
        configure(root)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(name: str, *, project_root: Path | None = None) -> str:
    """Id of experiment ``name``, creating it (or restoring a deleted one) if needed."""
    c = client(project_root)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name)
        except MlflowException:
            # Another process may have created it between our lookup and create.
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.lifecycle_stage == "deleted":
        c.restore_experiment(exp.experiment_id)
    return exp.experiment_id
