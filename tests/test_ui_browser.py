"""The UIs `persona-ops ui` brings up, in headless chromium, on a copy of the project: the Prefect UI
(its default, V2, under /v2) lists every pipeline's deployment with its schedule and renders a
deployment's run form; a persona-vectors run launched through the Prefect API (one trait, one
instruction pair, one question) is run to Completed by the `ui`'s serving process, and its artifacts link
to its MLflow run and registered version; the MLflow UI shows its experiment, the pipeline run with its
nested stage runs, and the registered vector with its alias. A full-page
screenshot of every page checked lands in test-artifacts/screenshots/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import copy_project
from test_ui import prefect_deployments, ui_running

from persona_ops.pipelines.registry import PIPELINES

pytestmark = [pytest.mark.slow, pytest.mark.browser]
SHOTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "screenshots"
TRAIT = "evil"
STAGES = ("generate", "judge", "activations", "vectors")
TINY = [f"persona_vectors.traits.names=[{TRAIT}]", "persona_vectors.generate.questions_limit=1",
        "persona_vectors.generate.sampling.max_new_tokens=8"]
FLOW_RUN_TIMEOUT_S = 900


@pytest.fixture(scope="module")
def ui(tmp_path_factory):
    project = copy_project(tmp_path_factory.mktemp("ui-browser"))
    trait = project / "data/traits/extract" / f"{TRAIT}.json"  # one instruction pair: 2 answers to judge
    spec = json.loads(trait.read_text())
    trait.write_text(json.dumps({**spec, "instruction": spec["instruction"][:1]}, indent=2))
    with ui_running(project) as (_, state):
        yield project, state


def prefect_api(state: dict):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    return temporary_settings(updates={PREFECT_API_URL: f"{state['prefect_url']}/api"})


@pytest.fixture(scope="module")
def launched(ui):
    """A tiny persona-vectors run, created through the API and not awaited: it runs while the
    Prefect pages are checked."""
    from prefect.deployments import run_deployment

    project, state = ui
    with prefect_api(state):
        return run_deployment("persona-vectors/persona-vectors", timeout=0,
                              parameters={"root": str(project), "overrides": TINY})


@pytest.fixture(scope="module")
def finished(ui, launched):
    """The launched run once it reached a final state."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(launched.id)

    _, state = ui
    deadline = time.monotonic() + FLOW_RUN_TIMEOUT_S
    with prefect_api(state):
        while not (run := asyncio.run(read())).state.is_final():
            assert time.monotonic() < deadline, f"flow run still {run.state.name} after {FLOW_RUN_TIMEOUT_S} s"
            time.sleep(2)
    return run


def shot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    path = SHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    print(f"screenshot: {path}")


def cron_in_words(cron: str) -> str:
    """How the Prefect UI words a daily or weekly morning cron ("M H * * D", H < 12)."""
    minute, hour, _, _, day = cron.split()
    days = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
    words = f"At {int(hour):02d}:{int(minute):02d} AM"
    return words if day == "*" else f"{words}, only on {days[int(day)]}"


def test_the_prefect_ui_lists_the_deployments_with_schedules_and_renders_a_run_form(ui, launched):
    from browser import chromium_page
    from playwright.sync_api import expect

    project, state = ui
    base = state["prefect_url"]
    schedules = yaml.safe_load((project / "params.yaml").read_text())["orchestration"]["schedules"]
    deployments = {d.name: d for d in prefect_deployments(f"{base}/api")}
    with chromium_page() as (page, _, _):
        page.goto(base)
        page.wait_for_url(f"{base}/v2/**")  # the root opens the default UI
        page.goto(f"{base}/v2/deployments")
        expect(page.get_by_text(f"{len(PIPELINES)} Deployments")).to_be_visible(timeout=60_000)
        for name in PIPELINES:
            row = page.get_by_role("row").filter(has=page.get_by_role("link", name=name, exact=True))
            expect(row).to_have_count(1)
            text = row.inner_text()
            shown = "schedules" in text or ("Active" in text and "At " in text)
            assert shown == (name in schedules), (name, text)
        shot(page, "prefect-deployments")

        for name in ("persona-vectors", "persona-space"):
            page.goto(f"{base}/v2/deployments/deployment/{deployments[name].id}")
            expect(page.get_by_text(cron_in_words(schedules[name]["cron"]), exact=True)).to_be_visible(timeout=60_000)
            expect(page.get_by_text("Schedules", exact=True)).to_be_visible()
            shot(page, f"prefect-deployment-{name}")

        pv = deployments["persona-vectors"]
        definitions = pv.parameter_openapi_schema.get("definitions") or pv.parameter_openapi_schema["$defs"]
        model = next(d["title"] for k, d in definitions.items() if k.endswith("PersonaVectorsParams"))
        generate = next(d for k, d in definitions.items() if k.endswith("GenerateCfg"))
        page.goto(f"{base}/v2/deployments/deployment/{pv.id}/run")
        expect(page.get_by_text("Parameters", exact=True)).to_be_visible(timeout=60_000)
        expect(page.get_by_text(f"{model} (Optional)", exact=True)).to_be_visible()
        titles = [f["title"] for f in generate["properties"].values() if "title" in f]  # (a $ref shows its model)
        assert "Questions Limit" in titles
        for title in titles:  # the generation section of the form
            expect(page.get_by_text(f"{title} (Optional)", exact=True).first).to_be_visible()
        shot(page, "prefect-deployment-run-form")


