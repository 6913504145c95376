"""Wall time and language-model loads of one whole pipeline run, for any checkout of the code.

The code directory ``--code`` (a checkout of some commit) is copied into a fresh temporary
project (dvc.yaml, params.yaml, data/, presets/, persona_ops/; ``git init``, ``dvc init``) and
COMMAND runs there with ``PYTHONPATH=<code>:bench/loadcount``: every process, the ``dvc repro``
and ``persona-ops stage`` subprocesses included, imports that code (checked before the run), and
``bench/loadcount/sitecustomize.py`` logs each top-level ``PreTrainedModel.from_pretrained`` call
to ``$PERSONA_OPS_LOAD_LOG``. MLflow tracks to the project's sqlite store, Prefect uses a fresh
``PREFECT_HOME`` and its ephemeral server. Reference data outside the project take absolute paths.

    python -m bench.pipelines --code /tmp/po-before --label before [--keep] [--out results.jsonl] \\
        -- persona-ops run persona-space -S persona_space.transcripts.max_new_tokens=8

The last line printed is one JSON object, also appended to ``--out``: label, code dir and commit,
command, exit code, wall seconds, model loads (count, seconds spent loading, distinct processes),
the ``Running stage`` lines of DVC's output (stages it ran) and the date.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

LOADCOUNT = Path(__file__).resolve().parent / "loadcount"
BIN = Path(sys.executable).parent  # the venv's persona-ops, dvc and python (not resolved: a venv link)
PROJECT_ITEMS = ("dvc.yaml", "params.yaml", "data", "presets", "persona_ops")
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


def make_project(code: Path, project: Path, env: dict) -> None:
    """What ``dvc repro`` needs, copied from ``code`` into ``project``, as a git + DVC repo."""
    project.mkdir()
    for item in PROJECT_ITEMS:
        src = code / item
        if src.is_dir():
            shutil.copytree(src, project / item, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy(src, project / item)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([str(BIN / "python"), "-m", "dvc", "init", "-q"], cwd=project, env=env, check=True)


def run_env(code: Path, base: Path, project: Path) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "MLFLOW_")) and k != "PERSONA_OPS_PARENT_RUN_ID"}
    env.update(PYTHONPATH=f"{code}{os.pathsep}{LOADCOUNT}", PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               MLFLOW_TRACKING_URI=f"sqlite:///{project}/mlflow.db", PREFECT_HOME=str(base / "prefect"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false", TOKENIZERS_PARALLELISM="false",
               PERSONA_OPS_LOAD_LOG=str(base / "loads.jsonl"))
    return env


def imported_from(env: dict, cwd: Path) -> Path:
    """Where a fresh process on ``env`` imports persona_ops from."""
    out = subprocess.run([str(BIN / "python"), "-c", "import persona_ops; print(persona_ops.__file__)"],
                         cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.strip()
    return Path(out).resolve().parent


def git_info(code: Path) -> dict:
    def git(*args: str) -> str | None:
        p = subprocess.run(["git", "--no-optional-locks", "-C", str(code), *args], capture_output=True, text=True)
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def loads(log: Path) -> dict:
    rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return {"model_loads": len(rows), "load_seconds": round(sum(r["seconds"] for r in rows), 2),
            "loading_processes": len({r["pid"] for r in rows}),
            "loads_by_model": dict(Counter(r["model"] for r in rows)),
            "failed_loads": sum(not r.get("ok", True) for r in rows)}


def main() -> None:
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: python -m bench.pipelines --code DIR --label NAME [--keep] [--out FILE] -- COMMAND...")
    cut = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--code", type=Path, required=True, help="A checkout of the code to run.")
    ap.add_argument("--label", required=True)
    ap.add_argument("--keep", action="store_true", help="Keep the temporary project (its path is printed).")
    ap.add_argument("--out", type=Path, help="Append the result line to this JSONL file.")
    args, command = ap.parse_args(argv[:cut]), argv[cut + 1:]
    code = args.code.resolve()

    base = Path(tempfile.mkdtemp(prefix=f"po-bench-{args.label}-"))
    project = base / "project"
    env = run_env(code, base, project)
    if (where := imported_from(env, cwd=base)) != code / "persona_ops":
        shutil.rmtree(base)
        sys.exit(f"persona_ops imports from {where}, not from {code}")
    make_project(code, project, env)
    output = base / "output.log"
    t0 = time.perf_counter()
    with output.open("w") as f:
        rc = subprocess.run(command, cwd=project, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - t0

    lines = output.read_text(errors="replace").splitlines()
    stages = [m.group(1) for line in lines if (m := RUNNING_STAGE.search(line))]
    result = {"label": args.label, "code": str(code), **git_info(code), "command": command, "exit_code": rc,
              "wall_s": round(wall, 1), **loads(base / "loads.jsonl"),
              "running_stage_lines": len(stages), "stages_run": sorted(set(stages)),
              "host": platform.node(), "cpus": os.cpu_count(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    if rc != 0:
        print("\n".join(lines[-60:]), file=sys.stderr)
        print(f"command failed (exit {rc}); output: {output if args.keep else '(removed; --keep keeps it)'}",
              file=sys.stderr)
    if args.keep:
        print(f"project kept: {project} (output.log, loads.jsonl and prefect/ beside it)")
    else:
        shutil.rmtree(base, ignore_errors=True)
    line = json.dumps(result)
    if args.out:
        with args.out.open("a") as f:
            f.write(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
