"""The trait fine-tuning matrix's report: a terminal table and one self-contained HTML page.

Input: the evaluation's ``eval_results.json``: ``traits`` (evaluated), ``trained_traits``,
``strengths``, ``cells`` (the base model first, then each cell's final checkpoint), each with
``scores[trait] = {n, trait_mean, trait_ci, coherence_mean, coherence_ci, projection_mean,
projection_ci, shift_mean, shift_ci}``, ``checkpoints`` (every evaluated checkpoint) and
``vector_cosine[trait][trait]`` between the persona vectors at ``layer`` (``hidden_states[layer]``).
Any mean or interval may be None (a judge that could not score); a model without activations
(``activations: false``, tuned through an API) has no projection and no shift.

The page has one tab per trained trait (score and coherence across strengths, checkpoint
curves), an "Across cells" tab (shift against judged score; cross-persona effects against the
cosine of the trait vectors) and a "Table" tab. Plots are matplotlib (Agg) PNGs embedded as
base64 and the tabs are a few lines of inline script, so the file opens offline.
"""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from pathlib import Path

import torch

from persona_ops.interp.geometry import pearson
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

STRENGTH_LABELS = {"normal": "baseline", "misaligned_1": "mild", "misaligned_2": "severe"}
METRIC_TITLES = {"trait": "trait score", "coherence": "coherence", "projection": "projection",
                 "shift": "finetuning shift"}
NO_ACTIVATIONS = "n/a (no activations: API model)"
_ACTIVATION_METRICS = ("projection", "shift")


# ---------------------------------------------------------------- reading the results

def mean_of(record: dict, trait: str, metric: str) -> float | None:
    """``metric``'s mean for ``trait`` in a cell or checkpoint record, or None."""
    return number(((record.get("scores") or {}).get(trait) or {}).get(f"{metric}_mean"))


def ci_of(record: dict, trait: str, metric: str) -> tuple[float, float] | None:
    """``metric``'s bootstrap interval for ``trait``, or None when it or either bound is missing."""
    ci = ((record.get("scores") or {}).get(trait) or {}).get(f"{metric}_ci")
    if not ci or len(ci) != 2:
        return None
    low, high = number(ci[0]), number(ci[1])
    return None if low is None or high is None else (low, high)


def has_activations(record: dict) -> bool:
    return record.get("activations", True) is not False


def _missing(record: dict, metric: str) -> str:
    """How a missing value of ``metric`` shows: n/a, or why a model without activations has none."""
    return NO_ACTIVATIONS if metric in _ACTIVATION_METRICS and not has_activations(record) else NA


def _why_missing(record: dict, metric: str, title: str | None = None) -> str:
    """What is missing from ``record``, for a caption: the metric's title, and why when it is known."""
    title = title or METRIC_TITLES[metric]
    return title if _missing(record, metric) == NA else f"{title}: {NO_ACTIVATIONS}"


def base_cell(results: dict) -> dict | None:
    """The base model's entry (the cell without a trained trait)."""
    return next((c for c in results["cells"] if c.get("trait") is None), None)


def evaluated_traits(results: dict) -> list[str]:
    return list(results.get("traits") or unique(t for c in results["cells"] for t in c.get("scores") or {}))


def trained_traits(results: dict) -> list[str]:
    return list(results.get("trained_traits") or unique(c["trait"] for c in results["cells"] if c.get("trait")))


def strengths(results: dict) -> list[str]:
    """The listed strengths, then any other strength a cell has, in order of appearance."""
    listed = list(results.get("strengths") or [])
    return unique(listed + [c["strength"] for c in results["cells"] if c.get("strength") is not None])


def cells_of(results: dict, trait: str) -> list[dict]:
    """The cells trained on ``trait``, in strength order."""
    order = {s: i for i, s in enumerate(strengths(results))}
    return sorted((c for c in results["cells"] if c.get("trait") == trait),
                  key=lambda c: order.get(c.get("strength"), len(order)))


def strength_label(strength: str) -> str:
    """``mild (misaligned_1)`` for the known strengths, the name itself otherwise."""
    return f"{STRENGTH_LABELS[strength]} ({strength})" if strength in STRENGTH_LABELS else strength


def cosine(results: dict, a: str, b: str) -> float | None:
    """Cosine similarity of the persona vectors of ``a`` and ``b`` (either order), or None."""
    table = results.get("vector_cosine") or {}
    value = (table.get(a) or {}).get(b)
    return number(value if value is not None else (table.get(b) or {}).get(a))


