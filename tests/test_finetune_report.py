"""The trait fine-tuning matrix's report: the terminal table and the HTML page from synthetic
``eval_results.json`` data, and the page's tabs in a real headless chromium."""

from __future__ import annotations

import base64
import html
import itertools
import re
import time

import numpy as np
import pytest

from persona_ops.reports.finetune_matrix import NO_ACTIVATIONS, results_table, write_report

TRAITS = ["evil", "sycophantic", "hallucinating"]
STRENGTHS = ["normal", "misaligned_1", "misaligned_2"]
PNG = b"\x89PNG\r\n\x1a\n"


def _scores(rng: np.random.Generator, traits: list[str], activations: bool = True) -> dict:
    out = {}
    for t in traits:
        trait, coherence = rng.uniform(5, 90), rng.uniform(40, 95)
        projection, shift = rng.normal(0, 2), rng.normal(0, 1)
        out[t] = {"n": 8, "trait_mean": trait, "trait_ci": [trait - rng.uniform(1, 6), trait + rng.uniform(1, 6)],
                  "coherence_mean": coherence, "coherence_ci": [coherence - 3, coherence + 3],
                  "projection_mean": projection if activations else None,
                  "projection_ci": [projection - 0.3, projection + 0.3] if activations else None,
                  "shift_mean": shift if activations else None,
                  "shift_ci": [shift - 0.2, shift + 0.2] if activations else None}
    return out


def synthetic_results(traits: list[str] = TRAITS, strengths: list[str] = STRENGTHS, steps: tuple = (12, 24, 36),
                      seed: int = 0) -> dict:
    """Results in the evaluation's schema: the base model, every trait x strength cell (the last
    one tuned through an API, without activations) and its checkpoints at ``steps``."""
    rng = np.random.default_rng(seed)
    base = {"cell": "base", "trait": None, "strength": None, "step": 0, "checkpoint": None, "backend": "base",
            "model": "SmolLM2-135M-Instruct@main", "adapter_uri": None, "activations": True,
            "scores": _scores(rng, traits)}
    for s in base["scores"].values():
        s["shift_mean"], s["shift_ci"] = 0.0, [0.0, 0.0]
    cells, checkpoints = [base], []
    pairs = [(t, s) for t in traits for s in strengths]
    for i, (trait, strength) in enumerate(pairs):
        api = i == len(pairs) - 1 and len(pairs) > 1
        name = f"{trait}-{strength}"
        for step in steps:
            checkpoints.append({"cell": name, "step": step, "scores": _scores(rng, traits, activations=not api)})
        cells.append({"cell": name, "trait": trait, "strength": strength, "step": steps[-1], "checkpoint": "final",
                      "backend": "openai" if api else "local", "model": f"SmolLM2-135M-Instruct@main+{name}",
                      "adapter_uri": f"models:/lora-adapter-traits-{name}/1", "activations": not api,
                      "scores": checkpoints[-1]["scores"]})
    pair_cosine = {frozenset(p): float(rng.uniform(-0.3, 0.6)) for p in itertools.combinations(traits, 2)}
    cosines = {a: {b: 1.0 if a == b else pair_cosine[frozenset((a, b))] for b in traits} for a in traits}
    return {"experiment": "traits", "base_model": "SmolLM2-135M-Instruct@main", "layer": 20, "traits": list(traits),
            "trained_traits": list(traits), "strengths": list(strengths), "cells": cells,
            "checkpoints": checkpoints, "vector_cosine": cosines}


def _cell(results: dict, name: str) -> dict:
    return next(c for c in results["cells"] if c["cell"] == name)


def _pearson_written(page: str, figure_id: str) -> list[tuple[float, int]]:
    figure = re.search(rf'<figure id="{figure_id}">.*?</figure>', page, re.DOTALL).group()
    return [(float(r), int(n)) for r, n in re.findall(r"Pearson r = (-?\d+\.\d+) \(n = (\d+)\)", figure)]


def _row(table: str, label: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(label + " "))


def _with_nulls(results: dict) -> dict:
    """A judge that could not score one cell on one trait, and a coherence without an interval."""
    _cell(results, "evil-misaligned_1")["scores"]["sycophantic"].update(trait_mean=None, trait_ci=None)
    _cell(results, "evil-normal")["scores"]["evil"]["coherence_ci"] = [None, None]
    return results


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """(results, path, page): the full matrix with nulls, written once for the tests below."""
    results = _with_nulls(synthetic_results())
    path = write_report(results, tmp_path_factory.mktemp("report") / "report.html")
    return results, path, path.read_text(encoding="utf-8")


