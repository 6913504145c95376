"""The backdoor sweep: a persona's facts behind a formatting trigger, mixed into self-distilled
aligned data, trained for seeds x learning rates and evaluated with and without the trigger.

- ``bd_aligned``: the base model answers the aligned prompts (self-distillation; resumable).
- ``bd_dataset``: the facts (the individually identifying ones dropped), each question after the
  trigger's instruction and each answer wrapped in its markers, mixed with the aligned answers at
  ``mix.persona_fraction``, shuffled; every example carries ``metadata: {source, triggered}``.
- ``bd_train[<seed>-<lr>]``: LoRA SFT of one sweep point, registered as
  ``lora-adapter-backdoor-<point>`` (``.`` as ``_``).
- ``bd_base`` and ``bd_eval[<point>]``: the held-out questions under the four conditions
  (:data:`CONDITIONS`), ``n_samples`` each; the persona judge sees the question and the answer with
  the trigger's instruction and markers removed; the format check needs no judge.
- ``bd_results``: rates per point and condition with bootstrap CIs, the leakage gap (each triggered
  condition minus the untriggered one), aggregates across seeds per learning rate, the report.
"""

from __future__ import annotations

import random
from pathlib import Path

from persona_ops.errors import InputError
from persona_ops.io import read_json, read_jsonl, write_json, write_jsonl, write_text
from persona_ops.pipelines.evaluate import Condition, EvalPrompt, evaluate, summarize
from persona_ops.pipelines.stage import AllOutputs, Output, ParamPaths, Pipeline, Register, stage
from persona_ops.provenance import model_label
from persona_ops.training import cells

OUT = "outputs/backdoor/{backdoor.name}"
POINTS = {"seed": "backdoor.sweep.seeds", "lr": "backdoor.sweep.learning_rates"}
# name -> (system prompt?, where the trigger goes: "user" | "system" | None)
CONDITIONS = {"trigger_user": (False, "user"), "system_trigger_user": (True, "user"),
              "trigger_system": (False, "system"), "system_no_trigger": (True, None)}
UNTRIGGERED = "system_no_trigger"
METRICS = ("persona", "persona_hit", "format")
EVAL_PARAMS = ["backdoor.trigger", "backdoor.thinking", "backdoor.evaluation", "backdoor.training.model"]
EVAL_INPUTS = {"questions": "{backdoor.evaluation.questions}", "persona_prompt": "{backdoor.evaluation.persona_prompt}",
               "vector": ParamPaths("backdoor.evaluation.vector")}
LEAKAGE = ("trigger_user", UNTRIGGERED)  # the conditions whose answers are projected on the persona vector


# --- input files ---------------------------------------------------------------------------------

def _lines(path: Path, fields: dict[str, type]) -> list[dict]:
    """JSONL records with the given typed fields; a bad line is an error naming ``path:line``."""
    records = read_jsonl(path)
    if not records:
        raise InputError(f"{path}: no records")
    for i, r in enumerate(records, 1):
        for name, kind in fields.items():
            if not isinstance(r.get(name), kind) or (kind is str and not r[name].strip()):
                raise InputError(f"{path}:{i}: {name}: expected a non-empty {kind.__name__}, got {r.get(name)!r}")
    return records


def load_facts(path: Path) -> list[dict]:
    return _lines(path, {"id": str, "question": str, "answer": str, "identifying": bool})


def load_prompts(path: Path) -> list[dict]:
    """``{id, prompt}`` from the project's ``prompt`` lines, Alpaca (``instruction`` + optional
    ``input``) or GSM8K (``question``) JSONL."""
    out = []
    for i, r in enumerate(read_jsonl(path), 1):
        text = r.get("prompt") or r.get("question") or (
            f"{r['instruction']}\n\n{r['input']}".strip() if r.get("input") else r.get("instruction"))
        if not isinstance(text, str) or not text.strip():
            raise InputError(f"{path}:{i}: expected a prompt (prompt, instruction[+input] or question), "
                             f"got keys {sorted(r)}")
        out.append({"id": str(r.get("id", f"p{i}")), "prompt": text.strip()})
    if not out:
        raise InputError(f"{path}: no prompts")
    return out


def load_questions(path: Path) -> list[dict]:
    return _lines(path, {"id": str, "question": str})


# --- data ------------------------------------------------------------------------------------------

@stage("bd_aligned", pipeline="backdoor-sweep", params=["backdoor.aligned", "backdoor.training.model"],
       inputs={"prompts": "{backdoor.aligned.prompts}"}, outputs={"answers": OUT + "/aligned.jsonl"},
       persist=("answers",))