def correlation(points: list[tuple[float, float]]) -> float | None:
    """Pearson correlation of (x, y) points; None for fewer than 2 or a constant series."""
    if len(points) < 2:
        return None
    xs, ys = torch.tensor(points, dtype=torch.float64).T
    return number(pearson(xs, ys))


# ---------------------------------------------------------------- formatting

def abbreviate(name: str) -> str:
    """Names longer than 8 characters cut to 6 and a dot (``hallucinating`` -> ``halluc.``)."""
    return name if len(name) <= 8 else name[:6] + "."


def _r_text(r: float | None, n: int) -> str:
    return f"Pearson r = {NA if r is None else f'{r:.3f}'} (n = {n})"


# ---------------------------------------------------------------- the terminal table

@dataclass
class _Group:
    name: str
    columns: list[Column]

    @property
    def width(self) -> int:
        return sum(c.width for c in self.columns) + len(self.columns) - 1


_GAP = "   "


def _cell_label(cell: dict, short: bool) -> str:
    name, trait = str(cell.get("cell")), cell.get("trait")
    if short and trait and name.startswith(trait):
        name = abbreviate(trait) + name[len(trait):]
    return printable(name)


def _trait_group(cells: list[dict], trait: str, short: bool) -> _Group:
    def shift(c: dict) -> str:
        return NA + "*" if not has_activations(c) else fmt_value(mean_of(c, trait, "shift"), spec="+.2f")

    return _Group(printable(abbreviate(trait) if short else trait), [
        Column("score [95% CI]", [fmt_value(mean_of(c, trait, "trait"), ci_of(c, trait, "trait")) for c in cells]),
        Column("coh.", [fmt_value(mean_of(c, trait, "coherence")) for c in cells]),
        Column("shift", [shift(c) for c in cells]),
    ])


def _blocks(label: Column, groups: list[_Group], width: int) -> list[list[_Group]]:
    """Groups packed left to right into blocks that fit ``width`` beside the label column."""
    blocks: list[list[_Group]] = [[]]
    used = label.width
    for g in groups:
        if blocks[-1] and used + len(_GAP) + g.width > width:
            blocks.append([])
            used = label.width
        blocks[-1].append(g)
        used += len(_GAP) + g.width
    return blocks


def _render(label: Column, groups: list[_Group]) -> list[str]:
    top = " " * label.width + "".join(_GAP + g.name[:g.width].ljust(g.width) for g in groups)
    titles = label.cell(label.title) + "".join(_GAP + " ".join(c.cell(c.title) for c in g.columns) for g in groups)
    lines = [top.rstrip(), titles, "-" * len(titles)]
    for i, text in enumerate(label.values):
        lines.append(label.cell(text) + "".join(_GAP + " ".join(c.cell(c.values[i]) for c in g.columns)
                                                for g in groups))
    return lines


def results_table(results: dict) -> str:
    """A plain-text table, one row per cell (the base model first) and per evaluated trait the
    judged trait score with its bootstrap 95% interval, the coherence and the finetuning shift;
    trait names are abbreviated when the full ones would not fit 120 columns, and traits that
    still do not fit continue in a second block."""
    cells, traits = results["cells"], evaluated_traits(results)
    for short in (False, True):
        label = Column("cell", [_cell_label(c, short) for c in cells], left=True)
        blocks = _blocks(label, [_trait_group(cells, t, short) for t in traits], TABLE_WIDTH)
        if len(blocks) == 1 and max(len(line) for line in _render(label, blocks[0])) <= TABLE_WIDTH:
            break
    lines: list[str] = []
    for block in blocks:
        lines += ([""] if lines else []) + _render(label, block)
    lines += [""] + textwrap.wrap(
        "score: judged trait score, mean [bootstrap 95% CI]; coh.: coherence; shift: finetuning shift (the same "
        f"texts through the fine-tuned minus the base model, on the trait's vector at layer {results.get('layer')})",
        TABLE_WIDTH)
    api = [printable(str(c.get("cell"))) for c in cells if not has_activations(c)]
    if api:
        lines += textwrap.wrap(f"* {NO_ACTIVATIONS}: {', '.join(api)}", TABLE_WIDTH)
    return "\n".join(lines)


# ---------------------------------------------------------------- plots

