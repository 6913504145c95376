"""The persona-vector pipeline (Chen et al. 2025): generate -> judge -> activations -> vectors.

Each stage reads files, writes files atomically (with provenance) and returns metrics.
None of them imports prefect, mlflow or dvc; ``persona_ops.stages`` wraps them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from persona_ops.chat import chat_messages, persona_system_prompt, render_prompt
from persona_ops.config import TraitParams
from persona_ops.data import load_trait
from persona_ops.io import provenance, read_jsonl, write_json, write_jsonl

OUT = Path("outputs/persona_vectors")
METRICS = Path("metrics/persona_vectors")


@dataclass
class StageResult:
    metrics: dict[str, float]
    inputs: list[Path]
    outputs: list[Path]
    register: dict[str, Path] = field(default_factory=dict)  # registered model name -> file


def trait_file(tp: TraitParams, root: Path) -> Path:
    t = tp.params.traits
    return root / t.dir / t.extract_subdir / f"{tp.trait}.json"


def paths(root: Path, trait: str) -> dict[str, Path]:
    d = root / OUT / trait
    return {
        "generations": d / "generations.jsonl",
        "judgements": d / "judgements.jsonl",
        "activations": d / "activations.safetensors",
        "vectors": d / "vectors.safetensors",
    }


def _load(tp: TraitParams):
    from persona_ops.models.adapters import load_model_ref

    return load_model_ref(tp.params.model)


def build_requests(tp: TraitParams, tokenizer, root: Path) -> list[dict]:
    """One record per polarity x instruction x question x sample, with its rendered prompt."""
    trait = load_trait(trait_file(tp, root))
    g = tp.params.generate
    questions = trait.questions[: g.questions_limit] if g.questions_limit else trait.questions
    names = {"pos": tp.assistant_name, "neg": tp.params.traits.neg_assistant_name}
    records = []
    for polarity in ("pos", "neg"):
        for ii, pair in enumerate(trait.instructions):
            system = persona_system_prompt(names[polarity], getattr(pair, polarity))
            for qi, question in enumerate(questions):
                prompt = render_prompt(tokenizer, chat_messages(tokenizer, system, question))
                for si in range(g.n_per_question):
                    records.append({
                        "id": f"{tp.trait}-{polarity}-i{ii}-q{qi}-s{si}", "trait": tp.trait,
                        "polarity": polarity, "instruction_idx": ii, "question_idx": qi, "sample_idx": si,
                        "system": system, "question": question, "prompt": prompt,
                    })
    return records


def generate(tp: TraitParams, root: Path, loaded=None) -> StageResult:
    """Generate answers under pos and neg persona system prompts (``generate.backend``: the
    local model on the engine, vLLM or an OpenAI-compatible server; see persona_ops.inference.backends)."""
    from persona_ops.inference.backends import make_generator
    from persona_ops.inference.sampling import SamplingParams

    load_trait(trait_file(tp, root))  # validate before the model is loaded
    g = tp.params.generate
    if g.backend == "hf":
        loaded = loaded or _load(tp)
    generator = make_generator(g, tp.params.model, "generate", loaded=loaded)
    tok = generator.tokenizer
    records = build_requests(tp, tok, root)
    sampling = SamplingParams(g.max_new_tokens, g.temperature, g.top_p, g.seed)
    chats = [chat_messages(tok, r["system"], r["question"]) for r in records]  # as rendered into "prompt"
    answers = generator.generate(chats, sampling, g.batch_size)
    for rec, ans in zip(records, answers):
        rec["answer"] = ans
    out = paths(root, tp.trait)["generations"]
    write_jsonl(out, records)
    _write_provenance(out, "generate", tp, [trait_file(tp, root)], generator.label)
    empty = sum(not a for a in answers)
    return StageResult({"generations": len(records), "empty_answers": empty},
                       [trait_file(tp, root)], [out])


def judge(tp: TraitParams, root: Path) -> StageResult:
    """Score every answer for the trait (the trait's eval_prompt) and for coherence, 0-100."""
    from persona_ops.judge import COHERENCE_PROMPT, fill_template, make_judge

    trait = load_trait(trait_file(tp, root))
    p = paths(root, tp.trait)
    records = read_jsonl(p["generations"])
    j = tp.params.judge
    judge_model = make_judge(j.backend, j.model, revision=j.revision, base_url=j.base_url,
                             api_key_env=j.api_key_env, max_concurrency=j.max_concurrency,
                             max_retries=j.max_retries, timeout=j.timeout, cache_path=root / j.cache,
                             batch_size=j.batch_size, answer_prefix=j.answer_prefix, dtype=tp.params.model.dtype,
                             device=tp.params.model.device)
    trait_prompts = [fill_template(trait.eval_prompt, r["question"], r["answer"]) for r in records]
    coh_prompts = [fill_template(COHERENCE_PROMPT, r["question"], r["answer"]) for r in records]
    scores = judge_model.score(trait_prompts + coh_prompts, lo=0, hi=100)
    n = len(records)
    rows = [{"id": r["id"], "polarity": r["polarity"], "trait": scores[i], "coherence": scores[n + i]}
            for i, r in enumerate(records)]
    write_jsonl(p["judgements"], rows)
    _write_provenance(p["judgements"], "judge", tp, [p["generations"], trait_file(tp, root)],
                      judge_model.backend.label)
    metrics = {"judged": n, "judge_backend_calls": judge_model.backend_calls,
               "unscored": sum(r["trait"] is None or r["coherence"] is None for r in rows)}
    for pol in ("pos", "neg"):
        for key in ("trait", "coherence"):
            vals = [r[key] for r in rows if r["polarity"] == pol and r[key] is not None]
            metrics[f"{pol}_{key}_mean"] = sum(vals) / len(vals) if vals else float("nan")
    return StageResult(metrics, [p["generations"], trait_file(tp, root)], [p["judgements"]])


def activations(tp: TraitParams, root: Path) -> StageResult:
    """Filter judged pairs, then capture prompt/response means at every layer for the survivors."""
    from persona_ops.interp.capture import capture_means
    from persona_ops.interp.vectors import FilterThresholds, filter_pairs, require_pairs

    p = paths(root, tp.trait)
    records = read_jsonl(p["generations"])
    judgements = {r["id"]: r for r in read_jsonl(p["judgements"])}
    f = tp.params.filter
    th = FilterThresholds(f.pos_min, f.neg_max, f.coherence_min, f.min_pairs)
    pairs, counts = filter_pairs(records, judgements, th)
    require_pairs(counts["pairs_passed"], counts["pairs_total"], th, tp.trait)
    loaded = _load(tp)
    tensors = {}
    for side, idx in (("pos", 0), ("neg", 1)):
        recs = [pair[idx] for pair in pairs]
        caps = capture_means(loaded, [r["prompt"] for r in recs], [r["answer"] for r in recs],
                             tp.params.activations.batch_size, desc=f"activations {tp.trait} {side}")
        tensors.update({f"{side}.{k}": v for k, v in caps.items()})
    from persona_ops.interp.vectors import save_vectors

    prov = provenance(stage="activations", params=tp.model_dump(), model=loaded.label,
                      inputs=[p["generations"], p["judgements"]])
    save_vectors(p["activations"], tensors, {
        "trait": tp.trait, "model": loaded.label, "provenance": prov,
        "ids": [[a["id"], b["id"]] for a, b in pairs]})
    scored = [judgements[r["id"]] for pair in pairs for r in pair]
    metrics = dict(counts, pos_trait_mean_passed=_mean(s["trait"] for s in scored if s["polarity"] == "pos"),
                   neg_trait_mean_passed=_mean(s["trait"] for s in scored if s["polarity"] == "neg"))
    return StageResult(metrics, [p["generations"], p["judgements"]], [p["activations"]])


def vectors(tp: TraitParams, root: Path) -> StageResult:
    """mean(pos) - mean(neg) per layer and aggregate -> ``vectors.safetensors`` (registered)."""
    from persona_ops.interp.vectors import load_vectors, mean_difference, save_vectors

    p = paths(root, tp.trait)
    acts, meta = load_vectors(p["activations"])
    pos = {k.split(".", 1)[1]: v for k, v in acts.items() if k.startswith("pos.")}
    neg = {k.split(".", 1)[1]: v for k, v in acts.items() if k.startswith("neg.")}
    vec = mean_difference(pos, neg)
    n_pairs = next(iter(pos.values())).shape[0]
    prov = provenance(stage="vectors", params=tp.model_dump(), model=meta.get("model"), inputs=[p["activations"]])
    save_vectors(p["vectors"], vec, {"trait": tp.trait, "model": meta.get("model", "unknown"),
                                     "n_pairs": n_pairs, "provenance": prov})
    norms = vec["response_avg"].norm(dim=-1)
    metrics = {"n_pairs": n_pairs, "num_layers": vec["response_avg"].shape[0] - 1,
               "response_avg_norm_max": float(norms.max()),
               "response_avg_norm_argmax_layer": int(norms.argmax())}
    return StageResult(metrics, [p["activations"]], [p["vectors"]],
                       register={f"persona-vector-{tp.trait}": p["vectors"]})


def _mean(values) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


def _write_provenance(out: Path, stage: str, tp: TraitParams, inputs: list[Path], model: str) -> None:
    write_json(out.with_suffix(".provenance.json"),
               provenance(stage=stage, params=tp.model_dump(), inputs=inputs, model=model))


STAGES = {"generate": generate, "judge": judge, "activations": activations, "vectors": vectors}
