"""Gated promotion (persona_ops.tracking.promotion, ``persona-ops promote``) against a real MLflow
SQLite store in tmp_path: the gate parser, promotion with who/when/why, listing and rollback."""

from __future__ import annotations

import getpass
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mlflow import MlflowClient
from persona_ops.cli import app
from persona_ops.errors import InputError
from persona_ops.tracking import promotion, registry, runs

NAME = "lora-adapter-evil"
GOOD = {"evil": {"trait_mean": 72.5, "coherence_mean": 61.0}}
BAD = {"evil": {"trait_mean": 41.0, "coherence_mean": 80.0}}
GATE = "evil.trait_mean>60 and evil.coherence_mean>=50"




def _version(root: Path, metrics: dict, n: int) -> int:
    """A new version of NAME (a small file) registered by a run that logged ``metrics``."""
    out = root / f"adapter{n}.bin"
    out.write_bytes(bytes([n]) * 16)
    with runs.start_run("trait-finetune", f"train@{n}") as s:
        s.log_metrics(metrics)
        return registry.register(NAME, out, kind="lora-adapter", run_id=s.run_id, source_path=out.name, alias=None)


def _cli(root: Path, *args: str):
    return CliRunner().invoke(app, ["promote", NAME, *args, "--root", str(root)])


# --- the gate parser ------------------------------------------------------------------------------

M = {"a": 1.0, "b": 2.0, "c": 3.0, "x.y": 5.0}


@pytest.mark.parametrize("text,holds", [
    ("a < 2", True), ("a < 1", False), ("a <= 1", True), ("a <= 0.5", False), ("b > 1", True), ("b > 2", False),
    ("b >= 2", True), ("b >= 2.5", False), ("c == 3", True), ("c == 3.1", False), ("c != 4", True),
    ("c != 3", False), ("x.y>4.5", True), ("a > -1e3", True),
    ("a > 5 or b > 1 and c > 2", True),     # and binds tighter: a>5 or (b>1 and c>2)
    ("(a > 5 or b > 1) and c > 5", False),  # the parentheses override it
    ("a > 5 and b > 1 or c > 2", True), ("a > 5 and (b > 1 or c > 2)", False),
    ("((a == 1))", True),
])
def test_the_gate_compares_with_every_operator_and_respects_precedence(text, holds):
    assert (promotion.check(text, M) == []) is holds


def test_failures_name_the_clauses_that_made_the_gate_false():
    assert [str(c) for c in promotion.check("a > 5 and b > 1 and c < 0", M)] == ["a > 5", "c < 0"]
    assert [str(c) for c in promotion.check("a > 5 or c < 0", M)] == ["a > 5", "c < 0"]
    assert promotion.check("a > 5 or c > 0", M) == []


@pytest.mark.parametrize("text,column,expected", [
    ("a >", 4, "a number after a >"),
    ("a 5", 3, "a comparison"),
    ("a > 5 and", 10, "a metric name or '('"),
    ("(a > 5", 7, "')' or and/or"),
    ("a > 5)", 6, "and/or or the end"),
    ("a > 5 b < 3", 7, "and/or or the end"),
    ("5 < a", 1, "a metric name or '('"),
    ("a => 5", 3, "a comparison"),
    ("a > 5 & b < 2", 7, "and/or or the end, found '&'"),
    ("", 1, "a metric name or '('"),
    ("__import__('os').system('touch pwned')", 11, "a comparison"),
    ("a > __import__('os')", 5, "a number after a >"),
])
def test_bad_gate_syntax_is_an_input_error_with_the_column(text, column, expected, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=rf"column {column}: expected {re.escape(expected)}") as e:
        promotion.check(text, M)
    assert repr(text) in str(e.value)
    assert not (tmp_path / "pwned").exists()


def test_a_metric_the_version_lacks_is_named_with_those_it_has():
    with pytest.raises(InputError, match=r"no metric evil\.trait_men \(its metrics: a, b, c, x\.y\)"):
        promotion.check("a > 0 and evil.trait_men > 60", M)


# --- promotion against the store ------------------------------------------------------------------

def test_a_passing_gate_moves_the_alias_and_records_who_when_why(store):
    v1 = _version(store, GOOD, 1)
    out = promotion.promote(NAME, v1, "champion", gate=GATE)
    assert out.changed and not out.refused and out.message() == f"models:/{NAME}@champion = v{v1}"
    c = MlflowClient()
    assert int(c.get_model_version_by_alias(NAME, "champion").version) == v1
    (entry,) = json.loads(c.get_registered_model(NAME).tags["persona_ops.alias.champion.history"])
    assert entry["version"] == v1 and entry["previous"] is None and entry["action"] == "promote"
    assert entry["who"] == getpass.getuser() and entry["why"] == GATE and entry["when"].endswith("Z")
    on_version = json.loads(c.get_model_version(NAME, str(v1)).tags["persona_ops.promotion.champion"])
    assert on_version == {k: entry[k] for k in ("action", "who", "when", "why", "gate")}
    local, version = registry.resolve(f"models:/{NAME}@champion", dst=store / "dl")
    assert local.read_bytes() == bytes([1]) * 16 and version.version == v1  # loads where a model is accepted


