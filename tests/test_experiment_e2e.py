"""`persona-ops experiment` end to end on the embedded model, as a researcher runs it: train the
matrix (a second `train` trains nothing), see each cell's status, evaluate and write the report,
then promote an adapter behind a gate (a failing gate is refused) and follow its lineage; DVC has
nothing left to do. The persona vectors are random ones of the embedded model's shape (the
persona-vectors pipeline has its own end-to-end test)."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import copy_project, persona_ops_cli, run_dvc
from test_trait_finetune import vector_file

pytestmark = pytest.mark.slow
ADAPTER = "lora-adapter-traits-evil-misaligned_2"


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = copy_project(tmp_path_factory.mktemp("experiment"))
    (proj / "vectors").mkdir()
    for seed, trait in enumerate(("evil", "sycophantic")):
        vector_file(proj / "vectors" / f"{trait}.safetensors", seed, layers=30, hidden=576)
    params = yaml.safe_load((proj / "params.yaml").read_text())
    ft = params["trait_finetune"]
    ft["traits"], ft["strengths"] = ["evil"], ["normal", "misaligned_2"]
    ft["training"]["train"].update(max_steps=2, save_every=1, batch_size=2, max_length=96)
    ft["evaluation"].update(traits=["evil", "sycophantic"], questions_limit=1, checkpoints="all",
                            vectors={t: f"vectors/{t}.safetensors" for t in ("evil", "sycophantic")})
    ft["evaluation"]["sampling"]["max_new_tokens"] = 8
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def cli(project, tmp_path_factory):
    with persona_ops_cli(project, tmp_path_factory.mktemp("prefect")) as invoke:
        yield invoke


@pytest.fixture(scope="module")
def trained(cli):
    first = cli("experiment", "train")
    assert first.returncode == 0, first.stdout
    return first


def test_train_then_train_again_trains_nothing(cli, trained, project):
    assert "trait-finetune: 2 stage items ran, 0 up to date" in trained.stdout
    assert "2/2 cells trained" in trained.stdout
    again = cli("experiment", "train")
    assert again.returncode == 0 and "0 stage items ran, 2 up to date; 0 model loads" in again.stdout, again.stdout


def test_status_shows_each_cell_with_its_registered_adapter(cli, trained):
    out = cli("experiment", "status")
    assert out.returncode == 0, out.stdout
    for strength in ("normal", "misaligned_2"):
        line = next(x for x in out.stdout.splitlines() if f"evil-{strength} " in x)
        assert "succeeded" in line and "local" in line and f"models:/lora-adapter-traits-evil-{strength}/1" in line


def test_results_evaluate_every_cell_and_write_the_report(cli, trained, project):
    out = cli("experiment", "results")
    assert out.returncode == 0, out.stdout
    assert "0 stage items ran" not in out.stdout and "evil-misaligned_2" in out.stdout
    results = json.loads((project / "outputs/trait_finetune/traits/results/eval_results.json").read_text())
    assert [c["cell"] for c in results["cells"]] == ["base", "evil-normal", "evil-misaligned_2"]
    assert all(c["scores"]["evil"]["coherence_mean"] is not None for c in results["cells"])  # the real judge scores
    assert (project / "outputs/trait_finetune/traits/results/report.html").is_file()
    status = run_dvc(project, "status", "--json", "ft_results")
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout


def test_a_gated_promotion_passes_or_is_refused_and_lineage_reaches_the_dataset(cli, trained, project):
    from persona_ops.tracking.lineage import graph_of

    assert cli("experiment", "results").returncode == 0  # evaluated (up to date after the test above)
    refused = cli("promote", ADAPTER, "--version", "1", "--if", "evil.coherence_mean > 1000")
    assert refused.returncode == 1 and "evil.coherence_mean > 1000 failed" in refused.stderr
    passed = cli("promote", ADAPTER, "--version", "1", "--if", "evil.coherence_mean >= 0 and final_loss > 0")
    assert passed.returncode == 0, passed.stdout
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"  # (restored by conftest)
    graph = graph_of(f"models:/{ADAPTER}@champion", project)
    data = {n["label"] for n in graph["nodes"] if n["kind"] == "data"}
    assert any(label.endswith("evil/misaligned_2.jsonl") for label in data), data


@pytest.mark.browser
def test_the_report_of_the_run_opens_in_a_browser_with_its_tabs(cli, trained, project, tmp_path):
    from browser import chromium_page, walk_tabs

    assert cli("experiment", "results").returncode == 0
    report = project / "outputs/trait_finetune/traits/results/report.html"
    tabs = ["evil", "Across cells", "Table"]
    with chromium_page() as (page, requests, errors):
        page.goto(report.as_uri())
        walk_tabs(page, tabs, tmp_path)
        assert "evil-misaligned_2" in page.locator(f"#panel-{len(tabs) - 1}").inner_text()
    assert errors == [] and all(u.startswith(("file:", "data:")) for u in requests)
