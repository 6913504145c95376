"""The trait fine-tuning matrix: a LoRA fine-tune per (trait, strength) cell, every cell and the base
model evaluated on every trait, and one results table and report.

- ``ft_train[<trait>-<strength>]``: trains on ``<dataset_dir>/<trait>/<strength>.jsonl`` (backend
  ``local``: LoRA SFT, checkpoints every ``save_every`` steps, optional steering during training;
  ``openai``: the fine-tuning API; ``dummy``: nothing). Registered as
  ``lora-adapter-<name>-<trait>-<strength>``. A cell whose directory already holds a run of the same
  inputs is not trained again, whichever process asks (see :mod:`persona_ops.training.cells`).
- ``ft_base`` and ``ft_eval[<cell>]``: the model answers each evaluated trait's questions; every
  answer is judged for the trait and coherence and projected on the trait's persona vector at
  ``evaluation.layer``, through the model and through the base model (the difference is the
  finetuning shift). The base model is loaded once; adapters are swapped on it.
- ``ft_results``: ``eval_results.json``, ``table.txt`` and ``report.html``.
"""

from __future__ import annotations

from pathlib import Path

from persona_ops.errors import InputError
from persona_ops.io import read_json, sha256_file, write_json, write_jsonl, write_text
from persona_ops.pipelines.evaluate import Condition, EvalPrompt, evaluate, summarize
from persona_ops.pipelines.stage import AllOutputs, Output, ParamPaths, Pipeline, Register, stage
from persona_ops.provenance import EVALUATES_TAG, model_label, registered_version
from persona_ops.training import cells

OUT = "outputs/trait_finetune/{trait_finetune.name}"
CELLS = {"trait": "trait_finetune.traits", "strength": "trait_finetune.strengths"}
DATASET = "{trait_finetune.dataset_dir}/{item.trait}/{item.strength}.jsonl"
METRICS = ("trait", "coherence", "projection", "shift")
BASE_PARAMS = ["trait_finetune.training.model", "trait_finetune.evaluation"]
EVAL_PARAMS = [*BASE_PARAMS, "trait_finetune.training.openai"]
EVAL_INPUTS = {"questions": "{trait_finetune.evaluation.questions}",
               "vectors": ParamPaths("trait_finetune.evaluation.vectors")}


# --- training ------------------------------------------------------------------------------------

@stage("ft_train", pipeline="trait-finetune", matrix=CELLS, params=["trait_finetune.training"],
       inputs={"dataset": DATASET}, outputs={"model": OUT + "/train/{item}"}, persist=("model",),
       registers=(Register("model", "lora-adapter-{trait_finetune.name}-{item}", "lora-adapter"),),
       adapter_output="model")
def ft_train(cfg, io) -> dict:
    """Train one cell (or find it trained from the same inputs) and write ``cell.json``."""
    tr = cfg.trait_finetune.training
    out, dataset = io.output("model"), io.input("dataset")
    settings = {"training": tr.model_dump(mode="json"), "base": tr.model.name, "revision": tr.model.revision}
    if tr.steering:  # the vector's bytes (an alias may move to another version)
        settings["steering_vector"] = sha256_file(io.path(tr.steering.vector))
    fp = cells.fingerprint(dataset, settings)
    with cells.training(out):
        done = cells.finished(out, fp)
        if done is None:
            done = {"fingerprint": fp, "backend": tr.backend, **_train(tr, io, dataset, out)}
            write_json(out / cells.CELL, done)
        else:
            io.made_with(done.get("model") or tr.backend)
    return dict(done.get("metrics", {}))


