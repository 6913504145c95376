"""Loaders and validators for the text datasets the pipelines read.

Formats (``detect_format`` tells them apart from the content):

- ``trait``: persona_vectors trait JSON, ``{"instruction": [{"pos", "neg"}, ...],
  "questions": [str, ...], "eval_prompt": str}`` (also assistant-axis ``traits/``).
- ``role``: assistant-axis role JSON, ``{"instruction": [{"pos"}, ...],
  "questions": [...], "eval_prompt": str}``. ``questions`` may be absent or empty.
  The role stored as ``default.json`` may omit ``eval_prompt`` and may have an
  empty instruction (no system prompt); its instructions may hold ``{model_name}``.
- ``questions``: JSONL, one ``{"question": str, "id": int | str}`` per line.
- ``chat``: JSONL, one ``{"messages": [{"role", "content"}, ...], "metadata": {...}}`` per
  line; ``metadata`` (any JSON object) is optional.
- ``name-list``: JSON object name -> one-line description (``role_list.json``).

Trait and role names are file stems and must be safe names (``persona_ops.names``).

Files are UTF-8, with or without a BOM, with LF or CRLF line ends. Beyond the JSON grammar,
refused: NaN/Infinity, integers longer than Python converts (``sys.get_int_max_str_digits``),
nesting deeper than ``MAX_DEPTH``, a key twice in one object, lone surrogates (``"\\ud800"``),
and files that are not regular files (FIFOs, devices).

Every problem is reported as ``path[:line]: field: what is wrong, what was expected``.
For JSON files the line is the line of the offending field, found by re-scanning
the file only when something is wrong.
"""

from __future__ import annotations

import bisect
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.errors import InputError
from persona_ops.names import NAME_RULE, is_safe_name, name_problem, printable

FORMATS = ("trait", "role", "questions", "chat", "name-list")
CHAT_ROLES = ("system", "user", "assistant")
TEMPLATE_FIELDS = ("question", "answer")
DEFAULT_ROLE = "default"

_DESCRIBE = {
    "trait": "JSON with instruction [{pos, neg}], questions and eval_prompt",
    "role": "JSON with instruction [{pos}], questions and eval_prompt",
    "questions": "JSONL of {question, id}",
    "chat": "JSONL of {messages: [{role, content}], metadata?: {...}}",
    "name-list": "JSON object name -> description",
}
_TRAIT_KEYS = ("instruction", "questions", "eval_prompt")
_CHAT_KEYS = ("messages", "metadata")
_TRAIT_OR_ROLE = "trait-or-role"  # detected, but malformed instructions hide which one
_MAX_PROBLEMS = 50  # per file; the rest are counted, not listed
MAX_DEPTH = 100  # nested arrays/objects; deeper documents are refused (recursion in json and later code)