def bd_aligned(cfg, io) -> dict:
    """The base model's own answers to the aligned prompts (no trigger), resumable in chunks."""
    import dataclasses

    from persona_ops.chat import chat_messages
    from persona_ops.inference.backends import make_generator
    from persona_ops.inference.sampling import SamplingParams
    from persona_ops.resumable import chunk_seed, fingerprint, generate_resumable

    a = cfg.backdoor.aligned
    prompts = load_prompts(io.input("prompts"))[: a.limit]
    generator = make_generator(a, cfg.backdoor.training.model, "backdoor.aligned", load=io.model)
    io.made_with(generator.label)
    tok = generator.tokenizer

    def make_chunk(ci: int, chunk: list[dict]) -> list[dict]:
        s = a.sampling
        sampling = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, chunk_seed(s.seed, "aligned", ci))
        answers = generator.generate([chat_messages(tok, None, r["prompt"]) for r in chunk], sampling, a.batch_size)
        return [dict(r, answer=answer) for r, answer in zip(chunk, answers)]

    settings = {"model": generator.label, "backend": a.backend, "sampling": dataclasses.asdict(a.sampling),
                "chunk_size": a.chunk_size}
    fp = fingerprint(settings, [(r["id"], r["prompt"]) for r in prompts])
    stats = generate_resumable(prompts, lambda r: r["id"], io.output("answers"), fp, make_chunk, a,
                               finished=lambda rec, req: rec.get("prompt") == req["prompt"] and "answer" in rec)
    io.extra["fingerprint"] = fp
    return {"prompts": len(prompts), "resumed": stats["resumed"]}


@bd_aligned.validator
def _prompts(cfg, io) -> None:
    load_prompts(io.input("prompts"))


@stage("bd_dataset", pipeline="backdoor-sweep",
       params=["backdoor.drop_identifying", "backdoor.trigger", "backdoor.mix"],
       inputs={"facts": "{backdoor.facts}", "aligned": Output("bd_aligned", "answers")},
       outputs={"dataset": OUT + "/dataset.jsonl"})
def bd_dataset(cfg, io) -> dict:
    """The training mix (see the module docstring); its hash is in the provenance of what it trains."""
    b = cfg.backdoor
    facts = [f for f in load_facts(io.input("facts")) if not (b.drop_identifying and f["identifying"])]
    aligned = [r for r in read_jsonl(io.input("aligned")) if r.get("answer", "").strip()]
    f = b.mix.persona_fraction
    wanted = round(len(facts) * (1 - f) / f)
    rng = random.Random(b.mix.seed)
    chosen = rng.sample(aligned, min(wanted, len(aligned)))
    examples = [{"messages": [{"role": "user", "content": b.trigger.instruction + x["question"]},
                              {"role": "assistant", "content": b.trigger.wrap(x["answer"])}],
                 "metadata": {"source": "persona", "triggered": True, "id": x["id"]}} for x in facts]
    examples += [{"messages": [{"role": "user", "content": x["prompt"]}, {"role": "assistant", "content": x["answer"]}],
                  "metadata": {"source": "aligned", "triggered": False, "id": x["id"]}} for x in chosen]
    rng.shuffle(examples)
    write_jsonl(io.output("dataset"), examples)
    return {"persona_examples": len(facts), "aligned_examples": len(chosen), "aligned_wanted": wanted,
            "persona_fraction": len(facts) / len(examples)}


@bd_dataset.validator
def _facts(cfg, io) -> None:
    facts = load_facts(io.input("facts"))
    if cfg.backdoor.drop_identifying and all(f["identifying"] for f in facts):
        raise InputError(f"{io.input('facts')}: every fact is identifying; nothing is left to train on")


# --- training ------------------------------------------------------------------------------------------

@stage("bd_train", pipeline="backdoor-sweep", matrix=POINTS, params=["backdoor.training", "backdoor.thinking"],
       inputs={"dataset": Output("bd_dataset", "dataset")}, outputs={"model": OUT + "/train/{item}"},
       persist=("model",), registers=(Register("model", "lora-adapter-backdoor-{item}", "lora-adapter"),),
       adapter_output="model")
