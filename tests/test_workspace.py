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


def test_a_run_in_another_process_holds_the_checkout_until_it_dies(tmp_path):
    """Two processes: the second `persona-ops run` is refused naming the first's pid; a SIGKILLed
    holder leaves no stale lock behind."""
    import signal
    import subprocess
    import sys

    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    before = (tmp_path / "params.yaml").read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from persona_ops.pipelines.workspace import workspace_lock\n"
         f"with workspace_lock({str(tmp_path)!r}, 'persona-space'):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        second = subprocess.run([str(Path(sys.executable).parent / "persona-ops"), "run", "persona-vectors", "--root",
                                 str(tmp_path), "-S", "persona_vectors.generate.batch_size=3"],
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert f"workspace busy: run persona-space (pid {holder.pid})" in second.stderr
        assert "Traceback" not in second.stderr + second.stdout
        assert (tmp_path / "params.yaml").read_bytes() == before
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with workspace_lock(tmp_path, "persona-vectors"):  # the kernel released the dead holder's lock
        pass


def test_a_flow_run_puts_params_back_when_its_parameters_are_rejected(tmp_path):
    """What a flow run does (prepare, plan, check) inside ``restored_on_error``: the override was
    written, the check rejects it, params.yaml and dvc.yaml are back byte for byte."""
    from conftest import copy_project

    from persona_ops.pipelines import launch, registry, runner

    copy_project(tmp_path)
    before = {f: (tmp_path / f).read_bytes() for f in ("params.yaml", "dvc.yaml")}
    with pytest.raises(InputError, match=r"steering\.layers: \[0\] outside 1\.\.30"):
        with launch.restored_on_error(tmp_path):
            params = launch.prepare(tmp_path, None, ["steering.layers=[0]", "steering.traits=[evil,sycophantic]"])
            assert (tmp_path / "params.yaml").read_bytes() != before["params.yaml"]  # written...
            plan = registry.plan(registry.pipeline_named("steering-sweep"), params, tmp_path)
            runner.check(plan, runner.Context(tmp_path, params))
    assert {f: (tmp_path / f).read_bytes() for f in before} == before  # ...and put back
