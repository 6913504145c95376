"""persona_ops.tracking against a real MLflow SQLite store in tmp_path."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient
from safetensors.torch import save_file

from persona_ops import tracking
from persona_ops.io import sha256_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory) -> Path:
    """An empty, fully migrated MLflow database (creating one costs ~4 s on 2 cores)."""
    d = tmp_path_factory.mktemp("mlflow-template")
    MlflowClient(tracking_uri=f"sqlite:///{d}/mlflow.db").search_experiments()
    return d / "mlflow.db"


@pytest.fixture()
def store(tmp_path, monkeypatch, empty_db) -> Path:
    """A fresh MLflow store: sqlite in tmp_path, cwd there so mlruns/ lands there too."""
    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.delenv(tracking.PARENT_RUN_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    tracking.configure(tmp_path)
    return tmp_path


def _children(parent_id: str) -> dict[str, mlflow.entities.Run]:
    runs = MlflowClient().search_runs(
        experiment_ids=[tracking.experiment_id("persona-vectors")],
        filter_string=f"tags.mlflow.parentRunId = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def test_pipeline_and_stage_runs_nest(store, monkeypatch):
    params = {"judge": {"model": "gpt-4.1-mini", "api_key": "sk-very-secret", "top_k": 20},
              "layers": [4, 8], "prompt": "x" * 10_000, "openai_token": "tok-123"}
    note = store / "note.txt"
    note.write_text("hello")
    with tracking.pipeline_run("persona-vectors", params={"trait": "evil"},
                               tags={"trigger": "test"}) as pid:
        with tracking.stage_run("generate", experiment="persona-vectors", parent_run_id=pid,
                                params=params, tags={"judge.password": "hunter2"}) as s:
            s.log_metrics({"n_kept": 17, "score": {"mean": 61.5}, "label": "skip-me"}, step=2)
            s.log_artifact(note)
            s.set_tags({"phase": "gen"})
        with tracking.stage_run("judge", experiment="persona-vectors", parent_run_id=pid,
                                params={}, tags={}):
            pass
        monkeypatch.setenv(tracking.PARENT_RUN_ENV, pid)  # as passed through `dvc repro`
        with tracking.stage_run("vectors", experiment="persona-vectors", params={"n": 1},
                                tags={}) as s3:
            pass
        with pytest.raises(RuntimeError):
            with tracking.stage_run("broken", experiment="persona-vectors", params={}, tags={}):
                raise RuntimeError("boom")

    client = MlflowClient()
    top = client.get_run(pid)
    assert top.info.status == "FINISHED"
    assert top.data.tags["persona_ops.pipeline"] == "persona-vectors"
    assert top.data.tags["git.commit"]
    assert top.data.tags["trigger"] == "test"
    assert tracking._PARENT_TAG not in top.data.tags

    kids = _children(pid)
    assert set(kids) == {"generate", "judge", "vectors", "broken"}
    assert kids["vectors"].info.run_id == s3.run_id
    assert kids["broken"].info.status == "FAILED"
    assert kids["judge"].info.status == "FINISHED"

    gen = kids["generate"]
    p = gen.data.params
    assert p["judge.model"] == "gpt-4.1-mini"
    assert p["judge.top_k"] == "20"
    assert p["layers"] == "[4,8]"
    assert len(p["prompt"]) == 6000
    for run in [top, *kids.values()]:
        assert not any(tracking.is_secret(k) for k in run.data.params)
        values = [*run.data.params.values(), *run.data.tags.values()]
        assert not any(v in ("sk-very-secret", "tok-123", "hunter2") for v in values)
    assert "judge.api_key" not in p
    assert gen.data.metrics == {"n_kept": 17.0, "score.mean": 61.5}
    assert gen.data.tags["phase"] == "gen"
    assert gen.data.tags["persona_ops.stage"] == "generate"
    # the artifact landed under <cwd>/mlruns, where the server script serves from
    art = Path(gen.info.artifact_uri.removeprefix("file://")) / "note.txt"
    assert art.read_text() == "hello"
    assert art.is_relative_to(store / "mlruns")


def _vector(path: Path, seed: int, model: str) -> bytes:
    g = torch.Generator().manual_seed(seed)
    save_file({"vector": torch.randn(5, 8, generator=g)}, str(path))
    path.with_suffix(".json").write_text(json.dumps({"model": model, "trait": "evil"}))
    return path.read_bytes()


def test_register_vector_twice(store):
    vec = store / "out" / "vectors" / "evil.safetensors"
    vec.parent.mkdir(parents=True)
    with tracking.stage_run("vectors", experiment="persona-vectors", parent_run_id=None,
                            params={}, tags={}) as s:
        v1_bytes = _vector(vec, 1, "tiny@abc")
        v1 = tracking.register_vector(vec, trait="evil", run_id=s.run_id,
                                      tags={"layer": 3, "hf_token": "nope"}, dvc_md5="md5-one")
        v2_bytes = _vector(vec, 2, "tiny@def")  # the stage rewrites the same path
        v2 = tracking.register_vector(vec, trait="evil", run_id=s.run_id, tags={"layer": 3})
    assert (v1, v2) == (1, 2)
    assert v1_bytes != v2_bytes

    client = MlflowClient()
    name = "persona-vector-evil"
    assert int(client.get_model_version_by_alias(name, "candidate").version) == 2
    t1 = client.get_model_version(name, "1").tags
    t2 = client.get_model_version(name, "2").tags
    assert t1["dvc_md5"] == "md5-one" and t1["model"] == "tiny@abc"
    assert "hf_token" not in t1
    assert t2["sha256"] == sha256_path(vec)
    assert t2["model"] == "tiny@def"  # from the sidecar
    assert t2["dvc_md5"] == hashlib.md5(v2_bytes).hexdigest()  # what DVC 3 records for a file
    assert t2["source.path"] == "out/vectors/evil.safetensors"
    assert t2["layer"] == "3" and t2["trait"] == "evil"
    assert client.get_model_version(name, "2").run_id == s.run_id

    got = tracking.load_registered_vector("evil", dst=store / "dl")
    assert got.read_bytes() == v2_bytes
    assert json.loads(got.with_suffix(".json").read_text())["model"] == "tiny@def"
    # the plain MLflow route works too, and version 1 kept its own bytes
    by_alias = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@candidate"))
    assert (by_alias / "evil.safetensors").read_bytes() == v2_bytes
    old = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1"))
    assert (old / "evil.safetensors").read_bytes() == v1_bytes

    with pytest.raises(tracking.InputError):
        tracking.load_registered_vector("evil", alias="champion")

    s_ = tracking.summary("persona-vectors")
    assert s_["tracking_uri"] == f"sqlite:///{store}/mlflow.db"
    assert s_["experiment"]["location"].startswith(str(store / "mlruns"))
    [m] = s_["registered_models"]
    assert (m["name"], m["version"], m["source_path"]) == (name, 2, "out/vectors/evil.safetensors")
    assert "persona-vector-evil@candidate = v2" in tracking.format_summary(s_)


DVC_LOCK = """\
schema: '2.0'
stages:
  vectors@evil:
    cmd: persona-ops stage vectors --trait evil
    deps:
    - path: data/acts/evil
      hash: md5
      md5: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir
      size: 1024
      nfiles: 2
    - path: persona_ops/vectors.py
      hash: md5
      md5: {code_md5}
      size: 10
    params:
      params.yaml:
        vectors.layers: [4, 8]
    outs:
    - path: out/vectors/evil.safetensors
      hash: md5
      md5: {out_md5}
      size: 99
  other:
    cmd: echo
    outs:
    - path: out/other.json
      md5: dddddddddddddddddddddddddddddddd
