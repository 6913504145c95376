"""Gated promotion of registered versions: move an alias (``champion``) to a version whose run's
metrics pass a gate, keep who/when/why, list the history and roll back.

A gate is a small expression, parsed here (never ``eval``): comparisons ``<, <=, >, >=, ==, !=``
of a dotted metric name against a number, joined by ``and`` / ``or`` (``and`` binds tighter) and
grouped by parentheses, e.g. ``evil.trait_mean > 60 and evil.coherence_mean >= 50``.

A version's metrics are those of the run that registered it (its ``run_id`` tag, see
:mod:`persona_ops.tracking.registry`) and of the newest run that evaluated it (tagged
``persona_ops.evaluates = name/version``; its metrics win). Each alias's history is a JSON list in
the registered model's tag ``persona_ops.alias.<alias>.history``, so listing and rolling back need
only the store;
the version promoted also gets the tag ``persona_ops.promotion.<alias>`` (who, when, why, gate).
"""

from __future__ import annotations

import getpass
import json
import operator
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Union

from mlflow.exceptions import MlflowException

from persona_ops.errors import InputError
from persona_ops.tracking.registry import evaluations_of
from persona_ops.tracking.store import client

OPS: dict[str, Callable[[float, float], bool]] = {"<=": operator.le, ">=": operator.ge, "==": operator.eq,
                                                  "!=": operator.ne, "<": operator.lt, ">": operator.gt}
TOKEN = re.compile(r"\s*(?:(?P<num>[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)|(?P<name>[A-Za-z_][\w./-]*)"
                   r"|(?P<op><=|>=|==|!=|<|>)|(?P<paren>[()]))")
HISTORY_TAG = "persona_ops.alias.{alias}.history"
PROMOTION_TAG = "persona_ops.promotion.{alias}"
MAX_HISTORY = 200  # entries kept per alias (the oldest go first)


# --- the gate -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Clause:
    metric: str
    op: str
    value: float

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.value:g}"

    def holds(self, metrics: dict[str, float]) -> bool:
        return OPS[self.op](metrics[self.metric], self.value)


@dataclass(frozen=True)
class Junction:
    op: str  # "and" | "or"
    parts: tuple[Gate, ...]

    def __str__(self) -> str:
        return f" {self.op} ".join(f"({p})" if isinstance(p, Junction) else str(p) for p in self.parts)


Gate = Union[Clause, Junction]


@dataclass(frozen=True)
class Token:
    kind: str  # num | name | op | paren | and | or | bad (no token starts there) | end
    text: str
    pos: int  # 1-based column


def tokens(text: str) -> list[Token]:
    out, i = [], 0
    while text[i:].strip():
        m = TOKEN.match(text, i)
        if m is None:  # the parser reports it, unless it finds an earlier error
            j = len(text) - len(text[i:].lstrip())
            out.append(Token("bad", text[j], j + 1))
            break
        kind = m.lastgroup
        pos, word = m.start(kind) + 1, m[kind]
        out.append(Token(word if kind == "name" and word in ("and", "or") else kind, word, pos))
        i = m.end()
    return out + [Token("end", "", len(text) + 1)]


def _syntax(text: str, pos: int, expected: str, found: str) -> InputError:
    return InputError(f"gate {text!r}: column {pos}: expected {expected}, found {found}")


class _Parser:
    def __init__(self, text: str):
        self.text, self.toks, self.i = text, tokens(text), 0

    def peek(self) -> Token:
        return self.toks[self.i]

    def take(self, kind: str, expected: str) -> Token:
        tok = self.peek()
        if tok.kind != kind:
            raise _syntax(self.text, tok.pos, expected, repr(tok.text) if tok.text else "the end")
        self.i += 1
        return tok

    def junction(self, op: str, part: Callable[[], Gate]) -> Gate:
        parts = [part()]
        while self.peek().kind == op:
            self.i += 1
            parts.append(part())
        return parts[0] if len(parts) == 1 else Junction(op, tuple(parts))

    def any_of(self) -> Gate:
        return self.junction("or", self.all_of)

    def all_of(self) -> Gate:
        return self.junction("and", self.atom)

    def atom(self) -> Gate:
        if self.peek().kind == "paren" and self.peek().text == "(":
            self.i += 1
            inner = self.any_of()
            if self.peek().text != ")":
                tok = self.peek()
                raise _syntax(self.text, tok.pos, "')' or and/or", repr(tok.text) if tok.text else "the end")
            self.i += 1
            return inner
        name = self.take("name", "a metric name or '('").text
        op = self.take("op", f"a comparison ({', '.join(sorted(OPS))}) after {name}").text
        return Clause(name, op, float(self.take("num", f"a number after {name} {op}").text))