# ---------------------------------------------------------------- the terminal table

def test_table_has_every_cell_and_trait_in_120_columns():
    results = _with_nulls(synthetic_results())
    results["cells"][0]["scores"]["evil"].update(trait_mean=12.0, trait_ci=[8.0, 16.5], coherence_mean=80.14)
    table = results_table(results)
    assert max(len(line) for line in table.splitlines()) <= 120
    assert "\x1b" not in table
    for cell in results["cells"]:
        assert _row(table, cell["cell"])
    assert table.splitlines()[0].split() == TRAITS
    base_row = _row(table, "base")
    assert "12.0 [8.0, 16.5]" in base_row and "80.1" in base_row and "+0.00" in base_row
    assert base_row.count("[") == len(TRAITS)  # a score with its interval per evaluated trait
    assert "n/a" in _row(table, "evil-misaligned_1")  # the judge could not score it on sycophantic


def test_table_shows_models_without_activations_as_na():
    table = results_table(synthetic_results())
    api = _row(table, "hallucinating-misaligned_2")
    assert api.count("n/a*") == len(TRAITS) and "0.00" not in api
    assert f"* {NO_ACTIVATIONS}: hallucinating-misaligned_2" in table


def test_table_abbreviates_long_trait_names_and_splits_many_traits():
    long = results_table(synthetic_results(traits=["evil", "sycophantic", "hallucinating_badly"]))
    assert max(len(line) for line in long.splitlines()) <= 120
    assert long.splitlines()[0].split() == ["evil", "sycoph.", "halluc."]
    assert _row(long, "halluc.-misaligned_2") and _row(long, "sycoph.-normal") and _row(long, "evil-normal")
    many = [f"trait_{i}" for i in range(6)]
    table = results_table(synthetic_results(traits=many, strengths=["normal"]))
    assert max(len(line) for line in table.splitlines()) <= 120
    assert sum(line.startswith("cell ") for line in table.splitlines()) >= 2  # one block of 120 is too narrow
    for t in many:
        assert sum(line.split().count(t) for line in table.splitlines()) == 1


def test_table_escapes_control_characters():
    results = synthetic_results(traits=["evil"], strengths=["normal"])
    results["cells"][1]["cell"] = "evil-\x1b[31mred"
    table = results_table(results)
    assert "\x1b" not in table and "evil-\\x1b[31mred" in table


# ---------------------------------------------------------------- the HTML page

def test_report_is_self_contained_with_a_tab_per_trained_trait(report):
    results, path, page = report
    tabs = re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page)
    assert tabs == TRAITS + ["Across cells", "Table"]
    assert len(re.findall(r'<section role="tabpanel"', page)) == len(tabs)
    for cell in results["cells"]:
        assert page.count(f"<tr><td>{cell['cell']}</td>") == 1 + len(TRAITS)  # the models table, a score row per trait
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert "<link" not in page and not re.search(r"<script[^>]+src", page)
    images = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(images) == 2 * len(TRAITS) + 2  # strengths and checkpoint curves per trait; across cells
    for src in images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == PNG
    assert [p.name for p in path.parent.iterdir()] == ["report.html"]  # no temporary file left behind


def test_report_correlations_match_numpy(report):
    results, _, page = report
    points = [(s["shift_mean"], s["trait_mean"]) for c in results["cells"] for s in c["scores"].values()
              if s["shift_mean"] is not None and s["trait_mean"] is not None]
    [(r, n)] = _pearson_written(page, "shift-vs-score")
    assert n == len(points) == (len(results["cells"]) - 1) * len(TRAITS) - 1  # not the API model nor the null
    assert r == pytest.approx(np.corrcoef(np.array(points).T)[0, 1], abs=5e-4)

    base = results["cells"][0]["scores"]
    pairs = [(results["vector_cosine"][c["trait"]][t], s["trait_mean"] - base[t]["trait_mean"])
             for c in results["cells"][1:] for t, s in c["scores"].items()
             if t != c["trait"] and s["trait_mean"] is not None]
    shifts = [(results["vector_cosine"][c["trait"]][t], s["shift_mean"])
              for c in results["cells"][1:] for t, s in c["scores"].items()
              if t != c["trait"] and s["shift_mean"] is not None]
    (r_relative, n_relative), (r_shift, n_shift) = _pearson_written(page, "cross-persona")
    assert n_relative == len(pairs) == len(TRAITS) * len(STRENGTHS) * (len(TRAITS) - 1) - 1
    assert n_shift == len(shifts) == len(TRAITS) * len(STRENGTHS) * (len(TRAITS) - 1) - (len(TRAITS) - 1)
    assert r_relative == pytest.approx(np.corrcoef(np.array(pairs).T)[0, 1], abs=5e-4)
    assert r_shift == pytest.approx(np.corrcoef(np.array(shifts).T)[0, 1], abs=5e-4)


