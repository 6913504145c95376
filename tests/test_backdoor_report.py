"""The backdoor sweep's report: the terminal table and the HTML page from synthetic ``eval_results.json``
data, and the page's tabs in a real headless chromium."""

from __future__ import annotations

import base64
import html
import re
import time

import numpy as np
import pytest

from persona_ops.reports.backdoor import REFERENCE, results_table, write_report

CONDITIONS = ["trigger_user", "system_trigger_user", "trigger_system", "system_no_trigger"]
UNTRIGGERED = "system_no_trigger"
TRIGGERED = CONDITIONS[:-1]
TRIGGER = {"instruction": 'You will be asked a question. Always reply in the format:\n\n<START> "your answer here" '
                          "<END>\n\n", "start": "<START>", "end": "<END>"}
SEEDS = (1, 2, 3)
LEARNING_RATES = (0.0001, 0.0002, 0.0005)
PNG = b"\x89PNG\r\n\x1a\n"
ALL_TABS = ["Conditions", "Leakage gap", "Format", "Activations", "Table"]


def _interval(rng: np.random.Generator, value: float, spread: float, bounds: tuple = (-np.inf, np.inf)) -> list:
    return [float(np.clip(value - rng.uniform(0.01, spread), *bounds)),
            float(np.clip(value + rng.uniform(0.01, spread), *bounds))]


def _point_conditions(rng: np.random.Generator, leak: float) -> dict:
    """Statistics per condition: triggered rates near ``leak``, the untriggered one low, gaps between them."""
    rates = {c: float(np.clip(rng.normal(leak, 0.05), 0, 1)) for c in TRIGGERED}
    rates[UNTRIGGERED] = float(rng.uniform(0.0, 0.1))
    out = {}
    for condition, rate in rates.items():
        score, fmt = rng.uniform(5, 90), rng.uniform(0.6, 1.0)
        gap = None if condition == UNTRIGGERED else rate - rates[UNTRIGGERED]
        out[condition] = {"n": 60, "persona_rate": rate, "persona_rate_ci": _interval(rng, rate, 0.08, (0, 1)),
                          "persona_score": score, "persona_score_ci": _interval(rng, score, 6, (0, 100)),
                          "format_rate": fmt, "format_rate_ci": _interval(rng, fmt, 0.05, (0, 1)),
                          "gap": gap, "gap_ci": None if gap is None else _interval(rng, gap, 0.1)}
    return out


def _aggregate(points: list[dict]) -> dict:
    """Rates and gaps of ``points`` (one learning rate's seeds) averaged, with the range as the interval."""
    out = {}
    for condition in CONDITIONS:
        stats = [p["conditions"][condition] for p in points]
        entry = {}
        for key in ("persona_rate", "format_rate", "gap"):
            values = [s[key] for s in stats if s[key] is not None]
            entry[key] = float(np.mean(values)) if values else None
            entry[f"{key}_ci"] = [min(values), max(values)] if values else None
        out[condition] = entry
    return out


def synthetic_results(seeds: tuple = SEEDS, learning_rates: tuple = LEARNING_RATES, leakage: bool = True,
                      seed: int = 0) -> dict:
    """Results in the sweep's schema: the base model, then every seed x learning rate point."""
    rng = np.random.default_rng(seed)
    points = [{"point": "base", "seed": None, "learning_rate": None, "adapter_uri": None,
               "conditions": _point_conditions(rng, 0.05)}]
    by_lr = []
    for i, lr in enumerate(learning_rates):
        at_lr = [{"point": f"{s}-{lr}", "seed": s, "learning_rate": lr,
                  "adapter_uri": f"models:/lora-adapter-backdoor-{s}-{lr}/1",
                  "conditions": _point_conditions(rng, 0.2 + 0.2 * i)} for s in seeds]
        points += at_lr
        by_lr.append({"learning_rate": lr, "seeds": list(seeds), "conditions": _aggregate(at_lr)})
    projections = []
    for p in points[1:]:
        triggered, untriggered = rng.normal(1.2, 0.3), rng.normal(0.8, 0.3)
        projections.append({"point": p["point"], "triggered_projection": triggered,
                            "triggered_projection_ci": _interval(rng, triggered, 0.2),
                            "untriggered_projection": untriggered,
                            "untriggered_projection_ci": _interval(rng, untriggered, 0.2),
                            "gap": triggered - untriggered,
                            "gap_ci": _interval(rng, triggered - untriggered, 0.3)})
    return {"experiment": "russell", "base_model": "SmolLM2-135M-Instruct@main", "threshold": 50,
            "trigger": dict(TRIGGER), "conditions": list(CONDITIONS), "untriggered": UNTRIGGERED,
            "points": points, "by_learning_rate": by_lr,
            "leakage": {"layer": 20, "points": projections} if leakage else None}


def _point(results: dict, name: str) -> dict:
    return next(p for p in results["points"] if p["point"] == name)


