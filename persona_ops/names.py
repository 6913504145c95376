"""Safe item names (trait and role names become file names, DVC stage names and shell words) and
printable text (what a file says, shown on a terminal)."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

from persona_ops.errors import InputError

SAFE_NAME = re.compile(r"\A(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
NAME_RULE = ("expected letters, digits, '_', '-' or '.', starting with a letter or digit, "
             "without '..' and at most 100 characters (it names files, DVC stages and shell words)")


def registry_name(name: str) -> str:
    """``name`` (made of safe names) as an MLflow registered model name, which takes no ``.``: each
    becomes ``_`` (the sweep point ``1-0.001`` registers as ``lora-adapter-backdoor-1-0_001``)."""
    return name.replace(".", "_")


def is_safe_name(name: str) -> bool:
    """Whether ``name`` matches ``SAFE_NAME`` (non-strings never do)."""
    return isinstance(name, str) and SAFE_NAME.match(name) is not None


def name_problem(name: str, what: str) -> str | None:
    """Why ``name`` is refused (``"trait 'a b' is not a usable name: expected ..."``), None if safe."""
    if is_safe_name(name):
        return None
    return f"{what} {name!r} is not a usable name: {NAME_RULE}"


def check_name(name: str, what: str, where: str | None = None) -> str:
    """Return ``name``, or raise ``InputError`` saying why it cannot name a file, stage or shell word."""
    problem = name_problem(name, what)
    if problem is None:
        return name
    raise InputError(f"{where}: {problem}" if where else problem)


def _validate(name: str) -> str:
    problem = name_problem(name, "name")
    if problem is not None:
        raise ValueError(problem)
    return name


Name = Annotated[str, AfterValidator(_validate)]
"""A ``str`` field that accepts only safe names (params, ``-S`` overrides)."""


def printable(text: str) -> str:
    """``text`` safe to print: control, format, separator and surrogate characters escaped
    (``\\x1b``, ``\\u202e``, ``\\ud800``), so text from a file cannot drive the terminal or break a line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape", "backslashreplace").decode("ascii")
                   for c in text)