def test_a_failing_gate_is_refused_naming_the_clause_and_leaves_the_alias(store):
    v1, v2 = _version(store, GOOD, 1), _version(store, BAD, 2)
    promotion.promote(NAME, v1, "champion", gate=GATE, reason="first")
    out = promotion.promote(NAME, v2, "champion", gate=GATE)
    assert not out.changed and [(str(c), v) for c, v in out.refused] == [("evil.trait_mean > 60", 41.0)]
    assert "evil.trait_mean > 60 failed (evil.trait_mean = 41)" in out.message()
    assert promotion.holder(NAME, "champion") == v1 and len(promotion.history(NAME, "champion")) == 1
    with pytest.raises(InputError, match=rf"models:/{NAME}/{v2} has no metric evil.score .*evil.coherence_mean"):
        promotion.promote(NAME, v2, "champion", gate="evil.score > 1")
    with pytest.raises(InputError, match=rf"models:/{NAME}/9: not in the registry"):
        promotion.promote(NAME, 9, "champion", gate=GATE)


def test_list_and_rollback_walk_back_through_the_holders(store):
    v1, v2, v3 = (_version(store, GOOD, n) for n in (1, 2, 3))
    with pytest.raises(InputError, match="no promotion history"):
        promotion.rollback(NAME, "champion")
    for v in (v1, v2, v3):
        promotion.promote(NAME, v, "champion", reason=f"release {v}")
    assert promotion.promote(NAME, v3, "champion").changed is False  # already there: nothing recorded
    assert promotion.rollback(NAME, "champion").version == v2
    assert promotion.rollback(NAME, "champion").version == v1
    with pytest.raises(InputError, match=rf"@champion: v{v1} has no previous holder"):
        promotion.rollback(NAME, "champion")
    assert promotion.holder(NAME, "champion") == v1
    lines = promotion.listing(NAME)
    assert lines[0] == f"@champion: v{v1}" and len(lines) == 6
    assert lines[1].endswith(f"promote v{v1} by {getpass.getuser()}: release {v1}")
    assert f"promote v{v2} (was v{v1})" in lines[2] and f"rollback v{v2} (was v{v3})" in lines[4]
    assert lines[5].endswith(f"rollback v{v1} (was v{v2}) by {getpass.getuser()}: rollback from v{v2}")


def test_rollback_after_the_alias_moved_outside_promotion_returns_to_the_recorded_holder(store):
    v1, v2 = _version(store, GOOD, 1), _version(store, GOOD, 2)
    promotion.promote(NAME, v1, "champion")
    MlflowClient().set_registered_model_alias(NAME, "champion", str(v2))
    assert promotion.rollback(NAME, "champion").version == v1


# --- through the command line ---------------------------------------------------------------------

def test_cli_promotes_refuses_lists_and_rolls_back(store):
    v1, v2, v3 = _version(store, GOOD, 1), _version(store, BAD, 2), _version(store, GOOD, 3)
    ok = _cli(store, "--version", str(v1), "--alias", "champion", "--if", GATE)
    assert ok.exit_code == 0 and f"@champion = v{v1}" in ok.output, ok.output
    refused = _cli(store, "--version", str(v2), "--if", GATE)
    assert refused.exit_code == 1 and "refused" in refused.output and "evil.trait_mean = 41" in refused.output
    assert _cli(store, "--version", str(v3), "--if", GATE, "--reason", "better").exit_code == 0
    listed = _cli(store, "--list")
    assert listed.exit_code == 0 and listed.output.startswith(f"@champion: v{v3}") and "better" in listed.output
    back = _cli(store, "--rollback", "champion")
    assert back.exit_code == 0 and f"@champion = v{v1} (was v{v3})" in back.output
    again = _cli(store, "--rollback", "champion")
    assert again.exit_code == 2 and "no previous holder" in again.output


@pytest.mark.parametrize("args,message", [
    (["--version", "1", "--if", "evil.trait_mean >"], "column 18: expected a number"),
    (["--version", "1", "--if", "evil.nope > 1"], "no metric evil.nope"),
    (["--version", "7"], f"models:/{NAME}/7: not in the registry"),
    (["--version", "1", "--if", ""], "column 1: expected a metric name"),
    ([], "expected one of --version N, --list, --rollback ALIAS, found none"),
    (["--list", "--rollback", "champion"], "found --list, --rollback"),
    (["--version", "1", "--alias", "v2"], "cannot set the alias"),
])
def test_cli_input_errors_exit_2_with_one_line(store, args, message):
    _version(store, GOOD, 1)
    result = _cli(store, *args)
    assert result.exit_code == 2 and "persona-ops: input error:" in result.output and message in result.output, \
        result.output
    assert "Traceback" not in result.output and promotion.holder(NAME, "champion") is None