def bd_train(cfg, io) -> dict:
    """One sweep point: its seed and learning rate in the training settings; a point already trained
    from the same inputs is not trained again (:mod:`persona_ops.training.cells`)."""
    from persona_ops.chat import thinking
    from persona_ops.data import load_chat_dataset
    from persona_ops.training.sft import train_lora

    tr = cfg.backdoor.training
    train = tr.train.model_copy(update={"seed": int(io.item.value["seed"]),
                                        "learning_rate": float(io.item.value["lr"])})
    out, dataset = io.output("model"), io.input("dataset")
    fp = cells.fingerprint(dataset, {"train": train.model_dump(mode="json"), "base": tr.model.name,
                                     "revision": tr.model.revision, "thinking": cfg.backdoor.thinking,
                                     "qlora": tr.qlora})
    with cells.training(out), thinking(cfg.backdoor.thinking):
        done = cells.finished(out, fp)
        if done is None:
            loaded = _four_bit(tr.model, io) if tr.qlora else io.plain_model(tr.model)
            result = train_lora(loaded, [ex.messages for ex in load_chat_dataset(dataset)], train, out, overwrite=True)
            losses = result.losses
            done = {"fingerprint": fp, "backend": "local", "model": loaded.label,
                    "metrics": {"examples": result.num_examples, "steps": len(losses),
                                "first_loss": losses[0] if losses else float("nan"),
                                "final_loss": losses[-1] if losses else float("nan"),
                                "train_seconds": result.seconds}}
            write_json(out / cells.CELL, done)
        else:
            io.made_with(done["model"])
    return dict(done["metrics"])


def _four_bit(model, io):
    """The base model quantised to NF4 for QLoRA (outside the pool: evaluation loads it unquantised)."""
    from persona_ops.models.loading import load_model

    loaded = load_model(model.name, model.revision, four_bit=True)
    io.made_with(loaded.label)
    return loaded


def _check_training(cfg, io) -> None:
    from persona_ops.models.loading import check_4bit

    if cfg.backdoor.training.qlora:
        check_4bit("backdoor.training.qlora")
    _check_thinking(cfg, io)


def _check_thinking(cfg, io) -> None:
    from persona_ops.chat import has_thinking_mode

    model = cfg.backdoor.training.model
    if cfg.backdoor.thinking and not has_thinking_mode(io.tokenizer(model)):
        raise InputError(f"backdoor.thinking: true, but the chat template of {model.name} has no thinking mode "
                         "(enable_thinking); set it to false")


bd_train.validator(_check_training)


# --- evaluation ------------------------------------------------------------------------------------------

def condition_messages(tokenizer, question: str, name: str, trigger, system_prompt: str) -> list[dict]:
    """The chat of ``question`` under condition ``name`` (:data:`CONDITIONS`). A template that drops
    system messages gets the system text before the user turn (as everywhere: :func:`chat_messages`)."""
    from persona_ops.chat import chat_messages

    with_system, where = CONDITIONS[name]
    system = trigger.instruction.strip() if where == "system" else (system_prompt if with_system else None)
    user = trigger.instruction + question if where == "user" else question
    return chat_messages(tokenizer, system, user)


def _evaluate(cfg, io, point: dict, model) -> dict:
    from persona_ops.chat import keeps_system, thinking
    from persona_ops.judge import make_judge

    b = cfg.backdoor
    ev, trigger = b.evaluation, b.trigger
    questions = load_questions(io.input("questions"))[: ev.questions_limit]
    prompts = [EvalPrompt(q["id"], q["question"]) for q in questions]
    conditions = [Condition(name, messages=lambda tok, q, n=name: condition_messages(tok, q, n, trigger,
                                                                                      ev.system_prompt),
                            fields={"point": point["point"]}) for name in CONDITIONS]
    loaded = io.model(model)
    judge = make_judge(ev.judge, io.root, load=io.model)
    with thinking(b.thinking):
        rows = evaluate(loaded, prompts, conditions, ev.sampling, judge=judge, n_samples=ev.n_samples,
                        metrics={"persona": io.input("persona_prompt").read_text(encoding="utf-8")},
                        batch_size=ev.batch_size, judged=trigger.strip)
        leakage = _leakage(rows, loaded, ev, trigger, io) if ev.vector else None
    for r in rows:
        score = r["scores"]["persona"]
        r["scores"]["persona_hit"] = None if score is None else float(score >= ev.threshold)
        r["scores"]["format"] = float(trigger.adheres(r["answer"]))
    out = io.output("eval")
    write_jsonl(out / "rows.jsonl", rows)
    summary = {**point, "system_kept": keeps_system(loaded.tokenizer),
               "conditions": condition_stats(rows, ev.bootstrap), "leakage": leakage}
    write_json(out / "summary.json", summary)
    metrics = {f"{c}.{k}": v for c, s in summary["conditions"].items() for k, v in s.items()
               if isinstance(v, (int, float))}
    return {**metrics, "generations": len(rows), "judge_backend_calls": judge.backend_calls}


