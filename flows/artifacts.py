"""What a flow run publishes in the Prefect UI (its Artifacts tab): a markdown summary of what was
made and where, a table of the stage items with their main metrics, and links to the MLflow run,
the registered versions and the HTML reports. MLflow links are web links when the tracking URI is
a server (``http://...``); with a local store they name the run and version for ``mlflow ui``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from persona_ops.pipelines import runner

METRICS_SHOWN = 4  # numeric metrics per item in the table


def publish(pipeline: str, outcomes: list[runner.Outcome], ctx: runner.Context, parent_run_id: str | None) -> None:
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    web = _mlflow_web(ctx) if ctx.tracking else None
    ran = [o for o in outcomes if o.state == "ran"]
    versions = [reg for o in ran for reg in (o.record or {}).get("registered", []) if reg.get("version")]
    reports = sorted({out["path"] for o in ran for out in (o.record or {}).get("outputs", [])
                      if out["path"].endswith(".html")} | _reports_in(ran, ctx.root))
    key = pipeline.lower()
    create_table_artifact(key=f"{key}-items", table=[_row(o) for o in outcomes],
                          description=f"{pipeline}: every stage item, what ran and its main metrics")
    create_markdown_artifact(key=f"{key}-summary", markdown=_summary(pipeline, outcomes, versions, reports, web,
                                                                     parent_run_id, ctx),
                             description=f"{pipeline}: what was made and where")
    if web and parent_run_id:
        create_link_artifact(key=f"{key}-mlflow-run", link=_run_url(web, parent_run_id), link_text="the MLflow run",
                             description=f"{pipeline}: the pipeline's MLflow run (its stage runs nested under it)")
    for path in reports:
        create_link_artifact(key=f"{key}-report", link=(ctx.root / path).resolve().as_uri(), link_text=path,
                             description=f"{pipeline}: the HTML report")


def _row(o: runner.Outcome) -> dict[str, Any]:
    numbers = {k: round(v, 4) if isinstance(v, float) else v for k, v in o.metrics.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    shown = dict(list(numbers.items())[:METRICS_SHOWN])
    return {"item": o.task, "state": o.state, "metrics": ", ".join(f"{k}={v}" for k, v in shown.items()),
            "mlflow_run": o.run_id or ""}


def _summary(pipeline: str, outcomes, versions: list[dict], reports: list[str], web: dict | None,
             parent_run_id: str | None, ctx: runner.Context) -> str:
    ran = [o for o in outcomes if o.state == "ran"]
    lines = [f"# {pipeline}", "", f"{len(ran)} stage items ran, {len(outcomes) - len(ran)} were up to date "
             f"(DVC), in `{ctx.root}`.", ""]
    if parent_run_id:
        run = f"[{parent_run_id}]({_run_url(web, parent_run_id)})" if web else f"`{parent_run_id}`"
        lines += [f"**MLflow run:** {run} (experiment `{pipeline}`; one nested run per stage item)", ""]
    if versions:
        lines += ["**Registered versions:**", ""]
        for v in versions:
            uri = f"models:/{v['name']}/{v['version']}"
            lines.append(f"- [{uri}]({_version_url(web, v)})" if web else f"- `{uri}`")
        lines.append("")
    if reports:
        lines += ["**Reports:**", ""] + [f"- [{p}]({(ctx.root / p).resolve().as_uri()})" for p in reports] + [""]
    made = [out["path"] for o in ran for out in (o.record or {}).get("outputs", [])]
    if made:
        lines += ["**Outputs written:**", ""] + [f"- `{p}`" for p in made] + [""]
    lines += ["Lineage of a result: `persona-ops lineage models:/NAME@ALIAS`."]
    return "\n".join(lines)


def _reports_in(ran: list[runner.Outcome], root: Path) -> set[str]:
    """HTML reports inside output directories (a results stage writes ``results/report.html``)."""
    found = set()
    for o in ran:
        for out in (o.record or {}).get("outputs", []):
            directory = root / out["path"]
            if directory.is_dir():
                found |= {str(p.relative_to(root)) for p in directory.glob("*.html")}
    return found


def _mlflow_web(ctx: runner.Context) -> dict | None:
    """``{"base": URL}`` when the tracking URI is an MLflow server, else None."""
    from persona_ops.tracking.store import tracking_uri

    uri = tracking_uri(ctx.root)
    return {"base": uri.rstrip("/")} if uri.startswith(("http://", "https://")) else None


def _run_url(web: dict, run_id: str) -> str:
    return f"{web['base']}/#/runs/{run_id}"


def _version_url(web: dict, version: dict) -> str:
    return f"{web['base']}/#/models/{version['name']}/versions/{version['version']}"
