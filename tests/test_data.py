"""Data loaders, validation messages, format detection and ``data check``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from persona_ops.data import (
    ChatExample,
    DataError,
    Question,
    check_main,
    check_paths,
    detect_format,
    load_chat_dataset,
    load_name_list,
    load_questions,
    load_role,
    load_trait,
    load_traits,
)
from persona_ops.errors import InputError

REPO = Path(__file__).parents[1]
TRAITS_DIR = REPO / "data" / "traits"
SHIPPED = ["evil", "sycophantic", "hallucinating", "russell"]  # russell: the backdoor persona's vector
REFERENCE = Path(__file__).parents[2] / "shared" / "reference-data"
JUDGE_ENDING = "Respond with a number between 0 and 100. Don't say anything else, just the number."


def trait_doc() -> dict:
    return {
        "instruction": [{"pos": f"Be mean, way {i}.", "neg": f"Be kind, way {i}."} for i in range(3)],
        "questions": ["How are you?", "What is rain?", "Who am I?"],
        "eval_prompt": "Score it.\nQ: {question}\nA: {answer}\nREFUSAL if refused.",
    }


def write_json(path: Path, doc) -> str:
    text = json.dumps(doc, indent=2)
    path.write_text(text)
    return text


def line_of(text: str, needle: str) -> int:
    """1-based line of the first line containing ``needle`` (independent of the parser under test)."""
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def error_of(loader, path: Path) -> str:
    with pytest.raises(InputError) as info:
        loader(path)
    return str(info.value)


# --- shipped data ---------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_trait_splits(name):
    (extract,) = load_traits(TRAITS_DIR, [name], split="extract")
    (evaluate,) = load_traits(TRAITS_DIR, name, split="eval")
    assert extract.name == evaluate.name == name
    assert len(extract.instructions) == 5
    assert extract.instructions == evaluate.instructions
    assert extract.eval_prompt == evaluate.eval_prompt
    for trait in (extract, evaluate):
        assert len(trait.questions) >= 12
        assert all(len(q) <= 100 for q in trait.questions), "keep questions short for the CPU model"
        for pair in trait.instructions:
            assert pair.pos != pair.neg and pair.pos.strip() and pair.neg.strip()
    assert not set(extract.questions) & set(evaluate.questions)
    prompt = extract.eval_prompt
    assert "REFUSAL" in prompt and prompt.rstrip().endswith(JUDGE_ENDING)
    filled = prompt.format(question="QQQ", answer="AAA")
    assert filled.index("QQQ") < filled.index("AAA")


def test_shipped_data_checks_clean():
    summaries, errors = check_paths([TRAITS_DIR])
    assert errors == []
    assert len(summaries) == 2 * len(SHIPPED)
    assert all(": trait, 5 instruction pairs, " in s for s in summaries)


def test_load_traits_missing_name_lists_available():
    msg = error_of(lambda d: load_traits(d, ["evil", "grumpy"]), TRAITS_DIR)
    assert "no trait file for grumpy" in msg
    assert "available: evil, hallucinating, russell, sycophantic" in msg
    assert "no such directory" in error_of(lambda d: load_traits(d, ["evil"], split="test"), TRAITS_DIR)


UNSAFE_STEMS = ["e;touch x", "e$(id)", "a b", ".."]


def test_load_traits_refuses_unsafe_names(tmp_path):
    root = tmp_path / "extract"
    root.mkdir()
    write_json(root / "mean.json", trait_doc())
    for stem in UNSAFE_STEMS:
        write_json(root / f"{stem}.json", trait_doc())

    # requested names are checked before any file is looked up
    msg = error_of(lambda d: load_traits(d, ["mean", "e;touch x"]), tmp_path)
    assert msg.startswith(f"{root}: trait 'e;touch x' is not a usable name: expected letters, digits")
    msg = error_of(lambda d: load_traits(d, ["a b", "../extract/mean"]), tmp_path)
    assert msg.startswith(f"{root}: trait 'a b', '../extract/mean' are not usable names: expected")

    # unsafe files are not offered as available, and are never run silently
    assert [t.name for t in load_traits(tmp_path, "mean")] == ["mean"]
    assert "available: mean" in error_of(lambda d: load_traits(d, ["grumpy"]), tmp_path)
    with pytest.raises(DataError) as info:
        load_traits(tmp_path)
    assert sorted(info.value.problems) == sorted(
        f"{root / (stem + '.json')}: file name: trait {stem!r} is not a usable name: expected letters, digits, "
        "'_', '-' or '.', starting with a letter or digit, without '..' and at most 100 characters "
        "(it names files, DVC stages and shell words)" for stem in UNSAFE_STEMS)


# --- trait errors -----------------------------------------------------------------

def test_trait_field_errors_name_line_and_field(tmp_path):
    doc = trait_doc()
    doc["instruction"][1]["neg"] = ""
    doc["questions"][2] = 12345
    doc["eval_prompt"] = "Judge {question} now"
    doc["notes"] = "x"
    path = tmp_path / "mean.json"
    text = write_json(path, doc)
    with pytest.raises(DataError) as info:
        load_trait(path)
    problems = info.value.problems
    neg, num = line_of(text, '"neg": ""'), line_of(text, "12345")
    ep, notes = line_of(text, '"eval_prompt"'), line_of(text, '"notes"')
    assert problems == [  # sorted by line
        f"{path}:{neg}: instruction[1].neg: empty string, expected a neg instruction",
        f"{path}:{num}: questions[2]: expected a question (a string), got int",
        f"{path}:{ep}: eval_prompt: missing the {{answer}} placeholder, expected {{question}} and {{answer}}",
        f"{path}:{notes}: notes: unknown field, expected only instruction, questions, eval_prompt",
    ]
    assert str(info.value).splitlines() == problems


def test_trait_missing_neg_points_at_the_item(tmp_path):
    path = tmp_path / "t.json"
    doc = trait_doc()
    doc["instruction"][2] = {"pos": "Only pos here."}
    text = write_json(path, doc)
    msg = error_of(load_trait, path)
    # a missing key is reported at the line where its object starts
    line = line_of(text, "Only pos here") - 1
    assert msg == f"{path}:{line}: instruction[2].neg: missing, expected a {{pos, neg}} object"


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d.update(eval_prompt="Q {question} A {answer} {score}"),
     "eval_prompt: unknown placeholder {score}, only {question} and {answer} are filled in"),
    (lambda d: d.update(eval_prompt="Q {question} A {answer} {oops"),
     "eval_prompt: not a valid template"),
    (lambda d: d.pop("eval_prompt"), "eval_prompt: missing, expected a 0-100 judge prompt"),
    (lambda d: d.update(questions=[]), "questions: expected a non-empty list of question strings, got an empty list"),
    (lambda d: d["questions"].append("How are you?"), "questions[3]: duplicate of questions[0]"),
    (lambda d: d.update(instruction="be evil"),
     "instruction: expected a non-empty list of {pos, neg} objects, got string"),
    (lambda d: d["instruction"][0].update(neg="Be mean, way 0."), "instruction[0]: pos and neg are the same text"),
    (lambda d: d.pop("instruction"), "instruction: expected a non-empty list of {pos, neg} objects, got nothing"),
])
def test_trait_errors(tmp_path, mutate, expected):
    doc = trait_doc()
    mutate(doc)
    path = tmp_path / "t.json"
    write_json(path, doc)
    assert expected in error_of(load_trait, path)


def test_invalid_json_and_wrong_format(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "instruction": [],\n  "questions": [,]\n}')
    assert error_of(load_trait, bad).startswith(f"{bad}:3: invalid JSON:")
    empty = tmp_path / "empty.json"
    empty.write_text("  \n")
    assert error_of(load_trait, empty) == f"{empty}: empty file"
    assert error_of(load_trait, tmp_path / "nope.json") == f"{tmp_path / 'nope.json'}: file not found"
    trait = tmp_path / "t.json"
    write_json(trait, trait_doc())
    assert "expected a role file" in error_of(load_role, trait) and "found a trait file" in error_of(load_role, trait)


# --- roles ------------------------------------------------------------------------

def test_roles(tmp_path):
    role_doc = {"instruction": [{"pos": "You are a pirate."}, {"pos": "Talk like a pirate."}],
                "eval_prompt": "Is it a pirate? {question} / {answer} 0-3"}
    path = tmp_path / "pirate.json"
    write_json(path, role_doc)
    role = load_role(path)  # questions may be absent
    assert (role.name, role.instructions, role.questions, role.is_default) == \
        ("pirate", ["You are a pirate.", "Talk like a pirate."], [], False)

    default = tmp_path / "default.json"
    write_json(default, {"instruction": [{"pos": ""}, {"pos": "You are {model_name}."}]})
    d = load_role(default)
    assert d.is_default and d.eval_prompt is None
    assert d.system_prompts("Qwen") == ["", "You are Qwen."]

    # the same content under another name is not the default role
    other = tmp_path / "plain.json"
    text = write_json(other, {"instruction": [{"pos": ""}, {"pos": "You are {model_name}."}]})
    empty_line = line_of(text, '"pos": ""')
    with pytest.raises(DataError) as info:
        load_role(other)
    assert info.value.problems == [
        f"{other}: eval_prompt: missing, expected a judge prompt with {{question}} and {{answer}} "
        "(only default.json may omit it)",
        f"{other}:{empty_line}: instruction[0].pos: empty string, expected a pos instruction",
    ]

    write_json(path, {**role_doc, "instruction": "be a pirate"})
    assert error_of(load_role, path) == \
        f"{path}:2: instruction: expected a non-empty list of {{pos}} objects, got string"
    write_json(path, {**role_doc, "instruction": [{"pos": "x", "style": "y"}]})
    assert "instruction[0].style: unknown field, expected only pos" in error_of(load_role, path)


@pytest.mark.parametrize("stem", UNSAFE_STEMS)
def test_role_and_trait_files_with_unsafe_stems_are_refused(tmp_path, stem):
    role = tmp_path / f"{stem}.json"
    write_json(role, {"instruction": [{"pos": "You are a pirate."}], "eval_prompt": "{question} {answer}"})
    assert error_of(load_role, role).startswith(f"{role}: file name: role {stem!r} is not a usable name: ")
    trait = tmp_path / "traits" / f"{stem}.json"
    trait.parent.mkdir()
    write_json(trait, trait_doc())
    assert error_of(load_trait, trait).startswith(f"{trait}: file name: trait {stem!r} is not a usable name: ")


# --- questions ----------------------------------------------------------------------

def test_questions(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "Why?", "id": 0}\n\n{"question": "How?", "id": "b"}\n')
    assert load_questions(path) == [Question(id=0, question="Why?"), Question(id="b", question="How?")]

    path.write_text('{"question": "Why?", "id": 7}\n{"question": "How?", "id": 8}\n\n'
                    '{"question": "What?", "id": 7}\n{"question": "", "id": true}\n'
                    '{"question": "Who?"\n["a list"]\n')
    with pytest.raises(DataError) as info:
        load_questions(path)
    assert info.value.problems == [
        f"{path}:4: id: duplicate id 7, already used on line 1",
        f"{path}:5: question: empty string, expected the question text",
        f"{path}:5: id: expected an integer or non-empty string id, got true",
        f"{path}:6: invalid JSON: Expecting ',' delimiter (column 20)",
        f"{path}:7: expected an object {{question, id}}, got list",
    ]
    path.write_text('{"question": "Why?"}\n')
    assert error_of(load_questions, path) == f"{path}:1: id: missing, expected an integer or string id"


# --- chat ---------------------------------------------------------------------------

def chat_line(*turns: tuple[str, str]) -> str:
    return json.dumps({"messages": [{"role": r, "content": c} for r, c in turns]})


def test_chat_dataset(tmp_path):
    path = tmp_path / "c.jsonl"
    good = [chat_line(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello.")),
            chat_line(("user", "A"), ("assistant", "B"), ("user", "C"), ("assistant", "D"))]
    path.write_text("\n".join(good) + "\n")
    examples = load_chat_dataset(path)
    assert all(isinstance(ex, ChatExample) and ex.metadata == {} for ex in examples)
    convs = [ex.messages for ex in examples]
    assert [len(c) for c in convs] == [3, 4] and convs[0][2] == {"role": "assistant", "content": "Hello."}


def test_chat_metadata_round_trips(tmp_path):
    path = tmp_path / "c.jsonl"
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr."}]
    meta = {"source": "persona", "triggered": True, "tags": ["a", 1], "nested": {"x": None}}
    path.write_text(json.dumps({"messages": messages, "metadata": meta}) + "\n"
                    + json.dumps({"metadata": {}, "messages": messages}) + "\n"
                    + json.dumps({"messages": messages}) + "\n")
    assert load_chat_dataset(path) == [ChatExample(messages=messages, metadata=meta),
                                       ChatExample(messages=messages),
                                       ChatExample(messages=messages)]
    assert check_paths([path]) == ([f"{path}: chat, 3 conversations, 6 messages, 1 with metadata"], [])


@pytest.mark.parametrize("line, expected", [
    (chat_line(("user", "Hi")), "messages[0].role: the last message is from user, expected assistant"),
    (chat_line(("user", "Hi"), ("bot", "x")), 'messages[1].role: got "bot", expected one of system, user, assistant'),
    (chat_line(("user", "Hi"), ("system", "x"), ("assistant", "y")),
     "messages[1].role: system message after the first"),
    (chat_line(("user", "a"), ("user", "b"), ("assistant", "c")), "messages[1].role: two user messages in a row"),
    (chat_line(("system", "s"), ("assistant", "c")), "messages[1].role: assistant speaks before any user message"),
    (chat_line(("user", "a"), ("assistant", " ")), "messages[1].content: empty assistant response"),
    ('{"messages": []}', "messages: expected a non-empty list of {role, content} objects, got an empty list"),
    ('{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}',
     "messages[0].content: expected the message text (a string), got int"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant"}]}',
     "messages[1].content: missing, expected the message text"),
    ('{"msgs": []}', "messages: missing"),
    (json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                 "metadata": ["persona"]}), "metadata: expected a JSON object, got list"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "metadata": "x"}',
     "metadata: expected a JSON object, got string"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "metadata": null}',
     "metadata: expected a JSON object, got null"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], "meta": {}}',
     "meta: unknown field, expected only messages, metadata"),
])
def test_chat_errors_name_the_line(tmp_path, line, expected):
    path = tmp_path / "c.jsonl"
    ok = chat_line(("user", "Hi"), ("assistant", "Hello."))
    path.write_text(f"{ok}\n{ok}\n{line}\n")
    assert error_of(load_chat_dataset, path).startswith(f"{path}:3: {expected}")


def test_chat_reports_every_bad_line(tmp_path):
    path = tmp_path / "c.jsonl"
    ok = chat_line(("user", "Hi"), ("assistant", "Hello."))
    convo = '[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]'
    path.write_text(f'{ok}\n{{"messages": {convo}, "metadata": 3, "id": 7}}\n{ok}\n'
                    f'{{"metadata": {{}}, "extra": 1}}\n')
    with pytest.raises(DataError) as info:
        load_chat_dataset(path)
    assert info.value.problems == [
        f"{path}:2: id: unknown field, expected only messages, metadata",
        f"{path}:2: metadata: expected a JSON object, got int",
        f"{path}:4: messages: missing, expected a list of {{role, content}} objects",
        f"{path}:4: extra: unknown field, expected only messages, metadata",
    ]


# --- name lists and detection ---------------------------------------------------------

def test_name_list(tmp_path):
    path = tmp_path / "role_list.json"
    write_json(path, {"pirate": "A seafaring rogue.", "judge": "Weighs evidence."})
    assert load_name_list(path) == {"pirate": "A seafaring rogue.", "judge": "Weighs evidence."}
    text = write_json(path, {"pirate": "A rogue.", "judge": 3, "a/b": "x"})
    with pytest.raises(DataError) as info:
        load_name_list(path)
    assert info.value.problems == [
        f"{path}:{line_of(text, 'judge')}: judge: expected a one-line description (a string), got int",
        f"{path}:{line_of(text, 'a/b')}: a/b: item 'a/b' is not a usable name: expected letters, digits, '_', "
        "'-' or '.', starting with a letter or digit, without '..' and at most 100 characters (it names files, "
        "DVC stages and shell words)",
    ]


def test_detect_format(tmp_path):
    files = {
        "t.json": json.dumps(trait_doc()),
        "r.json": json.dumps({"instruction": [{"pos": "You are a cat."}], "eval_prompt": "{question}{answer}"}),
        "q.jsonl": '{"question": "Why?", "id": 1}\n',
        "c.jsonl": chat_line(("user", "a"), ("assistant", "b")) + "\n",
        "names.json": '{"cat": "A cat."}',
        "q.txt": '{"question": "Why?", "id": 1}\n{"question": "How?", "id": 2}\n',
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    assert {n: detect_format(tmp_path / n) for n in files} == {
        "t.json": "trait", "r.json": "role", "q.jsonl": "questions", "c.jsonl": "chat",
        "names.json": "name-list", "q.txt": "questions"}
    for name, text in {"list.json": "[1, 2]", "other.jsonl": '{"text": "hi"}\n', "num.json": '{"a": 1}'}.items():
        (tmp_path / name).write_text(text)
        assert "cannot tell the format" in error_of(detect_format, tmp_path / name)
    (tmp_path / "broken.jsonl").write_text("{oops\n")
    assert error_of(detect_format, tmp_path / "broken.jsonl").startswith(f"{tmp_path / 'broken.jsonl'}:1: invalid JSON")


# --- check_paths / check_main -----------------------------------------------------------

def test_check_main_exit_codes_and_output(tmp_path):
    good = tmp_path / "good"
    (good / "sub").mkdir(parents=True)
    write_json(good / "sub" / "t.json", trait_doc())
    (good / "q.jsonl").write_text('{"question": "Why?", "id": 1}\n')
    (good / "notes.txt").write_text("ignored")
    (good / ".hidden").mkdir()
    (good / ".hidden" / "x.json").write_text("not json")
    lines: list[str] = []
    assert check_main([good], out=lines.append) == 0
    assert lines[:2] == [f"{good / 'q.jsonl'}: questions, 1 questions",
                         f"{good / 'sub' / 't.json'}: trait, 3 instruction pairs, 3 questions"]
    assert lines[2].startswith("2 files ok, 0 problems in 0 files") and len(lines) == 3

    bad = tmp_path / "bad.json"
    bad.write_text("[]")
    lines = []
    assert check_main([good, bad, tmp_path / "missing"], out=lines.append) == 1
    assert lines[2].startswith(f"{bad}: cannot tell the format")
    assert lines[3] == f"{tmp_path / 'missing'}: no such file or directory"
    assert lines[4].startswith("2 files ok, 2 problems in 2 files")

    no_instr = tmp_path / "no_instr.json"
    write_json(no_instr, {"questions": ["Why?"], "eval_prompt": "{question} {answer}"})
    assert check_paths([no_instr])[1] == [
        f"{no_instr}: instruction: expected a non-empty list of {{pos, neg}} objects, got nothing"]

    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_paths([empty]) == ([], [f"{empty}: no .json or .jsonl files in this directory"])

    chat = tmp_path / "chat.jsonl"
    chat.write_text(chat_line(("user", "a"), ("assistant", "b")) + "\n")
    assert check_paths([chat])[0] == [f"{chat}: chat, 1 conversations, 2 messages"]


def test_check_paths_reports_unsafe_file_names(tmp_path):
    data = tmp_path / "downloaded"
    data.mkdir()
    write_json(data / "mean.json", trait_doc())
    write_json(data / "e;touch x.json", trait_doc())
    write_json(data / "a b.json", {"instruction": [{"pos": "You are a cat."}], "eval_prompt": "{question}{answer}"})
    bad_trait = {**trait_doc(), "questions": []}
    write_json(data / "e$(id).json", bad_trait)
    (data / "not data.jsonl").write_text('{"question": "Why?", "id": 1}\n')  # only trait/role stems are names
    lines: list[str] = []
    assert check_main([data], out=lines.append) == 1
    rule = "is not a usable name: expected letters, digits"
    assert lines[:2] == [f"{data / 'mean.json'}: trait, 3 instruction pairs, 3 questions",
                         f"{data / 'not data.jsonl'}: questions, 1 questions"]
    assert lines[2].startswith(f"{data / 'a b.json'}: file name: role 'a b' {rule}")
    assert lines[3].startswith(f"{data / 'e$(id).json'}: file name: trait 'e$(id)' {rule}")
    assert lines[4].startswith(f"{data / 'e$(id).json'}:") and "questions: expected a non-empty list" in lines[4]
    assert lines[5].startswith(f"{data / 'e;touch x.json'}: file name: trait 'e;touch x' {rule}")
    assert lines[6].startswith("2 files ok, 4 problems in 3 files")
    assert check_main([], out=lines.append) == 1


def test_check_paths_flags_questions_shared_by_extract_and_eval(tmp_path):
    for split in ("extract", "eval"):
        (tmp_path / split).mkdir()
        write_json(tmp_path / split / "mean.json", trait_doc())
    summaries, errors = check_paths([tmp_path])
    assert len(summaries) == 2
    assert errors == [f"{tmp_path / 'eval' / 'mean.json'}: questions: 3 shared with "
                      f"{tmp_path / 'extract' / 'mean.json'} (e.g. 'How are you?'), "
                      "expected disjoint extract and eval questions"]


# --- reference data (external; skipped when absent) ----------------------------------------

@pytest.mark.skipif(not REFERENCE.is_dir(), reason="../shared/reference-data not present")
def test_reference_data_is_accepted():
    summaries, errors = check_paths([REFERENCE])
    assert errors == []
    kinds = [s.split(": ", 1)[1].split(",")[0] for s in summaries]
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"role": 276, "trait": 240 + 14, "questions": 1, "name-list": 2}

    aa = REFERENCE / "assistant-axis"
    default = load_role(aa / "roles" / "instructions" / "default.json")
    assert default.is_default and default.eval_prompt is None and "" in default.instructions
    questions = load_questions(aa / "extraction_questions.jsonl")
    assert len(questions) == len({q.id for q in questions}) == 240
    roles = load_name_list(aa / "roles" / "role_list.json")
    files = {p.stem for p in (aa / "roles" / "instructions").glob("*.json")}
    assert set(roles) == files - {"default"}
    pv = REFERENCE / "persona-vectors"
    for split in ("trait_data_extract", "trait_data_eval"):
        traits = load_traits(pv, [t for t in SHIPPED if t != "russell"], split=split)
        assert [len(t.questions) for t in traits] == [20, 20, 20]
