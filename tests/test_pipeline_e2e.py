"""End to end on the embedded model: the Prefect flow under a test harness drives the DVC
stages in a temporary git repo, MLflow records and registers; then plain `dvc repro` has
nothing to do, and changing one trait's parameter reruns only that trait."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, run_dvc

ROOT = Path(__file__).resolve().parents[1]
TRAITS = ["evil", "sycophantic"]
pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str):
    return run_dvc(project, *args)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (code deps, data, dvc.yaml) with a tiny configuration."""
    proj = tmp_path_factory.mktemp("proj")
    copy_project(proj)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["traits"]["names"] = TRAITS
    params["traits"]["per_trait"] = {t: {"assistant_name": t} for t in TRAITS}
    params["generate"].update(questions_limit=1, max_new_tokens=12)
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def mlflow_store(project):
    uri = f"sqlite:///{project}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def flow_result(project, mlflow_store, tmp_path_factory):
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipelines import persona_vectors

    with prefect_test_harness(server_startup_timeout=120):
        return persona_vectors(root=str(project))


def test_flow_produces_registered_vectors(project, flow_result):
    import mlflow
    from mlflow import MlflowClient

    from persona_ops.interp.vectors import load_vectors

    assert flow_result["traits"] == TRAITS
    client = MlflowClient()
    for trait in TRAITS:
        vecs, meta = load_vectors(project / f"outputs/persona_vectors/{trait}/vectors.safetensors")
        assert vecs["response_avg"].shape == (31, 576)  # 30 blocks + embeddings, hidden 576
        assert vecs["response_avg"][1:].norm(dim=-1).min() > 0
        assert json.loads(meta["provenance"])["inputs"]
        mv = client.get_model_version_by_alias(f"persona-vector-{trait}", "candidate")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/persona-vector-{trait}@candidate"))
        files = list(local.rglob("*.safetensors")) if local.is_dir() else [local]
        assert files and files[0].read_bytes() == (project / f"outputs/persona_vectors/{trait}/vectors.safetensors").read_bytes()
        assert mv.tags["model"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
    # one MLflow run per stage execution, nested under the pipeline run
    children = client.search_runs(
        [client.get_experiment_by_name("persona-vectors").experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{flow_result['pipeline_run_id']}'")
    assert sorted(r.data.tags["mlflow.runName"] for r in children) == sorted(
        f"{s}@{t}" for s in ("generate", "judge", "activations", "vectors") for t in TRAITS)
    judge_run = next(r for r in children if r.data.tags["mlflow.runName"] == "judge@evil")
    assert judge_run.data.metrics["judged"] == 10  # 5 instructions x 1 question x 2 polarities
    assert any(k.startswith("dvc.") and k.endswith(".md5") for k in judge_run.data.tags)
    assert judge_run.data.tags["git.commit"]


def test_dvc_repro_after_the_flow_has_nothing_to_do(project, flow_result):
    status = _dvc(project, "status", "--json", "vectors")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
    out = _dvc(project, "repro", "vectors")
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout


def test_one_traits_parameter_reruns_only_that_trait(project, flow_result):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["traits"]["per_trait"]["evil"]["filter"] = {"coherence_min": 0.0}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(_dvc(project, "status", "--json", "vectors").stdout)
    assert changed and all(name.endswith("@evil") for name in changed), changed
    out = _dvc(project, "repro", "vectors")
    assert out.returncode == 0, out.stderr
    running = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'judge@evil':" in running and all("@evil'" in line for line in running), running
    judge = json.loads((project / "metrics/persona_vectors/evil/judge.json").read_text())
    assert judge["judge_backend_calls"] == 0  # same answers: every judgement came from the cache
    assert json.loads(_dvc(project, "status", "--json", "vectors").stdout or "{}") == {}


def test_too_few_pairs_stops_with_a_clear_message(project, flow_result):
    from typer.testing import CliRunner

    from persona_ops.cli import app

    result = CliRunner().invoke(app, ["stage", "activations", "--trait", "sycophantic", "--root", str(project),
                                      "-S", "filter.min_pairs=1000", "-S", "tracking.enabled=false"])
    assert result.exit_code == 2
    assert "pairs passed the filter" in result.output and "filter.min_pairs=1000" in result.output