class DataError(InputError):
    """A file that was read but failed validation; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = [printable(x) for x in problems]  # text from the file may hold escape sequences
        shown = self.problems[:10]
        n = len(self.problems)
        more = f"\n... and {n - len(shown)} more" if n > len(shown) else ""
        super().__init__("\n".join(shown) + more)


class InstructionPair(BaseModel):
    """A system-prompt instruction that elicits a trait (``pos``) and one that suppresses it (``neg``)."""

    model_config = ConfigDict(frozen=True)
    pos: str
    neg: str


class Trait(BaseModel):
    """A persona_vectors trait: instruction pairs, questions and a 0-100 judge prompt."""

    model_config = ConfigDict(frozen=True)
    name: str
    instructions: list[InstructionPair]
    questions: list[str]
    eval_prompt: str
    path: Path


class Role(BaseModel):
    """An assistant-axis role: system-prompt instructions and a 0-3 role-expression judge prompt."""

    model_config = ConfigDict(frozen=True)
    name: str
    instructions: list[str]
    questions: list[str]
    eval_prompt: str | None
    path: Path

    @property
    def is_default(self) -> bool:
        """The default Assistant (``default.json``): neutral prompts, no judge."""
        return self.name == DEFAULT_ROLE

    def system_prompts(self, model_name: str) -> list[str]:
        """The instructions as system prompts, ``{model_name}`` filled in (default.json uses it)."""
        return [text.replace("{model_name}", model_name) for text in self.instructions]


class Question(BaseModel):
    """One shared extraction question."""

    model_config = ConfigDict(frozen=True)
    id: int | str
    question: str


class ChatExample(BaseModel):
    """One conversation of a chat dataset and its optional ``metadata`` object."""

    model_config = ConfigDict(frozen=True)
    messages: list[dict]
    metadata: dict = Field(default_factory=dict)


# --- problem collection -------------------------------------------------------

class _Problems:
    """Collects the problems of one file; JSON lines are looked up lazily from field paths."""

    def __init__(self, path: Path):
        self.path = path
        self.text = ""  # the file's text once read (for JSON line lookups)
        self.count = 0
        self._items: list[tuple[int | None, tuple, str]] = []

    def add(self, loc: tuple, msg: str, line: int | None = None) -> None:
        self.count += 1
        if len(self._items) < _MAX_PROBLEMS:
            self._items.append((line, loc, msg))

    def __bool__(self) -> bool:
        return self.count > 0

    def messages(self) -> list[str]:
        index: dict[tuple, int] | None = None
        located = []
        for line, loc, msg in self._items:
            if line is None and loc:
                if index is None:
                    index = _json_line_index(self.text)
                line = _nearest_line(index, loc)
            located.append((line, loc, msg))
        out = []
        for line, loc, msg in sorted(located, key=lambda item: item[0] or 0):
            where = f"{self.path}:{line}" if line else str(self.path)
            field = _render_loc(loc)
            out.append(f"{where}: {field}: {msg}" if field else f"{where}: {msg}")
        if self.count > len(self._items):
            out.append(f"{self.path}: ... {self.count - len(self._items)} more problems not listed")
        return out

    def raise_if_any(self) -> None:
        if self:
            raise DataError(self.messages())


def _render_loc(loc: tuple) -> str:
    """``("instruction", 2, "neg")`` -> ``instruction[2].neg``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _nearest_line(index: dict[tuple, int], loc: tuple) -> int | None:
    """Line of ``loc`` or of its closest present parent (a missing field: its object)."""
    while loc and loc not in index:
        loc = loc[:-1]
    return index[loc] if loc else None


_WS = re.compile(r"[ \t\n\r]*")


def _json_line_index(text: str) -> dict[tuple, int]:
    """Line number of every value of a (valid) JSON document, keyed by its path.

    An object member maps to the line of its key, an array item to the line where it starts.
    """
    newlines = [m.start() for m in re.finditer("\n", text)]
    index: dict[tuple, int] = {}
    decoder = json.JSONDecoder()

    def line_at(i: int) -> int:
        return bisect.bisect_left(newlines, i) + 1

    def skip(i: int) -> int:
        return _WS.match(text, i).end()  # type: ignore[union-attr]

    def walk(i: int, path: tuple) -> int:
        i = skip(i)
        index.setdefault(path, line_at(i))
        if text[i] == "{":
            i = skip(i + 1)
            while text[i] != "}":
                key_line = line_at(i)
                key, i = json.decoder.scanstring(text, i + 1)
                index[path + (key,)] = key_line
                i = skip(walk(skip(i) + 1, path + (key,)))  # skip(i) is the ':'
                if text[i] == ",":
                    i = skip(i + 1)
            return i + 1
        if text[i] == "[":
            i = skip(i + 1)
            n = 0
            while text[i] != "]":
                i = skip(walk(i, path + (n,)))
                n += 1
                if text[i] == ",":
                    i = skip(i + 1)
            return i + 1
        return decoder.raw_decode(text, i)[1]

    walk(0, ())
    return index


# --- reading and detection ----------------------------------------------------

class _JSONProblem(Exception):
    """A document Python's json would not parse or that is refused anyway; ``pos`` is its offset."""

    def __init__(self, msg: str, pos: int, extra_data: bool = False):
        super().__init__(msg)
        self.msg, self.pos, self.extra_data = msg, pos, extra_data


class _Constant(Exception):
    pass


class _KeysTwice(dict):
    """A parsed object in which some key appeared more than once (``twice`` lists them)."""

    def __init__(self, items: list[tuple[str, Any]]):
        super().__init__(items)
        self.twice = [k for k, n in Counter(k for k, _ in items).items() if n > 1]


def _no_constant(name: str) -> Any:
    raise _Constant(name)


_STRING = r'"(?:[^"\\]|\\.)*"'
_BRACKETS = re.compile(_STRING + r"|[\[\]{}]")
_CONSTANTS = re.compile(_STRING + r"|-?Infinity|NaN")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _offset_outside_strings(text: str, tokens: re.Pattern) -> int:
    """Offset of the first match of ``tokens`` that is not a string (0 if none)."""
    return next((m.start() for m in tokens.finditer(text) if m.group()[0] != '"'), 0)


