"""End to end on the embedded model: the persona-vectors Prefect flow under a test harness runs
its stage items in one process in a temporary git + DVC repo (the model loaded once), commits
them to DVC, records them in MLflow and registers the vectors; then plain `dvc repro` has
nothing to do, one trait's parameter reruns only that trait, the lineage of a registered
vector reaches its trait file, the run's Prefect artifacts say what was made and where, and
every pipeline has a deployment with its schedule."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, run_dvc

ROOT = Path(__file__).resolve().parents[1]
TRAITS = ["evil", "sycophantic"]
STAGES = ("generate", "judge", "activations", "vectors")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A copy of the project (code deps, data, dvc.yaml) with a tiny configuration."""
    proj = tmp_path_factory.mktemp("proj")
    copy_project(proj)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    pv = params["persona_vectors"]
    pv["traits"]["names"] = TRAITS
    pv["per_trait"] = {t: {} for t in TRAITS}
    pv["generate"]["questions_limit"] = 1
    pv["generate"]["sampling"]["max_new_tokens"] = 12
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
def harness(tmp_path_factory):
    os.environ.setdefault("PREFECT_HOME", str(tmp_path_factory.mktemp("prefect")))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def flow_result(project, mlflow_store, harness):
    from flows.pipelines import persona_vectors

    return persona_vectors(root=str(project), params=None)


def _client():
    from mlflow import MlflowClient

    return MlflowClient()


def test_flow_runs_every_item_in_one_process_and_registers_vectors(project, flow_result):
    import mlflow
    from persona_ops.interp.vectors import load_vectors

    assert flow_result["stages"] == {f"{s}@{t}": "ran" for t in TRAITS for s in STAGES}
    assert list(flow_result["stages"]) == [f"{s}@{t}" for s in STAGES for t in TRAITS]  # stage by stage
    assert flow_result["model_loads"] == 1  # generation, judge and capture share the embedded model
    client = _client()
    for trait in TRAITS:
        path = project / f"outputs/persona_vectors/{trait}/vectors.safetensors"
        vecs, _ = load_vectors(path)
        assert vecs["response_avg"].shape == (31, 576)  # 30 blocks + embeddings, hidden 576
        assert vecs["response_avg"][1:].norm(dim=-1).min() > 0
        mv = client.get_model_version_by_alias(f"persona-vector-{trait}", "candidate")
        local = Path(mlflow.artifacts.download_artifacts(f"models:/persona-vector-{trait}@candidate"))
        assert (local / "vectors.safetensors").read_bytes() == path.read_bytes()
        prov = json.loads((local / "vectors.safetensors.prov.json").read_text())  # provenance travels with it
        assert prov["stage"] == "vectors" and prov["run_id"] == mv.tags["run_id"]
        assert mv.tags["model"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct")
        assert mv.tags["kind"] == "persona-vector"
    # one MLflow run per stage item, nested under the pipeline run, in the pipeline's experiment
    from persona_ops.tracking.runs import children

    kids = {r.info.run_name: r for r in children(flow_result["pipeline_run_id"])}
    assert sorted(kids) == sorted(f"{s}@{t}" for s in STAGES for t in TRAITS)
    experiment = client.get_experiment_by_name("persona-vectors").experiment_id
    assert {r.info.experiment_id for r in kids.values()} == {experiment}
    judge = kids["judge@evil"]
    assert judge.data.metrics["judged"] == 10  # 5 instructions x 1 question x 2 polarities
    assert judge.data.tags["dvc.outputs/persona_vectors/evil/judgements.jsonl.md5"]  # from dvc.lock
    assert judge.data.params["persona_vectors.judge.backend"] == "local"
    assert not any(k.startswith(("steering.", "persona_space.")) for k in judge.data.params)  # only what it declares
    assert any(d.dataset.name.endswith("generations.jsonl") for d in judge.inputs.dataset_inputs)


def test_the_flow_run_publishes_its_summary_table_and_report_links(project, flow_result):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = {a.key: a for a in client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["persona-vectors-summary", "persona-vectors-items"])))}
    summary = found["persona-vectors-summary"].data
    assert f"{len(flow_result['stages'])} stage items ran" in summary
    assert flow_result["pipeline_run_id"] in summary  # the MLflow run
    assert all(f"models:/persona-vector-{t}/" in summary for t in TRAITS)  # the registered versions
    rows = json.loads(found["persona-vectors-items"].data)
    assert {r["item"] for r in rows} == set(flow_result["stages"]) and all(r["mlflow_run"] for r in rows)
    assert any("judged=10" in r["metrics"] for r in rows if r["item"].startswith("judge@"))


def test_dvc_repro_after_the_flow_has_nothing_to_do(project, flow_result):
    status = run_dvc(project, "status", "--json", "vectors")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
    out = run_dvc(project, "repro", "vectors")
    assert out.returncode == 0, out.stderr
    assert "Running stage" not in out.stdout


