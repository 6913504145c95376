"""One run per checkout: a second run refuses at once, naming the run that holds the checkout,
instead of computing with the first one's parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.errors import InputError
from persona_ops.pipelines.workspace import workspace_lock

ROOT = Path(__file__).resolve().parents[1]


def test_a_second_run_in_the_same_checkout_is_refused(tmp_path):
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = (tmp_path / "params.yaml").read_text()
    with workspace_lock(tmp_path, "persona-space"):
        with pytest.raises(InputError, match=r"workspace busy: run persona-space \(pid \d+\) since 20"):
            with workspace_lock(tmp_path, "persona-vectors"):
                pass
        result = CliRunner().invoke(app, ["run", "persona-vectors", "--root", str(tmp_path),
                                          "-S", "persona_vectors.generate.batch_size=3"])
        assert result.exit_code == 2 and "workspace busy: run persona-space" in result.output
        assert (tmp_path / "params.yaml").read_text() == before  # the refused run wrote nothing
    with workspace_lock(tmp_path, "persona-vectors"):  # released when the first run ends
        pass