def _too_deep_at(text: str) -> int | None:
    """Offset of the bracket that opens level ``MAX_DEPTH + 1``, None if the text stays shallower."""
    if text.count("[") + text.count("{") <= MAX_DEPTH:
        return None
    depth = 0
    for m in _BRACKETS.finditer(text):
        c = m.group()
        if c in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return m.start()
        elif c in "]}":
            depth -= 1
    return None


def _too_long_number(text: str, error: ValueError) -> _JSONProblem:
    """Python's json refuses integers longer than ``int()`` converts; find the number."""
    limit = sys.get_int_max_str_digits()
    digits = re.compile(_STRING + r"|(?<![\d.eE+-])-?\d{%d,}(?![\d.eE])" % (limit + 1))
    m = next((m for m in digits.finditer(text) if m.group()[0] != '"'), None)
    if m is None:
        return _JSONProblem(f"invalid JSON: {error}", 0)
    return _JSONProblem(f"a number with {len(m.group().lstrip('-'))} digits, expected at most {limit}", m.start())


def _parse_json(text: str) -> tuple[Any, bool]:
    """``json.loads`` with every crash turned into a located :class:`_JSONProblem`; also whether
    some object holds a key twice (then a :class:`_KeysTwice`)."""
    flagged: list[_KeysTwice] = []

    def pairs(items: list[tuple[str, Any]]) -> dict:
        obj = dict(items)
        if len(obj) == len(items):
            return obj
        flagged.append(_KeysTwice(items))
        return flagged[-1]

    value, too_deep = None, False
    try:
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=pairs)
    except json.JSONDecodeError as e:
        raise _JSONProblem(f"invalid JSON: {e.msg}", e.pos, e.msg == "Extra data") from None
    except _Constant as e:
        raise _JSONProblem(f"{e} is not standard JSON, expected a number or null",
                           _offset_outside_strings(text, _CONSTANTS)) from None
    except RecursionError:  # deeper than Python's json goes; located below
        too_deep = True
    except ValueError as e:
        raise _too_long_number(text, e) from None
    pos = _too_deep_at(text)
    if pos is not None or too_deep:
        raise _JSONProblem(f"nested deeper than {MAX_DEPTH} levels, expected at most {MAX_DEPTH} nested "
                           "arrays and objects", pos or 0)
    return value, bool(flagged)


