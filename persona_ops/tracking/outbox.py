"""What a run could not send to MLflow, kept in the project until it can be (``persona-ops track sync``).

One JSON entry per run in ``<root>/.persona-ops/tracking-outbox/``: how to create the run
(experiment, name, parent, tags, start time; its id if it was created before the store went
away), the operations MLflow did not take (params, tags, metrics, inputs, artifacts, JSON
documents, registrations; cleaned as for MLflow, so no secrets), and how it ended. The files
those operations need are hard links (else copies) in ``<entry>.files/``. An entry is written
atomically at the first failure and after every later operation; it stays "open" until its run
ends, with the process that owns it (host, pid, start time), so a replay never races a live
run and a dead owner's run is replayed as FAILED.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from persona_ops.io import read_json, sha256_path, write_json

OUTBOX = Path(".persona-ops") / "tracking-outbox"
SCHEMA = "persona-ops/tracking-outbox/1"
_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def now_ms() -> int:
    return int(time.time() * 1000)


def redact(text: str) -> str:
    """``text`` without the credentials a URL may carry (``http://user:pass@host``)."""
    return _CREDENTIALS.sub("***@", text)


def directory(root: Path) -> Path:
    return Path(root) / OUTBOX


# --- the process that owns a run --------------------------------------------------------------------

def _started(pid: int) -> float | None:
    import psutil

    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else round(process.create_time(), 2)
    except psutil.Error:
        return None


def _read(path: str) -> str | None:
    try:
        return os.readlink(path) if path.startswith("/proc/self/ns/") else Path(path).read_text().strip()
    except OSError:
        return None


def this_process() -> dict[str, Any]:
    """Host, pid and start time (pids are reused), with the boot and pid namespace (Linux), which
    tell a dead owner from a live one."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _started(os.getpid()),
            "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": _read("/proc/self/ns/pid")}


def is_alive(owner: dict) -> bool | None:
    """Whether ``owner``'s process still runs; None when this process cannot know (another host,
    or another pid namespace: a container)."""
    me = this_process()
    differs = {k for k in ("pidns", "boot") if owner.get(k) and me[k] and owner[k] != me[k]}
    if owner.get("host") != me["host"] or "pidns" in differs:
        return None
    if "boot" in differs:
        return False  # the machine rebooted since
    started = _started(int(owner["pid"]))
    if started is None or owner.get("started") is None:
        return started is not None
    return abs(started - float(owner["started"])) < 0.05


# --- entries ---------------------------------------------------------------------------------------------

class Entry:
    """One run's entry (``data`` as stored)."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = Path(path), data

    @classmethod
    def new(cls, root: Path, run: dict) -> Entry:
        """A new open entry for ``run`` (``uid``, ``experiment``, ``name``, ``parent_run_id``,
        ``tags``, ``start_time``, ``run_id``), owned by this process."""
        path = directory(root) / f"{run['start_time']}-{run['uid']}.json"
        return cls(path, {"schema": SCHEMA, **run, "state": "open", "owner": this_process(), "ops": [],
                          "status": None, "end_time": None, "error": None, "updated_at": now_ms()})

    @property
    def files(self) -> Path:
        return self.path.with_suffix(".files")

    @property
    def name(self) -> str:
        return self.data["name"]

    def add(self, op: dict) -> None:
        self.data["ops"].append(op)
        self.save()

    def keep(self, path: Path, as_name: str) -> dict:
        """Keep ``path`` (a file or a directory) for a replay; returns ``{file, sha256}``."""
        target = self.files / as_name
        if target.exists():
            shutil.rmtree(target) if target.is_dir() else target.unlink()
        target.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(Path(path), target)
        return {"file": as_name, "sha256": sha256_path(target)}

    def close(self, status: str, end_time: int) -> None:
        self.data.update(state="closed", status=status, end_time=end_time)
        self.save()

    def save(self) -> None:
        self.data["updated_at"] = now_ms()
        write_json(self.path, self.data)

    def successor(self, ended: tuple[str, int] | None) -> Entry:
        """A new, closed entry for the same run, for what comes after a replay took this one."""
        run = {k: v for k, v in self.data.items() if k not in ("ops", "state", "owner", "status", "end_time")}
        later = Entry(self.path.with_name(f"{self.path.stem}-{now_ms()}.json"),
                      {**run, "ops": [], "state": "closed", "owner": this_process(), "status": None, "end_time": None})
        if ended:
            later.data.update(status=ended[0], end_time=ended[1])
        return later

    def remove(self) -> None:
        """Drop the entry (first, so a crash leaves only an orphan folder), then its files."""
        self.path.unlink(missing_ok=True)
        shutil.rmtree(self.files, ignore_errors=True)
        self.path.with_suffix(".lock").unlink(missing_ok=True)


@contextmanager
def locked(entry: Entry | None, timeout: float = 60) -> Iterator[None]:
    """Hold ``entry``'s lock: its owner while writing it, a replay while sending and removing it."""
    if entry is None:
        yield
        return
    from filelock import FileLock

    entry.path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(entry.path.with_suffix(".lock"), timeout=timeout):
        yield


def link_or_copy(src: Path, dst: Path) -> None:
    """``dst`` holding ``src``'s bytes: hard links where the filesystem allows (outputs are replaced
    by atomic renames, never rewritten in place), else copies."""
    if src.is_dir():
        shutil.copytree(src, dst, copy_function=_link_file)
    else:
        _link_file(src, dst)


def _link_file(src, dst) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def entries(root: Path) -> list[Entry]:
    """The outbox's entries, oldest run first (unreadable files are skipped: see :func:`unreadable`)."""
    out = []
    for path in sorted(directory(root).glob("*.json")):
        try:
            data = read_json(path)
        except Exception:
            continue
        if isinstance(data, dict) and data.get("schema") == SCHEMA:
            out.append(Entry(path, data))
    return out


def unreadable(root: Path) -> list[Path]:
    ok = {e.path for e in entries(root)}
    return [p for p in sorted(directory(root).glob("*.json")) if p not in ok]


def orphans(root: Path) -> list[Path]:
    """Folders of files whose entry is gone (a replay that ended between its two deletions)."""
    return [d for d in directory(root).glob("*.files") if not d.with_suffix(".json").exists()]
