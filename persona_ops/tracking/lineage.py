"""Lineage graphs built only from recorded provenance: data files -> stage runs -> artifacts ->
registered versions (-> the runs that evaluated them), with each run's params, code version and metrics.

A walk starts at a registered version (its run's record), an MLflow run id or an output path
(its sidecar). Each input of a record names the run that produced it; that run's record comes
from MLflow (so an old version still shows the inputs it was made from after the files were
rebuilt), or, without tracking, from the input's sidecar when its hash is the recorded one.
An input with no producer is raw data. Nothing is inferred from names or paths.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from persona_ops.errors import InputError
from persona_ops.provenance import producer_of, read_sidecar, sidecar

RUN_ID = re.compile(r"^[0-9a-f]{32}$")


class Graph:
    def __init__(self, ref: str):
        self.ref = ref
        self.nodes: dict[str, dict] = {}
        self.edges: list[dict] = []
        self.root: str | None = None

    def node(self, node_id: str, node_kind: str, label: str, **attrs) -> str:
        if node_id not in self.nodes:
            self.nodes[node_id] = {"id": node_id, "kind": node_kind, "label": label, "attrs": attrs}
        return node_id

    def edge(self, source: str, target: str, kind: str) -> None:
        e = {"source": source, "target": target, "kind": kind}
        if e not in self.edges:
            self.edges.append(e)

    def as_dict(self) -> dict:
        return {"ref": self.ref, "root": self.root, "nodes": list(self.nodes.values()), "edges": self.edges}


def _file_id(path: str, sha: str) -> str:
    return f"file:{path}#{sha[:12]}"


def _tracked() -> bool:
    try:
        import mlflow  # noqa: F401
    except ImportError:  # pragma: no cover - a bare GPU box
        return False
    return True


def _run_data(run_id: str) -> tuple[dict, dict] | None:
    """``(metrics, tags)`` of a run, or None when MLflow does not have it."""
    from persona_ops.tracking.store import client

    try:
        run = client().get_run(run_id)
    except Exception:
        return None
    return dict(run.data.metrics), dict(run.data.tags)


def _record_of_run(run_id: str) -> dict | None:
    from persona_ops.tracking.runs import run_record

    return run_record(run_id)


def _add_record(g: Graph, record: dict, root: Path, seen: set[str]) -> str:
    """The run node of ``record``, its inputs (walked) and outputs; returns the run node's id."""
    key = record.get("run_id") or f"{record['stage']}@{record.get('item')}:{record.get('created_at')}"
    run_node = f"run:{key}"
    if run_node in seen:
        return run_node
    seen.add(run_node)
    name = f"{record['stage']}@{record['item']}" if record.get("item") else record["stage"]
    attrs: dict[str, Any] = {"stage": record["stage"], "item": record.get("item"), "pipeline": record.get("pipeline"),
                             "run_id": record.get("run_id"), "params": record.get("params"),
                             "code": record.get("code"), "models": [m.get("label") for m in record.get("models", [])],
                             "created_at": record.get("created_at")}
    g.node(run_node, "run", name, **attrs)
    if record.get("run_id") and _tracked():
        data = _run_data(record["run_id"])
        if data and data[0]:
            metrics_node = g.node(f"metrics:{key}", "metrics", f"metrics of {name}", values=data[0])
            g.edge(run_node, metrics_node, "logged")
    outputs = {}
    for out in record.get("outputs", []):
        node = g.node(_file_id(out["path"], out["sha256"]), "artifact", out["path"], sha256=out["sha256"])
        g.edge(run_node, node, "made")
        outputs[out["name"]] = node
    for reg in record.get("registered", []):
        v = g.node(f"version:{reg['name']}/{reg['version']}", "version", f"models:/{reg['name']}/{reg['version']}",
                   kind=reg.get("kind"))
        g.edge(outputs.get(reg.get("output"), run_node), v, "registered")
    for inp in record.get("inputs", []):
        producer = inp.get("producer") or {}
        upstream = _producer_record(producer, inp, root)
        kind = "artifact" if upstream else "data"
        node = g.node(_file_id(inp["path"], inp["sha256"]), kind, inp["path"], sha256=inp["sha256"])
        if upstream is not None:
            up = _add_record(g, upstream, root, seen)
            g.edge(up, node, "made")
        g.edge(node, run_node, "input")
    return run_node


def _producer_record(producer: dict, inp: dict, root: Path) -> dict | None:
    if producer.get("run_id") and _tracked():
        record = _record_of_run(producer["run_id"])
        if record is not None:
            return record
    if producer:  # untracked: the input's sidecar, if it still describes these bytes
        local = producer_of(Path(root) / inp["path"], Path(root), inp["sha256"])
        if local is not None and local.get("stage") == producer.get("stage"):
            return local
    return None


def graph_of(ref: str, root: str | Path = ".") -> dict:
    """The lineage graph of ``ref`` (see the module docstring) as ``{ref, root, nodes, edges}``."""
    root = Path(root)
    g = Graph(ref)
    seen: set[str] = set()
    if ref.startswith("models:/"):
        from persona_ops.tracking import store
        from persona_ops.tracking.registry import evaluations_of, version_of

        store.configure(root)
        version = version_of(ref)
        record = _record_of_run(version.run_id) if version.run_id else None
        if record is None:
            raise InputError(f"{ref}: its run {version.run_id} holds no provenance record")
        _add_record(g, record, root, seen)
        v = f"version:{version.name}/{version.version}"
        g.node(v, "version", version.uri, kind=version.tags.get("kind"), aliases=list(version.aliases),
               sha256=version.tags.get("sha256"))
        g.nodes[v]["attrs"].update(aliases=list(version.aliases))
        g.root = v
        for run_id in evaluations_of(version.name, version.version):  # downstream: what evaluated it
            record = _record_of_run(run_id)
            if record is not None:
                g.edge(v, _add_record(g, record, root, seen), "evaluated by")
    elif RUN_ID.match(ref):
        from persona_ops.tracking import store

        store.configure(root)
        record = _record_of_run(ref)
        if record is None:
            raise InputError(f"run {ref}: no such run, or it holds no provenance record")
        g.root = _add_record(g, record, root, seen)
    else:
        path = Path(ref) if Path(ref).is_absolute() else root / ref
        record = read_sidecar(path)
        if record is None:
            raise InputError(f"{ref}: no provenance recorded ({sidecar(path)} is missing); "
                             "is it an output of a stage?")
        if record.get("run_id") and _tracked():
            from persona_ops.tracking import store

            store.configure(root)
            record = _record_of_run(record["run_id"]) or record
        _add_record(g, record, root, seen)
        out = next((o for o in record["outputs"] if (root / o["path"]).resolve() == path.resolve()), None)
        g.root = _file_id(out["path"], out["sha256"]) if out else f"run:{record.get('run_id')}"
    return g.as_dict()
