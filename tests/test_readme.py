"""The README's layout section matches the tree, and its two opening commands are the Makefile's."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _layout() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("## Layout", 1)[1].split("```", 2)[1]
    paths = []
    for line in block.strip().splitlines():
        head = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        paths += [p.strip() for p in head.split(",")]
    return paths


def test_every_layout_entry_exists_and_every_part_is_listed():
    listed = _layout()
    for entry in listed:
        matches = list(ROOT.glob(entry.rstrip("/")))
        assert matches, f"README layout names {entry}, which does not exist"
    names = {e.rstrip("/") for e in listed}
    packages = [p.relative_to(ROOT).as_posix() for p in (ROOT / "persona_ops").iterdir()
                if p.is_dir() and (p / "__init__.py").exists()]
    pipelines = [p.name for p in (ROOT / "persona_ops/pipelines").iterdir() if (p / "__init__.py").exists()]
    for package in packages:
        assert package in names, f"{package}/ is missing from the README layout"
    layout_text = (ROOT / "README.md").read_text().split("## Layout", 1)[1]
    for name in pipelines:
        assert name in layout_text, f"pipeline package {name} is missing from the README layout"
    top = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")
           and p.name not in ("outputs", "metrics", "cache", "mlruns", "mlartifacts", "test-artifacts")
           and "egg-info" not in p.name}
    assert top <= {e.split("/")[0] for e in names}, top - {e.split("/")[0] for e in names}


def test_the_opening_commands_are_make_targets():
    text = (ROOT / "README.md").read_text()
    first = text.split("```bash", 1)[1].split("```", 1)[0].split()
    assert first[:2] == ["make", "run"] and "make" in first[3:] and "test" in first[3:]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci/run").read_text()
