"""Hostile and malformed input files through the real CLI: each is refused with one
``path[:line]: message`` line, nothing crashes, and nothing is written outside OUT_DIR.

The text corpus lives in ``tests/bad_inputs/`` (``expected.json`` holds each file's line and
message); binary vector files, model directories and file names that cannot live in git are
made here at run time.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from persona_ops.cli import app
from persona_ops.data import DataError, load_chat_dataset, load_questions, load_role, load_trait, load_traits
from persona_ops.errors import InputError
from persona_ops.interp.vectors import load_aggregate, load_vector_file, load_vectors

CORPUS = Path(__file__).parent / "bad_inputs"
EXPECTED = json.loads((CORPUS / "expected.json").read_text(encoding="utf-8"))
BAD, GOOD = EXPECTED["bad"], EXPECTED["good"]
INPUT_ERROR = "persona-ops: input error: "
UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def cli(*args) -> tuple[int, list[str]]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output.splitlines()


def data_check(*paths) -> tuple[int, list[str]]:
    code, lines = cli("data", "check", *paths)
    assert lines, "data check printed nothing"
    assert not any(UNPRINTABLE.search(line) for line in lines), "control characters reached the terminal"
    return code, lines


def assert_refused(lines: list[str], path: Path, line: int | None, message: str) -> None:
    where = f"{path}:{line}: " if line else f"{path}: "
    hits = [x for x in lines if x.startswith(where) and message in x]
    assert hits, f"no line starting {where!r} containing {message!r} in:\n" + "\n".join(lines)


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# --- the text corpus through `persona-ops data check` --------------------------------------

def test_corpus_is_large_and_listed():
    files = {p.name for p in (CORPUS / "bad").iterdir()} | {p.name for p in (CORPUS / "good").iterdir()}
    assert files == set(BAD) | set(GOOD)
    assert len(BAD) >= 30 and len(GOOD) >= 10


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_file_is_refused_with_its_place(name):
    path = CORPUS / "bad" / name
    code, lines = data_check(path)
    assert code == 1
    assert_refused(lines, path, BAD[name]["line"], BAD[name]["message"])
    assert lines[-1].startswith("0 files ok, ") and lines[-1].endswith(")")


@pytest.mark.parametrize("name", sorted(GOOD))
def test_unusual_but_valid_file_is_accepted(name):
    path = CORPUS / "good" / name
    code, lines = data_check(path)
    assert (code, lines[0]) == (0, f"{path}: {GOOD[name]}"), lines
    assert lines[1].startswith("1 files ok, 0 problems in 0 files")


def test_whole_corpus_at_once_reports_every_file():
    code, lines = data_check(CORPUS / "bad", CORPUS / "good")  # (expected.json beside them is no input)
    assert code == 1
    for name, summary in GOOD.items():
        assert f"{CORPUS / 'good' / name}: {summary}" in lines
    for name, exp in BAD.items():
        assert_refused(lines, CORPUS / "bad" / name, exp["line"], exp["message"])
    assert re.fullmatch(rf"{len(GOOD)} files ok, \d+ problems in {len(BAD)} files \(\S+s\)", lines[-1])


def test_loaders_accept_bom_and_crlf_like_data_check():
    good = CORPUS / "good"
    plain = load_trait(good / "trait_crlf.json")
    for name in ("trait_bom.json", "trait_bom_crlf.json"):
        t = load_trait(good / name)
        assert (t.instructions, t.questions, t.eval_prompt) == (plain.instructions, plain.questions,
                                                                 plain.eval_prompt)
    assert [q.id for q in load_questions(good / "questions_bom_crlf.jsonl")] == [0, 1, 2]
    assert load_role(good / "role_cjk.json").instructions == ["あなたは灯台守です。"]
    assert load_trait(good / "trait_escaped_surrogate_pair.json").questions == ["escaped pair 😀 and é"]
    meta = load_chat_dataset(good / "chat_deep_metadata.jsonl")[0].metadata
    depth = 0
    while "next" in meta:
        meta, depth = meta["next"], depth + 1
    assert depth == 59


def test_loaders_refuse_what_data_check_refuses():
    bad = CORPUS / "bad"
    for loader, name in [(load_trait, "trait_lone_surrogate.json"), (load_trait, "trait_deep_nesting.json"),
                         (load_trait, "trait_huge_integer.json"), (load_trait, "trait_template_conversion.json"),
                         (load_role, "role_template_conversion.json"), (load_questions, "questions_huge_id.jsonl"),
                         (load_chat_dataset, "chat_lone_surrogate.jsonl")]:
        with pytest.raises(InputError) as info:
            loader(bad / name)
        line, message = BAD[name]["line"], BAD[name]["message"]
        assert_refused(str(info.value).splitlines(), bad / name, line, message)


def test_one_broken_file_does_not_hide_the_others(tmp_path):
    (tmp_path / "a_deep.json").write_bytes((CORPUS / "bad" / "trait_deep_nesting.json").read_bytes())
    (tmp_path / "b_int.jsonl").write_bytes((CORPUS / "bad" / "questions_huge_id.jsonl").read_bytes())
    (tmp_path / "c_ok.json").write_bytes((CORPUS / "good" / "trait_bom.json").read_bytes())
    code, lines = data_check(tmp_path)
    assert code == 1
    assert lines[0] == f"{tmp_path / 'c_ok.json'}: trait, 2 instruction pairs, 2 questions"
    assert lines[1].startswith(f"{tmp_path / 'a_deep.json'}:") and "nested deeper than" in lines[1]
    assert lines[2].startswith(f"{tmp_path / 'b_int.jsonl'}:2: ") and "5000 digits" in lines[2]
    assert lines[3].startswith("1 files ok, 2 problems in 2 files")


# --- hostile file names (made here: some cannot live in git) ---------------------------------

HOSTILE_STEMS = ["e;touch pwned", "e$(touch pwned)", "a b", "..", "-rf", "a\nb", "`id`", "ünï", "x" * 101,
                 ".hidden", "a|b", "a>b"]


def hostile_dir(tmp_path: Path) -> Path:
    root = tmp_path / "extract"
    root.mkdir()
    doc = (CORPUS / "good" / "trait_crlf.json").read_bytes()
    for stem in HOSTILE_STEMS:
        (root / f"{stem}.json").write_bytes(doc)
    (root / "fine.json").write_bytes(doc)
    return root


def test_hostile_trait_names_are_refused_everywhere(tmp_path):
    root = hostile_dir(tmp_path)
    code, lines = data_check(root)
    assert code == 1 and lines[0] == f"{root / 'fine.json'}: trait, 2 instruction pairs, 2 questions"
    refused = [x for x in lines if ": file name: trait " in x]
    assert len(refused) == len(HOSTILE_STEMS)
    for stem in HOSTILE_STEMS:
        shown = repr(stem)
        assert any(f"trait {shown} is not a usable name: expected letters" in x for x in refused), stem
        with pytest.raises(InputError, match="is not a usable name"):
            load_trait(root / f"{stem}.json")
    with pytest.raises(DataError) as info:
        load_traits(tmp_path)
    assert len(info.value.problems) == len(HOSTILE_STEMS)
    assert [t.name for t in load_traits(tmp_path, ["fine"])] == ["fine"]
    assert not list(tmp_path.rglob("pwned"))


@pytest.mark.timeout(60)
def test_non_regular_files_are_refused_not_read(tmp_path):
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)  # reading it would block forever
    code, lines = data_check(fifo, "/dev/zero")
    assert code == 1
    assert_refused(lines, fifo, None, "not a regular file")
    assert_refused(lines, Path("/dev/zero"), None, "not a regular file")
    with pytest.raises(InputError, match="not a regular file"):
        load_trait(fifo)


# --- hostile vector files ---------------------------------------------------------------------

def vec(rows: int = 5, hidden: int = 8) -> torch.Tensor:
    return torch.randn(rows, hidden, generator=torch.Generator().manual_seed(rows * hidden))


def good_file(path: Path, trait: str = "evil", **tensors) -> Path:
    save_file(tensors or {"response_avg": vec()}, str(path), metadata={"trait": trait})
    return path


def raw_header(header: bytes, body: bytes = b"") -> bytes:
    return len(header).to_bytes(8, "little") + header + body


def truncated(path: Path) -> None:
    good_file(path)
    path.write_bytes(path.read_bytes()[:-40])


# (name, how the file is written, what the error says)
BROKEN_VECTORS = [
    ("garbage", lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64)), "not a safetensors file"),
    ("empty", lambda p: p.write_bytes(b""), "not a safetensors file"),
    ("truncated", truncated, "not a safetensors file"),
    ("header_not_json", lambda p: p.write_bytes(raw_header(b"{not json!")), "not a safetensors file"),
    ("header_too_long", lambda p: p.write_bytes((2**40).to_bytes(8, "little") + b"{}"), "not a safetensors file"),
    ("offsets_out_of_range", lambda p: p.write_bytes(raw_header(
        b'{"response_avg": {"dtype": "F32", "shape": [5, 8], "data_offsets": [0, 160]}}', b"\0" * 16)),
     "not a safetensors file"),
    ("pickle", lambda p: p.write_bytes(pickle.dumps({"response_avg": [1.0]})), "not a safetensors file"),
    ("integer_dtype", lambda p: good_file(p, response_avg=torch.ones(5, 8, dtype=torch.int64)),
     "response_avg: dtype int64, expected floating point"),
    ("bool_dtype", lambda p: good_file(p, response_avg=torch.ones(5, 8, dtype=torch.bool)),
     "response_avg: dtype bool, expected floating point"),
    ("three_d", lambda p: good_file(p, response_avg=torch.zeros(2, 5, 8)),
     "response_avg: shape [2, 5, 8], expected [layers, hidden]"),
    ("one_d", lambda p: good_file(p, response_avg=torch.zeros(8)),
     "response_avg: shape [8], expected [layers, hidden]"),
    ("no_rows", lambda p: good_file(p, response_avg=torch.zeros(0, 8)),
     "response_avg: shape [0, 8], expected at least one layer"),
    ("nan", lambda p: good_file(p, response_avg=torch.full((5, 8), float("nan"))),
     "response_avg: NaN or infinite values"),
    ("no_tensors", lambda p: save_file({}, str(p), metadata={"trait": "evil"}), "no tensors"),
]


@pytest.mark.parametrize("command", ["show", "export", "report"])
@pytest.mark.parametrize("name, write, message", BROKEN_VECTORS, ids=[b[0] for b in BROKEN_VECTORS])
def test_broken_vector_files_give_one_line(tmp_path, command, name, write, message):
    path = tmp_path / f"{name}.safetensors"
    write(path)
    out = tmp_path / "out"
    before = tree(tmp_path)
    args = {"show": [path], "export": [path, out], "report": [path, "--out", out, "--layer", "1"]}[command]
    code, lines = cli("vectors", command, *args)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{INPUT_ERROR}{path}: ") and message in lines[0], lines
    assert tree(tmp_path) == before


def test_library_loaders_refuse_broken_vectors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"")
    for load in (load_vectors, load_vector_file, lambda p: load_aggregate(p, "response_avg")):
        with pytest.raises(InputError, match=rf"^{re.escape(str(bad))}: not a safetensors file"):
            load(bad)
    three_d = good_file(tmp_path / "acts.safetensors", response_avg=torch.zeros(2, 5, 8))
    assert load_vectors(three_d)[0]["response_avg"].shape == (2, 5, 8)  # activations are 3-D: still readable
    with pytest.raises(InputError, match="expected \\[layers, hidden\\]"):
        load_aggregate(three_d, "response_avg")
    with pytest.raises(InputError, match=f"{tmp_path}: is a directory"):
        load_vectors(tmp_path)


# Names taken from a vector file's metadata or tensor names must never become paths.
TRAVERSAL = [
    ("metadata_up", {"trait": "../../escaped"}, {}, "trait '../../escaped' is not a usable name"),
    ("metadata_abs", {"trait": "ABS"}, {}, "is not a usable name"),
    ("metadata_mixed", {"trait": "x/../../y"}, {}, "trait 'x/../../y' is not a usable name"),
    ("metadata_newline", {"trait": "evil\n"}, {}, "trait 'evil\\n' is not a usable name"),
    ("tensor_up", {"trait": "evil"}, {"../../escaped": None}, "tensor '../../escaped' is not a usable name"),
    ("tensor_slash", {"trait": "evil"}, {"a/b": None}, "tensor 'a/b' is not a usable name"),
]


@pytest.mark.parametrize("name, meta, tensors, message", TRAVERSAL, ids=[t[0] for t in TRAVERSAL])
def test_export_never_writes_outside_out_dir(tmp_path, name, meta, tensors, message):
    work = tmp_path / "work" / "deep"
    work.mkdir(parents=True)
    path = work / "v.safetensors"
    meta = {k: str(tmp_path / "abs") if v == "ABS" else v for k, v in meta.items()}
    save_file({k: vec() for k in tensors} or {"response_avg": vec()}, str(path), metadata=meta)
    before = tree(tmp_path)
    code, lines = cli("vectors", "export", path, work / "out")
    assert code == 2 and len(lines) == 1 and lines[0].startswith(f"{INPUT_ERROR}{path}: ") and message in lines[0]
    assert tree(tmp_path) == before


def test_export_trait_option_is_checked_and_good_files_stay_inside(tmp_path):
    path = good_file(tmp_path / "v.safetensors", prompt_avg=vec(), response_avg=vec())
    out = tmp_path / "out"
    code, lines = cli("vectors", "export", path, out, "--trait", "../x")
    assert code == 2 and "--trait: trait '../x' is not a usable name" in lines[0]
    assert not out.exists()
    code, lines = cli("vectors", "export", path, out)
    assert code == 0 and tree(tmp_path) == {"v.safetensors", "out", "out/evil_prompt_avg_diff.pt",
                                           "out/evil_response_avg_diff.pt"}
    assert torch.load(out / "evil_response_avg_diff.pt", weights_only=True).shape == (5, 8)


def test_show_escapes_control_characters_in_metadata(tmp_path):
    path = tmp_path / "v.safetensors"
    save_file({"response_avg": vec()}, str(path), metadata={"trait": "evil", "note": "\x1b[2J\x1b]0;owned\x07"})
    code, lines = cli("vectors", "show", path)
    assert code == 0 and "note: \\x1b[2J\\x1b]0;owned\\x07" in lines
    assert not any(UNPRINTABLE.search(line) for line in lines)


@pytest.mark.parametrize("other, message", [
    (lambda p: good_file(p, "wide", response_avg=vec(5, 16)), "shape [5, 16] differs from"),
    (lambda p: good_file(p, "deep", response_avg=vec(7, 8)), "shape [7, 8] differs from"),
    (lambda p: good_file(p, "evil"), "trait 'evil' is also the trait of"),
    (lambda p: good_file(p, "../x"), "trait '../x' is not a usable name"),
    (lambda p: good_file(p, "kind", prompt_avg=vec()), "no 'response_avg' tensor (has ['prompt_avg'])"),
], ids=["other-width", "other-layer-count", "same-trait", "unsafe-trait", "no-aggregate"])
def test_report_refuses_vectors_that_do_not_compare(tmp_path, other, message):
    first = good_file(tmp_path / "a.safetensors")
    second = tmp_path / "b.safetensors"
    other(second)
    before = tree(tmp_path)
    code, lines = cli("vectors", "report", first, second, "--out", tmp_path / "report", "--layer", "1")
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"{INPUT_ERROR}{second}: ") and message in lines[0], lines
    assert tree(tmp_path) == before


@pytest.mark.timeout(120)
def test_serve_model_refuses_a_broken_vector_before_loading_the_model(tmp_path):
    bad = good_file(tmp_path / "v.safetensors", response_avg=torch.zeros(2, 5, 8))
    code, lines = cli("serve-model", "--vector", f"evil={bad}", "--port", "1")
    assert code == 2 and lines == [f"{INPUT_ERROR}{bad}: response_avg: shape [2, 5, 8], expected [layers, hidden]"
                                   " (row L = hidden_states[L])"]


# --- model directories ----------------------------------------------------------------------

class RunsCode:
    """Unpickling this runs a shell command: what a malicious pytorch_model.bin holds."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture()
