"""What the report modules share: reading and formatting values, terminal-table columns, matplotlib (Agg)
figures embedded as PNG data URIs, HTML tables and the self-contained page of tabs (a few lines of inline
script, so the file opens offline)."""

from __future__ import annotations

import base64
import html
import io
import math
from dataclasses import dataclass

NA = "n/a"
TABLE_WIDTH = 120
_MAX_LISTED = 12  # skipped points named in a caption; the rest are counted


# ---------------------------------------------------------------- values

def number(value) -> float | None:
    """A finite float, or None (missing, null or NaN)."""
    if value is None or isinstance(value, bool):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def unique(items) -> list:
    return list(dict.fromkeys(items))


def or_na(value) -> str:
    """``value`` as text, or n/a for None."""
    return NA if value is None else str(value)


def fmt_value(mean: float | None, ci: tuple[float, float] | None = None, spec: str = ".1f",
              missing: str = NA) -> str:
    """``12.0 [8.0, 16.5]``, ``12.0`` without an interval, ``missing`` without a mean."""
    if mean is None:
        return missing
    shown = format(mean, spec)
    return f"{shown} [{ci[0]:{spec}}, {ci[1]:{spec}}]" if ci else shown


@dataclass
class Column:
    """A column of a terminal table."""

    title: str
    values: list[str]
    left: bool = False

    @property
    def width(self) -> int:
        return max([len(self.title), *map(len, self.values)])

    def cell(self, text: str) -> str:
        return text.ljust(self.width) if self.left else text.rjust(self.width)


# ---------------------------------------------------------------- plots

def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mpl(text: str) -> str:
    """Text from the data as matplotlib shows it literally (``$`` would start mathtext)."""
    return str(text).replace("$", r"\$")


class Skipped:
    """Points left out of a plot, for its caption."""

    def __init__(self) -> None:
        self.items: list[str] = []

    def add(self, what: str, reason: str) -> None:
        self.items.append(f"{what} ({reason})")

    def caption(self) -> str:
        if not self.items:
            return ""
        shown = ", ".join(self.items[:_MAX_LISTED])
        more = f" and {len(self.items) - _MAX_LISTED} more" if len(self.items) > _MAX_LISTED else ""
        return f"Not plotted, no value: {shown}{more}."


def errorbar(ax, xs, means, cis, **style) -> None:
    """Points with their intervals as error bars (a point without an interval gets none)."""
    low = [max(0.0, m - ci[0]) if ci else 0.0 for m, ci in zip(means, cis)]
    high = [max(0.0, ci[1] - m) if ci else 0.0 for m, ci in zip(means, cis)]
    ax.errorbar(xs, means, yerr=[low, high], capsize=4, marker="o", **style)


def grid(rows: int, cols: int, width: float = 3.6, height: float = 3.0):
    """A figure of ``rows`` x ``cols`` axes, each about ``width`` x ``height`` inches with room for its
    title, tick labels and axis labels (fixed margins: a layout engine would double the drawing time)."""
    fig_w, fig_h = width * cols + 0.4, height * rows + 0.5
    fig, axes = _pyplot().subplots(rows, cols, figsize=(fig_w, fig_h), squeeze=False)
    fig.subplots_adjust(left=0.75 / fig_w, right=1 - 0.15 / fig_w, bottom=0.6 / fig_h, top=1 - 0.75 / fig_h,
                        wspace=0.8 / (width - 0.8), hspace=0.95 / (height - 0.95))
    return fig, axes


def embed(fig, alt: str, caption: str, fig_id: str) -> str:
    """The figure (closed here) as a PNG data URI inside a <figure> with its (already escaped) caption."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    _pyplot().close(fig)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return (f'<figure id="{fig_id}"><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{caption}</figcaption></figure>")


# ---------------------------------------------------------------- the page

def html_table(header: list[str], rows: list[list[str]]) -> str:
    """A table of plain strings (escaped here)."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_STYLE = """
body{font-family:sans-serif;margin:20px;color:#222}
[role=tablist]{display:flex;gap:4px;border-bottom:2px solid #888;margin:16px 0}
[role=tab]{border:1px solid #aaa;border-bottom:none;background:#eee;padding:6px 14px;cursor:pointer;font-size:14px}
[role=tab][aria-selected=true]{background:#fff;font-weight:bold;border-color:#555}
figure{margin:0 0 24px 0} figure img{max-width:100%} figcaption{font-size:13px;max-width:70em}
table{border-collapse:collapse;font-size:12px;margin-bottom:16px} th,td{border:1px solid #ccc;padding:3px 6px}
th{background:#f3f3f3} td{white-space:nowrap}
pre{background:#f6f6f6;padding:8px;white-space:pre-wrap;max-width:70em;font-size:13px}
"""

_SCRIPT = """
for (const tab of document.querySelectorAll('[role=tab]')) {
  tab.addEventListener('click', () => {
    for (const other of document.querySelectorAll('[role=tab]')) {
      const on = other === tab;
      other.setAttribute('aria-selected', String(on));
      document.getElementById(other.getAttribute('aria-controls')).hidden = !on;
    }
  });
}
"""


def page(title: str, summary: str, tabs: list[tuple[str, str]]) -> str:
    """A self-contained HTML page: ``title`` (plain text), the ``summary`` paragraph (HTML) and one tab per
    (name, HTML body) of ``tabs``, the first one shown."""
    buttons = "".join(f'<button role="tab" id="tab-{i}" aria-controls="panel-{i}" '
                      f'aria-selected="{"true" if i == 0 else "false"}">{html.escape(name)}</button>'
                      for i, (name, _) in enumerate(tabs))
    panels = "".join(f'<section role="tabpanel" id="panel-{i}" aria-labelledby="tab-{i}"{"" if i == 0 else " hidden"}>'
                     f"{body}</section>" for i, (_, body) in enumerate(tabs))
    title = html.escape(title)
    return (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{title}</h1><p>{summary}</p>"
            f'<nav role="tablist">{buttons}</nav>{panels}<script>{_SCRIPT}</script></body></html>\n')