def _reference(ax, base: dict | None, trait: str, metric: str) -> None:
    """The base model's value as a dashed line, its interval as a band."""
    value = None if base is None else mean_of(base, trait, metric)
    if value is None:
        return
    ax.axhline(value, ls="--", color="grey", lw=1, label="base model")
    ci = ci_of(base, trait, metric)
    if ci:
        ax.axhspan(ci[0], ci[1], color="grey", alpha=0.12)


def _strength_figure(results: dict, trait: str, fig_id: str) -> str:
    """Trait score and coherence of ``trait``'s cells across strengths, per evaluated trait."""
    cells, base, traits = cells_of(results, trait), base_cell(results), evaluated_traits(results)
    skipped = Skipped()
    fig, axes = grid(2, len(traits))
    positions = list(range(len(cells)))
    for row, metric in enumerate(("trait", "coherence")):
        for col, evaluated in enumerate(traits):
            ax = axes[row][col]
            kept = [(x, c) for x, c in zip(positions, cells) if mean_of(c, evaluated, metric) is not None]
            for c in cells:
                if mean_of(c, evaluated, metric) is None:
                    skipped.add(f"{c['cell']} on {evaluated}", METRIC_TITLES[metric])
            _reference(ax, base, evaluated, metric)
            if kept:
                errorbar(ax, [x for x, _ in kept], [mean_of(c, evaluated, metric) for _, c in kept],
                         [ci_of(c, evaluated, metric) for _, c in kept], color="tab:red" if row == 0 else "tab:blue")
            ax.set_xticks(positions, [mpl(strength_label(c["strength"])).replace(" (", "\n(") for c in cells],
                          fontsize=7)
            ax.set_xlim(-0.5, len(cells) - 0.5)
            ax.set_ylim(0, 100)
            trained = " (trained)" if evaluated == trait else ""
            ax.set_title(mpl(f"{evaluated}{trained}: {METRIC_TITLES[metric]}"), fontsize=9)
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.suptitle(mpl(f"cells trained on {trait}"), fontsize=10)
    caption = (f"Judged trait score (top) and coherence (bottom) of the cells trained on {html.escape(trait)}, "
               "per evaluated trait, across the strengths (mean, bootstrap 95% CI); dashed: the base model, "
               "its CI shaded. " + html.escape(skipped.caption()))
    return embed(fig, f"{trait}: score and coherence across strengths", caption, fig_id)


def checkpoint_series(results: dict, trait: str) -> dict[str, list[tuple[int, dict]]]:
    """Per cell of ``trait``: its evaluated checkpoints as (step, record) sorted by step, the final
    cell entry included when ``checkpoints`` lacks its step."""
    series = {}
    for cell in cells_of(results, trait):
        points = {int(p["step"]): p for p in results.get("checkpoints") or []
                  if p.get("cell") == cell["cell"] and p.get("step") is not None}  # an API model has no steps
        if cell.get("step") is not None:
            points.setdefault(int(cell["step"]), cell)
        series[cell["cell"]] = sorted(points.items())
    return series