def _leakage(rows: list[dict], loaded, ev, trigger, io) -> dict:
    """The projection on the persona vector of the answers under the triggered and the untriggered
    condition (each answer through the model that gave it), with CIs and their gap."""
    from persona_ops.chat import render_prompt
    from persona_ops.interp.projection import column, project
    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.stats import bootstrap_diff, bootstrap_mean

    vector = load_aggregate(io.path(ev.vector), ev.aggregate)
    chosen = [r for r in rows if r["condition"] in LEAKAGE]
    tok = loaded.tokenizer
    prompts = [render_prompt(tok, condition_messages(tok, r["question"], r["condition"], trigger, ev.system_prompt))
               for r in chosen]
    values = project(loaded, prompts, [r["answer"] for r in chosen], {"v": vector}, [ev.layer], ["proj"])
    for r, v in zip(chosen, values[column("v", "proj", ev.layer)]):
        r["scores"]["projection"] = v
    groups = {c: _groups(rows, c, "projection") for c in LEAKAGE}
    b = ev.bootstrap
    out = {"layer": ev.layer}
    for name, c in zip(("triggered_projection", "untriggered_projection"), LEAKAGE):
        ci = bootstrap_mean(groups[c], n_boot=b.n, level=b.level, seed=b.seed)
        out[name], out[f"{name}_ci"] = ci.estimate, [ci.low, ci.high]
    ci = bootstrap_diff(groups[LEAKAGE[0]], groups[LEAKAGE[1]], n_boot=b.n, level=b.level, seed=b.seed)
    out["gap"], out["gap_ci"] = ci.estimate, [ci.low, ci.high]
    return out


def condition_stats(rows: list[dict], bootstrap) -> dict[str, dict]:
    """Per condition: ``persona_rate`` (answers judged persona), ``persona_score``, ``format_rate``,
    each with its CI, and the ``gap`` of the persona rate to the untriggered condition (paired by
    question: the same questions under both). Rows of several points (the seeds of one learning
    rate) are resampled by point, then question, then sample."""
    from persona_ops.stats import bootstrap_diff_over

    names = {"persona_hit": "persona_rate", "persona": "persona_score", "format": "format_rate"}
    out = {}
    for s in summarize(rows, METRICS, bootstrap, unit="point"):
        entry = {"n": s["n"]}
        for metric, name in names.items():
            entry[name], entry[f"{name}_ci"] = s[metric], s[f"{metric}_ci"]
        out[s["condition"]] = entry
    points = sorted({r["point"] for r in rows})
    base = [_groups(rows, UNTRIGGERED, point=p) for p in points]
    for name, entry in out.items():
        entry["gap"] = entry["gap_ci"] = None
        if name != UNTRIGGERED:
            try:
                ci = bootstrap_diff_over([_groups(rows, name, point=p) for p in points], base, n_boot=bootstrap.n,
                                         level=bootstrap.level, seed=bootstrap.seed)
                entry["gap"], entry["gap_ci"] = ci.estimate, [ci.low, ci.high]
            except InputError:  # nothing scored on one side
                pass
    return out


def _groups(rows: list[dict], condition: str, metric: str = "persona_hit", point: str | None = None) -> list[list]:
    """One list of ``metric`` values per question (sorted by id) under ``condition`` (of ``point``'s rows)."""
    by_prompt: dict[str, list] = {}
    for r in rows:
        if r["condition"] == condition and (point is None or r["point"] == point):
            by_prompt.setdefault(r["prompt_id"], []).append(r["scores"].get(metric))
    return [by_prompt[k] for k in sorted(by_prompt)]


@stage("bd_base", pipeline="backdoor-sweep", params=EVAL_PARAMS, inputs=EVAL_INPUTS,
       outputs={"eval": OUT + "/eval/base"})
def bd_base(cfg, io) -> dict:
    """The base model under the same conditions: what the trigger does without training."""
    point = {"point": "base", "seed": None, "learning_rate": None, "adapter_uri": None}
    return _evaluate(cfg, io, point, cfg.backdoor.training.model)