def parse(text: str) -> Gate:
    """The gate ``text`` describes; an :class:`InputError` naming the column of a syntax error."""
    parser = _Parser(text)
    gate = parser.any_of()
    tok = parser.peek()
    if tok.kind != "end":
        raise _syntax(text, tok.pos, "and/or or the end", repr(tok.text))
    return gate


def clauses(gate: Gate) -> list[Clause]:
    return [gate] if isinstance(gate, Clause) else [c for p in gate.parts for c in clauses(p)]


def failures(gate: Gate, metrics: dict[str, float]) -> list[Clause]:
    """The clauses that make ``gate`` false on ``metrics`` (empty when it holds)."""
    if isinstance(gate, Clause):
        return [] if gate.holds(metrics) else [gate]
    failed = [failures(p, metrics) for p in gate.parts]
    if gate.op == "or" and not all(failed):
        return []
    return [c for f in failed for c in f]


def check(text: str, metrics: dict[str, float], *, where: str = "the version") -> list[Clause]:
    """The failing clauses of gate ``text`` on ``metrics``; an :class:`InputError` for a metric
    ``metrics`` lacks (naming it and those there are)."""
    gate = parse(text)
    missing = sorted({c.metric for c in clauses(gate)} - set(metrics))
    if missing:
        have = ", ".join(sorted(metrics)) or "none"
        raise InputError(f"gate {text!r}: {where} has no metric {', '.join(missing)} (its metrics: {have})")
    return failures(gate, metrics)


# --- promotion ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    name: str
    alias: str
    version: int
    previous: int | None
    refused: list[tuple[Clause, float]]  # the failing clauses and the version's values
    changed: bool

    def message(self) -> str:
        if self.refused:
            why = "; ".join(f"{c} failed ({c.metric} = {v:g})" for c, v in self.refused)
            return f"refused: models:/{self.name}/{self.version} stays off @{self.alias}: {why}"
        if not self.changed:
            return f"models:/{self.name}@{self.alias} is already v{self.version}"
        was = f" (was v{self.previous})" if self.previous is not None else ""
        return f"models:/{self.name}@{self.alias} = v{self.version}{was}"


def _model_version(name: str, version: int):
    try:
        return client().get_model_version(name, str(version))
    except MlflowException as e:
        raise InputError(f"models:/{name}/{version}: not in the registry ({e.message})") from None


def version_metrics(name: str, version: int) -> dict[str, float]:
    """The metrics of the run that registered version ``version`` of ``name``, with those of its
    newest evaluation (a run tagged ``persona_ops.evaluates = name/version``) over them."""
    mv = _model_version(name, version)
    run_id = mv.tags.get("run_id") or mv.run_id
    metrics: dict[str, float] = {}
    if run_id:
        try:
            metrics = dict(client().get_run(run_id).data.metrics)
        except MlflowException as e:
            raise InputError(f"models:/{name}/{version}: its run {run_id} is not in the store ({e.message})") from None
    evaluations = evaluations_of(name, version)
    newest = dict(client().get_run(evaluations[-1]).data.metrics) if evaluations else {}
    return {**metrics, **newest}