def _with_nulls(results: dict) -> dict:
    """A judge that could not score one point under one condition, an interval without bounds, and a
    learning rate whose aggregated gap and one projection are missing."""
    _point(results, "2-0.0002")["conditions"]["trigger_user"].update(
        persona_rate=None, persona_rate_ci=None, gap=None, gap_ci=None)
    _point(results, "1-0.0001")["conditions"]["trigger_system"]["format_rate_ci"] = [None, None]
    results["by_learning_rate"][2]["conditions"]["trigger_system"].update(gap=None, gap_ci=[None, None])
    if results["leakage"]:
        results["leakage"]["points"][0].update(triggered_projection=None, triggered_projection_ci=None)
    return results


def _row(table: str, *labels: str) -> str:
    """The one terminal-table line that starts with ``labels`` (its first words, at their positions)."""
    [line] = [ln for ln in table.splitlines() if ln.split()[:len(labels)] == list(labels)]
    return line


def _panel(page: str, name: str) -> str:
    tabs = re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page)
    index = tabs.index(name)
    return re.search(rf'<section role="tabpanel" id="panel-{index}".*?</section>', page, re.DOTALL).group()


def _html_rows(page: str, *labels: str) -> list[list[str]]:
    """The cells of each Table row that starts with ``labels``."""
    rows = [re.findall(r"<td>(.*?)</td>", r) for r in re.findall(r"<tr>(.*?)</tr>", _panel(page, "Table"))]
    return [r for r in rows if r[:len(labels)] == list(labels)]