def _checkpoint_figure(results: dict, trait: str, series: dict[str, list[tuple[int, dict]]], fig_id: str) -> str:
    """Trait score, coherence and finetuning shift against the step, one line per cell."""
    base, traits = base_cell(results), evaluated_traits(results)
    cells = {c["cell"]: c for c in cells_of(results, trait)}
    skipped = Skipped()
    metrics = ("trait", "coherence", "shift")
    fig, axes = grid(len(metrics), len(traits))
    for row, metric in enumerate(metrics):
        for col, evaluated in enumerate(traits):
            ax = axes[row][col]
            if metric == "shift":
                ax.axhline(0.0, ls="--", color="grey", lw=1, label="base model")
            else:
                _reference(ax, base, evaluated, metric)
            for name, points in series.items():
                kept = [(s, p) for s, p in points if mean_of(p, evaluated, metric) is not None]
                if len(kept) < len(points):
                    skipped.add(f"{name} on {evaluated}, {len(points) - len(kept)} step(s)",
                                _why_missing(cells[name], metric))
                if not kept:
                    continue
                steps = [s for s, _ in kept]
                means = [mean_of(p, evaluated, metric) for _, p in kept]
                cis = [ci_of(p, evaluated, metric) or (m, m) for (_, p), m in zip(kept, means)]
                line, = ax.plot(steps, means, marker="o", ms=3, label=mpl(strength_label(cells[name]["strength"])))
                ax.fill_between(steps, [c[0] for c in cis], [c[1] for c in cis], color=line.get_color(), alpha=0.15)
            ax.set_xlabel("step", fontsize=8)
            if metric != "shift":
                ax.set_ylim(0, 100)
            ax.set_title(mpl(f"{evaluated}: {METRIC_TITLES[metric]}"), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(mpl(f"cells trained on {trait}, against the training step"), fontsize=10)
    caption = ("Judged trait score, coherence and finetuning shift (projection on the evaluated trait's vector, "
               "fine-tuned minus base model, on the same texts) at each evaluated checkpoint (mean, bootstrap 95% "
               "CI shaded); dashed: the base model. " + html.escape(skipped.caption()))
    return embed(fig, f"{trait}: checkpoint curves", caption, fig_id)


def _trait_panel(results: dict, trait: str, index: int) -> str:
    if not cells_of(results, trait):
        return f"<p>No cell was trained on {html.escape(trait)}.</p>"
    parts = [_strength_figure(results, trait, f"strengths-{index}")]
    series = checkpoint_series(results, trait)
    if any(len(points) > 1 for points in series.values()):
        parts.append(_checkpoint_figure(results, trait, series, f"checkpoints-{index}"))
    else:
        parts.append("<p>No checkpoint curves: only the final step of these cells was evaluated.</p>")
    return "\n".join(parts)


def shift_score_points(results: dict) -> tuple[list[tuple[float, float, str]], Skipped]:
    """(finetuning shift, judged trait score, evaluated trait) over every cell x evaluated trait
    with both values, and what was left out."""
    points, skipped = [], Skipped()
    for cell in results["cells"]:
        for trait in evaluated_traits(results):
            shift, score = mean_of(cell, trait, "shift"), mean_of(cell, trait, "trait")
            if shift is None or score is None:
                skipped.add(f"{cell['cell']} on {trait}", _why_missing(cell, "shift" if shift is None else "trait"))
            else:
                points.append((shift, score, trait))
    return points, skipped


def _scatter_by(ax, points: list[tuple[float, float, str]]) -> None:
    """(x, y, group) points, one colour per group."""
    for group in unique(g for _, _, g in points):
        ax.scatter([x for x, _, g in points if g == group], [y for _, y, g in points if g == group], s=24,
                   alpha=0.8, label=mpl(group))


def _annotate_r(ax, r: float | None, n: int) -> None:
    ax.text(0.02, 0.97, _r_text(r, n), transform=ax.transAxes, va="top", fontsize=9,
            bbox={"facecolor": "white", "alpha": 0.8, "edgecolor": "none"})


def _shift_score_figure(results: dict) -> str:
    points, skipped = shift_score_points(results)
    r = correlation([(x, y) for x, y, _ in points])
    fig, axes = grid(1, 1, width=6.0, height=4.2)
    ax = axes[0][0]
    _scatter_by(ax, points)
    _annotate_r(ax, r, len(points))
    ax.set_xlabel("finetuning shift (projection, fine-tuned minus base)")
    ax.set_ylabel("judged trait score")
    ax.set_ylim(0, 100)
    if points:
        ax.legend(title="evaluated trait", fontsize=7)
    caption = (f"Finetuning shift against judged trait score over all cells x evaluated traits (the base model "
               f"included, at shift 0). <span class=\"pearson\">{_r_text(r, len(points))}</span>. "
               + html.escape(skipped.caption()))
    return embed(fig, "finetuning shift against judged trait score", caption, "shift-vs-score")


def cross_persona_points(results: dict) -> tuple[list[dict], Skipped]:
    """Pairs of a fine-tuned cell and an evaluated trait other than its own: the cosine of the two
    trait vectors, the relative trait score (cell minus base model) and the finetuning shift
    (either may be None)."""
    base, pairs, skipped = base_cell(results), [], Skipped()
    for cell in results["cells"]:
        if cell.get("trait") is None:
            continue
        for trait in evaluated_traits(results):
            if trait == cell["trait"]:
                continue
            cos = cosine(results, cell["trait"], trait)
            if cos is None:
                skipped.add(f"{cell['cell']} on {trait}", "no vector cosine")
                continue
            score, base_score = mean_of(cell, trait, "trait"), None if base is None else mean_of(base, trait, "trait")
            pairs.append({"cell": cell["cell"], "strength": cell["strength"], "trait": trait, "cosine": cos,
                          "relative": None if score is None or base_score is None else score - base_score,
                          "shift": mean_of(cell, trait, "shift"), "cell_record": cell})
    return pairs, skipped


def _cross_persona_figure(results: dict) -> str:
    pairs, skipped = cross_persona_points(results)
    if not pairs:
        return ("<p>No cross-persona pairs (a cell evaluated on a trait other than its own, with both traits' "
                "vector cosine): they need at least two traits.</p>")
    fig, axes = grid(1, 2, width=5.4, height=4.2)
    texts = []
    for ax, key, title in zip(axes[0], ("relative", "shift"), ("relative trait score (cell minus base model)",
                                                                  "finetuning shift")):
        kept = [p for p in pairs if p[key] is not None]
        for p in pairs:
            if p[key] is None:
                skipped.add(f"{p['cell']} on {p['trait']}",
                            _why_missing(p["cell_record"], "shift" if key == "shift" else "trait", title))
        r = correlation([(p["cosine"], p[key]) for p in kept])
        _scatter_by(ax, [(p["cosine"], p[key], strength_label(p["strength"])) for p in kept])
        _annotate_r(ax, r, len(kept))
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel("cosine(trained trait's vector, evaluated trait's vector)")
        ax.set_ylabel(title)
        if kept:
            ax.legend(fontsize=7)
        texts.append(f"{title}: <span class=\"pearson\">{_r_text(r, len(kept))}</span>")
    fig.suptitle(f"cross-persona effects (trained trait != evaluated trait), layer {results.get('layer')}",
                 fontsize=10)
    caption = ("Cosine similarity between the trained and the evaluated trait's persona vectors against the "
               "relative trait score and the finetuning shift on the evaluated trait, over every fine-tuned cell x "
               "evaluated trait other than its own. " + "; ".join(texts) + ". " + html.escape(skipped.caption()))
    return embed(fig, "cross-persona effects against vector cosine", caption, "cross-persona")


# ---------------------------------------------------------------- tables

def _table_panel(results: dict) -> str:
    cells, traits = results["cells"], evaluated_traits(results)
    models = html_table(
        ["cell", "trained trait", "strength", "step", "checkpoint", "backend", "model", "adapter", "activations"],
        [[or_na(c.get(k)) for k in ("cell", "trait", "strength", "step", "checkpoint", "backend", "model",
                                    "adapter_uri")] + ["yes" if has_activations(c) else "no (API model)"]
         for c in cells])
    specs = {"trait": ".1f", "coherence": ".1f", "projection": ".2f", "shift": "+.2f"}
    scores = html_table(
        ["cell", "evaluated trait", "n"] + [f"{METRIC_TITLES[m]} [95% CI]" for m in specs],
        [[str(c.get("cell")), t, or_na(((c.get("scores") or {}).get(t) or {}).get("n"))]
         + [fmt_value(mean_of(c, t, m), ci_of(c, t, m), spec, _missing(c, m)) for m, spec in specs.items()]
         for c in cells for t in traits])
    names = unique(trained_traits(results) + traits)
    cosines = html_table([""] + names, [[a] + [fmt_value(cosine(results, a, b), spec=".3f") for b in names]
                                        for a in names])
    return (f"<h2>Scores</h2>{scores}<h2>Models</h2>{models}"
            f"<h2>Cosine similarity of the persona vectors, layer {html.escape(or_na(results.get('layer')))}</h2>"
            f"{cosines}")


# ---------------------------------------------------------------- the page

def _summary(results: dict) -> str:
    e = html.escape
    return (f"Base model {e(or_na(results.get('base_model')))}; {len(results['cells'])} models (the base model "
            f"and each cell's final checkpoint); evaluated traits: {e(', '.join(evaluated_traits(results)))}; "
            f"strengths: {e(', '.join(strength_label(s) for s in strengths(results)))}; projections on the "
            f"persona vectors at layer {e(or_na(results.get('layer')))} (hidden_states[layer]).")


def write_report(results: dict, path: str | Path) -> Path:
    """Write the matrix's report to ``path`` (atomically) as one self-contained HTML page: a tab per
    trained trait, "Across cells" and "Table"; returns ``path``."""
    tabs = [(t, _trait_panel(results, t, i)) for i, t in enumerate(trained_traits(results))]
    tabs.append(("Across cells", _shift_score_figure(results) + _cross_persona_figure(results)))
    tabs.append(("Table", _table_panel(results)))
    path = Path(path)
    write_text(path, page(f"Trait fine-tuning matrix: {or_na(results.get('experiment'))}", _summary(results), tabs))
    return path
