"""Rendering a lineage graph (``persona_ops.tracking.lineage.graph_of``): text, Mermaid, Graphviz
dot, JSON, or a self-contained HTML page (an inline SVG, laid out in columns from raw data on the
left to the result on the right; no scripts)."""

from __future__ import annotations

import html
import json

from persona_ops.errors import InputError

FORMATS = ("text", "mermaid", "dot", "json", "html")
_SHAPES = {"data": ("[(", ")]"), "artifact": ("[/", "/]"), "run": ("[", "]"), "version": ("{{", "}}"),
           "metrics": ("([", "])")}
_COLOURS = {"data": "#dbeafe", "artifact": "#f3f4f6", "run": "#fde68a", "version": "#bbf7d0", "metrics": "#fce7f3"}


def render(graph: dict, fmt: str = "text") -> str:
    if fmt not in FORMATS:
        raise InputError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return {"text": text, "mermaid": mermaid, "dot": dot, "json": lambda g: json.dumps(g, indent=2, default=str),
            "html": page}[fmt](graph)


def _detail(node: dict) -> str:
    a = node["attrs"]
    if node["kind"] in ("data", "artifact"):
        return f"sha256 {a['sha256'][:12]}"
    if node["kind"] == "run":
        code = a.get("code") or {}
        dirty = " (+changes)" if code.get("dirty_files") else ""
        return f"run {str(a.get('run_id') or 'untracked')[:12]}, code {str(code.get('git_commit'))[:10]}{dirty}"
    if node["kind"] == "version":
        return f"{a.get('kind')}" + (f" @{', @'.join(a['aliases'])}" if a.get("aliases") else "")
    if node["kind"] == "metrics":
        return ", ".join(f"{k}={v:.4g}" for k, v in list(a["values"].items())[:6])
    return ""


def _incoming(graph: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {n["id"]: [] for n in graph["nodes"]}
    for e in graph["edges"]:
        out[e["target"]].append(e["source"])
    return out


def text(graph: dict) -> str:
    """An indented tree from the result back to raw data (a node seen before is shown once)."""
    nodes = {n["id"]: n for n in graph["nodes"]}
    incoming = _incoming(graph)
    metrics = {e["source"]: e["target"] for e in graph["edges"] if nodes[e["target"]]["kind"] == "metrics"}
    lines, shown = [f"lineage of {graph['ref']}"], set()

    def visit(node_id: str, depth: int) -> None:
        n = nodes[node_id]
        again = node_id in shown
        lines.append(f"{'  ' * depth}{'<- ' if depth else ''}{n['kind']}: {n['label']}  [{_detail(n)}]"
                     + (" (above)" if again else ""))
        if again:
            return
        shown.add(node_id)
        if node_id in metrics:
            lines.append(f"{'  ' * (depth + 1)}metrics: {_detail(nodes[metrics[node_id]])}")
        for src in incoming[node_id]:
            if nodes[src]["kind"] != "metrics":
                visit(src, depth + 1)

    visit(graph["root"], 0)
    return "\n".join(lines)



def mermaid(graph: dict) -> str:
    ids = {n["id"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
    lines = ["flowchart LR"]
    for n in graph["nodes"]:
        left, right = _SHAPES[n["kind"]]
        label = f"{n['label']}<br/>{_detail(n)}".replace('"', "'")
        lines.append(f'  {ids[n["id"]]}{left}"{label}"{right}')
    lines += [f"  {ids[e['source']]} -->|{e['kind']}| {ids[e['target']]}" for e in graph["edges"]]
    lines += [f"  classDef {k} fill:{c}" for k, c in _COLOURS.items()]
    lines += [f"  class {ids[n['id']]} {n['kind']}" for n in graph["nodes"]]
    return "\n".join(lines)


def dot(graph: dict) -> str:
    shapes = {"data": "cylinder", "artifact": "note", "run": "box", "version": "hexagon", "metrics": "ellipse"}
    ids = {n["id"]: f"n{i}" for i, n in enumerate(graph["nodes"])}
    lines = ["digraph lineage {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10, style=filled];']
    for n in graph["nodes"]:
        label = f"{n['label']}\\n{_detail(n)}".replace('"', "'")
        kind = n["kind"]
        lines.append(f'  {ids[n["id"]]} [label="{label}", shape={shapes[kind]}, fillcolor="{_COLOURS[kind]}"];')
    lines += [f'  {ids[e["source"]]} -> {ids[e["target"]]} [label="{e["kind"]}"];' for e in graph["edges"]]
    return "\n".join(lines + ["}"])


def _columns(graph: dict) -> dict[str, int]:
    """Column of each node: its longest path from a node without inputs."""
    incoming = _incoming(graph)
    col: dict[str, int] = {}

    def depth(node_id: str, stack: tuple = ()) -> int:
        if node_id not in col:
            parents = [p for p in incoming[node_id] if p not in stack]
            col[node_id] = 1 + max((depth(p, stack + (node_id,)) for p in parents), default=-1)
        return col[node_id]

    for n in graph["nodes"]:
        depth(n["id"])
    return col


def page(graph: dict) -> str:
    """A standalone HTML page: the graph as an SVG and a table of every node's details."""
    col = _columns(graph)
    w, h, gap_x, gap_y = 230, 46, 60, 18
    rows: dict[int, int] = {}
    pos = {}
    for n in sorted(graph["nodes"], key=lambda n: (col[n["id"]], n["kind"], n["label"])):
        c = col[n["id"]]
        pos[n["id"]] = (20 + c * (w + gap_x), 20 + rows.get(c, 0) * (h + gap_y))
        rows[c] = rows.get(c, 0) + 1
    width = 40 + (max(col.values(), default=0) + 1) * (w + gap_x)
    height = 40 + max(rows.values(), default=1) * (h + gap_y)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             'font-size="11"><defs><marker id="a" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
             'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#555"/></marker></defs>']
    for e in graph["edges"]:
        (x1, y1), (x2, y2) = pos[e["source"]], pos[e["target"]]
        parts.append(f'<line x1="{x1 + w}" y1="{y1 + h / 2}" x2="{x2}" y2="{y2 + h / 2}" stroke="#555" '
                     'marker-end="url(#a)"/>')
    for n in graph["nodes"]:
        x, y = pos[n["id"]]
        label, detail = html.escape(n["label"][-38:]), html.escape(_detail(n)[:44])
        parts.append(f'<g><title>{html.escape(n["id"])}</title><rect x="{x}" y="{y}" width="{w}" height="{h}" rx="6" '
                     f'fill="{_COLOURS[n["kind"]]}" stroke="#333"/><text x="{x + 8}" y="{y + 18}" '
                     f'font-weight="bold">{label}</text><text x="{x + 8}" y="{y + 35}">{detail}</text></g>')
    parts.append("</svg>")
    table = "".join(f"<tr><td>{html.escape(n['kind'])}</td><td>{html.escape(n['label'])}</td>"
                    f"<td><pre>{html.escape(json.dumps(n['attrs'], indent=1, default=str)[:4000])}</pre></td></tr>"
                    for n in graph["nodes"])
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>lineage of {html.escape(graph['ref'])}"
            "</title><style>body{font-family:sans-serif;margin:20px} td{vertical-align:top;border-top:1px solid #ddd;"
            "padding:4px} pre{margin:0;font-size:11px}</style></head><body>"
            f"<h1>Lineage of {html.escape(graph['ref'])}</h1>{''.join(parts)}<h2>Nodes</h2><table>{table}</table>"
            "</body></html>")
