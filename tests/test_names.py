"""Safe item names: what may become a file, DVC stage or shell word."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ValidationError

from persona_ops.errors import InputError
from persona_ops.names import SAFE_NAME, Name, check_name, is_safe_name, printable

GOOD = ["evil", "drill_sergeant", "step-12", "qwen3.5", "1", "A", "x" * 100]
BAD = ["e;touch x", "e$(id)", "a b", "..", ".", "", ".hidden", "-rf", "_x", "a..b", "a/b", "a\\b",
       "a\nb", "evil\n", "x" * 101, "ünï", "a*", "`id`", "a'b", "a:b"]


@pytest.mark.parametrize("name", GOOD)
def test_good_names(name):
    assert is_safe_name(name) and SAFE_NAME.match(name)
    assert check_name(name, "trait") == name


@pytest.mark.parametrize("name", BAD)
def test_bad_names(name):
    assert not is_safe_name(name)
    assert SAFE_NAME.search(name) is None  # anchored: no safe part of an unsafe name matches
    with pytest.raises(InputError) as info:
        check_name(name, "trait", "data/traits/extract")
    msg = str(info.value)
    assert msg.startswith(f"data/traits/extract: trait {name!r} is not a usable name: expected letters, ")
    assert "(it names files, DVC stages and shell words)" in msg


def test_check_name_without_where_and_non_strings():
    with pytest.raises(InputError, match=r"^role 'a b' is not a usable name: expected"):
        check_name("a b", "role")
    assert not is_safe_name(None) and not is_safe_name(3)  # type: ignore[arg-type]


class Params(BaseModel):
    name: Name = "evil"
    names: list[Name] = []


def test_pydantic_name_type():
    assert Params(names=["evil", "qwen3.5"]).names == ["evil", "qwen3.5"]
    assert Params(name="drill_sergeant").name == "drill_sergeant"
    with pytest.raises(ValidationError) as info:
        Params(names=["evil", "e;touch x"])
    (err,) = info.value.errors()
    assert err["loc"] == ("names", 1)
    assert "'e;touch x' is not a usable name: expected letters" in err["msg"]
    with pytest.raises(ValidationError):
        Params(name="..")
    with pytest.raises(ValidationError):
        Params(name=5)  # type: ignore[arg-type]


@pytest.mark.parametrize("text, shown", [
    ("evil 你好 😀 é", "evil 你好 😀 é"),  # printable text is left alone
    ("a\x1b[2Jb", "a\\x1b[2Jb"),  # terminal escape sequences
    ("line\nbreak\r\ttab", "line\\nbreak\\r\\ttab"),
    ("half \ud800", "half \\ud800"),  # a lone surrogate would crash print()
    ("\u202eevil\u2028", "\\u202eevil\\u2028"),  # bidi override, line separator
    ("bell\x07 nul\x00 c1\x9b", "bell\\x07 nul\\x00 c1\\x9b"),
])
def test_printable_escapes_what_could_drive_a_terminal(text, shown):
    assert printable(text) == shown
    assert printable(shown) == shown


@pytest.mark.parametrize("name", ["lora-adapter-backdoor-1-0.001", "persona-vector-v1.2", "a_b-c"])
def test_registry_names_are_what_mlflow_takes(name):
    from mlflow.utils.validation import _validate_logged_model_name

    from persona_ops.names import registry_name

    _validate_logged_model_name(registry_name(name))  # what refused the sweep points (no '.', '/', ':', '%')
    assert registry_name(name).replace("_", ".") == name.replace("_", ".")  # only the dots change