def holder(name: str, alias: str) -> int | None:
    """The version ``alias`` of ``name`` is on, None when unset."""
    try:
        return int(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def history(name: str, alias: str) -> list[dict]:
    """What moved ``alias`` of ``name``, oldest first."""
    try:
        tags = client().get_registered_model(name).tags or {}
    except MlflowException as e:
        raise InputError(f"models:/{name}: not in the registry ({e.message})") from None
    raw = tags.get(HISTORY_TAG.format(alias=alias))
    try:
        return json.loads(raw) if raw else []
    except json.JSONDecodeError:
        raise InputError(f"models:/{name}: tag {HISTORY_TAG.format(alias=alias)}: expected a JSON list, "
                         f"found {raw[:80]!r}") from None


def _who() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _move(name: str, alias: str, version: int, entry: dict) -> None:
    """Point ``alias`` at ``version`` and record ``entry`` (who/when added) on the model and the version."""
    c = client()
    entry = {**entry, "version": version, "who": _who(),
             "when": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except MlflowException as e:
        raise InputError(f"models:/{name}@{alias}: cannot set the alias ({e.message})") from None
    past = (history(name, alias) + [entry])[-MAX_HISTORY:]
    c.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(past))
    c.set_model_version_tag(name, str(version), PROMOTION_TAG.format(alias=alias),
                            json.dumps({k: entry[k] for k in ("action", "who", "when", "why", "gate")}))


def promote(name: str, version: int, alias: str, *, gate: str | None = None, reason: str | None = None) -> Outcome:
    """Move ``alias`` of ``name`` to ``version`` if its run's metrics pass ``gate``; a refusal
    leaves the alias where it was."""
    gated = gate is not None  # an empty gate is a syntax error, not "no gate"
    metrics = version_metrics(name, version) if gated else {}
    failed = check(gate, metrics, where=f"models:/{name}/{version}") if gated else []
    previous = holder(name, alias)
    if failed:
        return Outcome(name, alias, version, previous, [(c, metrics[c.metric]) for c in failed], False)
    _model_version(name, version)
    if previous == version:
        return Outcome(name, alias, version, previous, [], False)
    _move(name, alias, version, {"action": "promote", "previous": previous, "gate": gate,
                                 "why": reason or gate or "no gate"})
    return Outcome(name, alias, version, previous, [], True)


def rollback(name: str, alias: str, *, reason: str | None = None) -> Outcome:
    """Move ``alias`` of ``name`` back to the version that held it before the current one."""
    past = history(name, alias)
    current = holder(name, alias)
    if not past:
        raise InputError(f"models:/{name}@{alias}: no promotion history, so no previous holder to roll back to")
    last = past[-1]
    if current == last["version"]:  # undo the last move
        target = last.get("previous")
        put = [e for e in past[:-1] if e["version"] == target]
        before = put[-1].get("previous") if put else None
    else:  # the alias was moved (or removed) outside promotion: back to the last recorded holder
        target, before = last["version"], last.get("previous")
    if target is None:
        raise InputError(f"models:/{name}@{alias}: v{current} has no previous holder to roll back to")
    _move(name, alias, int(target), {"action": "rollback", "previous": before, "replaced": current, "gate": None,
                                     "why": reason or f"rollback from v{current}"})
    return Outcome(name, alias, int(target), current, [], True)


def listing(name: str) -> list[str]:
    """Lines showing each alias of ``name``, where it is, and what moved it."""
    try:
        rm = client().get_registered_model(name)
    except MlflowException as e:
        raise InputError(f"models:/{name}: not in the registry ({e.message})") from None
    prefix, suffix = HISTORY_TAG.split("{alias}")
    tagged = {k[len(prefix):-len(suffix)] for k in (rm.tags or {}) if k.startswith(prefix) and k.endswith(suffix)}
    aliases = sorted(set(rm.aliases or {}) | tagged)
    lines = []
    for alias in aliases:
        at = holder(name, alias)
        lines.append(f"@{alias}: {'v' + str(at) if at is not None else 'unset'}")
        for e in history(name, alias):
            was = e["previous"] if e["action"] == "promote" else e.get("replaced")
            was = f" (was v{was})" if was is not None else ""
            lines.append(f"  {e['when']} {e['action']} v{e['version']}{was} by {e['who']}: {e['why']}")
    return lines or [f"models:/{name}: no aliases"]