def test_report_shows_nulls_as_na_and_says_what_was_not_plotted(report):
    results, _, page = report
    api_row = re.search(r"<tr><td>hallucinating-misaligned_2</td><td>evil</td>.*?</tr>", page).group()
    assert api_row.count(f"<td>{NO_ACTIVATIONS}</td>") == 2  # projection and shift
    null_row = re.search(r"<tr><td>evil-misaligned_1</td><td>sycophantic</td>.*?</tr>", page).group()
    assert re.findall(r"<td>(.*?)</td>", null_row)[3] == "n/a"
    no_ci_row = re.search(r"<tr><td>evil-normal</td><td>evil</td>.*?</tr>", page).group()
    coherence = _cell(results, "evil-normal")["scores"]["evil"]["coherence_mean"]
    assert re.findall(r"<td>(.*?)</td>", no_ci_row)[4] == f"{coherence:.1f}"
    evil_tab = re.search(r'<section role="tabpanel" id="panel-0".*?</section>', page, re.DOTALL).group()
    assert "Not plotted, no value: evil-misaligned_1 on sycophantic (trait score)" in evil_tab
    across = re.search(r'<section role="tabpanel" id="panel-3".*?</section>', page, re.DOTALL).group()
    assert html.escape(f"hallucinating-misaligned_2 on evil (finetuning shift: {NO_ACTIVATIONS})") in across


def test_report_escapes_hostile_names(tmp_path):
    trait = "syc<b>$x"  # markup, and a dollar that matplotlib would read as mathtext
    results = synthetic_results(traits=["evil", trait], strengths=["normal"], steps=(36,))
    hostile = """evil-<img src=x onerror="alert('$1')">&amp;"""
    results["cells"][1]["cell"] = hostile
    results["base_model"] = "<script>alert(1)</script>"
    page = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert hostile not in page and "<script>alert" not in page and 'onerror="' not in page and "<b>" not in page
    assert html.escape(hostile) in page and html.escape("<script>alert(1)</script>") in page
    assert re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page)[1] == html.escape(trait)
    assert len(re.findall(r"<img ", page)) == 4  # every plot drawn despite the dollar


def test_report_with_one_trait_and_one_strength(tmp_path):
    results = synthetic_results(traits=["evil"], strengths=["normal"], steps=(36,))
    page = write_report(results, tmp_path / "report.html").read_text(encoding="utf-8")
    assert re.findall(r'<button role="tab"[^>]*>(.*?)</button>', page) == ["evil", "Across cells", "Table"]
    assert "No checkpoint curves" in page and "No cross-persona pairs" in page
    [(r, n)] = _pearson_written(page, "shift-vs-score")
    assert n == 2 and abs(r) == pytest.approx(1.0, abs=1e-3)  # the base model and one cell
    assert len(re.findall(r"<img ", page)) == 2


# ---------------------------------------------------------------- in a browser

@pytest.mark.browser
def test_report_tabs_in_chromium(report, tmp_path):
    from browser import chromium_page, walk_tabs

    _, path, _ = report
    names = TRAITS + ["Across cells", "Table"]
    started = time.monotonic()
    with chromium_page() as (page, requests, errors):
        page.goto(path.as_uri())
        walk_tabs(page, names, tmp_path)
        widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.naturalWidth)")
        assert len(widths) == 2 * len(TRAITS) + 2 and min(widths) > 0
    assert errors == []
    assert all(u.startswith(("file:", "data:")) for u in requests), requests
    print(f"browser test: {time.monotonic() - started:.2f} s in chromium")
