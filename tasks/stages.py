"""Prefect tasks that run persona_ops stages through DVC, so DVC stays the one cache.

A stage task runs ``dvc repro --single-item TARGET``: DVC skips it when nothing it depends
on changed, and records its outputs in ``dvc.lock`` when it runs, so after a Prefect run a
plain ``dvc repro`` has nothing to do (and the reverse).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from persona_ops.errors import InputError, TransientError

INPUT_ERROR_MARK = "persona-ops: input error:"


def _retry_unless_input_error(task, task_run, state) -> bool:
    try:
        state.result()
    except InputError:
        return False
    except Exception:
        return True
    return False


@task(name="validate-inputs", cache_policy=NO_CACHE, retries=0)
def validate_inputs(root: str, overrides: list[str], pipeline: str) -> dict:
    """Validate params and every input file of ``pipeline`` before any model is loaded; write the
    overrides into params.yaml (as ``dvc exp run -S`` does) so DVC and the flow see the same values.
    ``persona_space.roles.names: null`` (every role in roles.dir) is written out as the list."""
    from persona_ops.config import load_params, save_params
    from persona_ops.data import check_paths, load_traits

    rootp = Path(root)
    params = load_params(rootp / "params.yaml", overrides)
    expanded = False
    if pipeline in ("persona-vectors", "steering-sweep", "projection"):
        load_traits(rootp / params.traits.dir, params.traits.names, split=params.traits.extract_subdir)
        if pipeline == "steering-sweep":
            load_traits(rootp / params.traits.dir, params.steering.traits, split="eval")
    else:
        from persona_ops.pipelines.persona_space import role_names

        ps = params.persona_space
        paths = [rootp / ps.roles.dir, rootp / ps.roles.questions, rootp / params.finetune.dataset]
        _, errors = check_paths([str(p) for p in paths])
        if errors:
            raise InputError("\n".join(errors))
        names = role_names(ps, rootp)  # the role files exist
        if ps.roles.names is None:  # every role in roles.dir: DVC's foreach needs the list written out
            ps.roles.names = names
            expanded = True
    if overrides or expanded or any(n not in params.traits.per_trait for n in params.traits.names):
        save_params(params, rootp / "params.yaml")
    return params.model_dump(mode="json")


def _env(parent_run_id: str | None) -> dict:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)  # the venv's persona-ops and dvc
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    if parent_run_id:
        env["PERSONA_OPS_PARENT_RUN_ID"] = parent_run_id
    return env


@task(name="dvc-stage", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=exponential_backoff(2),
      retry_condition_fn=_retry_unless_input_error, task_run_name="{target}")
def run_dvc_stage(target: str, root: str, parent_run_id: str | None = None) -> str:
    """Reproduce one DVC stage (e.g. ``generate@evil``); returns ``"ran"`` or ``"up to date"``."""
    logger = get_run_logger()
    cmd = [sys.executable, "-m", "dvc", "repro", "--single-item", target]
    proc = subprocess.Popen(cmd, cwd=root, env=_env(parent_run_id), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line.rstrip())
        logger.info(line.rstrip())
    proc.wait()
    if proc.returncode != 0:
        for line in lines:
            if INPUT_ERROR_MARK in line:
                raise InputError(line.split(INPUT_ERROR_MARK, 1)[1].strip())
        tail = "\n".join(lines[-30:])
        raise TransientError(f"dvc repro {target} failed (exit {proc.returncode}):\n{tail}")
    return "ran" if any(line.startswith("Running stage") for line in lines) else "up to date"
