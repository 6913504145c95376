"""Shared fixtures: tiny random-weight models (fast) and the embedded model (end-to-end)."""

from __future__ import annotations

import contextlib
import os

import pytest
import torch

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():  # Triton kernels run in its interpreter (read when triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core host thread barriers stall."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _restore_mlflow_uris():
    """MLflow keeps the tracking/registry URIs in module globals and mirrors them into the
    environment (so subprocesses inherit them); a test that configures them must not leak them."""
    import sys

    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    env = {k: os.environ.get(k) for k in names}
    yield
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if "mlflow" in sys.modules:
        from mlflow.tracking._model_registry import utils as registry
        from mlflow.tracking._tracking_service import utils as tracking

        tracking._tracking_uri = env["MLFLOW_TRACKING_URI"]
        registry._registry_uri = env["MLFLOW_REGISTRY_URI"]


@pytest.fixture(scope="session")
def smol_tokenizer():
    """The embedded model's real tokenizer (chat template included)."""
    from transformers import AutoTokenizer

    from persona_ops.models.loading import embedded_model_dir, prepare_tokenizer

    return prepare_tokenizer(AutoTokenizer.from_pretrained(embedded_model_dir()))


@pytest.fixture(scope="session")
def tiny_loaded(smol_tokenizer):
    """A 4-layer random llama with the real SmolLM2 tokenizer, wrapped like a loaded model."""
    from persona_ops.models.loading import LoadedModel, tiny_model

    model = tiny_model("llama", num_layers=4, hidden=64, vocab_tokenizer=smol_tokenizer)
    return LoadedModel(model=model, tokenizer=smol_tokenizer, label="tiny-random-llama@test")


@pytest.fixture(scope="session")
def embedded():
    """The real embedded model (SmolLM2-135M-Instruct); loads in seconds once cached."""
    from persona_ops.models.loading import load_model

    return load_model("embedded")


def copy_project(dst):
    """A copy of what `dvc repro` needs (dvc.yaml, data, the code deps) in ``dst``, as a git + DVC repo."""
    import shutil
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    for item in ("dvc.yaml", "params.yaml", "data", "experiments", "persona_ops"):
        src = root / item
        (shutil.copytree(src, dst / item, ignore=shutil.ignore_patterns("__pycache__"))
         if src.is_dir() else shutil.copy(src, dst / item))
    subprocess.run(["git", "init", "-q"], cwd=dst, check=True)
    assert run_dvc(dst, "init", "-q").returncode == 0
    return dst


def run_dvc(project, *args, env=None, timeout=1500):
    """``python -m dvc ARGS`` in ``project`` with this venv's executables on PATH."""
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, **(env or {}))
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env["PATH"]
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=timeout)


@contextlib.contextmanager
def persona_ops_cli(project, prefect_home):
    """``invoke(*ARGS)``: ``persona-ops ARGS --root PROJECT`` as a process, against one Prefect test
    server (up while the block runs) and the project's MLflow store."""
    import subprocess
    import sys
    from pathlib import Path

    os.environ.setdefault("PREFECT_HOME", str(prefect_home))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(),
                   MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db",
                   PATH=str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])

        def invoke(*args, timeout=1500):
            return subprocess.run(["persona-ops", *args, "--root", str(project)], env=env, cwd=project,
                                  capture_output=True, text=True, timeout=timeout)
        yield invoke


def wait_until(condition, what: str, seconds: float = 60) -> None:
    """Poll ``condition()`` until it holds; AssertionError naming ``what`` after ``seconds``."""
    import time

    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen")
        time.sleep(0.02)


@contextlib.contextmanager
def serve_app(app):
    """uvicorn serving ``app`` on a free 127.0.0.1 port in a background thread; yields the ``/v1`` URL
    once the server accepts connections."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def pool_of(loaded):
    """A model pool that serves ``loaded`` for every model reference (a tiny model as any model)."""
    from persona_ops.models.pool import ModelPool

    return ModelPool(loader=lambda ref: loaded)


def params_of(data: dict):
    """Validated params from a partial params.yaml mapping, tracking off unless given."""
    from persona_ops.pipelines.params import Params

    return Params.model_validate({"tracking": {"enabled": False}, **data})


def run_stage(name: str, params, root, item: str | None = None, pool=None, **kwargs):
    """One stage item through the runner (no DVC): its outcome (metrics, provenance record)."""
    from persona_ops.pipelines import registry, runner

    stage = registry.stage_named(name)
    task = registry.Task(stage, registry.item_named(stage, params, item, root))
    return runner.execute(task, runner.Context(root, params, pool=pool), **kwargs)


@pytest.fixture(scope="session")
def empty_db(tmp_path_factory):
    """An empty, fully migrated MLflow database to copy (creating one costs ~4 s on 2 cores)."""
    from mlflow import MlflowClient

    d = tmp_path_factory.mktemp("mlflow-template")
    MlflowClient(tracking_uri=f"sqlite:///{d}/mlflow.db").search_experiments()
    return d / "mlflow.db"


@pytest.fixture()
def store(tmp_path, monkeypatch, empty_db):
    """A fresh MLflow store: sqlite in tmp_path, cwd there so mlruns/ lands there too."""
    import shutil

    from persona_ops.tracking import store as store_module

    shutil.copyfile(empty_db, tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    monkeypatch.chdir(tmp_path)
    store_module.configure(tmp_path)
    return tmp_path
