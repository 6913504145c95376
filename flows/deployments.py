"""A deployment for every pipeline, with its schedule from params.yaml (``orchestration.schedules``).

``persona-ops serve-flows`` serves them from one process against the Prefect server named by
``PREFECT_API_URL`` (start one with ``prefect server start --host 127.0.0.1``); they show in the
Prefect UI with their parameter forms and schedules. Stopping the process pauses the schedules.
"""

from __future__ import annotations

from pathlib import Path

from flows.pipelines import FLOWS
from persona_ops.pipelines.params import load_params


def deployments(root: str | Path = ".") -> list:
    """One ``RunnerDeployment`` per pipeline (named like it), scheduled as params.yaml says."""
    from prefect.schedules import Cron

    root = Path(root).resolve()
    schedules = load_params(root / "params.yaml").orchestration.schedules
    out = []
    for name, flow in FLOWS.items():
        s = schedules.get(name)
        crons = [Cron(s.cron, timezone=s.timezone, active=s.active)] if s else None
        out.append(flow.to_deployment(name=name, schedules=crons, parameters={"root": str(root)},
                                      description=flow.description, tags=["persona-ops"]))
    return out


def register(root: str | Path = ".") -> list:
    """Register every deployment with the Prefect server (without serving); returns their ids."""
    return [d.apply() for d in deployments(root)]


def serve(root: str | Path = ".") -> None:
    """Register the deployments and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(root))
