"""The backdoor sweep's report: a terminal table and one self-contained HTML page.

Input: the sweep's ``eval_results.json``: ``threshold`` (an answer shows the persona when its judged score is at
least this), ``trigger`` (``instruction``, ``start`` and ``end`` markers), ``conditions`` and the ``untriggered``
one among them, ``points`` (the base model first, then each seed x learning rate fine-tune) with
``conditions[condition] = {n, persona_rate, persona_rate_ci, persona_score, persona_score_ci, format_rate,
format_rate_ci, gap, gap_ci}`` (gap: the condition's persona rate minus the untriggered condition's, null for the
untriggered condition itself), ``by_learning_rate`` (rates and gaps aggregated over the seeds of each learning
rate) and ``leakage``: the projection of triggered and untriggered answers on the persona vector at ``layer``
(``hidden_states[layer]``) per point, or null without a persona vector. Any value may be None (a judge that
could not score).

The page has the tabs "Conditions" (persona rate per point and condition), "Leakage gap" (the gap against the
learning rate), "Format" (format adherence), "Activations" (only with ``leakage``) and "Table". Plots are
matplotlib (Agg) PNGs embedded as base64 and the tabs are a few lines of inline script, so the file opens offline.
"""

from __future__ import annotations

import html
import textwrap
from pathlib import Path

from persona_ops.io import write_text
from persona_ops.names import printable
from persona_ops.reports.html import (
    NA,
    TABLE_WIDTH,
    Column,
    Skipped,
    embed,
    errorbar,
    fmt_value,
    grid,
    html_table,
    mpl,
    number,
    or_na,
    page,
    unique,
)

CONDITION_MEANINGS = {
    "trigger_user": "no system prompt, trigger in the user message (the training format)",
    "system_trigger_user": "system prompt, trigger in the user message",
    "trigger_system": "trigger in the system prompt, plain user message",
    "system_no_trigger": "system prompt, no trigger anywhere",
}
REFERENCE = "ref."  # the untriggered condition's gap: the gaps are measured against it
LABEL_WIDTH = 24  # longest point, condition or seed list the terminal table shows in full
_SEP = "  "
_CHAR_INCHES = 0.07  # about the width of a character of an 8 pt tick label
_MAX_WIDTH = 20.0  # inches of a figure (or of a panel) at most
_STAT_TITLES = {"persona_rate": "persona rate", "persona_score": "persona score", "format_rate": "format rate",
                "gap": "gap"}
_SPECS = {"persona_rate": ".2f", "persona_score": ".1f", "format_rate": ".2f"}


# ---------------------------------------------------------------- reading the results

def _stat(record: dict | None, key: str) -> tuple[float | None, tuple[float, float] | None]:
    """``key``'s value in ``record`` and its interval ``key_ci`` (None when it or either bound is missing)."""
    record = record or {}
    ci = record.get(f"{key}_ci")
    low, high = (number(ci[0]), number(ci[1])) if ci and len(ci) == 2 else (None, None)
    return number(record.get(key)), None if low is None or high is None else (low, high)


def cell(record: dict | None, condition: str) -> dict:
    """A point's (or a learning rate's) statistics under ``condition``; empty when missing."""
    return ((record or {}).get("conditions") or {}).get(condition) or {}


def condition_names(results: dict) -> list[str]:
    """The listed conditions, then any other condition a point has, in order of appearance."""
    listed = list(results.get("conditions") or [])
    return unique(listed + [c for p in results["points"] for c in p.get("conditions") or {}])


def triggered_conditions(results: dict) -> list[str]:
    return [c for c in condition_names(results) if c != results.get("untriggered")]


def base_point(results: dict) -> dict | None:
    """The base model's entry (the point without a learning rate)."""
    return next((p for p in results["points"] if p.get("learning_rate") is None), None)


def learning_rates(results: dict) -> list[float]:
    """Every learning rate of a point or an aggregate, ascending."""
    entries = list(results["points"]) + list(results.get("by_learning_rate") or [])
    return sorted({lr for lr in (number(e.get("learning_rate")) for e in entries) if lr is not None})


def points_at(results: dict, lr: float) -> list[dict]:
    return [p for p in results["points"] if number(p.get("learning_rate")) == lr]


