"""One pipeline run per checkout at a time, and the params it computes with.

``persona-ops run`` (and every flow run) holds an exclusive lock on ``.persona-ops/run.lock``
while it writes its overrides into params.yaml and computes: a second run in the same checkout
stops at once with "workspace busy (run X since T)" instead of computing with the first's
parameters, and the first never sees the second's. The operating system releases the lock
when the process ends, however it ends.
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from persona_ops.errors import InputError

LOCK = Path(".persona-ops") / "run.lock"


@contextmanager
def workspace_lock(root: Path, what: str) -> Iterator[None]:
    """Hold the checkout's run lock for ``what`` (e.g. ``persona-vectors``); an ``InputError``
    names the run holding it."""
    path = Path(root) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(path)
            raise InputError(f"workspace busy: run {holder.get('what', '?')} (pid {holder.get('pid', '?')}) since "
                             f"{holder.get('since', '?')} holds {path}; wait for it, or use another checkout") from None
        info = {"what": what, "pid": os.getpid(),
                "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def _holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}
