"""End to end on the embedded model: `dvc repro trajectory` in a temporary repo with a tiny
configuration - LoRA fine-tune, persona space, checkpoint activations, trajectory report -
then MLflow holds the persona space and the adapter, and a second `dvc repro` does nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import copy_project, run_dvc

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _dvc(project: Path, *args: str):
    return run_dvc(project, *args, env={"MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlflow.db"})


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    proj = tmp_path_factory.mktemp("traj")
    copy_project(proj)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    ft = params["finetune"]
    ft["train"].update(max_steps=4, save_every=2, limit=8)
    ps = params["persona_space"]
    ps["model"]["adapter"] = f"{ft['out']}/checkpoint-4"
    ps["roles"].update(names=["pirate", "therapist", "zen_monk"], instructions_limit=1, questions_limit=2)
    ps["transcripts"]["max_new_tokens"] = 12
    ps["trajectory"]["checkpoints"] = [
        {"label": "base", "step": 0, "model": {"name": "embedded", "adapter": None}},
        {"label": "step-2", "step": 2, "model": {"name": "embedded", "adapter": f"{ft['out']}/checkpoint-2"}},
        {"label": "step-4", "step": 4, "model": {"name": "embedded", "adapter": f"{ft['out']}/checkpoint-4"}}]
    (proj / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return proj


@pytest.fixture(scope="module")
def repro(project):
    out = _dvc(project, "repro", "trajectory")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_trajectory_outputs(project, repro):
    base = project / "outputs/persona_space"
    records = [json.loads(line) for line in (base / "trajectory/trajectory.jsonl").read_text().splitlines()]
    assert [r["checkpoint"] for r in records] == ["base", "step-2", "step-4"]
    for png in ("pc_scatter.png", "axis_projection.png", "pc_coordinates.png", "default_path.png"):
        assert (base / "trajectory" / png).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((base / "persona_space.metrics.json").read_text())
    assert metrics["n_roles"] == 3 and len(metrics["axis_pc1_cos_per_layer"]) == 31
    assert all(isinstance(r["default"]["axis"], float) for r in records)
    # step-4 is the reference model: replaying its own transcripts gives the reference axis back
    assert records[-1]["axis_cos_reference"] == pytest.approx(1.0, abs=1e-4)
    assert records[0]["axis_cos_reference"] < 1.0 - 1e-6
    manifest = json.loads((project / "outputs/finetune/pirate/manifest.json").read_text())
    assert [c["step"] for c in manifest["checkpoints"]] == [2, 4]


def test_registry_and_nothing_left_to_do(project, repro):
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/mlflow.db"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    space = client.get_model_version_by_alias("persona-space-smollm2-135m-instruct", "candidate")
    adapter = client.get_model_version_by_alias("lora-adapter-pirate", "candidate")
    assert space.tags["model"].endswith("checkpoint-4") and adapter.tags["sha256"]
    again = _dvc(project, "repro", "trajectory")
    assert again.returncode == 0 and "Running stage" not in again.stdout
