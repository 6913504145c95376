"""dvc.yaml, params.yaml, the stage registry and the flow agree."""

from pathlib import Path

import yaml
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.stages import SPECS, dvc_yaml

ROOT = Path(__file__).resolve().parents[1]


def test_committed_dvc_yaml_is_generated_from_the_registry():
    result = CliRunner().invoke(app, ["dvc-yaml", "--check", "--root", str(ROOT)])
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((ROOT / "dvc.yaml").read_text()) == dvc_yaml()


def test_every_tracked_param_exists_in_params_yaml():
    data = yaml.safe_load((ROOT / "params.yaml").read_text())
    for trait in data["traits"]["names"]:
        for spec in SPECS:
            for key in spec.params:
                node = data
                for part in key.replace("${item}", trait).split("."):
                    assert part in node, f"{spec.name}: params key {key} missing in params.yaml"
                    node = node[part]


def test_registry_order_is_a_valid_run_order():
    """The flow runs SPECS in order; every dep made by a stage must come from an earlier one."""
    from persona_ops.stages import PIPELINES, pipeline_stages

    for pipeline in PIPELINES:
        made: set[str] = set()
        for spec in pipeline_stages(pipeline):
            for dep in spec.deps:
                producers = {o for s in SPECS for o in s.outs if o == dep or o.startswith(dep + "/")}
                assert producers <= made, f"{pipeline}: {spec.name} needs {producers - made} first"
            made |= set(spec.outs)


def test_stage_cli_reports_input_errors_cleanly(tmp_path):
    (tmp_path / "params.yaml").write_text("traits:\n  dir: nowhere\n  names: [evil]\n"
                                          "tracking:\n  enabled: false\n")
    result = CliRunner().invoke(app, ["stage", "generate", "--trait", "evil", "--root", str(tmp_path)])
    assert result.exit_code == 2
    assert "persona-ops: input error:" in result.output and "evil.json" in result.output