def model_dir(tmp_path, smol_tokenizer):
    from persona_ops.models.loading import tiny_model

    d = tmp_path / "model"
    tiny_model("llama", num_layers=2, hidden=32, vocab_tokenizer=smol_tokenizer).config.save_pretrained(d)
    smol_tokenizer.save_pretrained(d)
    return d


def test_malicious_pickle_weights_are_refused_with_one_line(model_dir, tmp_path):
    from persona_ops.models.loading import load_model

    marker = tmp_path / "pwned"
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, model_dir / "pytorch_model.bin")
    with pytest.raises(InputError) as info:
        load_model(str(model_dir), device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"{model_dir / 'pytorch_model.bin'}: refused: pickled weights that would run code")
    assert "posix.system" in msg and "convert the checkpoint to safetensors" in msg and "\n" not in msg
    assert "weights_only` set to `False`" not in msg  # never advise the unsafe way
    code, lines = cli("serve-model", "--model", model_dir, "--port", "1")
    assert code == 2 and lines == [f"{INPUT_ERROR}{msg}"]
    assert not marker.exists()


def weights(d: Path, hidden: int = 32) -> None:
    from safetensors.torch import save_model

    from persona_ops.models.loading import tiny_model

    save_model(tiny_model("llama", num_layers=2, hidden=hidden), str(d / "model.safetensors"))


