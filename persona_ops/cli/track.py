"""``persona-ops track``: what stages could not send to MLflow (the outbox) and sending it."""

from __future__ import annotations

from pathlib import Path

import typer

track_app = typer.Typer(no_args_is_help=True, help="MLflow tracking: the outbox of records a run could not send.")
ROOT_HELP = "Project directory (holds params.yaml and the outbox .persona-ops/tracking-outbox)."


def register(app: typer.Typer) -> None:
    app.add_typer(track_app, name="track")


@track_app.command("sync")
def sync(root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """Send what runs kept while MLflow was away ($MLFLOW_TRACKING_URI, else <root>/mlflow.db), once
    (a second sync creates nothing), and end FAILED the runs left RUNNING by processes that died.
    Exits 1 while something is still kept."""
    from persona_ops.tracking import sync as tracking_sync

    report = tracking_sync.sync(root)
    for line in report.lines():
        typer.echo(line)
    if report.left:
        raise typer.Exit(1)


@track_app.command("status")
def status(root: Path = typer.Option(Path("."), help=ROOT_HELP)) -> None:
    """List the runs whose records are kept in the outbox, and why each was kept."""
    from persona_ops.tracking import outbox

    entries = outbox.entries(root)
    for e in entries:
        d = e.data
        why = (d.get("error") or "").split("\n")[0][:200]
        typer.echo(f"{e.path.name}: {d['name']} ({d.get('experiment')}), {d['state']}, {len(d['ops'])} records; {why}")
    for path in outbox.unreadable(root):
        typer.echo(f"{path.name}: unreadable")
    if not entries:
        typer.echo("the outbox is empty")