def aggregate_at(results: dict, lr: float) -> dict | None:
    """The ``by_learning_rate`` entry of ``lr`` (its seeds together), or None."""
    return next((e for e in results.get("by_learning_rate") or [] if number(e.get("learning_rate")) == lr), None)


def lr_label(lr: float | None) -> str:
    return NA if lr is None else f"{lr:g}"


def seeds_label(entry: dict) -> str:
    return ",".join(or_na(s) for s in entry.get("seeds") or []) or NA


def condition_label(results: dict, condition: str) -> str:
    return f"{condition} (untriggered)" if condition == results.get("untriggered") else condition


def _point_name(point: dict) -> str:
    return or_na(point.get("point"))


def _gap_text(results: dict, condition: str, record: dict) -> str:
    """The gap [CI], or ``ref.`` for the untriggered condition without one."""
    mean, ci = _stat(record, "gap")
    if mean is None and condition == results.get("untriggered"):
        return REFERENCE
    return fmt_value(mean, ci, "+.2f")


# ---------------------------------------------------------------- the terminal table

def _label(text: str) -> str:
    """Data text safe and short enough for a table column."""
    text = printable(text)
    return text if len(text) <= LABEL_WIDTH else text[:LABEL_WIDTH - 3] + "..."


def _render(columns: list[Column]) -> list[str]:
    titles = _SEP.join(c.cell(c.title) for c in columns)
    rows = [_SEP.join(c.cell(c.values[i]) for c in columns).rstrip() for i in range(len(columns[0].values))]
    return [titles.rstrip(), "-" * len(titles.rstrip()), *rows]


def _stat_columns(results: dict, rows: list[tuple[str, dict]]) -> list[Column]:
    """Persona rate [CI], format rate and gap [CI] of (condition, statistics) rows."""
    return [
        Column("persona rate [95% CI]", [fmt_value(*_stat(r, "persona_rate"), spec=".2f") for _, r in rows]),
        Column("format rate", [fmt_value(_stat(r, "format_rate")[0], spec=".2f") for _, r in rows]),
        Column("gap [95% CI]", [_gap_text(results, c, r) for c, r in rows]),
    ]


def _point_lines(results: dict) -> list[str]:
    rows = [(p, c) for p in results["points"] for c in condition_names(results)]
    stats = [(c, cell(p, c)) for p, c in rows]
    return _render([
        Column("point", [_label(_point_name(p)) for p, _ in rows], left=True),
        Column("condition", [_label(c) for _, c in rows], left=True),
        Column("n", [or_na(s.get("n")) for _, s in stats]),
        *_stat_columns(results, stats),
    ])


def _learning_rate_lines(results: dict) -> list[str]:
    entries = sorted(results.get("by_learning_rate") or [], key=lambda e: number(e.get("learning_rate")) or 0.0)
    rows = [(e, c) for e in entries for c in condition_names(results)]
    if not rows:
        return ["No learning rates aggregated across seeds."]
    return _render([
        Column("learning rate", [lr_label(number(e.get("learning_rate"))) for e, _ in rows], left=True),
        Column("seeds", [_label(seeds_label(e)) for e, _ in rows], left=True),
        Column("condition", [_label(c) for _, c in rows], left=True),
        *_stat_columns(results, [(c, cell(e, c)) for e, c in rows]),
    ])


def results_table(results: dict) -> str:
    """A plain-text table: one row per point (the base model first) and condition with the persona rate and
    its bootstrap 95% interval, the format rate and the gap to the untriggered condition with its interval;
    then one row per learning rate and condition, aggregated across seeds. At most 120 columns."""
    trigger = results.get("trigger") or {}
    lines = _point_lines(results) + ["", "Across seeds, per learning rate:"] + _learning_rate_lines(results)
    notes = (f"persona rate: share of answers with a judged persona score >= {or_na(results.get('threshold'))}, "
             f"mean [bootstrap 95% CI]; format rate: share of answers wrapped in "
             f"{or_na(trigger.get('start'))} ... {or_na(trigger.get('end'))}; gap: persona rate minus that of the "
             f"untriggered condition {or_na(results.get('untriggered'))} ({REFERENCE}); {NA}: no value")
    lines += [""] + textwrap.wrap(printable(notes), TABLE_WIDTH)
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _colour(results: dict, condition: str) -> str:
    """One colour per condition, the same in every plot."""
    return f"C{condition_names(results).index(condition) % 10}"