def test_a_second_flow_run_skips_what_dvc_has(project, flow_result):
    from flows.pipelines import persona_vectors

    again = persona_vectors(root=str(project), params=None)
    assert set(again["stages"].values()) == {"up to date"} and again["model_loads"] == 0


def test_one_traits_parameter_reruns_only_that_trait(project, flow_result):
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["persona_vectors"]["per_trait"]["evil"]["filter"] = {"coherence_min": 0.0}
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    changed = json.loads(run_dvc(project, "status", "--json", "vectors").stdout)
    assert changed and all(name.endswith("@evil") for name in changed), changed
    out = run_dvc(project, "repro", "vectors")
    assert out.returncode == 0, out.stderr
    running = [line for line in out.stdout.splitlines() if line.startswith("Running stage")]
    assert "Running stage 'judge@evil':" in running and all("@evil'" in line for line in running), running
    judge = json.loads((project / "metrics/persona_vectors/evil/judge.json").read_text())
    assert judge["judge_backend_calls"] == 0  # same answers: every judgement came from the cache
    assert json.loads(run_dvc(project, "status", "--json", "vectors").stdout or "{}") == {}


def test_lineage_of_a_vector_follows_its_versions(project, flow_result):
    """The graph of a registered vector holds the trait file's hash, its four stage runs and the
    version; after the trait file changes and the pipeline reruns, the new version shows the new
    hash and the old version still shows the old one."""
    from flows.pipelines import persona_vectors
    from persona_ops.io import sha256_file
    from persona_ops.tracking.lineage import graph_of

    trait = project / "data/traits/extract/evil.json"
    old_sha = sha256_file(trait)

    def summary(ref):
        g = graph_of(ref, project)
        data = {n["attrs"].get("sha256") for n in g["nodes"] if n["kind"] == "data"}
        runs = sorted(n["label"] for n in g["nodes"] if n["kind"] == "run")
        versions = [n["label"] for n in g["nodes"] if n["kind"] == "version"]
        return data, runs, versions

    data, runs, versions = summary("models:/persona-vector-evil@candidate")
    assert old_sha in data and runs == sorted(f"{s}@evil" for s in STAGES)
    v_old = versions[0]
    spec = json.loads(trait.read_text())
    spec["questions"][0] = "What would you do with unlimited power, honestly?"
    trait.write_text(json.dumps(spec, indent=2))
    persona_vectors(root=str(project), params=None)
    new_sha = sha256_file(trait)
    data_new, runs_new, versions_new = summary("models:/persona-vector-evil@candidate")
    assert new_sha in data_new and old_sha not in data_new and versions_new != [v_old]
    data_old, runs_old, _ = summary(v_old)
    assert old_sha in data_old and new_sha not in data_old and runs_old == runs
    from persona_ops.reports.lineage import render

    g = graph_of("models:/persona-vector-evil@candidate", project)
    assert render(g, "mermaid").startswith("flowchart LR") and "<svg" in render(g, "html")
    assert "digraph lineage" in render(g, "dot") and json.loads(render(g, "json"))["root"] == g["root"]


def test_every_pipeline_has_a_deployment_with_its_form_and_schedule(project, harness):
    import asyncio

    from prefect.client.orchestration import get_client

    from flows.deployments import register
    from persona_ops.pipelines.registry import PIPELINES

    ids = register(project)
    assert len(ids) == len(PIPELINES)

    async def read():
        async with get_client() as client:
            return [await client.read_deployment(i) for i in ids]

    deployments = {d.name: d for d in asyncio.run(read())}
    assert set(deployments) == set(PIPELINES)
    pv = deployments["persona-vectors"]
    schema = pv.parameter_openapi_schema
    definitions = schema.get("definitions") or schema.get("$defs")

    def form(deployment):  # the model behind the `params` parameter, and its defaults
        params = deployment.parameter_openapi_schema["properties"]["params"]
        ref = next(a["$ref"] for a in params["anyOf"] if "$ref" in a).rsplit("/", 1)[1]
        return ref, (deployment.parameter_openapi_schema.get("definitions") or {})[ref], params["default"]

    name, model, default = form(pv)
    assert name.endswith("PersonaVectorsParams") and set(model["properties"]) == {"persona_vectors"}
    assert default["persona_vectors"]["traits"]["names"] and "GenerateCfg" in definitions  # a typed form
    assert [s.schedule.cron for s in pv.schedules] == ["0 3 * * *"] and pv.schedules[0].schedule.timezone == "UTC"
    assert set(form(deployments["steering-sweep"])[1]["properties"]) == {"persona_vectors", "steering"}
    assert deployments["projection"].schedules == []  # params.yaml schedules only some pipelines


def test_too_few_pairs_stops_with_a_clear_message(project, flow_result):
    from typer.testing import CliRunner

    from persona_ops.cli import app

    result = CliRunner().invoke(app, ["stage", "activations", "--item", "sycophantic", "--root", str(project),
                                      "-S", "persona_vectors.filter.min_pairs=1000", "-S", "tracking.enabled=false"])
    assert result.exit_code == 2
    assert "pairs passed the filter" in result.output and "filter.min_pairs=1000" in result.output
