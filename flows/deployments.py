"""A deployment for every pipeline, with its schedule from params.yaml (``orchestration.schedules``).

``persona-ops serve-flows`` serves them from one process against the Prefect server named by
``PREFECT_API_URL`` (start one with ``prefect server start --host 127.0.0.1``); they show in the
Prefect UI with their parameter forms and schedules. Stopping the process pauses the schedules.
``persona-ops serve-flows --pool NAME`` instead puts them on a process work pool and exits; a worker
(``prefect worker start --pool NAME``) runs their flow runs, importing ``flows.pipelines`` in the project.
"""

from __future__ import annotations

from pathlib import Path

from flows.pipelines import FLOWS
from persona_ops.pipelines.params import load_params


def deployments(root: str | Path = ".", pool: str | None = None) -> list:
    """One ``RunnerDeployment`` per pipeline (named like it), scheduled as params.yaml says; on the
    work pool ``pool`` when given (its flow runs import the flow by module, working in ``root``)."""
    from prefect.deployments.runner import EntrypointType
    from prefect.schedules import Cron

    root = Path(root).resolve()
    schedules = load_params(root / "params.yaml").orchestration.schedules
    on_pool = ({"work_pool_name": pool, "entrypoint_type": EntrypointType.MODULE_PATH,
                "job_variables": {"working_dir": str(root)}} if pool else {})
    out = []
    for name, flow in FLOWS.items():
        s = schedules.get(name)
        crons = [Cron(s.cron, timezone=s.timezone, active=s.active)] if s else None
        out.append(flow.to_deployment(name=name, schedules=crons, parameters={"root": str(root)},
                                      description=flow.description, tags=["persona-ops"], **on_pool))
    return out


def register(root: str | Path = ".", pool: str | None = None) -> list:
    """Register (create or update) every deployment with the Prefect server without serving, on the
    process work pool ``pool`` when given (created if missing); returns their ids."""
    if pool:
        ensure_process_pool(pool)
    return [d.apply() for d in deployments(root, pool)]


def ensure_process_pool(name: str) -> None:
    """Create the process work pool ``name`` with Prefect's default job template, unless it exists."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.workers.process import ProcessWorker

    pool = WorkPoolCreate(name=name, type=ProcessWorker.type,
                          base_job_template=ProcessWorker.get_default_base_job_template())
    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(pool)
        except ObjectAlreadyExists:
            pass


def serve(root: str | Path = ".") -> None:
    """Register the deployments and run their flow runs until interrupted."""
    from prefect import serve as prefect_serve

    prefect_serve(*deployments(root))
