"""The steering sweep: layers x coefficients x kind for one trait's persona vector.

Every (kind, layer, coefficient) point answers the trait's eval questions through the
evaluation primitive (one generation batch, per-row coefficients), is judged for the trait
and coherence, and the best point (highest trait score among points coherent enough) is
recorded as metrics, with bootstrap intervals per point.
"""

from __future__ import annotations

from persona_ops.errors import InputError
from persona_ops.io import write_json, write_jsonl
from persona_ops.judge import coherence_prompt, make_judge
from persona_ops.pipelines.evaluate import Condition, EvalPrompt, Steer, evaluate, summarize
from persona_ops.pipelines.stage import Output, Pipeline, stage

EVAL_FILE = "{persona_vectors.traits.dir}/{persona_vectors.traits.eval_subdir}/{item}.json"
METRICS = ("trait", "coherence")


def conditions(sp, vector) -> list[Condition]:
    """One condition per (kind, layer, coefficient); ``vector`` is ``[num_layers + 1, hidden]``."""
    return [Condition(f"{k}/L{layer}/c{c:g}", steering=(Steer(k, layer, vector[layer], c, sp.positions),),
                      fields={"kind": k, "layer": layer, "coef": c})
            for k in sp.kinds for layer in sp.layers for c in sp.coefs]


def best_point(points: list[dict], coherence_min: float) -> dict | None:
    """The point with the highest mean trait score among those whose mean coherence is at least
    ``coherence_min``; None when no point qualifies."""
    ok = [p for p in points if p["trait"] is not None and (p["coherence"] or 0) >= coherence_min]
    return max(ok, key=lambda p: p["trait"]) if ok else None


@stage("steering_sweep", pipeline="steering-sweep", each="steering.traits",
       params=["steering", "persona_vectors.model", "persona_vectors.judge"],
       inputs={"trait": EVAL_FILE, "vectors": Output("vectors", "vectors")},
       outputs={"sweep": "outputs/steering/{item}"})
def steering_sweep(cfg, io) -> dict:
    from persona_ops.data import load_trait
    from persona_ops.interp.vectors import load_aggregate
    from persona_ops.reports.sweep import plot_sweep

    sp, pv = cfg.steering, cfg.persona_vectors
    trait = load_trait(io.input("trait"))
    vector = load_aggregate(io.input("vectors"), sp.aggregate)
    bad = [L for L in sp.layers if not 1 <= L < vector.shape[0]]
    if bad:
        raise InputError(f"steering.layers {bad}: expected 1..{vector.shape[0] - 1} (layer L = hidden_states[L])")
    questions = trait.questions[: sp.questions_limit] if sp.questions_limit else trait.questions
    prompts = [EvalPrompt(f"q{i}", q) for i, q in enumerate(questions)]
    loaded = io.model(pv.model)
    judge = make_judge(pv.judge, io.root, load=io.model)
    metrics = {"trait": trait.eval_prompt, "coherence": coherence_prompt(pv.judge.coherence_prompt, io.root)}
    rows = evaluate(loaded, prompts, conditions(sp, vector), sp.sampling, judge=judge, metrics=metrics,
                    n_samples=sp.n_per_question, batch_size=sp.batch_size)
    points = summarize(rows, METRICS, sp.bootstrap)
    best = best_point(points, sp.coherence_min)
    out = io.output("sweep")
    write_jsonl(out / "sweep.jsonl", rows)
    write_json(out / "results.json", {"trait": io.item.name, "points": points, "best": best})
    plot_sweep(points, out / "sweep.png", io.item.name)
    best = best or {}
    return {"points": len(points), "generations": len(rows), "judge_backend_calls": judge.backend_calls,
            "best_layer": best.get("layer", -1),
            "best_coef": best.get("coef", float("nan")), "best_trait_score": best.get("trait", float("nan")),
            "best_coherence": best.get("coherence", float("nan"))}


@steering_sweep.validator
def _eval_trait(cfg, io) -> None:
    from persona_ops.data import load_trait

    load_trait(io.input("trait"))
    io.check_layers(cfg.persona_vectors.model, "steering.layers", cfg.steering.layers)


PIPELINE = Pipeline("steering-sweep", (steering_sweep,),
                    "Persona vectors, then layers x coefficients x kind of steering for steering.traits.")
