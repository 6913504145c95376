"""The MLflow store: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///<project>/mlflow.db``.

With a SQLite URI each new experiment's artifacts go to ``<cwd>/mlruns/<id>`` (absolute, fixed
at creation), so run from the project root; ``mlflow/start-server.sh`` serves that same store.
"""

from __future__ import annotations

import os
from pathlib import Path

from mlflow.exceptions import MlflowException

import mlflow
from mlflow import MlflowClient

_configured_root: Path | None = None


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


def client(project_root: Path | None = None) -> MlflowClient:
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