"""


def _md5(b: bytes) -> str:
    return hashlib.md5(b).hexdigest()


def test_lineage_tags_from_dvc_lock(store):
    sha = "e" * 64
    inputs = {"data/traits/evil.json": sha, str(store / "data/acts/evil"): "f" * 64}
    no_lock = tracking.lineage_tags(model_label="m@r", inputs=inputs, dvc_stage="vectors@evil",
                                    project_root=store)
    assert not any(k.startswith("dvc.") and k.endswith(".md5") for k in no_lock)

    (store / "persona_ops").mkdir()
    (store / "persona_ops/vectors.py").write_bytes(b"code")
    out = store / "out/vectors/evil.safetensors"
    out.parent.mkdir(parents=True)
    out.write_bytes(b"new vector")  # being rewritten by the running stage
    (store / "dvc.lock").write_text(DVC_LOCK.format(code_md5=_md5(b"code"),
                                                    out_md5=_md5(b"old vector")))
    tags = tracking.lineage_tags(model_label="HuggingFaceTB/SmolLM2-135M-Instruct@main",
                                 inputs=inputs, dvc_stage="vectors@evil", project_root=store)
    assert tags["model"] == "HuggingFaceTB/SmolLM2-135M-Instruct@main"
    assert tags["git.commit"]
    assert tags["input.data/traits/evil.json.sha256"] == sha
    assert tags["input.data/acts/evil.sha256"] == "f" * 64  # absolute path made relative
    assert tags["dvc.stage"] == "vectors@evil"
    assert tags["dvc.data/acts/evil.md5"] == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir"
    assert tags["dvc.persona_ops/vectors.py.md5"] == _md5(b"code")
    assert "dvc.out/vectors/evil.safetensors.md5" not in tags  # stale lock entry left out
    assert "dvc.out/other.json.md5" not in tags  # another stage
    none = tracking.lineage_tags(model_label="m", inputs={}, dvc_stage="missing@x",
                                 project_root=store)
    assert not any(k.endswith(".md5") for k in none)

    with tracking.pipeline_run("persona-vectors", params={}, tags={}) as pid:
        with tracking.stage_run("vectors@evil", experiment="persona-vectors", parent_run_id=pid,
                                params={}, tags={}) as s:
            s.log_lineage(model_label="m@r", inputs=inputs, dvc_stage="vectors@evil",
                          project_root=store)
    run = MlflowClient().get_run(s.run_id)
    assert run.data.tags["dvc.data/acts/evil.md5"].endswith(".dir")
    got = {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags})
           for d in run.inputs.dataset_inputs}
    assert got["data/acts/evil"][0] == "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.dir"  # DVC md5 wins
    assert got["data/acts/evil"][1]["mlflow.data.context"] == "dvc-dep"
    assert got["persona_ops/vectors.py"][0] == _md5(b"code")
    assert got["data/traits/evil.json"][0] == sha[:36]  # MLflow caps digests at 36 chars
    assert got["data/traits/evil.json"][1] == {"mlflow.data.context": "input",
                                               "dvc_stage": "vectors@evil"}
    assert len(got) == 3

    # `dvc repro` finished and rewrote the lock: the flow refreshes its stage runs' tags.
    (store / "dvc.lock").write_text(DVC_LOCK.format(code_md5=_md5(b"code"),
                                                    out_md5=_md5(b"new vector")))
    assert tracking.refresh_dvc_tags(pid, store) == 1
    tags = MlflowClient().get_run(s.run_id).data.tags
    assert tags["dvc.out/vectors/evil.safetensors.md5"] == _md5(b"new vector")


def test_params_helpers():
    assert tracking.flatten({"a": {"b": {"c": 1}}, "d": {}}) == {"a.b.c": 1, "d": {}}
    clean = tracking.clean_params({"judge": {"API_KEY": "x", "url": "http://h"}, "Password": 1,
                                   "k" * 300: "v", "flag": True, "none": None})
    assert clean == {"judge.url": "http://h", "flag": "True", "none": "None",
                     tracking._fit_key("k" * 300): "v"}
    assert len(tracking._fit_key("k" * 300)) == 250


def test_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.tracking_uri(tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert tracking.tracking_uri(tmp_path) == "http://127.0.0.1:5999"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_start_server_serves_the_project_store(store, monkeypatch):
    # A run logged locally (no server) before the server starts ...
    (store / "a.txt").write_text("from the local client")
    with tracking.stage_run("s", experiment="persona-vectors", parent_run_id=None,
                            params={}, tags={}) as s:
        s.log_artifact(store / "a.txt")
        vec = store / "evil.safetensors"
        v1_bytes = _vector(vec, 1, "tiny@abc")
        tracking.register_vector(vec, trait="evil", run_id=s.run_id, tags={})
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
        tracking.configure(store)
        eid = tracking.experiment_id("via-server")
        assert MlflowClient().get_experiment(eid).artifact_location == str(store / "mlruns" / eid)
        assert f"{base}/#/experiments/{eid}" == tracking.summary("via-server")["experiment"]["location"]
        # Registering and loading through the server use the same files.
        with tracking.stage_run("s2", experiment="via-server", params={}, tags={}) as s2:
            v2_bytes = _vector(vec, 2, "tiny@def")
            assert tracking.register_vector(vec, trait="evil", run_id=s2.run_id, tags={}) == 2
        assert tracking.load_registered_vector("evil", dst=store / "dl").read_bytes() == v2_bytes
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
