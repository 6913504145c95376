"""Tracking outages against real MLflow: a ``mlflow server`` subprocess on 127.0.0.1 over a
SQLite store in tmp (or that store itself). A stage never waits on or fails for tracking: what
it could not send is kept in the project's outbox and replayed, once, by ``persona-ops track
sync`` or the next run; runs of processes that died end FAILED; a fresh store can be opened by
two processes at once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import copy_project, params_of, run_stage
from safetensors.torch import save_file

from mlflow import MlflowClient
from persona_ops.io import md5_file, read_json, sha256_path

REPO = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "persona-ops"
TRAITS = ("evil", "sycophantic", "hallucinating")
SECRET = "sk-outbox-test-0123456789abcdef"
OUTBOX = Path(".persona-ops/tracking-outbox")
HTTP_SETTINGS = ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT",
                 "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER")



@pytest.fixture()
def root(tmp_path, monkeypatch, empty_db) -> Path:
    """A project dir (cwd) with the vectors stage's inputs for every trait, a migrated store and
    no user setting of MLflow's HTTP retries (the project bounds them itself)."""
    shutil.copytree(REPO / "data/traits/extract", tmp_path / "data/traits/extract")
    _activations(tmp_path)
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    for name in HTTP_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SECRET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _activations(root: Path) -> None:
    for i, trait in enumerate(TRAITS):
        d = root / "outputs/persona_vectors" / trait
        d.mkdir(parents=True, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        save_file({"pos.response_avg": torch.randn(3, 5, 8, generator=g),
                   "neg.response_avg": torch.randn(3, 5, 8, generator=g)}, str(d / "activations.safetensors"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dead(monkeypatch) -> str:
    """Point tracking at a port nothing listens on (credentials in the URI, as some setups do)."""
    uri = f"http://ops:{SECRET}@127.0.0.1:{_free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _entries(root: Path) -> list[dict]:
    return [read_json(p) for p in sorted((root / OUTBOX).glob("*.json"))]


def _outbox_text(root: Path) -> str:
    return "".join(p.read_text(errors="replace") for p in (root / OUTBOX).rglob("*") if p.is_file())


def _all_runs(uri: str, experiment: str = "persona-vectors") -> tuple[list, MlflowClient]:
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    exp = c.get_experiment_by_name(experiment)
    return (c.search_runs([exp.experiment_id], max_results=1000) if exp else []), c


def _runs(uri: str, experiment: str = "persona-vectors") -> tuple[dict, int, MlflowClient]:
    """The runs by name (the last of a name), how many there are, and a client."""
    runs, c = _all_runs(uri, experiment)
    return {r.info.run_name: r for r in sorted(runs, key=lambda r: r.info.start_time)}, len(runs), c


def _versions(c: MlflowClient, name: str) -> list:
    return c.search_model_versions(f"name = '{name}'")


def _record(c: MlflowClient, run) -> dict:
    path = c.download_artifacts(run.info.run_id, "provenance.json")
    return json.loads(Path(path).read_text())


def _assert_replayed(uri: str, root: Path, traits, entries_by_name: dict) -> None:
    """Each stage run exists once, as it would have been sent: times, params, metrics, tags, the
    provenance record (with its run id and registered version) and the version with its alias."""
    from persona_ops.tracking.runs import clean_params

    all_runs, c = _all_runs(uri)
    for trait in traits:
        name = f"vectors@{trait}"
        same = [r for r in all_runs if r.info.run_name == name]
        assert len(same) == 1, f"{len(same)} runs named {name}"
        run, entry = same[0], entries_by_name.get(name)
        assert run.info.status == "FINISHED"
        if entry is not None:
            assert (run.info.start_time, run.info.end_time) == (entry["start_time"], entry["end_time"])
        metrics = read_json(root / "metrics/persona_vectors" / trait / "vectors.json")
        assert run.data.metrics == {k: float(v) for k, v in metrics.items()}
        assert run.data.tags["persona_ops.stage"] == "vectors" and run.data.tags["dvc.stage"] == name
        out = root / "outputs/persona_vectors" / trait / "vectors.safetensors"
        assert run.data.tags[f"dvc.outputs/persona_vectors/{trait}/vectors.safetensors.md5"] == md5_file(out)
        versions = _versions(c, f"persona-vector-{trait}")
        mine = [v for v in versions if v.tags["run_id"] == run.info.run_id]
        assert len(mine) == 1 and mine[0].tags["sha256"] == sha256_path(out)
        assert int(c.get_model_version_by_alias(f"persona-vector-{trait}", "candidate").version) == \
            max(int(v.version) for v in versions)
        record = _record(c, run)
        assert record["run_id"] == run.info.run_id and record["stage"] == "vectors"
        assert run.data.params == clean_params(record["params"])
        assert record["registered"] == [{"name": f"persona-vector-{trait}", "version": int(mine[0].version),
                                         "kind": "persona-vector", "output": "vectors"}]
        assert {o["sha256"] for o in record["outputs"]} == {sha256_path(out)}


def _cli(*args, root: Path, env: dict | None = None, timeout: int = 180) -> subprocess.CompletedProcess:
    """The real ``persona-ops`` command (``timeout``: a guard against a hang, not a measurement)."""
    full = {**os.environ, **(env or {})}
    full["PATH"] = str(CLI.parent) + os.pathsep + full["PATH"]
    return subprocess.run([str(CLI), *args, "--root", str(root)], cwd=root, env=full, capture_output=True,
                          text=True, timeout=timeout)


# --- without a server: the store unreachable, then the project's SQLite store ------------------------

def test_a_stage_with_tracking_unreachable_completes_keeps_an_entry_and_replays_once(root, monkeypatch, caplog):
    import logging

    caplog.set_level(logging.WARNING)
    _dead(monkeypatch)
    params = params_of({"tracking": {"enabled": True}})
    down = run_stage("vectors", params, root, "evil")
    out = root / "outputs/persona_vectors/evil/vectors.safetensors"
    assert down.run_id is None and out.is_file() and (root / "metrics/persona_vectors/evil/vectors.json").is_file()
    assert read_json(out.with_name(out.name + ".prov.json"))["output"]["sha256"] == sha256_path(out)
    entries = _entries(root)
    assert [e["name"] for e in entries] == ["vectors@evil"] and entries[0]["status"] == "FINISHED"
    assert "track sync" in caplog.text
    assert SECRET not in _outbox_text(root) and SECRET not in caplog.text  # nor the URI's password
    # MLflow's own HTTP retries are bounded by the project, not by the user's environment.
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT

    assert MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() <= 2 and MLFLOW_HTTP_REQUEST_TIMEOUT.get() <= 30

    from persona_ops.tracking import sync

    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    report = sync.sync(root)
    assert report.replayed == ["vectors@evil"] and not report.left and not _entries(root)
    _assert_replayed(uri, root, ["evil"], {"vectors@evil": entries[0]})
    from typer.testing import CliRunner

    from persona_ops.cli import app

    again = CliRunner().invoke(app, ["track", "sync", "--root", str(root)])
    assert again.exit_code == 0 and again.output.strip() == "nothing to replay"
    _assert_replayed(uri, root, ["evil"], {"vectors@evil": entries[0]})


def test_a_replayed_version_keeps_its_bytes_and_leaves_the_alias_to_a_later_version(root, monkeypatch):
    from persona_ops.io import atomic_path
    from persona_ops.tracking import registry, runs, sync

    vec = root / "vectors.safetensors"
    save_file({"v": torch.ones(3)}, str(vec))
    kept = vec.read_bytes()
    _dead(monkeypatch)
    with runs.start_run("persona-vectors", "early", project_root=root) as early:
        assert early.register("persona-vector-evil", vec, kind="persona-vector", source_path=vec.name,
                              output="vectors") is None
    with atomic_path(vec) as tmp:  # the output is rebuilt and registered while that run waits
        save_file({"v": torch.zeros(3)}, str(tmp))
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    later_run = c.create_run(c.create_experiment("later")).info.run_id
    later = registry.register("persona-vector-evil", vec, kind="persona-vector", run_id=later_run,
                              source_path=vec.name)
    assert sync.sync(root).replayed == ["early"]
    assert int(c.get_model_version_by_alias("persona-vector-evil", "candidate").version) == later
    (replayed,) = [v for v in _versions(c, "persona-vector-evil") if int(v.version) != later]
    local, _ = registry.resolve(f"models:/persona-vector-evil/{replayed.version}", dst=root / "dl")
    assert local.read_bytes() == kept and replayed.tags["sha256"] != sha256_path(vec)


KILL_IN_RUN = """
import os, signal, sys
from pathlib import Path
from persona_ops.tracking import runs
root = Path(sys.argv[1])
with runs.start_run("persona-vectors", sys.argv[2], params={"x": 1}, project_root=root) as run:
    run.log_metrics({"loss": 0.5})
    print(run.run_id, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_in_run(root: Path, name: str, uri: str) -> subprocess.Popen:
    """A process that starts a run and is SIGKILLed inside it."""
    return subprocess.Popen([sys.executable, "-c", KILL_IN_RUN, str(root), name], cwd=root, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)


def test_runs_of_sigkilled_processes_end_failed_with_the_reason_on_the_next_run(root, monkeypatch):
    uri = f"sqlite:///{root}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    online = _killed_in_run(root, "online", uri)
    online_id = online.communicate()[0].strip()
    offline = _killed_in_run(root, "offline", f"http://127.0.0.1:{_free_port()}")  # killed with its run kept
    offline.communicate()
    assert online.returncode == offline.returncode == -signal.SIGKILL
    by_name, _, c = _runs(uri)
    assert set(by_name) == {"online"} and by_name["online"].info.status == "RUNNING"
    assert by_name["online"].info.run_id == online_id
    assert [(e["name"], e["state"]) for e in _entries(root)] == [("offline", "open")]

    from persona_ops.tracking import runs

    with runs.start_run("persona-vectors", "next", project_root=root):
        pass
    by_name, n, c = _runs(uri)
    assert n == 3 and by_name["next"].info.status == "FINISHED"
    for run in (by_name["online"], by_name["offline"]):
        assert run.info.status == "FAILED" and "died before the run ended" in run.data.tags["persona_ops.ended_by"]
        assert run.data.metrics == {"loss": 0.5} and run.data.params == {"x": "1"}
    assert not _entries(root)


FIRST_USE = """
import sys, time
from pathlib import Path
root, me = Path(sys.argv[1]), sys.argv[2]
from persona_ops.tracking import runs, store  # imports done before the start signal
(root / f"ready-{me}").touch()
while not (root / "go").exists():
    time.sleep(0.005)
with runs.start_run("first-use", me, project_root=root) as run:
    run.log_metrics({"n": 1})
print(run.run_id)
"""


def test_two_processes_opening_one_fresh_sqlite_store_at_once_both_succeed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own store: <root>/mlflow.db
    procs = [subprocess.Popen([sys.executable, "-c", FIRST_USE, str(tmp_path), me], cwd=tmp_path, text=True,
                              env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for me in ("a", "b")]
    while not all((tmp_path / f"ready-{me}").exists() for me in ("a", "b")):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.01)
    (tmp_path / "go").touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    by_name, n, _ = _runs(f"sqlite:///{tmp_path}/mlflow.db", "first-use")
    assert n == 2 and {r.info.status for r in by_name.values()} == {"FINISHED"}
    assert not (tmp_path / OUTBOX).exists() or not _entries(tmp_path)


# --- with a real tracking server ------------------------------------------------------------------

@contextmanager
def mlflow_server(root: Path, port: int):
    """``mlflow/start-server.sh`` on ``root``'s store at 127.0.0.1:``port``, until the block ends."""
    env = {**os.environ, "PERSONA_OPS_ROOT": str(root), "MLFLOW_PORT": str(port)}
    for k in ("MLFLOW_HOST", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    env["PATH"] = str(CLI.parent) + os.pathsep + env["PATH"]
    log = open(root / f"server-{port}.log", "ab")
    proc = subprocess.Popen([str(REPO / "mlflow" / "start-server.sh")], env=env, cwd=root, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120  # a guard against a server that never starts
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("mlflow server did not start:\n" + (root / f"server-{port}.log").read_text())
            time.sleep(0.3)
        yield proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGKILL the server's process group: an outage, not a shutdown."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.fixture()
def project(root) -> Path:
    """``root`` as a git + DVC checkout of this project (dvc.yaml, params.yaml, the code), with the
    persona-vectors pipeline's traits those of the vector files made above."""
    import yaml

    shutil.rmtree(root / "data")
    copy_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    pv = params["persona_vectors"]
    pv["traits"]["names"], pv["per_trait"] = list(TRAITS), {t: {} for t in TRAITS}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root


@pytest.mark.slow
def test_with_the_server_down_stages_finish_and_track_sync_replays_them_once(project, monkeypatch):
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    ran = _cli("stage", "vectors", "--all", root=project, timeout=120)  # the default retries took 4+ minutes
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "Traceback" not in ran.stderr

    from persona_ops.pipelines.dvc import lock_entries

    lock = lock_entries(project)
    for trait in TRAITS:
        out = f"outputs/persona_vectors/{trait}/vectors.safetensors"
        assert {o["path"]: o["md5"] for o in lock[f"vectors@{trait}"]["outs"]}[out] == md5_file(project / out)
    entries = {e["name"]: e for e in _entries(project)}
    assert set(entries) == {f"vectors@{t}" for t in TRAITS}
    assert SECRET not in _outbox_text(project)

    with mlflow_server(project, port):
        synced = _cli("track", "sync", root=project)
        assert synced.returncode == 0, synced.stdout + synced.stderr
        assert not _entries(project)
        _assert_replayed(uri, project, TRAITS, entries)
        again = _cli("track", "sync", root=project)
        assert again.returncode == 0 and "nothing to replay" in again.stdout
        _assert_replayed(uri, project, TRAITS, entries)
        assert _runs(uri)[1] == len(TRAITS)
        assert all(len(_versions(_runs(uri)[2], f"persona-vector-{t}")) == 1 for t in TRAITS)


@pytest.mark.slow
def test_a_server_killed_during_and_between_stages_is_caught_up_by_the_next_run(project, monkeypatch):
    from persona_ops.pipelines import runner

    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = params_of({"tracking": {"enabled": True}})
    with mlflow_server(project, port) as server:
        live = run_stage("vectors", params, project, "evil")
        assert live.run_id is not None

        real_write = runner.write_sidecars

        def server_dies_mid_stage(record, root):  # after the run was created, before it is complete
            stop(server)
            return real_write(record, root)

        monkeypatch.setattr(runner, "write_sidecars", server_dies_mid_stage)
        during = run_stage("vectors", params, project, "sycophantic")
    monkeypatch.setattr(runner, "write_sidecars", real_write)
    assert during.run_id is not None  # created before the server went away
    between = run_stage("vectors", params, project, "hallucinating")  # the server is down
    assert between.run_id is None
    entries = {e["name"]: e for e in _entries(project)}
    assert set(entries) == {"vectors@sycophantic", "vectors@hallucinating"}

    with mlflow_server(project, port):
        by_name, _, c = _runs(uri)
        cut = by_name["vectors@sycophantic"]
        assert cut.info.status == "RUNNING" and not cut.data.metrics
        run_stage("vectors", params, project, "evil")  # the next run replays what was kept
        assert not _entries(project)
        by_name, n, c = _runs(uri)
        assert n == 4 and by_name["vectors@sycophantic"].info.run_id == during.run_id
        _assert_replayed(uri, project, ["sycophantic", "hallucinating"], entries)
        assert len(_versions(c, "persona-vector-evil")) == 2