def test_a_run_launched_through_the_api_completes_in_the_serving_process(ui, finished):
    from browser import chromium_page
    from playwright.sync_api import expect

    project, state = ui
    assert finished.state.is_completed(), (finished.state.name, finished.state.message)
    log = project / ".persona-ops/ui/serve.log"
    deadline = time.monotonic() + 60  # the run's last lines reach the log after its state reached the API
    while f"Flow run '{finished.name}' - Finished in state Completed()" not in (text := log.read_text()):
        assert time.monotonic() < deadline, text[-3000:]
        time.sleep(0.5)
    assert all(f"Flow run '{finished.name}' - {s}@{TRAIT}: ran" in text for s in STAGES)
    with chromium_page() as (page, _, _):
        page.goto(f"{state['prefect_url']}/v2/runs/flow-run/{finished.id}")
        expect(page.get_by_text(finished.name).first).to_be_visible(timeout=60_000)
        expect(page.get_by_text("Completed").first).to_be_visible()
        shot(page, "prefect-flow-run")


def test_the_mlflow_ui_shows_the_run_its_stage_runs_and_the_registered_vector(ui, finished):
    from browser import chromium_page
    from playwright.sync_api import expect

    from mlflow import MlflowClient

    _, state = ui
    base = state["mlflow_url"]
    client = MlflowClient(tracking_uri=base, registry_uri=base)
    experiment = client.get_experiment_by_name("persona-vectors")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = {r.info.run_id: r.info.run_name for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert sorted(children.values()) == sorted(f"{s}@{TRAIT}" for s in STAGES)
    model = f"persona-vector-{TRAIT}"
    version = client.get_model_version_by_alias(model, "candidate").version
    with chromium_page() as (page, _, _):
        page.goto(f"{base}/#/experiments")
        expect(page.get_by_role("link", name="persona-vectors", exact=True)).to_be_visible(timeout=60_000)
        shot(page, "mlflow-experiments")

        page.goto(f"{base}/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning")
        parent_row = page.locator(f'[role="row"][row-id="{parent.info.run_id}"]').first
        expect(parent_row).to_contain_text("persona-vectors", timeout=60_000)
        assistant = page.get_by_role("button", name="Close")
        if assistant.is_visible():  # the chat side panel hides the table's columns
            assistant.click()
        parent_row.get_by_role("button").first.click()  # expand: the nested stage runs
        for run_id, name in children.items():
            expect(page.locator(f'[role="row"][row-id="{run_id}"]').first).to_contain_text(name)
        shot(page, "mlflow-runs")

        page.goto(f"{base}/#/models")
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=model, exact=True))
        expect(row).to_contain_text("candidate", timeout=60_000)
        expect(row).to_contain_text(f"Version {version}")
        shot(page, "mlflow-models")

        page.goto(f"{base}/#/models/{model}")
        row = page.get_by_role("row").filter(has=page.get_by_role("link", name=f"Version {version}", exact=True))
        expect(row).to_contain_text("candidate", timeout=60_000)
        shot(page, f"mlflow-model-{model}")


def test_the_runs_artifacts_link_to_the_mlflow_run_and_the_registered_vector(ui, finished):
    """The flow run's summary (a Prefect artifact) names its MLflow run and registered version as
    links into the MLflow server the run tracked to; the Prefect UI shows it."""
    import asyncio

    from browser import chromium_page
    from playwright.sync_api import expect
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    _, state = ui

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[finished.id])))

    with prefect_api(state):
        artifacts = {a.key: a for a in asyncio.run(read())}
    summary = artifacts["persona-vectors-summary"]
    assert f"]({state['mlflow_url']}/#/runs/" in summary.data  # the pipeline's MLflow run
    assert f"[models:/persona-vector-{TRAIT}/" in summary.data and f"{state['mlflow_url']}/#/models/" in summary.data
    assert f"]({state['mlflow_url']}/#/runs/" in artifacts["persona-vectors-mlflow-run"].data  # a link artifact
    with chromium_page() as (page, _, _):
        page.goto(f"{state['prefect_url']}/v2/runs/flow-run/{finished.id}")
        page.get_by_role("tab", name="Artifacts").click(timeout=60_000)
        expect(page.get_by_text("persona-vectors-summary").first).to_be_visible(timeout=60_000)
        shot(page, "prefect-flow-run-artifacts")
