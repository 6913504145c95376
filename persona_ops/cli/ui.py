"""``persona-ops ui``: the servers researchers use, started detached on the project: the Prefect
server, the MLflow server on the project's store and a process serving every pipeline's
deployment to that Prefect server. Their logs and the state file (their records) live in
``<root>/.persona-ops/ui/``."""

from __future__ import annotations

import json
import os
import sys
import urllib.request
from datetime import datetime
from pathlib import Path

import typer

from persona_ops import servers
from persona_ops.cli.common import fail, prefect_env
from persona_ops.errors import InputError

ROOT_HELP = "Project directory (holds params.yaml, mlflow.db and mlruns/)."
STATE_DIR = Path(".persona-ops") / "ui"
HEALTH_TIMEOUT_S = 300.0  # a fresh Prefect database migrates first; a busy 2-core host is slow
START_MLFLOW = Path(__file__).resolve().parents[2] / "mlflow" / "start-server.sh"


def register(app: typer.Typer) -> None:
    app.command("ui")(ui)


def ui(root: Path = typer.Option(Path("."), help=ROOT_HELP),
       prefect_port: int = typer.Option(4200, help="Port of the Prefect server (UI and API)."),
       mlflow_port: int = typer.Option(5000, help="Port of the MLflow server (UI and API)."),
       host: str = typer.Option("127.0.0.1", help="Bind address of both servers (loopback by default)."),
       stop: bool = typer.Option(False, "--stop", help="Stop what `persona-ops ui` started and forget it."),
       status: bool = typer.Option(False, "--status", help="Say what runs (exit 1 unless everything does).")
       ) -> None:
    """Start, detached, a Prefect server (its database under <root>/.prefect unless PREFECT_HOME is
    set), an MLflow server on the project's store (mlflow/start-server.sh: <root>/mlflow.db,
    artifacts in <root>/mlruns) and a process serving a deployment of every pipeline to that
    Prefect server (`persona-ops serve-flows`); wait until each answers; print the URLs and the
    variables that send runs to them. Logs and state: <root>/.persona-ops/ui/."""
    root = root.resolve()
    if stop and status:
        fail(InputError("ui: expected one of --stop and --status, found both"))
    if status:
        _report_status(_read_state(root))
        return
    from filelock import FileLock, Timeout

    lock = root / STATE_DIR / ".lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(lock, timeout=3 * HEALTH_TIMEOUT_S):  # one `ui` at a time starts or stops them
            if stop:
                _stop_all(root, _read_state(root))
            else:
                _up(root, host, prefect_port, mlflow_port, _read_state(root))
    except Timeout:
        fail(InputError(f"{lock}: another `persona-ops ui` has held this lock for {3 * HEALTH_TIMEOUT_S:.0f} s"))


def _state_path(root: Path) -> Path:
    return root / STATE_DIR / "state.json"


def _read_state(root: Path) -> dict | None:
    from persona_ops.io import read_json

    path = _state_path(root)
    if not path.exists():
        return None
    try:
        return read_json(path)
    except InputError as e:
        fail(InputError(f"{e} (the state of `persona-ops ui`: remove it once its servers are stopped)"))


def _write_state(root: Path, state: dict) -> None:
    from persona_ops.io import write_json

    write_json(_state_path(root), state)


def _up(root: Path, host: str, prefect_port: int, mlflow_port: int, state: dict | None) -> None:
    if state is not None:
        stopped = [r for r in state["servers"] if not servers.alive(r)]
        if not stopped:
            typer.echo("persona-ops ui is already running:")
            _print_urls(root, state)
            return
        for r in stopped:
            typer.echo(f"{r['name']} (pid {r['pid']}) has stopped; the end of {r['log']}:\n"
                       + servers.log_tail(Path(r["log"]), 10), err=True)
        typer.echo("stopping the rest and starting again", err=True)
        _stop_all(root, state)
    try:
        if prefect_port == mlflow_port:
            raise InputError(f"ui: --prefect-port and --mlflow-port are both {prefect_port}")
        servers.check_port(host, prefect_port, "the Prefect server, --prefect-port")
        servers.check_port(host, mlflow_port, "the MLflow server, --mlflow-port")
    except InputError as e:
        fail(e)
    state = {"host": host, "prefect_port": prefect_port, "mlflow_port": mlflow_port,
             "prefect_url": _url(host, prefect_port), "mlflow_url": _url(host, mlflow_port), "servers": []}
    try:
        _start_all(root, state)
    except servers.ServerError as e:
        _stop_all(root, state, quiet=True)
        typer.echo(f"persona-ops ui: {e}", err=True)
        raise typer.Exit(1)
    except BaseException:  # interrupted: nothing is left running
        _stop_all(root, state, quiet=True)
        raise
    _print_urls(root, state)