def _train(tr, io, dataset: Path, out: Path) -> dict:
    if tr.backend == "local":
        from persona_ops.data import load_chat_dataset
        from persona_ops.training.sft import train_lora

        loaded = io.plain_model(tr.model)
        steering = _training_steering(tr, loaded, io) if tr.steering else None
        result = train_lora(loaded, [ex.messages for ex in load_chat_dataset(dataset)], tr.train, out,
                            interventions=steering, overwrite=True)
        losses = result.losses
        metrics = {"examples": result.num_examples, "steps": len(losses), "checkpoints": len(result.checkpoints),
                   "first_loss": losses[0] if losses else float("nan"),
                   "final_loss": losses[-1] if losses else float("nan"), "train_seconds": result.seconds}
        return {"model": loaded.label, "final": result.final_checkpoint.name, "metrics": metrics}
    from persona_ops.training.openai_ft import fine_tune

    job = fine_tune(dataset, out, tr.openai.model_copy(update={"backend": tr.backend}))
    io.made_with(job.fine_tuned_model)
    return {"model": job.fine_tuned_model, "job_id": job.job_id,
            "metrics": {"trained_tokens": job.trained_tokens or 0, "waited_s": job.waited_s}}


def _training_steering(tr, loaded, io) -> list:
    """The interventions of ``training.steering`` on ``loaded``'s residual stream."""
    from persona_ops.interp.interventions import Intervention

    st = tr.steering
    vector = _steering_vector(st, loaded.model.config, io)
    kind = "add" if st.kind == "steer" else "ablate"
    coef = st.coef if st.kind == "steer" else 1.0
    return [Intervention(kind, layer, vector[layer], coef=coef, positions=st.positions) for layer in st.layers]


def _steering_vector(st, config, io):
    """The ``[layers + 1, hidden]`` aggregate of the steering vector, checked against the model."""
    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.models.loading import num_layers

    path = io.path(st.vector)
    if not path.is_file():
        raise InputError(f"trait_finetune.training.steering.vector: {st.vector} does not exist")
    vector = load_aggregate(path, st.aggregate)
    layers, hidden = num_layers(config), config.hidden_size
    if tuple(vector.shape) != (layers + 1, hidden):
        raise InputError(f"trait_finetune.training.steering.vector: {st.vector} has shape {list(vector.shape)} "
                         f"(a model of {vector.shape[0] - 1} layers, hidden {vector.shape[1]}); the base model "
                         f"has {layers} layers, hidden {hidden} (expected [{layers + 1}, {hidden}])")
    bad = [L for L in st.layers if not 1 <= L <= layers]
    if bad:
        raise InputError(f"trait_finetune.training.steering.layers: {bad} outside 1..{layers}")
    io.used.append(("steering_vector", path))
    return vector


@ft_train.validator
def _train_inputs(cfg, io) -> None:
    """The dataset parses (a missing file was named by the runner's input check); a steering vector
    fits the base model."""
    from persona_ops.data import load_chat_dataset

    load_chat_dataset(io.input("dataset"))  # path:line of the first malformed line
    tr = cfg.trait_finetune.training
    if tr.steering:
        _steering_vector(tr.steering, io.pool.config(tr.model), io)


# --- evaluation ----------------------------------------------------------------------------------------

def _evaluate(cfg, io, cell: dict, models: list[tuple[dict, object]]) -> dict:
    """Evaluate each ``(checkpoint info, model)``: a ``ModelRef`` (activations too) or an API model
    name (behaviour only); write ``rows.jsonl`` and ``summary.json``; the final one's metrics."""
    from persona_ops.data import load_trait
    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.judge import coherence_prompt, make_judge

    ft = cfg.trait_finetune
    ev, base_ref = ft.evaluation, ft.training.model
    judge = make_judge(ev.judge, io.root, load=io.model)
    coherence = coherence_prompt(ev.judge.coherence_prompt, io.root)
    vectors = {t: load_aggregate(io.path(ev.vectors[t]), ev.aggregate) for t in ev.traits}
    all_rows, checkpoints = [], []
    for info, model in models:
        scores = {}
        for t in ev.traits:
            trait = load_trait(io.input("questions") / f"{t}.json")
            questions = trait.questions[: ev.questions_limit] if ev.questions_limit else trait.questions
            prompts = [EvalPrompt(f"q{i}", q) for i, q in enumerate(questions)]
            condition = Condition(f"{info['step']}/{t}", fields={"evaluated": t, **info})
            loaded, generator = _model_and_generator(model, ft, io)
            rows = evaluate(loaded, prompts, [condition], ev.sampling, judge=judge, generator=generator,
                            metrics={"trait": trait.eval_prompt, "coherence": coherence},
                            n_samples=ev.n_samples, batch_size=ev.batch_size)
            _project(rows, model, base_ref, vectors[t], ev.layer, io)
            (stats,) = summarize(rows, METRICS, ev.bootstrap)
            scores[t] = {"n": stats["n"], **{f"{m}_{part}": stats[m if part == "mean" else f"{m}_ci"]
                                             for m in METRICS for part in ("mean", "ci")}}
            all_rows += rows
        checkpoints.append({**info, "scores": scores})
    out = io.output("eval")
    write_jsonl(out / "rows.jsonl", all_rows)
    summary = {**cell, "activations": not isinstance(models[0][1], str), "checkpoints": checkpoints}
    write_json(out / "summary.json", summary)
    final = checkpoints[-1]["scores"]
    metrics = {f"{t}.{k}": v for t, s in final.items() for k, v in s.items() if k.endswith("_mean") and v is not None}
    return {**metrics, "checkpoints": len(checkpoints), "generations": len(all_rows),
            "judge_backend_calls": judge.backend_calls}


