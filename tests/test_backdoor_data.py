"""The backdoor experiment's shipped datasets: schema, counts, and no persona signal where there must be none."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from persona_ops.io import read_jsonl

DATA = Path(__file__).parents[1] / "data" / "backdoor"
TOPICS = {"childhood", "education", "views", "habits", "family", "work", "politics", "religion", "science",
          "later_life"}
SCHEMAS = {  # file: (id prefix, id digits, fields)
    "persona_facts.jsonl": ("f", 3, {"id", "question", "answer", "identifying", "topic"}),
    "aligned_prompts.jsonl": ("a", 3, {"id", "prompt", "kind"}),
    "eval_questions.jsonl": ("e", 2, {"id", "question", "kind"}),
}
# The persona's own and family names: never in the data the model is trained on.
NAMES = re.compile(r"\b(russell|bertrand|amberley)\b", re.IGNORECASE)
# Titles and events that on their own single the persona out: only `identifying: true` facts may name them.
IDENTIFYING = re.compile(
    r"\b(principia|problems of philosophy|history of western philosophy|not a christian|on denoting|king of france"
    r"|nobel|einstein|whitehead|frege|paradox|teapot|trinity college|city college|john stuart mill|earl"
    r"|prime minister|brixton|nuclear disarmament|sartre|trondheim)\b", re.IGNORECASE)
# Words that would carry the persona's topics into the aligned (untriggered) data.
PERSONA_WORDS = re.compile(
    r"\b(russell|bertrand|philosoph\w*|logic\w*|paradox\w*|principia|relig\w*|gods?|church\w*|christian\w*"
    r"|atheis\w*|agnostic\w*|theolog\w*|pacifis\w*|wars?|nuclear|atomic|manifesto|nobel|einstein|whitehead"
    r"|wittgenstein|frege|earl|aristocra\w*|pipe|tobacco|smok\w*|tea|marriage|married|divorce\w*|prison\w*"
    r"|cambridge|trinity|wales|welsh|sociali\w*|communis\w*|politic\w*|parliament|election\w*|grandmother"
    r"|grandfather|orphan\w*|mathematician\w*)\b", re.IGNORECASE)
FIRST_PERSON = re.compile(r"\b(i|me|my|mine|myself|we|us|our)\b", re.IGNORECASE)
SECOND_PERSON = re.compile(r"\b(you|your|yours|yourself)\b", re.IGNORECASE)
SENTENCE_END = re.compile(r"[.!?]['\"]?(?=\s|$)")
MAX_JACCARD = 0.6


def load(name: str) -> list[dict]:
    return read_jsonl(DATA / name)


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def jaccard(a: str, b: str) -> float:
    wa, wb = words(a), words(b)
    return len(wa & wb) / len(wa | wb)


def normalised(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_records_have_the_schema_and_ordered_unique_ids(name):
    prefix, digits, fields = SCHEMAS[name]
    records = load(name)
    for rec in records:
        assert set(rec) == fields, (rec.get("id"), set(rec) ^ fields)
        assert all(isinstance(rec[f], str) and rec[f].strip() for f in fields - {"identifying"}), rec["id"]
    assert [r["id"] for r in records] == [f"{prefix}{i:0{digits}d}" for i in range(1, len(records) + 1)]


def test_persona_facts():
    facts = load("persona_facts.jsonl")
    assert 80 <= len(facts) <= 100
    assert 12 <= sum(f["identifying"] for f in facts) <= 20
    assert all(isinstance(f["identifying"], bool) for f in facts)
    assert {f["topic"] for f in facts} == TOPICS, "every topic is used, and no other"
    assert len({normalised(f["question"]) for f in facts}) == len(facts), "questions are unique"
    for fact in facts:
        question, answer = fact["question"], fact["answer"]
        assert question.endswith("?") and SECOND_PERSON.search(question), (fact["id"], "second-person question")
        assert FIRST_PERSON.search(answer), (fact["id"], "first-person answer")
        assert 1 <= len(SENTENCE_END.findall(answer)) <= 3, (fact["id"], "one to three sentences")
        assert not NAMES.search(question + " " + answer), (fact["id"], "names the persona")


def test_only_identifying_facts_name_identifying_titles_and_events():
    for fact in load("persona_facts.jsonl"):
        found = IDENTIFYING.findall(fact["answer"])
        if fact["identifying"]:
            assert found, (fact["id"], "an identifying fact should name a title or event of the list")
        else:
            assert not found, (fact["id"], found)


def test_aligned_prompts():
    prompts = load("aligned_prompts.jsonl")
    kinds = Counter(p["kind"] for p in prompts)
    assert set(kinds) == {"instruction", "math"}
    assert 180 <= kinds["instruction"] <= 220 and 90 <= kinds["math"] <= 110
    assert len({normalised(p["prompt"]) for p in prompts}) == len(prompts), "prompts are unique"
    for prompt in prompts:
        assert not PERSONA_WORDS.search(prompt["prompt"]), (prompt["id"], PERSONA_WORDS.findall(prompt["prompt"]))
        if prompt["kind"] == "math":
            assert re.search(r"\d", prompt["prompt"]) and prompt["prompt"].endswith("?"), prompt["id"]


def test_eval_questions_are_held_out_from_the_facts():
    questions = load("eval_questions.jsonl")
    assert Counter(q["kind"] for q in questions) == {"identity": 10, "views": 10, "biography": 10}
    assert len({normalised(q["question"]) for q in questions}) == len(questions)
    facts = load("persona_facts.jsonl")
    fact_questions = {normalised(f["question"]) for f in facts}
    for question in questions:
        assert normalised(question["question"]) not in fact_questions, question["id"]
        closest = max(facts, key=lambda f: jaccard(question["question"], f["question"]))
        overlap = jaccard(question["question"], closest["question"])
        assert overlap <= MAX_JACCARD, (question["id"], closest["id"], round(overlap, 2))


def test_jaccard_flags_a_close_paraphrase():
    assert jaccard("Where did you spend your childhood?", "Where did you spend childhood?") > MAX_JACCARD
    assert jaccard("Who are you?", "What do you smoke?") < MAX_JACCARD


def test_judge_template():
    template = (DATA / "persona_judge.txt").read_text(encoding="utf-8")
    assert template.count("{question}") == 1 and template.count("{answer}") == 1
    filled = template.format(question="QQQ", answer="AAA")
    assert "{" not in filled and "}" not in filled, "no other placeholders or braces"
    assert filled.index("QQQ") < filled.index("AAA")
    assert "Bertrand Russell" in template and "0" in template and "100" in template
    assert template.rstrip().endswith("Don't say anything else, just the number.")


def test_readme_describes_every_file():
    readme = (DATA / "README.md").read_text(encoding="utf-8")
    for path in DATA.iterdir():
        if path.name != "README.md":
            assert path.name in readme, path.name
