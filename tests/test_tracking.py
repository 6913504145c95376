"""persona_ops.tracking against a real MLflow SQLite store in tmp_path: runs, the registry,
resolving ``models:/`` URIs, and stages that never depend on the store being up."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
from conftest import params_of, run_stage
from safetensors.torch import save_file

from mlflow import MlflowClient
from persona_ops.interp.vectors import load_vectors
from persona_ops.io import sha256_path
from persona_ops.tracking import registry, runs
from persona_ops.tracking import store as store_module

REPO = Path(__file__).resolve().parents[1]




def test_pipeline_and_stage_runs_nest_in_one_experiment_without_secrets(store):
    params = {"judge": {"model": "gpt-4.1-mini", "api_key": "sk-very-secret", "top_k": 20},
              "layers": [4, 8], "prompt": "x" * 10_000, "openai_token": "tok-123"}
    note = store / "note.txt"
    note.write_text("hello")
    with runs.start_run("steering-sweep", "steering-sweep", tags={"trigger": "test"}) as top:
        with runs.start_run("steering-sweep", "generate@evil", parent_run_id=top.run_id, params=params,
                            tags={"judge.password": "hunter2"}) as s:
            s.log_metrics({"n_kept": 17, "score": {"mean": 61.5}, "label": "skip-me", "flag": True}, step=2)
            s.log_artifact(note)
            s.log_json({"stage": "generate"}, runs.RECORD)
        with pytest.raises(RuntimeError):
            with runs.start_run("steering-sweep", "broken", parent_run_id=top.run_id):
                raise RuntimeError("boom")
    client = MlflowClient()
    kids = {r.info.run_name: r for r in runs.children(top.run_id)}
    assert set(kids) == {"generate@evil", "broken"} and kids["broken"].info.status == "FAILED"
    assert {r.info.experiment_id for r in kids.values()} == {client.get_run(top.run_id).info.experiment_id}
    gen = kids["generate@evil"]
    p = gen.data.params
    assert p["judge.model"] == "gpt-4.1-mini" and p["judge.top_k"] == "20" and p["layers"] == "[4,8]"
    assert len(p["prompt"]) == 6000 and "judge.api_key" not in p
    for run in [client.get_run(top.run_id), *kids.values()]:
        assert not any(runs.is_secret(k) for k in run.data.params)
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(v in ("sk-very-secret", "tok-123", "hunter2") for v in values)
    assert gen.data.metrics == {"n_kept": 17.0, "score.mean": 61.5}
    assert runs.run_record(gen.info.run_id) == {"stage": "generate"} and runs.run_record(top.run_id) is None
    art = Path(gen.info.artifact_uri.removeprefix("file://")) / "note.txt"
    assert art.read_text() == "hello" and art.is_relative_to(store / "mlruns")


def _vector(path: Path, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    save_file({"vector": torch.randn(5, 8, generator=g)}, str(path))
    path.with_name(path.name + ".prov.json").write_text('{"stage": "vectors"}')
    return path.read_bytes()


def _register(vec: Path, run_id: str, root: Path) -> int:
    return registry.register("persona-vector-evil", vec, kind="persona-vector", run_id=run_id,
                             source_path=vec.relative_to(root).as_posix(), model="tiny@abc",
                             sidecar=vec.with_name(vec.name + ".prov.json"), tags={"hf_token": "nope"})


def test_registered_versions_carry_kind_run_and_hash_and_resolve(store):
    vec = store / "out" / "evil.safetensors"
    vec.parent.mkdir(parents=True)
    with runs.start_run("persona-vectors", "vectors@evil") as s:
        v1_bytes = _vector(vec, 1)
        v1_sha = sha256_path(vec)
        v1 = _register(vec, s.run_id, store)
        v2_bytes = _vector(vec, 2)  # the stage rewrites the same path
        v2 = _register(vec, s.run_id, store)
    assert (v1, v2) == (1, 2) and v1_bytes != v2_bytes
    client = MlflowClient()
    mv1 = client.get_model_version("persona-vector-evil", "1")
    assert mv1.tags["kind"] == "persona-vector" and mv1.tags["run_id"] == s.run_id
    assert mv1.tags["sha256"] == v1_sha and mv1.tags["source.path"] == "out/evil.safetensors"
    assert "hf_token" not in mv1.tags and mv1.tags["model"] == "tiny@abc"
    assert client.get_registered_model("persona-vector-evil").tags[registry.KIND_TAG] == "persona-vector"
    assert int(client.get_model_version_by_alias("persona-vector-evil", "candidate").version) == 2
    local, version = registry.resolve("models:/persona-vector-evil/1", dst=store / "dl1")
    assert local.read_bytes() == v1_bytes and version.uri == "models:/persona-vector-evil/1"
    assert (local.parent / "evil.safetensors.prov.json").is_file()  # the provenance travels with it
    assert registry.resolve("models:/persona-vector-evil@candidate", dst=store / "dl2")[0].read_bytes() == v2_bytes
    with pytest.raises(Exception, match="not in the registry"):
        registry.version_of("models:/persona-vector-evil@champion")
    with pytest.raises(Exception, match="expected models:/NAME@ALIAS"):
        registry.version_of("models:/persona-vector-evil")


def test_params_helpers():
    assert runs.flatten({"a": {"b": {"c": 1}}, "d": {}}) == {"a.b.c": 1, "d": {}}
    clean = runs.clean_params({"judge": {"API_KEY": "x", "url": "http://h"}, "Password": 1,
                               "k" * 300: "v", "flag": True, "none": None})
    assert clean == {"judge.url": "http://h", "flag": "True", "none": "None", runs._fit_key("k" * 300): "v"}
    assert len(runs._fit_key("k" * 300)) == 250


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert store_module.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert store_module.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def test_a_stage_runs_the_same_when_the_tracking_server_is_down(tmp_path, monkeypatch, caplog):
    """Outputs never depend on MLflow: with the store unreachable the stage warns, keeps its records
    in the outbox (tests/test_tracking_outage.py replays them) and makes the same outputs."""
    import logging

    shutil.copytree(REPO / "data/traits/extract", tmp_path / "data/traits/extract")
    vec_dir = tmp_path / "outputs/persona_vectors/evil"
    vec_dir.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    save_file({"pos.response_avg": torch.randn(3, 5, 8, generator=g),
               "neg.response_avg": torch.randn(3, 5, 8, generator=g)}, str(vec_dir / "activations.safetensors"))
    params = params_of({"tracking": {"enabled": True}})
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    caplog.set_level(logging.WARNING)
    down = run_stage("vectors", params, tmp_path, "evil")
    assert down.run_id is None and "persona-ops track sync" in caplog.text
    assert len(list((tmp_path / ".persona-ops/tracking-outbox").glob("*.json"))) == 1
    first = load_vectors(vec_dir / "vectors.safetensors")
    untracked = run_stage("vectors", params_of({}), tmp_path, "evil")
    again = load_vectors(vec_dir / "vectors.safetensors")  # (safetensors orders header keys at random)
    assert again[1] == first[1] and all(torch.equal(again[0][k], v) for k, v in first[0].items())
    assert untracked.metrics == down.metrics and down.record["run_id"] is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_start_server_serves_the_project_store(store, monkeypatch):
    # A run logged locally (no server) before the server starts ...
    (store / "a.txt").write_text("from the local client")
    with runs.start_run("persona-vectors", "s") as s:
        s.log_artifact(store / "a.txt")
        vec = store / "evil.safetensors"
        v1_bytes = _vector(vec, 1)
        _register(vec, s.run_id, store)
    model_id = MlflowClient().get_model_version("persona-vector-evil", 1).source.split("/")[-1]

    port = _free_port()
    env = {**os.environ, "PERSONA_OPS_ROOT": str(store), "MLFLOW_PORT": str(port)}
    env.pop("MLFLOW_HOST", None)
    env.pop("MLFLOW_TRACKING_URI", None)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    log = open(store / "server.log", "wb")
    proc = subprocess.Popen([str(REPO / "mlflow" / "start-server.sh")], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                    assert r.status == 200 and r.read().strip() == b"OK"
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("server did not start:\n" + (store / "server.log").read_text())
                time.sleep(0.5)
        # ... is visible through it, artifacts included.
        with urllib.request.urlopen(f"{base}/get-artifact?path=a.txt&run_uuid={s.run_id}") as r:
            assert r.read() == b"from the local client"
        with urllib.request.urlopen(f"{base}/ajax-api/2.0/mlflow/logged-models/{model_id}"
                                    "/artifacts/files?artifact_file_path=evil.safetensors") as r:
            assert r.read() == v1_bytes
        # An experiment created through the server lands in the same mlruns/ layout.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", base)
        store_module.configure(store)
        eid = store_module.experiment_id("via-server")
        assert MlflowClient().get_experiment(eid).artifact_location == str(store / "mlruns" / eid)
        assert f"{base}/#/experiments/{eid}" == registry.summary("via-server")["experiment"]["location"]
        # Registering and loading through the server use the same files.
        with runs.start_run("via-server", "s2") as s2:
            v2_bytes = _vector(vec, 2)
            assert _register(vec, s2.run_id, store) == 2
        local, version = registry.resolve("models:/persona-vector-evil@candidate", dst=store / "dl")
        assert local.read_bytes() == v2_bytes and version.version == 2
        assert list((store / "mlruns" / eid / "models").glob("m-*/artifacts/evil.safetensors"))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