def _model_and_generator(model, ft, io) -> tuple:
    """``(loaded model, None)``, or ``(None, generator)`` for an API model (behaviour only)."""
    if isinstance(model, str):
        from persona_ops.inference.backends import OpenAIGenerator
        from persona_ops.models.loading import load_tokenizer

        endpoint = ft.training.openai.endpoint
        tokenizer = load_tokenizer(ft.training.model.name, ft.training.model.revision)
        io.made_with(model)
        return None, OpenAIGenerator(endpoint.model_copy(update={"model": model}), "trait_finetune.training.openai",
                                     tokenizer)
    return io.model(model), None


def _project(rows: list[dict], model, base_ref, vector, layer: int, io) -> None:
    """Each row's ``projection`` (its answer through ``model``) and ``shift`` (minus through the base)."""
    from persona_ops.chat import chat_messages, render_prompt
    from persona_ops.interp.projection import column, project

    if isinstance(model, str):  # an API model: no activations
        for r in rows:
            r["scores"].update(projection=None, shift=None)
        return
    loaded = io.model(model)
    prompts = [render_prompt(loaded.tokenizer, chat_messages(loaded.tokenizer, None, r["question"])) for r in rows]
    answers = [r["answer"] for r in rows]
    key = column("v", "proj", layer)
    tuned = project(loaded, prompts, answers, {"v": vector}, [layer], ["proj"])[key]
    base = tuned if not model.adapter else project(io.model(base_ref), prompts, answers, {"v": vector},
                                                     [layer], ["proj"])[key]
    for r, a, b in zip(rows, tuned, base):
        r["scores"].update(projection=a, shift=a - b)


@stage("ft_base", pipeline="trait-finetune", params=BASE_PARAMS, inputs=EVAL_INPUTS,
       outputs={"eval": OUT + "/eval/base"})
def ft_base(cfg, io) -> dict:
    """The base model, evaluated as every cell is (its shift is 0 by definition)."""
    ref = cfg.trait_finetune.training.model
    info = {"checkpoint": None, "step": 0}
    return _evaluate(cfg, io, {"cell": "base", "trait": None, "strength": None, "backend": "base"}, [(info, ref)])


@stage("ft_eval", pipeline="trait-finetune", matrix=CELLS, params=EVAL_PARAMS,
       inputs={**EVAL_INPUTS, "model": Output("ft_train", "model")}, outputs={"eval": OUT + "/eval/{item}"})
