"""`persona-ops ui` on a copy of the project, with real servers on free ports: both health endpoints
answer, the Prefect API holds a deployment of every pipeline with its params.yaml schedule, the
MLflow server answers on the project's store, a second `ui` says it runs, `--status` lists the
three, `--stop` leaves no process and frees the ports; a taken port is refused before anything
starts, naming the port and its holder. Below: the process functions on small processes."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import copy_project

from persona_ops import servers
from persona_ops.pipelines.registry import PIPELINES

CLI = Path(sys.executable).parent / "persona-ops"
STATE = Path(".persona-ops/ui/state.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ui_cli(project: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``persona-ops ui --root PROJECT ARGS`` as a process, in an environment that names no Prefect
    home or server and no MLflow store (the project's own are used)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PREFECT_HOME", "PREFECT_API_URL", "MLFLOW_TRACKING_URI")}
    env["PATH"] = str(CLI.parent) + os.pathsep + env["PATH"]
    return subprocess.run([str(CLI), "ui", "--root", str(project), *args], env=env, cwd=project,
                          capture_output=True, text=True, timeout=timeout, check=False)


def ui_in_process(project: Path, *args: str):
    """`persona-ops ui --root PROJECT ARGS` in this process (no CLI start-up to wait for)."""
    from typer.testing import CliRunner

    from persona_ops.cli import app

    return CliRunner().invoke(app, ["ui", "--root", str(project), *args])


@contextmanager
def ui_running(project: Path):
    """`persona-ops ui` on free ports until the block ends (then `--stop`); yields (its output, state)."""
    prefect_port, mlflow_port = free_port(), free_port()
    try:
        out = ui_cli(project, "--prefect-port", str(prefect_port), "--mlflow-port", str(mlflow_port))
        assert out.returncode == 0, out.stdout + out.stderr
        yield out, yaml.safe_load((project / STATE).read_text())
    finally:
        if (project / STATE).exists():
            ui_in_process(project, "--stop")


def prefect_deployments(api_url: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def read():
        async with get_client() as client:
            return await client.read_deployments()

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def group_pids(state: dict) -> set[int]:
    return {p.pid for record in state["servers"] for p in servers.group(record)}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def ui(project):
    with ui_running(project) as (out, state):
        yield out, state


@pytest.mark.slow
def test_ui_starts_both_servers_and_serves_every_deployment_with_its_schedule(ui, project):
    from mlflow import MlflowClient

    out, state = ui
    prefect_url, mlflow_url = state["prefect_url"], state["mlflow_url"]
    for line in (f"Prefect UI: {prefect_url}", f"MLflow UI:  {mlflow_url}",
                 f"export PREFECT_API_URL={prefect_url}/api", f"export MLFLOW_TRACKING_URI={mlflow_url}"):
        assert line in out.stdout, out.stdout
    assert servers.answers(f"{prefect_url}/api/health") and servers.answers(f"{mlflow_url}/health")
    assert [r["name"] for r in state["servers"]] == ["prefect", "mlflow", "serve"]
    assert all(servers.alive(r) for r in state["servers"])
    assert (project / ".prefect" / "prefect.db").is_file()  # the project's Prefect database
    schedules = yaml.safe_load((project / "params.yaml").read_text())["orchestration"]["schedules"]
    deployments = {d.name: d for d in prefect_deployments(f"{prefect_url}/api")}
    assert sorted(deployments) == sorted(PIPELINES)
    for name, d in deployments.items():
        expected = [(schedules[name]["cron"], schedules[name]["timezone"])] if name in schedules else []
        assert [(s.schedule.cron, s.schedule.timezone) for s in d.schedules] == expected, name
        assert d.parameters["root"] == str(project)
    experiments = MlflowClient(tracking_uri=mlflow_url).search_experiments()
    assert "Default" in {e.name for e in experiments}
    assert (project / "mlflow.db").is_file()  # the server's store is the project's


@pytest.mark.slow
def test_a_second_ui_says_it_is_already_running(ui, project):
    _, state = ui
    again = ui_in_process(project, "--prefect-port", str(free_port()))
    assert again.exit_code == 0, again.output
    assert "already running" in again.stdout and f"Prefect UI: {state['prefect_url']}" in again.stdout
    assert yaml.safe_load((project / STATE).read_text()) == state  # nothing new started


@pytest.mark.slow
def test_status_lists_what_runs(ui, project):
    _, state = ui
    out = ui_in_process(project, "--status")
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    for record in state["servers"]:
        line = next(x for x in lines if x.startswith(record["name"]))
        assert "running" in line and f"pid {record['pid']}" in line


@pytest.mark.slow
def test_stop_leaves_no_process_and_frees_the_ports(ui, project):
    _, state = ui
    pids = group_pids(state)
    assert {r["pid"] for r in state["servers"]} <= pids and len(pids) > 3  # servers start workers of their own
    out = ui_cli(project, "--stop", timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert all(f"{r['name']} (pid {r['pid']})" in out.stdout for r in state["servers"])
    assert not (project / STATE).exists()
    assert [pid for pid in pids if not gone(pid)] == []
    for port in (state["prefect_port"], state["mlflow_port"]):
        assert not servers.port_taken("127.0.0.1", port), port
    status = ui_in_process(project, "--status")
    assert status.exit_code == 1 and "nothing runs" in status.stdout


def test_a_taken_port_is_refused_naming_it_and_its_holder(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        out = ui_in_process(tmp_path, "--prefect-port", str(free_port()), "--mlflow-port", str(taken))
    assert out.exit_code == 2, out.output
    assert f"127.0.0.1:{taken} (the MLflow server, --mlflow-port) is already in use by pid {os.getpid()} (" \
        in out.stderr, out.output
    assert not (tmp_path / STATE).exists() and not list(tmp_path.glob(".persona-ops/ui/*.log"))  # nothing started


# --- the process functions -----------------------------------------------------------------------

def test_a_server_that_exits_is_reported_with_its_log(tmp_path):
    record = servers.start("broken", [sys.executable, "-c", "print('no config here'); raise SystemExit(3)"],
                           env=dict(os.environ), cwd=tmp_path, log=tmp_path / "broken.log")
    with pytest.raises(servers.ServerError) as e:
        servers.wait_healthy(record, lambda: False, timeout=60)
    assert "broken exited before it answered" in str(e.value) and "no config here" in str(e.value)
    assert str(tmp_path / "broken.log") in str(e.value)


def test_a_server_that_never_answers_times_out_and_stop_kills_what_ignores_sigterm(tmp_path):
    code = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('up', flush=True); "
            "time.sleep(60)")
    record = servers.start("stubborn", [sys.executable, "-c", code], env=dict(os.environ), cwd=tmp_path,
                           log=tmp_path / "stubborn.log")
    with pytest.raises(servers.ServerError, match="stubborn did not answer within 1 s"):
        servers.wait_healthy(record, lambda: False, timeout=1)
    deadline = time.monotonic() + 30
    while len(servers.group(record)) < 2:  # the leader and its child
        assert time.monotonic() < deadline, servers.log_tail(tmp_path / "stubborn.log")
        time.sleep(0.05)
    pids = [p.pid for p in servers.group(record)]
    assert servers.stop([record], grace=0.5) == ["stubborn"]  # SIGTERM ignored: killed
    assert all(gone(pid) for pid in pids) and not servers.alive(record)
    assert servers.stop([record]) == []  # nothing left to stop