def _start_all(root: Path, state: dict) -> None:
    """Both servers at once, the serving process as soon as the Prefect API answers (it needs MLflow
    only once a flow runs); the state is written after each start, so an interrupted start can
    still be stopped."""
    host, prefect_url, mlflow_url = state["host"], state["prefect_url"], state["mlflow_url"]
    env = _env(root, prefect_url)
    prefect = _start(root, state, "prefect", ["prefect", "server", "start", "--host", host,
                                              "--port", str(state["prefect_port"])], env)
    mlflow = _start(root, state, "mlflow", [str(START_MLFLOW)],
                    dict(env, PERSONA_OPS_ROOT=str(root), MLFLOW_HOST=host, MLFLOW_PORT=str(state["mlflow_port"])))
    servers.wait_healthy(prefect, lambda: servers.answers(f"{prefect_url}/api/health"), HEALTH_TIMEOUT_S)
    serve = _start(root, state, "serve", ["persona-ops", "serve-flows", "--root", str(root)],
                   dict(env, MLFLOW_TRACKING_URI=mlflow_url))
    servers.wait_healthy(mlflow, lambda: servers.answers(f"{mlflow_url}/health"), HEALTH_TIMEOUT_S)
    servers.wait_healthy(serve, _serving(f"{prefect_url}/api", serve["created"]), HEALTH_TIMEOUT_S)


def _url(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _start(root: Path, state: dict, name: str, command: list[str], env: dict) -> dict:
    record = servers.start(name, command, env=env, cwd=root, log=root / STATE_DIR / f"{name}.log")
    state["servers"].append(record)
    _write_state(root, state)
    return record


def _env(root: Path, prefect_url: str) -> dict[str, str]:
    """This environment, with this venv's executables first, the Prefect database under the project
    (unless PREFECT_HOME is set) and the Prefect API the one started here."""
    prefect_env()
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("PREFECT_HOME", str(root / ".prefect"))
    env["PREFECT_API_URL"] = f"{prefect_url}/api"
    return env


def _serving(api: str, since: float):
    """Every pipeline's deployment is in the Prefect API and was polled by a runner since ``since``."""
    from persona_ops.pipelines.registry import PIPELINES

    def ready() -> bool:
        request = urllib.request.Request(f"{api}/deployments/filter", data=b"{}", method="POST",
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=5) as r:
                deployments = json.load(r)
        except (OSError, ValueError):
            return False
        polled = {d["name"] for d in deployments
                  if d.get("last_polled") and datetime.fromisoformat(d["last_polled"]).timestamp() >= since - 1}
        return set(PIPELINES) <= polled
    return ready


def _stop_all(root: Path, state: dict | None, quiet: bool = False) -> None:
    """Stop the recorded processes, the serving one first (it pauses the schedules through the
    Prefect API), then both servers at once; remove the state."""
    if state is None:
        typer.echo(f"persona-ops ui: nothing runs (no state in {_state_path(root)})")
        return
    serve = [r for r in state["servers"] if r["name"] == "serve"]
    rest = [r for r in state["servers"] if r["name"] != "serve"]
    killed = servers.stop(serve) + servers.stop(rest)
    if not quiet:
        for r in state["servers"]:
            typer.echo(f"{'killed' if r['name'] in killed else 'stopped'} {r['name']} (pid {r['pid']})")
    _state_path(root).unlink(missing_ok=True)


def _report_status(state: dict | None) -> None:
    if state is None:
        typer.echo("persona-ops ui: nothing runs")
        raise typer.Exit(1)
    where = {"prefect": state["prefect_url"], "mlflow": state["mlflow_url"], "serve": "every pipeline's deployment"}
    up = [servers.alive(r) for r in state["servers"]]
    for record, running in zip(state["servers"], up):
        typer.echo(f"{record['name']:8s} {'running' if running else 'stopped'}  pid {record['pid']:<8d} "
                   f"{where.get(record['name'], '')}  log {record['log']}")
    if not all(up) or len(up) < len(where):
        raise typer.Exit(1)


def _print_urls(root: Path, state: dict) -> None:
    typer.echo(f"Prefect UI: {state['prefect_url']}\n"
               f"MLflow UI:  {state['mlflow_url']}\n"
               "Send runs from a shell to them:\n"
               f"  export PREFECT_API_URL={state['prefect_url']}/api\n"
               f"  export MLFLOW_TRACKING_URI={state['mlflow_url']}\n"
               f"Logs: {root / STATE_DIR}/*.log; stop: persona-ops ui --stop --root {root}")