def _nodes(value: Any) -> Iterable[tuple[tuple, Any]]:
    """Every value of a parsed document with its field path (iterative: depth is bounded anyway)."""
    stack: list[tuple[tuple, Any]] = [((), value)]
    while stack:
        loc, node = stack.pop()
        yield loc, node
        if isinstance(node, dict):
            stack.extend((loc + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((loc + (i,), v) for i, v in enumerate(node))


def _lone_surrogate(text: str) -> str | None:
    m = _SURROGATE.search(text)
    return None if m is None else m.group().encode("unicode_escape").decode("ascii")


def _check_document(p: _Problems, value: Any, raw: str, keys_twice: bool, line: int | None = None) -> None:
    """Keys given twice and lone surrogates: both parse, then mislead or crash later stages."""
    surrogates = _SURROGATE_ESCAPE.search(raw) is not None
    if not (surrogates or keys_twice):
        return
    for loc, node in _nodes(value):
        if isinstance(node, _KeysTwice):
            for key in node.twice:
                p.add(loc + (key,), "appears twice in one object, expected each field once", line)
        if not surrogates:
            continue
        texts = [(loc, node, "(an unpaired UTF-16 half)")] if isinstance(node, str) else []
        if isinstance(node, dict):
            texts += [(loc + (k,), k, "in a field name") for k in node]
        for where, text, what in texts:
            half = _lone_surrogate(text)
            if half:
                p.add(where, f"lone surrogate {half} {what}, expected valid Unicode text", line)


def _read_text(path: Path) -> str:
    """A data file's text: a regular file, UTF-8, a leading BOM dropped."""
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a file")
    if not path.is_file():  # reading a FIFO or /dev/zero would never end
        raise InputError(f"{path}: not a regular file (a FIFO, device or socket), expected a file")
    try:
        return path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (bad byte at offset {e.start})") from None


def _line_col(text: str, pos: int) -> tuple[int, int]:
    return text.count("\n", 0, pos) + 1, pos - text.rfind("\n", 0, pos)


def _read(path: Path, problems: _Problems) -> tuple[str, Any]:
    """Parse a file as ``("json", value)`` or ``("jsonl", [(line, value), ...])``.

    ``.jsonl`` files are always JSON lines, ``.json`` files always one document; other
    names are tried as one document first. Unreadable files raise ``InputError``; bad
    JSONL lines are added to ``problems`` and skipped.
    """
    text = problems.text = _read_text(path)
    if not text.strip():
        raise InputError(f"{path}: empty file")
    if path.suffix != ".jsonl":
        try:
            value, keys_twice = _parse_json(text)
        except _JSONProblem as e:
            if path.suffix == ".json" or not e.extra_data:
                raise InputError(f"{path}:{_line_col(text, e.pos)[0]}: {e.msg}") from None
        else:
            _check_document(problems, value, text, keys_twice)
            return "json", value
    records = []
    # split on "\n" only: str.splitlines would also split on U+2028 inside JSON strings
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            value, keys_twice = _parse_json(line)
        except _JSONProblem as e:
            problems.add((), f"{e.msg} (column {_line_col(line, e.pos)[1]})", line=lineno)
            continue
        _check_document(problems, value, line, keys_twice, lineno)
        records.append((lineno, value))
    return "jsonl", records


def _detect(kind: str, content: Any) -> str | None:
    """The format of parsed content, or None when it matches none."""
    if kind == "jsonl":
        first = next((rec for _, rec in content if isinstance(rec, dict)), None)
        if first is None:
            return None
        if "messages" in first:
            return "chat"
        if "question" in first:
            return "questions"
        return None
    if not isinstance(content, dict) or not content:
        return None
    if "instruction" in content:
        items = content["instruction"]
        if isinstance(items, list) and items and all(isinstance(i, dict) for i in items):
            return "trait" if any("neg" in i for i in items) else "role"
        return _TRAIT_OR_ROLE
    if "questions" in content or "eval_prompt" in content:
        return _TRAIT_OR_ROLE
    if "messages" in content or "question" in content:
        return None
    # name -> description; tolerate a few bad values so validation can name them
    n_str = sum(isinstance(v, str) for v in content.values())
    return "name-list" if 2 * n_str >= len(content) else None


def _unknown_format(path: Path) -> InputError:
    expected = "; ".join(f"{k}: {v}" for k, v in _DESCRIBE.items())
    return InputError(f"{path}: cannot tell the format, expected one of: {expected}")


def detect_format(path: str | Path) -> str:
    """The format of a file (one of ``FORMATS``), judged from its content.

    Raises ``InputError`` for unreadable or invalid JSON and content of no known format.
    """
    path = Path(path)
    problems = _Problems(path)
    kind, content = _read(path, problems)
    fmt = _detect(kind, content)
    if fmt is None:
        problems.raise_if_any()
        raise _unknown_format(path)
    return "trait" if fmt == _TRAIT_OR_ROLE else fmt


# --- field validators ---------------------------------------------------------

def _type_name(value: Any) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean",
            type(None): "null"}.get(type(value), type(value).__name__)


def _check_str(p: _Problems, loc: tuple, value: Any, what: str, allow_empty: bool = False,
               line: int | None = None) -> bool:
    if not isinstance(value, str):
        p.add(loc, f"expected {what} (a string), got {_type_name(value)}", line)
        return False
    if not allow_empty and not value.strip():
        p.add(loc, f"empty string, expected {what}", line)
        return False
    return True


def _check_keys(p: _Problems, loc: tuple, obj: dict, allowed: Sequence[str],
                line: int | None = None) -> None:
    for key in obj:
        if key not in allowed:
            p.add(loc + (key,), f"unknown field, expected only {', '.join(allowed)}", line)


_TEMPLATE_BRACES = re.compile(r"\{[^{}]*\}|[{}]")
_TEMPLATE_FIELD = re.compile(r"\{([^!:]*)(![^:]*)?(:.*)?\}", re.DOTALL)


def _check_template(p: _Problems, loc: tuple, value: Any) -> bool:
    """A judge prompt. The judge fills ``{question}`` and ``{answer}`` by plain replacement
    (``judge.fill_template``), so those placeholders, written exactly so, are its only braces."""
    if not _check_str(p, loc, value, "a judge prompt with {question} and {answer}"):
        return False
    before = p.count
    for m in _TEMPLATE_BRACES.finditer(value):
        text = m.group()
        if text in ("{question}", "{answer}"):
            continue
        if len(text) == 1:
            p.add(loc, f"not a valid template: stray {text!r} at character {m.start()}, expected braces only "
                       "in the {question} and {answer} placeholders")
            continue
        name, conversion, spec = _TEMPLATE_FIELD.fullmatch(text).groups()  # type: ignore[union-attr]
        if name in TEMPLATE_FIELDS and (conversion or spec):
            what = f"conversion {conversion!r}" if conversion else f"format spec {spec!r}"
            p.add(loc, f"placeholder {text}: {what} is not supported, expected exactly {{{name}}}")
        else:
            p.add(loc, f"unknown placeholder {text}, only {{question}} and {{answer}} are filled in")
    for name in TEMPLATE_FIELDS:
        if f"{{{name}}}" not in value:
            p.add(loc, f"missing the {{{name}}} placeholder, expected {{question}} and {{answer}}")
    return p.count == before


def _check_questions(p: _Problems, obj: dict, required: bool) -> list[str]:
    if "questions" not in obj and not required:
        return []
    value = obj.get("questions")
    if not isinstance(value, list) or (required and not value):
        got = "an empty list" if value == [] else ("nothing" if "questions" not in obj else _type_name(value))
        p.add(("questions",), f"expected a non-empty list of question strings, got {got}")
        return []
    seen: dict[str, int] = {}
    for i, q in enumerate(value):
        if _check_str(p, ("questions", i), q, "a question"):
            if q in seen:
                p.add(("questions", i), f"duplicate of questions[{seen[q]}]")
            seen.setdefault(q, i)
    return value


def _check_instructions(p: _Problems, obj: dict, keys: tuple[str, ...],
                        allow_empty: bool = False) -> list[dict]:
    value = obj.get("instruction")
    shape = "{" + ", ".join(keys) + "}"
    if not isinstance(value, list) or not value:
        got = "an empty list" if value == [] else ("nothing" if "instruction" not in obj else _type_name(value))
        p.add(("instruction",), f"expected a non-empty list of {shape} objects, got {got}")
        return []
    for i, item in enumerate(value):
        loc = ("instruction", i)
        if not isinstance(item, dict):
            p.add(loc, f"expected a {shape} object, got {_type_name(item)}")
            continue
        _check_keys(p, loc, item, keys)
        for key in keys:
            if key not in item:
                p.add(loc + (key,), f"missing, expected a {shape} object")
            else:
                _check_str(p, loc + (key,), item[key], f"a {key} instruction", allow_empty)
        if len(keys) == 2 and item.get("pos") == item.get("neg") and isinstance(item.get("pos"), str):
            p.add(loc, "pos and neg are the same text, expected opposite instructions")
    return value


def _check_stem(p: _Problems, path: Path, what: str) -> None:
    """The file stem names the trait or role; unsafe stems would reach stage names and shells."""
    problem = name_problem(path.stem, what)
    if problem is not None:
        p.add((), f"file name: {problem}")


def _object(p: _Problems, kind: str, content: Any, fmt: str) -> dict | None:
    if kind != "json" or not isinstance(content, dict):
        got = "JSON lines" if kind == "jsonl" else _type_name(content)
        p.add((), f"expected a JSON object ({_DESCRIBE[fmt]}), got {got}")
        return None
    return content


def _records(p: _Problems, kind: str, content: Any, fmt: str) -> list[tuple[int, Any]]:
    if kind == "jsonl":
        return content
    if isinstance(content, dict):  # a one-line file not named .jsonl
        return [(1, content)]
    p.add((), f"expected JSON lines ({_DESCRIBE[fmt]}), got one JSON {_type_name(content)}")
    return []


# --- per-format validation ----------------------------------------------------

def _validate_trait(path: Path, kind: str, content: Any, p: _Problems) -> Trait | None:
    _check_stem(p, path, "trait")
    obj = _object(p, kind, content, "trait")
    if obj is None:
        return None
    _check_keys(p, (), obj, _TRAIT_KEYS)
    pairs = _check_instructions(p, obj, ("pos", "neg"))
    questions = _check_questions(p, obj, required=True)
    if "eval_prompt" not in obj:
        p.add(("eval_prompt",), "missing, expected a 0-100 judge prompt with {question} and {answer}")
    else:
        _check_template(p, ("eval_prompt",), obj["eval_prompt"])
    if p:
        return None
    return Trait(name=path.stem, instructions=[InstructionPair(**i) for i in pairs],
                 questions=questions, eval_prompt=obj["eval_prompt"], path=path)


def _validate_role(path: Path, kind: str, content: Any, p: _Problems) -> Role | None:
    _check_stem(p, path, "role")
    obj = _object(p, kind, content, "role")
    if obj is None:
        return None
    is_default = path.stem == DEFAULT_ROLE
    _check_keys(p, (), obj, _TRAIT_KEYS)
    # default.json's first instruction is "" (no system prompt); other roles need text
    items = _check_instructions(p, obj, ("pos",), allow_empty=is_default)
    questions = _check_questions(p, obj, required=False)
    if "eval_prompt" in obj:
        _check_template(p, ("eval_prompt",), obj["eval_prompt"])
    elif not is_default:
        p.add(("eval_prompt",), "missing, expected a judge prompt with {question} and {answer} "
                                "(only default.json may omit it)")
    if p:
        return None
    return Role(name=path.stem, instructions=[i["pos"] for i in items], questions=questions,
                eval_prompt=obj.get("eval_prompt"), path=path)


def _validate_questions(path: Path, kind: str, content: Any, p: _Problems) -> list[Question] | None:
    out: list[Question] = []
    first_line: dict[str, int] = {}
    for line, rec in _records(p, kind, content, "questions"):
        if not isinstance(rec, dict):
            p.add((), f"expected an object {{question, id}}, got {_type_name(rec)}", line)
            continue
        ok = True
        if "question" not in rec:
            p.add(("question",), "missing, expected the question text", line)
            ok = False
        else:
            ok &= _check_str(p, ("question",), rec["question"], "the question text", line=line)
        qid = rec.get("id")
        if "id" not in rec:
            p.add(("id",), "missing, expected an integer or string id", line)
            ok = False
        elif isinstance(qid, bool) or not isinstance(qid, (int, str)) or qid == "":
            p.add(("id",), f"expected an integer or non-empty string id, got {json.dumps(qid)}", line)
            ok = False
        elif str(qid) in first_line:  # 1 and "1" collide in string-keyed outputs
            p.add(("id",), f"duplicate id {json.dumps(qid)}, already used on line {first_line[str(qid)]}",
                  line)
            ok = False
        else:
            first_line[str(qid)] = line
        if ok:
            out.append(Question(id=qid, question=rec["question"]))
    if not out and not p:
        p.add((), "no questions, expected one {question, id} object per line")
    return None if p else out


def _check_conversation(p: _Problems, line: int, messages: Any) -> bool:
    loc: tuple = ("messages",)
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _type_name(messages)
        p.add(loc, f"expected a non-empty list of {{role, content}} objects, got {got}", line)
        return False
    before = p.count
    prev = None
    for j, m in enumerate(messages):
        mloc = loc + (j,)
        if not isinstance(m, dict):
            p.add(mloc, f"expected a {{role, content}} object, got {_type_name(m)}", line)
            return False
        role = m.get("role")
        if role not in CHAT_ROLES:
            got = "nothing" if "role" not in m else json.dumps(role)
            p.add(mloc + ("role",), f"got {got}, expected one of {', '.join(CHAT_ROLES)}", line)
            return False
        if "content" not in m:
            p.add(mloc + ("content",), "missing, expected the message text", line)
        else:
            _check_str(p, mloc + ("content",), m["content"], "the message text", allow_empty=True, line=line)
        if role == "system" and j > 0:
            p.add(mloc + ("role",), "system message after the first, expected it only at messages[0]", line)
        elif role != "system" and role == prev:
            p.add(mloc + ("role",), f"two {role} messages in a row, expected user and assistant turns "
                                    "to alternate", line)
        elif role == "assistant" and prev in (None, "system"):
            p.add(mloc + ("role",), "assistant speaks before any user message, expected a user turn first",
                  line)
        prev = role
    last = messages[-1]
    if last.get("role") != "assistant":
        p.add(loc + (len(messages) - 1, "role"),
              f"the last message is from {last.get('role')}, expected assistant (the response)", line)
    elif isinstance(last.get("content"), str) and not last["content"].strip():
        p.add(loc + (len(messages) - 1, "content"), "empty assistant response, expected text", line)
    return p.count == before


def _validate_chat(path: Path, kind: str, content: Any, p: _Problems) -> list[ChatExample] | None:
    out: list[ChatExample] = []
    for line, rec in _records(p, kind, content, "chat"):
        if not isinstance(rec, dict):
            p.add((), f"expected an object {{messages: [...]}}, got {_type_name(rec)}", line)
            continue
        if "messages" not in rec:
            p.add(("messages",), "missing, expected a list of {role, content} objects", line)
            ok = False
        else:
            ok = _check_conversation(p, line, rec["messages"])
        _check_keys(p, (), rec, _CHAT_KEYS, line)
        metadata = rec.get("metadata", {})
        if not isinstance(metadata, dict):
            p.add(("metadata",), f"expected a JSON object, got {_type_name(metadata)}", line)
        elif ok:
            out.append(ChatExample(messages=rec["messages"], metadata=metadata))
    if not out and not p:
        p.add((), "no conversations, expected one {messages: [...]} object per line")
    return None if p else out


def _validate_name_list(path: Path, kind: str, content: Any, p: _Problems) -> dict[str, str] | None:
    obj = _object(p, kind, content, "name-list")
    if obj is None:
        return None
    if not obj:
        p.add((), "empty object, expected name -> description entries")
    for name, desc in obj.items():
        problem = name_problem(name, "item")
        if problem:
            p.add((name,), problem)
        _check_str(p, (name,), desc, "a one-line description")
    return None if p else dict(obj)


_VALIDATORS: dict[str, Callable[[Path, str, Any, _Problems], Any]] = {
    "trait": _validate_trait,
    "role": _validate_role,
    "questions": _validate_questions,
    "chat": _validate_chat,
    "name-list": _validate_name_list,
}


def _load(path: str | Path, expect: str | None = None) -> tuple[str, Any]:
    """Read, detect and validate one file; return ``(format, value)`` or raise ``InputError``."""
    path = Path(path)
    p = _Problems(path)
    kind, content = _read(path, p)
    fmt = _detect(kind, content)
    if fmt == _TRAIT_OR_ROLE:
        fmt = expect if expect in ("trait", "role") else "trait"
    if expect is not None:
        if fmt is not None and fmt != expect:
            raise InputError(f"{path}: expected a {expect} file ({_DESCRIBE[expect]}), "
                             f"found a {fmt} file")
        fmt = expect
    if fmt is None:
        p.raise_if_any()
        raise _unknown_format(path)
    value = _VALIDATORS[fmt](path, kind, content, p)
    p.raise_if_any()
    return fmt, value


# --- public loaders -----------------------------------------------------------

def load_trait(path: str | Path) -> Trait:
    """Load a persona_vectors trait file; the trait's name is the file stem."""
    return _load(path, "trait")[1]


def load_role(path: str | Path) -> Role:
    """Load an assistant-axis role file (``default.json`` is the default Assistant)."""
    return _load(path, "role")[1]


def load_questions(path: str | Path) -> list[Question]:
    """Load shared questions (JSONL ``{question, id}``); ids must be unique."""
    return _load(path, "questions")[1]


def load_chat_dataset(path: str | Path) -> list[ChatExample]:
    """Load conversations (JSONL ``{messages, metadata?}``): an optional first system message,
    then alternating user/assistant turns ending with a non-empty assistant response."""
    return _load(path, "chat")[1]


def load_name_list(path: str | Path) -> dict[str, str]:
    """Load a name -> description list such as ``role_list.json`` or ``trait_list.json``."""
    return _load(path, "name-list")[1]


def load_traits(directory: str | Path, names: str | Sequence[str] | None = None,
                split: str = "extract") -> list[Trait]:
    """Load ``<directory>/<split>/<name>.json`` for each name (every trait there when None).

    Names must be safe (``persona_ops.names``); files with unsafe stems are never listed as
    available, and are an error when every trait is asked for.
    """
    root = Path(directory) / split
    if not root.is_dir():
        raise InputError(f"{root}: no such directory, expected trait files at {root}/<name>.json")
    files = sorted(root.glob("*.json"))
    available = [p.stem for p in files if is_safe_name(p.stem)]
    if names is None:
        unsafe = [p for p in files if not is_safe_name(p.stem)]
        if unsafe:
            raise DataError([f"{p}: file name: {name_problem(p.stem, 'trait')}" for p in unsafe])
        names = available
    elif isinstance(names, str):
        names = [names]
    bad = [n for n in names if not is_safe_name(n)]
    if bad:
        verb = "is not a usable name" if len(bad) == 1 else "are not usable names"
        raise InputError(f"{root}: trait {', '.join(map(repr, bad))} {verb}: {NAME_RULE}")
    missing = [n for n in names if n not in available]
    if missing:
        raise InputError(f"{root}: no trait file for {', '.join(missing)}; "
                         f"available: {', '.join(available) or 'none'}")
    return [load_trait(root / f"{n}.json") for n in names]


# --- checking many files --------------------------------------------------------

def _summary(fmt: str, value: Any) -> str:
    if fmt == "trait":
        return f"trait, {len(value.instructions)} instruction pairs, {len(value.questions)} questions"
    if fmt == "role":
        extra = ", default role" if value.is_default else ""
        return f"role, {len(value.instructions)} instructions, {len(value.questions)} questions{extra}"
    if fmt == "questions":
        return f"questions, {len(value)} questions"
    if fmt == "chat":
        with_meta = sum(1 for ex in value if ex.metadata)
        extra = f", {with_meta} with metadata" if with_meta else ""
        return f"chat, {len(value)} conversations, {sum(len(ex.messages) for ex in value)} messages{extra}"
    return f"name-list, {len(value)} names"


def _files_of(path: Path) -> list[Path]:
    """A file as given; a directory walked for *.json / *.jsonl (hidden directories skipped, hidden
    files not: ``...json`` would be a trait named ``..``)."""
    if path.is_dir():
        found = sorted(
            f for f in path.rglob("*")
            if f.suffix in (".json", ".jsonl") and f.is_file()
            and not any(part.startswith(".") for part in f.relative_to(path).parts[:-1]))
        if not found:
            raise InputError(f"{path}: no .json or .jsonl files in this directory")
        return found
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    return [path]


def _check_splits(traits: list[Trait], errors: list[str]) -> None:
    """Extract and eval files of one trait must not share questions (that would leak).

    Pairs are ``<dir>/<prefix>extract/<name>.json`` and ``<dir>/<prefix>eval/<name>.json``,
    e.g. ``data/traits/{extract,eval}`` or persona_vectors' ``trait_data_{extract,eval}``.
    """
    pairs: dict[tuple, dict[str, Trait]] = {}
    for t in traits:
        m = re.fullmatch(r"(.*?)(extract|eval)", t.path.parent.name)
        if m:
            pairs.setdefault((t.path.parent.parent, m.group(1), t.name), {})[m.group(2)] = t
    for pair in pairs.values():
        if len(pair) == 2:
            shared = sorted(set(pair["extract"].questions) & set(pair["eval"].questions))
            if shared:
                errors.append(f"{pair['eval'].path}: questions: {len(shared)} shared with "
                              f"{pair['extract'].path} (e.g. {shared[0]!r}), expected disjoint "
                              "extract and eval questions")


def check_paths(paths: Iterable[str | Path]) -> tuple[list[str], list[str]]:
    """Validate files and directories; return (one summary line per good file, error lines)."""
    summaries: list[str] = []
    errors: list[str] = []
    traits: list[Trait] = []
    for raw in paths:
        try:
            files = _files_of(Path(raw))
        except InputError as e:
            errors.append(str(e))
            continue
        for path in files:
            try:
                fmt, value = _load(path)
            except DataError as e:
                errors.extend(e.problems)
                continue
            except InputError as e:
                errors.append(str(e))
                continue
            except Exception as e:  # a bug, not bad data: still one line, and the other files are checked
                errors.append(f"{path}: internal error while checking ({type(e).__name__}: {e})")
                continue
            summaries.append(f"{path}: {_summary(fmt, value)}")
            if fmt == "trait":
                traits.append(value)
    _check_splits(traits, errors)
    return summaries, errors


def check_main(paths: Sequence[str | Path], out: Callable[[str], Any] = print) -> int:
    """``persona-ops data check``: print summaries, then errors, then a count; 0 if all good."""
    start = time.perf_counter()
    if not paths:
        out("no paths given, expected files or directories to check")
        return 1
    summaries, errors = check_paths(paths)
    for line in summaries + errors:
        out(printable(line))
    bad = len({e.split(":", 1)[0] for e in errors})
    out(f"{len(summaries)} files ok, {len(errors)} problems in {bad} files "
        f"({time.perf_counter() - start:.2f}s)")
    return 1 if errors else 0
