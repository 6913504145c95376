"""Catching MLflow up: replaying the outbox and ending runs whose process died.

``persona-ops track sync`` runs :func:`sync`; every run that reaches MLflow runs it too
(:func:`catch_up`), so what a stage kept while the server was down is sent by the next run.

A replay finds the run again by its ``persona_ops.run_uid`` tag (or the id it had), else
creates it with the original start time, tags and parent; sends the kept operations (all
idempotent; registrations are found by run and output before one is made); fills the
provenance record's run id and registered versions; ends the run with the original status and
end time; and only then deletes the entry. An entry whose process is still running is left
alone; one whose process died before the run ended is replayed as FAILED, with the reason in
``persona_ops.ended_by``. A RUNNING run tagged with a process of this host that is gone is
ended FAILED the same way.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import RunStatus, ViewType
from mlflow.exceptions import MlflowException

from persona_ops.io import read_json, sha256_path
from persona_ops.tracking import outbox
from persona_ops.tracking.ops import ENDED_BY_TAG, RECORD, UID_TAG, apply, owner_of
from persona_ops.tracking.store import client, experiment_id, tracking_uri

log = logging.getLogger(__name__)
FAILED = RunStatus.to_string(RunStatus.FAILED)
_reaped_here: set[str] = set()  # stores this process has checked for dead runs


@dataclass
class Report:
    """What a sync did: entries replayed, entries left (with why), runs ended."""

    replayed: list[str] = field(default_factory=list)
    left: list[tuple[str, str]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"replayed {name}" for name in self.replayed]
        out += [f"ended {run_id} FAILED: its process died" for run_id in self.ended]
        out += [f"kept {name}: {why}" for name, why in self.left]
        return out or ["nothing to replay"]


def sync(root: Path, *, wait: bool = True, reap: bool = True) -> Report:
    """Replay the outbox of ``root`` into the configured store, then (``reap``) end dead runs.
    ``wait``: for an entry another process is replaying (else it is left for later)."""
    from filelock import Timeout

    root = Path(root)
    report = Report()
    client(root)
    pending = outbox.entries(root)
    for i, entry in enumerate(pending):
        why = _not_ready(entry)
        if why:
            report.left.append((entry.name, why))
            continue
        try:
            with outbox.locked(entry, timeout=60 if wait else 0):
                if not entry.path.exists():  # another process replayed it
                    continue
                entry = outbox.Entry(entry.path, read_json(entry.path))
                replay(entry, root)
                entry.remove()
            report.replayed.append(entry.name)
        except Timeout:
            report.left.append((entry.name, "another process is replaying it"))
        except Exception as e:
            report.left.append((entry.name, outbox.redact(f"{type(e).__name__}: {e}").splitlines()[0][:300]))
            if not _reachable(root):
                report.left += [(later.name, "MLflow is unreachable") for later in pending[i + 1:]]
                break
    report.left += [(p.name, "unreadable (not replayed; inspect or delete it)") for p in outbox.unreadable(root)]
    for orphan in outbox.orphans(root):
        shutil.rmtree(orphan, ignore_errors=True)
    if reap and _reachable(root):
        kept = {e.data.get("uid") for e in outbox.entries(root)}
        report.ended = end_dead_runs(root, exclude=kept)
        _reaped_here.add(tracking_uri(root))
    return report


def catch_up(root: Path, *, reap: bool) -> None:
    """What a run does once MLflow answered: replay what is kept, and (``reap``, or the first time
    in this process) end dead runs. Never raises: the outbox stays for the next try."""
    root = Path(root)
    reap = reap or tracking_uri(root) not in _reaped_here
    if not reap and not any(outbox.directory(root).glob("*.json")):
        return
    try:
        report = sync(root, wait=False, reap=reap)
    except Exception as e:
        log.warning("MLflow: catching up the tracking outbox failed (%s); `persona-ops track sync` retries",
                    outbox.redact(str(e)).splitlines()[0][:300])
        return
    if report.replayed or report.ended:
        log.info("MLflow: %s", "; ".join(report.lines()))


def _not_ready(entry: outbox.Entry) -> str | None:
    """Why ``entry`` cannot be replayed yet (None: it can)."""
    if entry.data["state"] == "closed":
        return None
    alive = outbox.is_alive(entry.data["owner"])
    if alive:
        return "its run is still going"
    if alive is None:
        return f"its run is open in a process this machine cannot see ({_who(entry.data['owner'])})"
    return None


def _reachable(root: Path) -> bool:
    try:
        client(root).search_experiments(max_results=1)
        return True
    except Exception:
        return False


def replay(entry: outbox.Entry, root: Path) -> str | None:
    """Send ``entry`` (see the module docstring); returns the run id (None: the run it adds to is gone)."""
    data = entry.data
    c = client(root)
    run_id = _run_of(data, root)
    if run_id is None:
        log.warning("MLflow: run %s of %s no longer exists; dropping what was kept for it", data.get("run_id"),
                    entry.path.name)
        return None
    registered, skipped = [], {}
    for op in data["ops"]:
        why = _files_changed(op, entry.files)
        if why:
            skipped[op.get("name") or op.get("file")] = why
            continue
        if op["op"] == "json" and op["name"] == RECORD:
            op = {**op, "obj": {**op["obj"], "run_id": op["obj"].get("run_id") or run_id,
                                "registered": (op["obj"].get("registered") or []) + registered}}
        version = apply(op, run_id, root, files=entry.files, uid=data.get("uid"))
        if op["op"] == "register":
            registered.append({"name": op["name"], "version": version, "kind": op["kind"], "output": op["output"]})
            c.set_tag(run_id, f"registered.{op['name']}", str(version))
    if skipped:
        c.set_tag(run_id, "persona_ops.replay.skipped", json.dumps(skipped, sort_keys=True)[:5000])
    status, end_time = data.get("status"), data.get("end_time")
    if data["state"] == "open":  # its process died before the run ended
        status, end_time = FAILED, data["updated_at"]
        c.set_tag(run_id, ENDED_BY_TAG, f"persona-ops: its process ({_who(data['owner'])}) died before the run ended "
                                        "(replayed from the tracking outbox)")
    if status:
        c.set_terminated(run_id, status=status, end_time=end_time)
    return run_id


def _run_of(data: dict, root: Path) -> str | None:
    """The run ``data`` is about: its id, else the one tagged with its uid, else a new one."""
    c = client(root)
    if data.get("run_id"):
        try:
            return c.get_run(data["run_id"]).info.run_id
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
    if not data.get("experiment"):
        return None
    exp_id = experiment_id(data["experiment"], project_root=root)
    found = c.search_runs([exp_id], f"tags.`{UID_TAG}` = '{data['uid']}'", run_view_type=ViewType.ALL, max_results=1)
    if found:
        return found[0].info.run_id
    return c.create_run(exp_id, run_name=data["name"], tags=data["tags"], start_time=data["start_time"]).info.run_id


def _files_changed(op: dict, files: Path) -> str | None:
    """Why the files an operation needs are not the ones kept (None: they are)."""
    if "file" not in op:
        return None
    if op["op"] == "register":
        path, expected = files / op["file"] / op["staged"], op["tags"].get("sha256")
    else:
        path, expected = files / op["file"], op.get("sha256")
    if not path.exists():
        return "its kept files are gone"
    if expected and sha256_path(path) != expected:
        return "its kept files changed after the run"
    return None


def _who(owner: dict) -> str:
    started = owner.get("started")
    when = _dt.datetime.fromtimestamp(float(started)).isoformat(timespec="seconds") if started else "?"
    return f"pid {owner.get('pid')} on {owner.get('host')}, started {when}"


def end_dead_runs(root: Path, exclude: set[str] = frozenset()) -> list[str]:
    """End FAILED every RUNNING run tagged with a process of this host that is gone (runs of a
    kept entry, ``exclude`` by uid, are the replay's to end); returns their ids."""
    c = client(root)
    experiments = [e.experiment_id for e in c.search_experiments()]
    ended = []
    for i in range(0, len(experiments), 100):
        for run in c.search_runs(experiments[i:i + 100], "attributes.status = 'RUNNING'", max_results=10_000):
            owner = owner_of(run.data.tags)
            if owner is None or run.data.tags.get(UID_TAG) in exclude or outbox.is_alive(owner) is not False:
                continue
            why = f"persona-ops: its process ({_who(owner)}) died before the run ended"
            c.set_tag(run.info.run_id, ENDED_BY_TAG, why)
            c.set_terminated(run.info.run_id, status=FAILED, end_time=outbox.now_ms())
            ended.append(run.info.run_id)
    return ended