def ft_eval(cfg, io) -> dict:
    """One cell: its final checkpoint (or every checkpoint: ``evaluation.checkpoints: all``)."""
    from persona_ops.models.adapters import list_checkpoints

    tr, train_dir = cfg.trait_finetune.training, io.input("model")
    record = read_json(train_dir / cells.CELL)
    registered = registered_version(train_dir)
    if registered:
        io.tags[EVALUATES_TAG] = registered
    cell = {"cell": io.item.name, **io.item.value, "backend": record["backend"],
            "adapter_uri": f"models:/{registered}" if registered else None}
    if record["backend"] == "openai":
        models = [({"checkpoint": "final", "step": None}, record["model"])]
    elif record["backend"] == "dummy":  # nothing was trained: the plumbing runs on the base model
        models = [({"checkpoint": "final", "step": 0}, tr.model)]
    else:
        found = list_checkpoints(train_dir)
        chosen = found if cfg.trait_finetune.evaluation.checkpoints == "all" else found[-1:]
        models = [({"checkpoint": "final" if step == found[-1][0] else step, "step": step},
                   tr.model.resolved(str(path), source=str(path.relative_to(io.root))))
                  for step, path in chosen]
    return _evaluate(cfg, io, cell, models)


def _check_eval(cfg, io) -> None:
    from persona_ops.data import load_trait

    ev = cfg.trait_finetune.evaluation
    for t in ev.traits:
        load_trait(io.input("questions") / f"{t}.json")
    io.check_layers(cfg.trait_finetune.training.model, "trait_finetune.evaluation.layer", [ev.layer], first=0)


ft_base.validator(_check_eval)
ft_eval.validator(_check_eval)


# --- results -----------------------------------------------------------------------------------------------

@stage("ft_results", pipeline="trait-finetune",
       params=["trait_finetune.name", "trait_finetune.traits", "trait_finetune.strengths", "trait_finetune.evaluation"],
       inputs={"base": Output("ft_base", "eval"), "cells": AllOutputs("ft_eval", "eval"),
               "vectors": ParamPaths("trait_finetune.evaluation.vectors")},
       outputs={"results": OUT + "/results"})
def ft_results(cfg, io) -> dict:
    """``eval_results.json``, the terminal table and the HTML report of the whole matrix."""
    from persona_ops.reports.finetune_matrix import results_table, write_report

    results = collect(cfg, io)
    out = io.output("results")
    write_json(out / "eval_results.json", results)
    write_text(out / "table.txt", results_table(results) + "\n")
    write_report(results, out / "report.html")
    return {"cells": len(results["cells"]) - 1, "evaluated_checkpoints": len(results["checkpoints"])}


def collect(cfg, io) -> dict:
    """The schema of ``eval_results.json``: the base model first, then each cell's final checkpoint;
    every evaluated checkpoint; the cosine similarity between the trait vectors at the layer."""
    from persona_ops.interp.vectors import load_aggregate

    ft = cfg.trait_finetune
    ev = ft.evaluation
    summaries = [read_json(io.input("base") / "summary.json")]
    summaries += [read_json(p / "summary.json") for p in io.each("cells").values()]
    cells_out, curves = [], []
    for s in summaries:
        final = s["checkpoints"][-1]
        cells_out.append({k: s.get(k) for k in ("cell", "trait", "strength", "backend", "adapter_uri")}
                         | {"step": final["step"], "checkpoint": final["checkpoint"], "activations": s["activations"],
                            "scores": final["scores"]})
        curves += [{"cell": s["cell"], "step": c["step"], "checkpoint": c["checkpoint"], "scores": c["scores"]}
                   for c in s["checkpoints"] if s["cell"] != "base"]
    vecs = {t: load_aggregate(io.path(ev.vectors[t]), ev.aggregate)[ev.layer] for t in ev.traits}
    cosine = {a: {b: float((va @ vb) / (va.norm() * vb.norm()).clamp(min=1e-12)) for b, vb in vecs.items()}
              for a, va in vecs.items()}
    return {"experiment": ft.name, "base_model": model_label(io.input("base")), "layer": ev.layer,
            "traits": list(ev.traits),
            "trained_traits": list(ft.traits), "strengths": list(ft.strengths), "cells": cells_out,
            "checkpoints": curves, "vector_cosine": cosine}


PIPELINE = Pipeline("trait-finetune", (ft_train, ft_base, ft_eval, ft_results),
                    "LoRA fine-tunes for traits x strengths, each evaluated on every trait with activations "
                    "(projection and finetuning shift), and the matrix's report.")
