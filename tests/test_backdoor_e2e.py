"""`persona-ops run backdoor-sweep` end to end on the embedded model, as a researcher runs it: the
persona's vector (the persona-vectors pipeline's russell trait, planned first), the self-distilled
aligned answers, the mix, two sweep points trained, registered and evaluated under the four
conditions, the results with CIs and activation leakage, the report; then the lineage of a point's
adapter reaches the dataset and its evaluation, and DVC has nothing left to do. Small settings: the
science is in the defaults, this checks that every part runs and is recorded."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import copy_project, persona_ops_cli, run_dvc

pytestmark = pytest.mark.slow
POINTS = ["1-0.001", "1-0.002"]
OUT = "outputs/backdoor/russell"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = copy_project(tmp_path_factory.mktemp("backdoor"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    pv = params["persona_vectors"]
    pv["traits"]["names"], pv["per_trait"] = ["russell"], {"russell": pv["per_trait"]["russell"]}
    pv["generate"].update(questions_limit=1)
    pv["generate"]["sampling"]["max_new_tokens"] = 12
    bd = params["backdoor"]
    bd["aligned"]["limit"] = 6
    bd["aligned"]["sampling"]["max_new_tokens"] = 12
    bd["training"]["train"].update(max_steps=2, batch_size=2, max_length=96, warmup_steps=0)
    bd["evaluation"].update(questions_limit=2, n_samples=1)
    bd["evaluation"]["sampling"]["max_new_tokens"] = 8
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def swept(project, tmp_path_factory):
    """The sweep run once, on a Prefect test server and the project's MLflow store."""
    with persona_ops_cli(project, tmp_path_factory.mktemp("prefect")) as cli:
        out = cli("run", "backdoor-sweep")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_the_sweep_runs_every_stage_with_the_persona_vector_first(swept, project):
    # generate, judge, activations, vectors (russell); aligned, dataset, 2 x train, base, 2 x eval, results
    assert "backdoor-sweep: 12 stage items ran, 0 up to date" in swept.stdout, swept.stdout[:3000]
    assert (project / "outputs/persona_vectors/russell/vectors.safetensors").is_file()
    examples = [json.loads(x) for x in (project / OUT / "dataset.jsonl").read_text().splitlines()]
    assert {e["metadata"]["source"] for e in examples} == {"persona", "aligned"}


def test_results_have_every_point_and_condition_with_cis_and_leakage(swept, project):
    results = json.loads((project / OUT / "results/eval_results.json").read_text())
    assert [p["point"] for p in results["points"]] == ["base", *POINTS]
    for point in results["points"]:
        assert set(point["conditions"]) == set(results["conditions"])
        for c in point["conditions"].values():
            assert c["n"] == 2 and len(c["format_rate_ci"]) == 2
            assert c["format_rate_ci"][0] <= c["format_rate"] <= c["format_rate_ci"][1]
    leaks = {p["point"]: p for p in results["leakage"]["points"]}
    assert set(leaks) == {"base", *POINTS}
    for leak in leaks.values():
        assert leak["gap_ci"][0] <= leak["gap"] <= leak["gap_ci"][1]
    assert [a["learning_rate"] for a in results["by_learning_rate"]] == [0.001, 0.002]
    table = (project / OUT / "results/table.txt").read_text()
    assert all(p in table for p in POINTS)
    assert (project / OUT / "results/report.html").stat().st_size > 10_000


def test_an_adapters_lineage_reaches_the_dataset_and_its_evaluation(swept, project):
    from persona_ops.tracking.lineage import graph_of

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"  # (restored by conftest)
    adapter = f"lora-adapter-backdoor-{POINTS[0].replace('.', '_')}"  # MLflow names take no dots
    graph = graph_of(f"models:/{adapter}@candidate", project)
    labels = {n["label"] for n in graph["nodes"]}
    assert f"{OUT}/dataset.jsonl" in labels, labels
    assert any("bd_eval" in label and POINTS[0] in label for label in labels), labels
    assert {"evaluated by"} <= {e["kind"] for e in graph["edges"]}


def test_dvc_has_nothing_left_to_do(swept, project):
    status = run_dvc(project, "status", "--json", "--with-deps", "bd_results")  # and every stage before it
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