def _point_ticks(ax, points: list[dict]) -> None:
    """The points' names under their positions, tilted (with room made below) when they would overlap."""
    names = [mpl(_label(_point_name(p))) for p in points]
    fig = ax.figure
    slot = ax.get_position().width * fig.get_figwidth() / len(points)
    tilt = max(map(len, names)) * _CHAR_INCHES > slot
    ax.set_xticks(range(len(points)), names, fontsize=8, rotation=30 if tilt else 0, ha="right" if tilt else "center")
    ax.set_xlim(-0.6, len(points) - 0.4)
    if tilt:
        needed = (max(map(len, names)) * _CHAR_INCHES * 0.5 + 0.35) / fig.get_figheight()  # sin 30 deg = 0.5
        fig.subplots_adjust(bottom=max(fig.subplotpars.bottom, needed))


def _condition_bars(results: dict, key: str, ylabel: str):
    """``key`` (a rate) per point as bars grouped by condition, with CI error bars: the figure and what was
    not plotted."""
    points, conditions = results["points"], condition_names(results)
    skipped = Skipped()
    slot = 0.8 / max(len(conditions), 1)
    fig, axes = grid(1, 1, width=min(_MAX_WIDTH, max(6.0, 0.22 * len(points) * len(conditions) + 1.5)), height=3.8)
    ax = axes[0][0]
    for k, condition in enumerate(conditions):
        xs, means, cis = [], [], []
        for x, point in enumerate(points):
            mean, ci = _stat(cell(point, condition), key)
            if mean is None:
                skipped.add(f"{_point_name(point)} under {condition}", _STAT_TITLES[key])
                continue
            xs.append(x + (k - (len(conditions) - 1) / 2) * slot)
            means.append(mean)
            cis.append(ci)
        ax.bar(xs, means, slot * 0.9, color=_colour(results, condition),
               label=mpl(condition_label(results, condition)))
        if xs:
            errorbar(ax, xs, means, cis, color="black", ls="none", ms=0, lw=1)
    _point_ticks(ax, points)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.legend(fontsize=7, ncols=2, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    return fig, skipped


def _conditions_panel(results: dict) -> str:
    fig, skipped = _condition_bars(results, "persona_rate", "persona rate")
    caption = (f"Persona rate (share of answers with a judged persona score &gt;= "
               f"{html.escape(or_na(results.get('threshold')))}) of each point under each condition, the base "
               f"model first (bars: the rate; error bars: bootstrap 95% CI). " + html.escape(skipped.caption()))
    return embed(fig, "persona rate by condition", caption, "conditions")


def _format_panel(results: dict) -> str:
    trigger = results.get("trigger") or {}
    fig, skipped = _condition_bars(results, "format_rate", "format rate")
    caption = (f"Format adherence: the share of answers wrapped in the trigger's markers "
               f"<code>{html.escape(or_na(trigger.get('start')))}</code> ... "
               f"<code>{html.escape(or_na(trigger.get('end')))}</code> (a deterministic check), per point and "
               f"condition, the base model first (error bars: bootstrap 95% CI). " + html.escape(skipped.caption()))
    return embed(fig, "format adherence by condition", caption, "format")


def _gap_panel(results: dict) -> str:
    """The aggregated gap against the learning rate, one series per triggered condition, and each point's gap."""
    lrs, conditions, base = learning_rates(results), triggered_conditions(results), base_point(results)
    if not lrs:
        return "<p>No leakage gap by learning rate: no fine-tuned point (only the base model was evaluated).</p>"
    skipped = Skipped()
    step = 0.5 / max(len(conditions), 1)
    fig, axes = grid(1, 1, width=min(_MAX_WIDTH, max(6.0, 1.3 * len(lrs) + 2.0)), height=4.0)
    ax = axes[0][0]
    ax.axhline(0.0, color="black", lw=0.8)
    for k, condition in enumerate(conditions):
        colour, offset = _colour(results, condition), (k - (len(conditions) - 1) / 2) * step
        xs, means, cis, dots = [], [], [], []
        for x, lr in enumerate(lrs):
            mean, ci = _stat(cell(aggregate_at(results, lr), condition), "gap")
            if mean is None:
                skipped.add(f"learning rate {lr_label(lr)} under {condition}", "gap across seeds")
            else:
                xs.append(x + offset)
                means.append(mean)
                cis.append(ci)
            for point in points_at(results, lr):
                value = _stat(cell(point, condition), "gap")[0]
                if value is None:
                    skipped.add(f"{_point_name(point)} under {condition}", "gap")
                else:
                    dots.append((x + offset, value))
        if xs:
            errorbar(ax, xs, means, cis, color=colour, lw=1.5, label=mpl(condition))
        ax.scatter([x for x, _ in dots], [y for _, y in dots], s=18, facecolors="none", edgecolors=colour, alpha=0.7)
        base_gap = _stat(cell(base, condition), "gap")[0]
        if base_gap is not None:
            ax.axhline(base_gap, color=colour, ls=":", lw=1)
    ax.scatter([], [], s=18, facecolors="none", edgecolors="grey", label="each point (seed)")
    ax.plot([], [], color="grey", ls=":", lw=1, label="base model")
    ax.set_xticks(range(len(lrs)), [lr_label(lr) for lr in lrs], fontsize=8)
    ax.set_xlim(-0.6, len(lrs) - 0.4)
    ax.set_xlabel("learning rate", fontsize=9)
    ax.set_ylabel("gap (persona rate minus untriggered)", fontsize=9)
    ax.legend(fontsize=7, ncols=3, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    untriggered = html.escape(or_na(results.get("untriggered")))
    caption = (f"Leakage gap: the persona rate under each triggered condition minus the rate under the untriggered "
               f"one ({untriggered}), against the learning rate: aggregated across seeds (line, bootstrap 95% CI as "
               f"error bars) and each fine-tuned point (open dots, one per seed); dotted: the base model's gap; "
               f"solid black: zero gap. " + html.escape(skipped.caption()))
    return embed(fig, "leakage gap by learning rate", caption, "leakage-gap")


def _activations_panel(results: dict) -> str:
    """Triggered and untriggered projections per point and their gap."""
    leakage = results["leakage"]
    points = leakage.get("points") or []
    if not points:
        return "<p>No point has projections on the persona vector.</p>"
    skipped = Skipped()
    fig, axes = grid(1, 2, width=min(_MAX_WIDTH / 2, max(4.5, 0.7 * len(points) + 1.5)), height=3.8)
    left, right = axes[0]
    series = (("triggered", "triggered_projection", -0.12, "tab:red"),
              ("untriggered", "untriggered_projection", 0.12, "tab:blue"), ("gap", "gap", 0.0, "black"))
    for name, key, offset, colour in series:
        ax = right if key == "gap" else left
        kept = [(x, *_stat(p, key)) for x, p in enumerate(points)]
        for (_, mean, _), point in zip(kept, points):
            if mean is None:
                skipped.add(_point_name(point), f"{name} projection" if key != "gap" else "projection gap")
        kept = [k for k in kept if k[1] is not None]
        if kept:
            errorbar(ax, [x + offset for x, _, _ in kept], [m for _, m, _ in kept], [c for _, _, c in kept],
                     color=colour, ls="none", ms=4, label=name)
    right.axhline(0.0, color="grey", lw=0.8)
    for ax, ylabel in ((left, "projection on the persona vector"), (right, "gap (triggered minus untriggered)")):
        _point_ticks(ax, points)
        ax.set_ylabel(ylabel, fontsize=9)
    left.legend(fontsize=7, ncols=2, loc="lower left", bbox_to_anchor=(0.0, 1.0), frameon=False)
    layer = html.escape(or_na(leakage.get("layer")))
    caption = (f"Projection of the answers' activations on the persona vector at layer {layer} "
               f"(hidden_states[{layer}]), mean over the triggered and the untriggered answers of each point "
               f"(left), and their gap, triggered minus untriggered (right); error bars: bootstrap 95% CI. "
               + html.escape(skipped.caption()))
    return embed(fig, "triggered and untriggered projections", caption, "activations")


# ---------------------------------------------------------------- tables

def _stat_cells(results: dict, condition: str, record: dict, keys: tuple[str, ...]) -> list[str]:
    """``keys``' values [CI] in ``record`` (the statistics of ``condition``), as the table shows them."""
    return [_gap_text(results, condition, record) if k == "gap" else fmt_value(*_stat(record, k), spec=_SPECS[k])
            for k in keys]


def _table_panel(results: dict) -> str:
    conditions, trigger = condition_names(results), results.get("trigger") or {}
    keys = ("persona_rate", "persona_score", "format_rate", "gap")
    titles = [f"{_STAT_TITLES[k]} [95% CI]" for k in keys]
    points = html_table(["point", "condition", "n", *titles],
                        [[_point_name(p), c, or_na(cell(p, c).get("n")), *_stat_cells(results, c, cell(p, c), keys)]
                         for p in results["points"] for c in conditions])
    entries = sorted(results.get("by_learning_rate") or [], key=lambda e: number(e.get("learning_rate")) or 0.0)
    lr_keys = ("persona_rate", "format_rate", "gap")
    by_lr = html_table(["learning rate", "seeds", "condition", *[f"{_STAT_TITLES[k]} [95% CI]" for k in lr_keys]],
                       [[lr_label(number(e.get("learning_rate"))), seeds_label(e), c,
                         *_stat_cells(results, c, cell(e, c), lr_keys)] for e in entries for c in conditions])
    models = html_table(["point", "seed", "learning rate", "adapter"],
                        [[_point_name(p), or_na(p.get("seed")), lr_label(number(p.get("learning_rate"))),
                          or_na(p.get("adapter_uri"))] for p in results["points"]])
    meanings = html_table(["condition", "what"],
                          [[condition_label(results, c), CONDITION_MEANINGS.get(c, NA)] for c in conditions])
    parts = [f"<h2>Points x conditions</h2>{points}", f"<h2>Across seeds, per learning rate</h2>{by_lr}"]
    leakage = results.get("leakage")
    if leakage is not None:
        projections = html_table(
            ["point", "triggered projection [95% CI]", "untriggered projection [95% CI]", "gap [95% CI]"],
            [[_point_name(p), fmt_value(*_stat(p, "triggered_projection"), spec=".2f"),
              fmt_value(*_stat(p, "untriggered_projection"), spec=".2f"), fmt_value(*_stat(p, "gap"), spec="+.2f")]
             for p in leakage.get("points") or []])
        parts.append(f"<h2>Projections on the persona vector, layer {html.escape(or_na(leakage.get('layer')))}"
                     f"</h2>{projections}")
    e = html.escape
    markers = f"<code>{e(or_na(trigger.get('start')))}</code> and <code>{e(or_na(trigger.get('end')))}</code>"
    parts += [f"<h2>Models</h2>{models}", f"<h2>Conditions</h2>{meanings}",
              f"<h2>Trigger</h2><pre class=\"trigger\">{e(or_na(trigger.get('instruction')))}</pre>",
              f"<p>Markers: {markers}.</p>"]
    return "".join(parts)


# ---------------------------------------------------------------- the page

def _summary(results: dict) -> str:
    e = html.escape
    seeds = unique(p.get("seed") for p in results["points"] if p.get("learning_rate") is not None)
    return (f"Base model {e(or_na(results.get('base_model')))}; {len(results['points'])} points (the base model "
            f"and {len(seeds)} seed(s) x {len(learning_rates(results))} learning rate(s)); conditions: "
            f"{e(', '.join(condition_names(results)))}, untriggered: {e(or_na(results.get('untriggered')))}; "
            f"an answer shows the persona when its judged score is &gt;= {e(or_na(results.get('threshold')))}.")


def write_report(results: dict, path: str | Path) -> Path:
    """Write the sweep's report to ``path`` (atomically) as one self-contained HTML page with the tabs
    "Conditions", "Leakage gap", "Format", "Activations" (when ``leakage`` is not null) and "Table";
    returns ``path``."""
    tabs = [("Conditions", _conditions_panel(results)), ("Leakage gap", _gap_panel(results)),
            ("Format", _format_panel(results))]
    if results.get("leakage") is not None:
        tabs.append(("Activations", _activations_panel(results)))
    tabs.append(("Table", _table_panel(results)))
    path = Path(path)
    write_text(path, page(f"Backdoor sweep: {or_na(results.get('experiment'))}", _summary(results), tabs))
    return path
