"""Input errors through `persona-ops run`: one clear line (exit 2), no traceback, before anything
runs, and nothing of the rejected parameters left in params.yaml or dvc.yaml."""

from __future__ import annotations

import pytest
from conftest import copy_project
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.cli.common import INPUT_ERROR_MARK

CASES = [  # (pipeline, override, what the line says)
    ("persona-vectors", "persona_vectors.generate.batch_size=[1", "the value is not valid YAML"),
    ("persona-vectors", "persona_vectors.generate.batchsize=8", "did you mean persona_vectors.generate.batch_size?"),
    ("persona-vectors", "persona_vectors.generate.batch_size=zero", "batch_size"),
    ("persona-vectors", "persona_vectors.traits.names=[evil, 'e;touch x']", "is not a usable name"),
    ("persona-vectors", "persona_vectors.traits.names=[humorous]", "extract/humorous.json does not exist"),
    ("persona-vectors", "persona_vectors.model.name=/nonexistent/model-dir",
     "stage generate@evil: persona_vectors.model: model.name="),
    ("steering-sweep", "steering.layers=[999]", "steering.layers: [999] outside 1..30"),
    ("persona-space", "persona_space.space.layer=31", "persona_space.space.layer: [31] outside 0..30"),
    ("persona-space", "persona_space.capping.layers=[20,40]", "persona_space.capping.layers: [40] outside 1..30"),
    ("no-such-pipeline", "persona_vectors.generate.batch_size=8", "no-such-pipeline"),
]


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return copy_project(tmp_path_factory.mktemp("project"))


@pytest.mark.parametrize("pipeline, override, message", CASES, ids=[c[1][:40] for c in CASES])
def test_a_rejected_run_says_why_in_one_line_and_leaves_nothing_behind(project, pipeline, override, message):
    before = {f: (project / f).read_bytes() for f in ("params.yaml", "dvc.yaml")}
    result = CliRunner().invoke(app, ["run", pipeline, "--root", str(project), "-S", override])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith(INPUT_ERROR_MARK)]
    assert len(errors) == 1 and message in result.output, result.output
    assert "Traceback" not in result.output
    assert {f: (project / f).read_bytes() for f in before} == before
    assert not (project / "outputs").exists()
