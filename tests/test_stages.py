"""dvc.yaml, params.yaml, the stage registry and the flow agree."""

import inspect
from pathlib import Path

import yaml
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.config import load_params
from persona_ops.stages import SPECS, dvc_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_generated_from_the_registry():
    result = CliRunner().invoke(app, ["dvc-yaml", "--check", "--root", str(ROOT)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc_yaml()


def test_every_tracked_param_exists_in_params_yaml():
    data = load_params(ROOT / "params.yaml").dvc_view()
    for trait in data["traits"]["names"]:
        for spec in SPECS:
            for key in spec.params:
                node = data
                for part in key.replace("${item}", trait).split("."):
                    assert part in node, f"{spec.name}: params key {key} missing in params.yaml"
                    node = node[part]


def test_registry_order_is_a_valid_run_order():
    """The flow runs SPECS in order; every dep made by a stage must come from an earlier one."""
    import flows.persona_vectors as fpv

    assert "for spec in SPECS" in inspect.getsource(fpv.persona_vectors)
    all_outs = {o for s in SPECS for o in s.outs}
    made: set[str] = set()
    for spec in SPECS:
        assert set(spec.deps) & all_outs <= made, f"{spec.name} depends on a later stage"
        made |= set(spec.outs)


def test_stage_cli_reports_input_errors_cleanly(tmp_path):
    (tmp_path / "params.yaml").write_text("traits:\n  dir: nowhere\n  names: [evil]\n"
                                          "tracking:\n  enabled: false\n")
    result = CliRunner().invoke(app, ["stage", "generate", "--trait", "evil", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "persona-ops: input error:" in result.output and "evil.json" in result.output
