"""``generate-trait``: one request for instruction pairs, questions and a judge prompt in
persona_vectors' format, checked by the trait validation, the questions split between
``<out>/extract/<name>.json`` and ``<out>/eval/<name>.json`` (the layout persona-ops reads)."""

from __future__ import annotations

from pathlib import Path

from persona_ops.data import Trait
from persona_ops.datagen.prompts import trait_prompt
from persona_ops.datagen.replies import DatagenCfg, asker, parse_json, validated
from persona_ops.errors import InputError
from persona_ops.inference.openai_client import UnusableReply
from persona_ops.io import write_json
from persona_ops.names import check_name

SPLITS = ("extract", "eval")
_SHAPE = 'a trait object {"instruction": [{"pos", "neg"}], "questions": [...], "eval_prompt"}'


def check_trait_reply(text: str, name: str, instructions: int, questions: int) -> Trait:
    """The trait a reply holds, with at least the asked-for counts (the first ones kept)."""
    trait = validated("trait", parse_json(text, _SHAPE), stem=name)
    for field, got, want in (("instruction", len(trait.instructions), instructions),
                             ("questions", len(trait.questions), questions)):
        if got < want:
            raise UnusableReply(f"reply: {field}: {got} items, expected {want}")
    return trait.model_copy(update={"instructions": trait.instructions[:instructions],
                                    "questions": trait.questions[:questions]})


def trait_files(trait: Trait, out: Path) -> dict[str, Path]:
    """Write the trait's extract and eval files (first and second half of the questions)."""
    half = len(trait.questions) // 2
    parts = {"extract": trait.questions[:half], "eval": trait.questions[half:]}
    written = {}
    for split in SPLITS:
        path = Path(out) / split / f"{trait.name}.json"
        write_json(path, {"instruction": [pair.model_dump() for pair in trait.instructions],
                          "questions": parts[split], "eval_prompt": trait.eval_prompt})
        written[split] = path
    return written


def generate_trait(name: str, description: str, out: Path, cfg: DatagenCfg, questions: int = 40,
                   instructions: int = 5) -> dict[str, Path]:
    """Ask the model for trait ``name`` and write its files; returns them by split."""
    check_name(name, "trait")
    if not description.strip():
        raise InputError("--description: empty, expected what the trait is")
    if questions < 2 or instructions < 1:
        raise InputError(f"--questions {questions} / --instructions {instructions}: expected at least 2 "
                         "questions (one per split) and 1 instruction pair")
    endpoint = cfg.endpoint("trait generation")
    ask = asker(cfg, lambda text: check_trait_reply(text, name, instructions, questions), json_reply=True)
    [trait] = endpoint.map(ask, [(f"trait:{name}", trait_prompt(name, description, instructions, questions))])
    return trait_files(trait, out)
