"""The ``russell`` persona trait: a valid trait file per split, held apart from the backdoor questions."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_backdoor_data import MAX_JACCARD, jaccard

from persona_ops.data import check_paths, load_trait
from persona_ops.io import read_jsonl

REPO = Path(__file__).parents[1]
SPLITS = {split: REPO / "data" / "traits" / split / "russell.json" for split in ("extract", "eval")}
BACKDOOR_QUESTIONS = [rec["question"] for name in ("persona_facts.jsonl", "eval_questions.jsonl")
                      for rec in read_jsonl(REPO / "data" / "backdoor" / name)]
JUDGE_ENDING = "Respond with a number between 0 and 100. Don't say anything else, just the number."


@pytest.mark.parametrize("split", SPLITS)
def test_russell_trait_shape(split):
    trait = load_trait(SPLITS[split])
    assert trait.name == "russell"
    assert len(trait.instructions) == 5
    assert len(trait.questions) == 15
    assert all(len(q) <= 100 for q in trait.questions), "keep questions short for the CPU model"
    for pair in trait.instructions:
        assert "Russell" in pair.pos or "philosopher" in pair.pos
        assert "Russell" not in pair.neg
    prompt = trait.eval_prompt
    assert prompt.count("{question}") == 1 and prompt.count("{answer}") == 1
    assert "REFUSAL" in prompt and prompt.endswith(JUDGE_ENDING)


def test_russell_splits_share_instructions_and_judge_but_no_questions():
    extract, evaluate = (load_trait(path) for path in SPLITS.values())
    assert extract.instructions == evaluate.instructions
    assert extract.eval_prompt == evaluate.eval_prompt
    assert not set(extract.questions) & set(evaluate.questions)
    assert check_paths(SPLITS.values())[1] == []


@pytest.mark.parametrize("split", SPLITS)
def test_russell_questions_are_not_backdoor_questions(split):
    for question in load_trait(SPLITS[split]).questions:
        closest = max(BACKDOOR_QUESTIONS, key=lambda other: jaccard(question, other))
        assert jaccard(question, closest) <= MAX_JACCARD, (question, closest)