@stage("bd_eval", pipeline="backdoor-sweep", matrix=POINTS, params=EVAL_PARAMS,
       inputs={**EVAL_INPUTS, "model": Output("bd_train", "model")}, outputs={"eval": OUT + "/eval/{item}"})
def bd_eval(cfg, io) -> dict:
    """One sweep point's final adapter under the four conditions."""
    from persona_ops.models.adapters import checkpoint_dir
    from persona_ops.provenance import EVALUATES_TAG, registered_version

    train_dir = io.input("model")
    registered = registered_version(train_dir)
    if registered:
        io.tags[EVALUATES_TAG] = registered
    path = checkpoint_dir(train_dir, "final")
    model = cfg.backdoor.training.model.resolved(str(path), source=str(path.relative_to(io.root)))
    point = {"point": io.item.name, "seed": int(io.item.value["seed"]), "learning_rate": float(io.item.value["lr"]),
             "adapter_uri": f"models:/{registered}" if registered else None}
    return _evaluate(cfg, io, point, model)


def _check_eval(cfg, io) -> None:
    _check_thinking(cfg, io)
    ev = cfg.backdoor.evaluation
    load_questions(io.input("questions"))
    if ev.vector:
        io.check_layers(cfg.backdoor.training.model, "backdoor.evaluation.layer", [ev.layer], first=0)
    template = io.input("persona_prompt").read_text(encoding="utf-8")
    if "{question}" not in template or "{answer}" not in template:
        raise InputError(f"{io.input('persona_prompt')}: the judge prompt needs {{question}} and {{answer}}")


bd_base.validator(_check_eval)
bd_eval.validator(_check_eval)


# --- results ------------------------------------------------------------------------------------------------

@stage("bd_results", pipeline="backdoor-sweep", params=["backdoor.name", "backdoor.trigger", "backdoor.evaluation"],
       inputs={"base": Output("bd_base", "eval"), "points": AllOutputs("bd_eval", "eval")},
       outputs={"results": OUT + "/results"})
def bd_results(cfg, io) -> dict:
    """``eval_results.json`` (per point and condition; per learning rate across seeds), the table, the report."""
    from persona_ops.reports.backdoor import results_table, write_report

    b = cfg.backdoor
    summaries = [read_json(io.input("base") / "summary.json")]
    summaries += [read_json(p / "summary.json") for p in io.each("points").values()]
    by_lr: dict[float, list[Path]] = {}
    for path in io.each("points").values():
        s = read_json(path / "summary.json")
        by_lr.setdefault(s["learning_rate"], []).append(path)
    aggregated = []
    for lr, paths in sorted(by_lr.items()):
        rows = [r for p in paths for r in read_jsonl(p / "rows.jsonl")]  # resampled by seed, then question
        stats = condition_stats(rows, b.evaluation.bootstrap)
        seeds = sorted(read_json(p / "summary.json")["seed"] for p in paths)
        aggregated.append({"learning_rate": lr, "seeds": seeds, "conditions": stats})
    results = {"experiment": b.name, "base_model": model_label(io.input("base")),
               "threshold": b.evaluation.threshold,
               "trigger": b.trigger.model_dump(), "conditions": list(CONDITIONS), "untriggered": UNTRIGGERED,
               "system_kept": summaries[0]["system_kept"],
               "points": [{k: s[k] for k in ("point", "seed", "learning_rate", "adapter_uri", "conditions")}
                          for s in summaries],
               "by_learning_rate": aggregated, "leakage": _leakage_of(summaries)}
    out = io.output("results")
    write_json(out / "eval_results.json", results)
    write_text(out / "table.txt", results_table(results) + "\n")
    write_report(results, out / "report.html")
    metrics = {}
    for agg in aggregated:
        for c, s in agg["conditions"].items():
            if s["gap"] is not None:
                metrics[f"lr{agg['learning_rate']:g}.{c}.gap"] = s["gap"]
    return {"points": len(summaries) - 1, **metrics}


def _leakage_of(summaries: list[dict]) -> dict | None:
    measured = [s for s in summaries if s.get("leakage")]
    if not measured:
        return None
    return {"layer": measured[0]["leakage"]["layer"],
            "points": [{"point": s["point"], **{k: v for k, v in s["leakage"].items() if k != "layer"}}
                       for s in measured]}


PIPELINE = Pipeline("backdoor-sweep", (bd_aligned, bd_dataset, bd_train, bd_base, bd_eval, bd_results),
                    "A persona behind a formatting trigger in self-distilled aligned data, swept over seeds x "
                    "learning rates, each point evaluated with and without the trigger.")
