"""Scale-out on Dask (and on Ray where prefect-ray is installed): a local cluster of 3 worker
processes runs the persona-vectors pipeline's three traits, each stage's items at once (their
Prefect task runs overlap in time) but never more than the 2 slots of a Prefect global concurrency
limit (as a `gpu` limit would hold them to the GPUs); the workers run the stage items, the flow's
process commits them to DVC, so afterwards `dvc status` is clean and the lineage of every
registered vector holds its four stage runs."""

from __future__ import annotations

import json
import os
from importlib.util import find_spec

import pytest
import yaml
from conftest import copy_project, persona_ops_cli, run_dvc

pytestmark = pytest.mark.slow
RUNNERS = [pytest.param(kind, marks=pytest.mark.skipif(find_spec(f"prefect_{kind}") is None,
                                                       reason=f"needs prefect-{kind}")) for kind in ("dask", "ray")]
TRAITS = ["evil", "sycophantic", "hallucinating"]
STAGES = ["generate", "judge", "activations", "vectors"]
LIMIT, SLOTS = "persona-ops-slots", 2


@pytest.fixture(scope="module", params=RUNNERS)
def project(request, tmp_path_factory):
    proj = copy_project(tmp_path_factory.mktemp(f"scale-out-{request.param}"))
    params = yaml.safe_load((proj / "params.yaml").read_text())
    pv = params["persona_vectors"]
    pv["traits"]["names"], pv["per_trait"] = TRAITS, {t: {} for t in TRAITS}
    pv["generate"]["questions_limit"] = 1
    pv["generate"]["sampling"]["max_new_tokens"] = 12
    params["orchestration"]["task_runner"] = {"kind": request.param, "workers": 3, "address": None,
                                              "cluster_class": None}
    params["orchestration"]["concurrency_limit"] = LIMIT
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def task_runs(project, tmp_path_factory):
    """The run through the CLI on a Prefect test server; its task runs as read back from the server."""
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    with persona_ops_cli(project, tmp_path_factory.mktemp("prefect")) as cli:
        with get_client(sync_client=True) as client:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=LIMIT, limit=SLOTS))
        out = cli("run", "persona-vectors")
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs()
    return {r.name: r for r in runs if r.state and r.state.is_completed()}


def test_each_stages_items_run_at_once_within_the_concurrency_limit(task_runs, project):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    stage_runs = {r.info.run_name: r.info for r in client.search_runs(
        [client.get_experiment_by_name("persona-vectors").experiment_id])}
    for stage in ("generate", "activations"):  # the two stages that load the model and work longest
        spans = [(task_runs[f"{stage}[{t}]"].start_time, task_runs[f"{stage}[{t}]"].end_time) for t in TRAITS]
        starts, ends = sorted(s for s, _ in spans), sorted(e for _, e in spans)
        assert starts[1] < ends[0], f"{stage}: no two items overlapped: {spans}"
        # the stage's work (its MLflow run, inside the slot) of 3 items on 3 workers: never 3 at once
        work = [(stage_runs[f"{stage}@{t}"].start_time, stage_runs[f"{stage}@{t}"].end_time) for t in TRAITS]
        assert max(s for s, _ in work) >= min(e for _, e in work), f"{stage}: 3 items at once: {work}"


def test_dvc_has_nothing_to_do_after_the_workers(task_runs, project):
    status = run_dvc(project, "status", "--json", "--with-deps", "vectors")  # every trait's four stages
    assert status.returncode == 0 and json.loads(status.stdout or "{}") == {}, status.stdout
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]
    assert {f"{s}@{t}" for s in STAGES for t in TRAITS} <= set(lock)


def test_lineage_of_every_vector_holds_its_four_stage_runs(task_runs, project):
    from persona_ops.tracking.lineage import graph_of

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{project}/mlflow.db"  # (restored by conftest)
    for trait in TRAITS:
        graph = graph_of(f"models:/persona-vector-{trait}@candidate", project)
        runs = sorted(n["label"] for n in graph["nodes"] if n["kind"] == "run")
        assert runs == sorted(f"{s}@{trait}" for s in STAGES), runs