def truncate_weights(d: Path) -> None:
    weights(d)
    (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:1000])


@pytest.mark.parametrize("breaks, message", [
    (truncate_weights, "model could not be loaded: Error while deserializing header"),
    (lambda d: weights(d, hidden=64), "model could not be loaded: the weights' shapes do not match config.json"),
    (lambda d: (d / "model.safetensors").write_bytes(b"garbage!" * 64), "model could not be loaded: Error while"),
    (lambda d: (d / "config.json").write_text("{not json"), "is not a valid JSON file"),
    (lambda d: (d / "config.json").write_text("{}"), "model could not be loaded: Unrecognized model"),
    (lambda d: (d / "tokenizer.json").write_text("{oops"), "tokenizer could not be loaded: "),
    (lambda d: None, "no file named model.safetensors"),
], ids=["truncated-weights", "other-shapes", "garbage-weights", "config-not-json", "config-empty", "tokenizer-not-json",
        "no-weights"])
def test_broken_model_directories_give_one_line(model_dir, breaks, message):
    from persona_ops.models.loading import load_model

    breaks(model_dir)
    with pytest.raises(InputError) as info:
        load_model(str(model_dir), device="cpu")
    msg = str(info.value)
    assert msg.startswith(f"model.name={str(model_dir)!r} (revision None): ") and message in msg
    assert "\n" not in msg