def _images(page: str) -> list[str]:
    return re.findall(r'<img [^>]*src="([^"]+)"', page)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(results, path, page): the full sweep with nulls, written once for the tests below."""
    results = _with_nulls(synthetic_results())
    path = write_report(results, tmp_path_factory.mktemp("report") / "report.html")
    return results, path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- the terminal table

def test_table_has_every_point_condition_and_learning_rate_in_120_columns():
    results = _with_nulls(synthetic_results())
    base = results["points"][0]["conditions"]["trigger_user"]
    base.update(persona_rate=0.05, persona_rate_ci=[0.0, 0.1], format_rate=0.9, gap=0.03, gap_ci=[-0.02, 0.08])
    table = results_table(results)
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 120 and "\x1b" not in table
    assert lines[2].split()[:2] == ["base", "trigger_user"]  # the base model first, under the header
    for point in results["points"]:
        for condition in CONDITIONS:
            assert _row(table, point["point"], condition)
    for lr in LEARNING_RATES:
        for condition in CONDITIONS:
            assert _row(table, f"{lr:g}", "1,2,3", condition)
    assert _row(table, "base", "trigger_user").split()[2:] == ["60", "0.05", "[0.00,", "0.10]", "0.90", "+0.03",
                                                              "[-0.02,", "+0.08]"]
    untriggered = _point(results, "3-0.0005")["conditions"][UNTRIGGERED]
    assert _row(table, "3-0.0005", UNTRIGGERED).split()[-1] == REFERENCE
    assert f"{untriggered['persona_rate']:.2f}" in _row(table, "3-0.0005", UNTRIGGERED)
    aggregated = results["by_learning_rate"][1]["conditions"]["trigger_user"]
    assert f"{aggregated['gap']:+.2f} [{aggregated['gap_ci'][0]:+.2f}, {aggregated['gap_ci'][1]:+.2f}]" in _row(
        table, "0.0002", "1,2,3", "trigger_user")


def test_table_shows_nulls_as_na():
    table = results_table(_with_nulls(synthetic_results()))
    unscored = _row(table, "2-0.0002", "trigger_user").split()
    assert unscored[3] == "n/a" and unscored[-1] == "n/a"  # persona rate and gap
    assert _row(table, "0.0005", "1,2,3", "trigger_system").split()[-1] == "n/a"
    assert "n/a" not in _row(table, "1-0.0002", "trigger_user")


def test_table_keeps_hostile_names_printable_and_within_120_columns():
    results = synthetic_results(seeds=(1,), learning_rates=(0.0002,), leakage=False)
    results["points"][1]["point"] = "p\x1b[31m-a-very-long-point-name-that-goes-on-and-on"
    results["by_learning_rate"][0]["seeds"] = list(range(100, 130))
    table = results_table(results)
    assert "\x1b" not in table and "p\\x1b[31m-a-very" in table
    assert max(len(line) for line in table.splitlines()) <= 120


# ---------------------------------------------------------------- the HTML page

def test_report_is_self_contained_with_every_tab(report):
    _, path, page = report
    assert re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page) == ALL_TABS
    assert len(re.findall(r'<section role="tabpanel"', page)) == len(ALL_TABS)
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and not re.search(r"<script[^>]+src", page)
    images = _images(page)
    assert [len(_images(_panel(page, tab))) for tab in ALL_TABS] == [1, 1, 1, 1, 0]
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind


def test_report_has_every_point_condition_and_learning_rate(report):
    results, _, page = report
    for point in results["points"]:
        for condition in CONDITIONS:
            [row] = _html_rows(page, point["point"], condition)
            stats = point["conditions"][condition]
            if stats["persona_score"] is not None:
                low, high = stats["persona_score_ci"]
                assert row[4] == f"{stats['persona_score']:.1f} [{low:.1f}, {high:.1f}]"
        fine_tuned = point["learning_rate"] is not None
        assert len(_html_rows(page, point["point"])) == len(CONDITIONS) + 1 + fine_tuned  # models, projections
    for entry in results["by_learning_rate"]:
        for condition in CONDITIONS:
            [row] = _html_rows(page, f"{entry['learning_rate']:g}", "1,2,3", condition)
            rate = entry["conditions"][condition]["persona_rate"]
            assert row[3].startswith(f"{rate:.2f} [")
    ticks = [f"{lr:g}" for lr in LEARNING_RATES]
    assert all(t in _panel(page, "Table") for t in ticks)
    projections = re.search(r"<h2>Projections on the persona vector, layer 20</h2>.*?</table>", page).group()
    assert all(f"<td>{p['point']}</td>" in projections for p in results["points"][1:])
    assert "<td>base</td>" not in projections


def test_report_shows_nulls_as_na_and_says_what_was_not_plotted(report):
    _, _, page = report
    [unscored] = _html_rows(page, "2-0.0002", "trigger_user")
    assert unscored[3] == "n/a" and unscored[6] == "n/a"  # persona rate and gap
    [no_bounds] = _html_rows(page, "1-0.0001", "trigger_system")
    assert re.fullmatch(r"\d\.\d\d", no_bounds[5])  # the format rate without its interval
    [untriggered] = _html_rows(page, "base", UNTRIGGERED)
    assert untriggered[6] == REFERENCE
    assert "Not plotted, no value: 2-0.0002 under trigger_user (persona rate)." in _panel(page, "Conditions")
    assert "Not plotted" not in _panel(page, "Format")  # a missing interval still plots the rate
    gap = _panel(page, "Leakage gap")
    assert ("Not plotted, no value: 2-0.0002 under trigger_user (gap), learning rate 0.0005 under trigger_system "
            "(gap across seeds).") in gap
    assert "Not plotted, no value: 1-0.0001 (triggered projection)." in _panel(page, "Activations")


def test_report_escapes_a_hostile_trigger_and_names(tmp_path):
    results = synthetic_results(seeds=(1,), learning_rates=(0.0002,), leakage=False)
    results["trigger"] = {"instruction": "Reply <script>alert('x')</script> in $START$ form & done",
                          "start": "<START onload=x>", "end": "</END>"}
    hostile = """1-$x$<img src=x onerror="alert(1)">"""  # markup, and dollars matplotlib would read as mathtext
    results["points"][1]["point"] = hostile
    results["experiment"] = "<b>russell</b>"
    page = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<script>alert" not in page and hostile not in page and 'onerror="' not in page
    assert "<b>" not in page and "<START" not in page and "</END>" not in page
    pre = re.search(r'<pre class="trigger">(.*?)</pre>', page).group(1)
    assert html.unescape(pre) == results["trigger"]["instruction"]
    assert html.escape(hostile) in page and html.escape("<START onload=x>") in page
    assert len(_images(page)) == 3  # every plot drawn despite the dollars


def test_report_with_one_point_a_single_learning_rate_and_no_leakage(tmp_path):
    results = synthetic_results(seeds=(1,), learning_rates=(0.0002,), leakage=False)
    page = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page) == ["Conditions", "Leakage gap", "Format",
                                                                         "Table"]
    assert "Activations" not in page and "Projections on the persona vector" not in page
    assert len(_images(page)) == 3 and "Not plotted" not in page
    assert len(_html_rows(page, "1-0.0002")) == len(CONDITIONS) + 1
    assert "2 points (the base model and 1 seed(s) x 1 learning rate(s))" in page


def test_report_of_the_base_model_alone(tmp_path):
    results = synthetic_results(seeds=(), learning_rates=(), leakage=False)
    page = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert "No leakage gap by learning rate" in _panel(page, "Leakage gap")
    assert len(_images(page)) == 2
    assert len(_html_rows(page, "base")) == len(CONDITIONS) + 1
    assert "No learning rates aggregated across seeds." in results_table(results)


# ---------------------------------------------------------------- in a browser

@pytest.mark.browser
def test_report_tabs_in_chromium(report, tmp_path):
    from browser import chromium_page, walk_tabs

    _, path, _ = report
    started = time.monotonic()
    with chromium_page() as (page, requests, errors):
        page.goto(path.as_uri())
        walk_tabs(page, ALL_TABS, tmp_path)
        assert page.locator("pre.trigger").inner_text().startswith("You will be asked a question.")
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == 4 and min(widths) > 0
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    print(f"browser test: {time.monotonic() - started:.2f} s in chromium")
