"""Scheduled deployments, served by one process: ``persona-ops serve-flows``.

The process registers the deployments with the Prefect server named by ``PREFECT_API_URL``
(start one with ``prefect server start --host 127.0.0.1``) and runs their flow runs; the
schedules show in the Prefect UI. Stopping the process pauses the schedules.
"""

from __future__ import annotations

from flows.pipelines import persona_space, persona_vectors, trajectory

DEPLOYMENTS = {
    # name: (flow, cron, default parameters)
    "persona-vectors-nightly": (persona_vectors, "0 3 * * *", {"overrides": []}),
    "persona-space-weekly": (persona_space, "0 4 * * 0", {"overrides": []}),
    "trajectory-weekly": (trajectory, "0 5 * * 0", {"overrides": []}),
}


def serve(root: str = ".") -> None:
    from prefect import serve as prefect_serve

    prefect_serve(*[flow.to_deployment(name=name, cron=cron, parameters={**params, "root": root})
                    for name, (flow, cron, params) in DEPLOYMENTS.items()])
