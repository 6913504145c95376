"""Detached servers: each starts in its own process group with its output in a log file, is
checked until it answers, and is stopped by group (SIGTERM, then SIGKILL after a grace); the
holder of a taken port, found before anything starts.

A started server is a record (name, pid, start time, log, command), plain JSON, so a later
command can tell whether it still runs (same pid *and* start time: a reused pid is not it) and
stop it. ``persona-ops ui`` keeps its records in ``<root>/.persona-ops/ui/state.json``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from persona_ops.errors import InputError

GRACE_S = 10.0


class ServerError(RuntimeError):
    """A server that exited or did not answer in time; the message ends with its log's tail."""


def start(name: str, command: list[str], *, env: dict[str, str], cwd: Path, log: Path) -> dict:
    """Start ``command`` detached (a new session, so it outlives this process and is stopped as a
    group), stdin closed, stdout and stderr appended to ``log``; return its record."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return {"name": name, "pid": proc.pid, "created": _created(proc.pid), "log": str(log), "command": command}


def _created(pid: int) -> float:
    try:
        return psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:  # exited at once: wait_healthy reports it with the log
        return 0.0


def alive(record: dict) -> bool:
    """The record's process still runs (a zombie or a new process under the same pid does not count)."""
    try:
        p = psutil.Process(record["pid"])
        return abs(p.create_time() - record["created"]) < 0.05 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def group(record: dict) -> list[psutil.Process]:
    """The live processes of the record's process group (its leader and what it started)."""
    members = []
    for p in psutil.process_iter():
        try:
            if (os.getpgid(p.pid) == record["pid"] and p.create_time() >= record["created"] - 0.05
                    and p.status() != psutil.STATUS_ZOMBIE):
                members.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return members


def stop(records: list[dict], grace: float = GRACE_S) -> list[str]:
    """SIGTERM the records' process groups together, SIGKILL what is left of them after ``grace``
    seconds; return the names of those that had to be killed."""
    running = [r for r in records if group(r)]
    for r in running:
        _signal_group(r["pid"], signal.SIGTERM)
    left = _wait_gone(running, grace)
    for r in left:
        _signal_group(r["pid"], signal.SIGKILL)
    _wait_gone(left, 10.0)
    return [r["name"] for r in left]


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _wait_gone(records: list[dict], timeout: float) -> list[dict]:
    """Wait until no process of the records' groups is left or ``timeout`` passes; return the
    records whose groups still have one."""
    deadline = time.monotonic() + timeout
    while True:
        left = [r for r in records if group(r)]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def wait_healthy(record: dict, ready: Callable[[], bool], timeout: float) -> None:
    """Return once ``ready()`` holds; raise :class:`ServerError` with the log's tail if the process
    exits first or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if not alive(record):
            raise ServerError(f"{record['name']} exited before it answered; the end of {record['log']}:\n"
                              + log_tail(Path(record["log"])))
        if time.monotonic() > deadline:
            raise ServerError(f"{record['name']} did not answer within {timeout:.0f} s; the end of "
                              f"{record['log']}:\n" + log_tail(Path(record["log"])))
        time.sleep(0.5)


def answers(url: str, timeout: float = 2.0) -> bool:
    """``url`` answers a GET with 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log ("(empty)" when there is nothing)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty)"


def port_taken(host: str, port: int) -> bool:
    """Something holds ``host:port`` (a listening or bound socket; a closing connection does not count)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def port_holder(port: int) -> str | None:
    """``pid N (command line)`` of the process listening on ``port``, or None when it cannot be found
    (a socket bound but not listening, or another user's process)."""
    try:
        conns = psutil.net_connections(kind="inet")
    except psutil.AccessDenied:
        return None
    for c in conns:
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid:
            try:
                command = " ".join(psutil.Process(c.pid).cmdline())
            except psutil.Error:
                command = "?"
            return f"pid {c.pid} ({command})"
    return None


def check_port(host: str, port: int, what: str) -> None:
    """Raise an ``InputError`` naming ``host:port``, what wanted it and who holds it, if it is taken."""
    if port_taken(host, port):
        holder = port_holder(port)
        raise InputError(f"{host}:{port} ({what}) is already in use"
                         + (f" by {holder}" if holder else " (its process could not be found)"))
