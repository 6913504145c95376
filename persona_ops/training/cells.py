"""A training run of a sweep or matrix cell on disk: who trains it (a lock), what state it is in,
and whether what its directory holds was made from exactly these inputs (so a rerun retrains nothing).

Beside a run's output directory ``<dir>/<cell>/`` lie ``<dir>/.<cell>.lock`` (an ``flock`` held
while a process trains it: a second process waits, then finds it done) and
``<dir>/.<cell>.state.json`` (``running`` with pid and host, ``succeeded``, or ``failed`` with the
error). Inside it, ``cell.json`` records the inputs' fingerprint and what training made.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from persona_ops.io import read_json, sha256_file, sha256_text, write_json

CELL = "cell.json"


def _beside(out_dir: Path, suffix: str) -> Path:
    return out_dir.parent / f".{out_dir.name}.{suffix}"


def fingerprint(dataset: Path, settings: dict) -> str:
    """sha256 of the dataset's bytes and every setting that shapes the training."""
    return sha256_text(json.dumps({"dataset": sha256_file(dataset), **settings}, sort_keys=True, default=str))


def finished(out_dir: Path, fp: str) -> dict | None:
    """What ``cell.json`` records when the directory holds a finished run of fingerprint ``fp``."""
    path = out_dir / CELL
    if not path.is_file():
        return None
    record = read_json(path)
    return record if record.get("fingerprint") == fp else None


def write_state(out_dir: Path, state: str, **fields) -> None:
    write_json(_beside(out_dir, "state.json"), {"state": state, "pid": os.getpid(), "host": socket.gethostname(),
                                                "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **fields})


@contextmanager
def training(out_dir: Path) -> Iterator[None]:
    """Hold the cell's lock (waiting for another process that holds it) and keep its state file."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(_beside(out_dir, "lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_state(out_dir, "running")
        try:
            yield
        except BaseException as e:
            write_state(out_dir, "failed", error=f"{type(e).__name__}: {e}"[:2000])
            raise
        write_state(out_dir, "succeeded")


def state(out_dir: Path) -> dict:
    """``{"state": pending | running | succeeded | failed, ...}``; a ``running`` state whose lock
    no process holds was interrupted (a killed process): reported as failed."""
    path = _beside(out_dir, "state.json")
    if not path.is_file():
        return {"state": "succeeded" if (out_dir / CELL).is_file() else "pending"}
    record = read_json(path)
    if record.get("state") == "running" and not _locked(_beside(out_dir, "lock")):
        record = {**record, "state": "failed", "error": "interrupted (no process holds the cell's lock)"}
    return record


def _locked(path: Path) -> bool:
    if not path.exists():
        return False
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False
