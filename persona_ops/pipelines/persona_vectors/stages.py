"""The persona-vector pipeline (Chen et al. 2025): generate -> judge -> activations -> vectors, per trait.

Each stage reads its declared inputs, writes its declared outputs and returns metrics; the
runner writes provenance, records MLflow and registers the vectors.
"""

from __future__ import annotations

import dataclasses

from persona_ops.chat import chat_messages, persona_system_prompt, render_prompt
from persona_ops.data import load_trait
from persona_ops.inference.backends import make_generator
from persona_ops.inference.sampling import SamplingParams
from persona_ops.io import read_jsonl, write_jsonl
from persona_ops.judge import coherence_prompt, fill_template, make_judge
from persona_ops.pipelines.stage import Output, Pipeline, Register, stage
from persona_ops.resumable import chunk_seed, fingerprint, generate_resumable

OUT = "outputs/persona_vectors/{item}"
TRAIT_FILE = "{persona_vectors.traits.dir}/{persona_vectors.traits.extract_subdir}/{item}.json"
PER_TRAIT = dict(pipeline="persona-vectors", each="persona_vectors.traits.names",
                 per_item="persona_vectors.per_trait")


@stage("generate", **PER_TRAIT, inputs={"trait": TRAIT_FILE},
       params=["persona_vectors.model", "persona_vectors.generate", "persona_vectors.traits.assistant_name",
               "persona_vectors.traits.neg_assistant_name"],
       outputs={"generations": f"{OUT}/generations.jsonl"})
def generate(cfg, io) -> dict:
    """Answers under pos and neg persona system prompts (``generate.backend``: the local model on
    the engine, vLLM or an OpenAI-compatible server)."""
    p = cfg.persona_vectors
    trait = load_trait(io.input("trait"))
    g = p.generate
    generator = make_generator(g, p.model, "persona_vectors.generate", load=io.model)
    io.made_with(generator.label)
    tok = generator.tokenizer
    questions = trait.questions[: g.questions_limit] if g.questions_limit else trait.questions
    names = {"pos": p.traits.assistant_name or io.item.name, "neg": p.traits.neg_assistant_name}
    records = []
    for polarity in ("pos", "neg"):
        for ii, pair in enumerate(trait.instructions):
            system = persona_system_prompt(names[polarity], getattr(pair, polarity))
            for qi, question in enumerate(questions):
                prompt = render_prompt(tok, chat_messages(tok, system, question))
                for si in range(g.n_per_question):
                    records.append({"id": f"{io.item.name}-{polarity}-i{ii}-q{qi}-s{si}", "trait": io.item.name,
                                    "polarity": polarity, "instruction_idx": ii, "question_idx": qi,
                                    "sample_idx": si, "system": system, "question": question, "prompt": prompt})

    def make_chunk(ci: int, chunk: list[dict]) -> list[dict]:
        s = g.sampling
        sampling = SamplingParams(s.max_new_tokens, s.temperature, s.top_p, chunk_seed(s.seed, io.item.name, ci))
        answers = generator.generate([chat_messages(tok, r["system"], r["question"]) for r in chunk], sampling,
                                     g.batch_size)
        return [dict(r, answer=a) for r, a in zip(chunk, answers)]

    settings = {"model": generator.label, "backend": g.backend, "sampling": dataclasses.asdict(g.sampling),
                "batch_size": g.batch_size, "chunk_size": g.chunk_size}
    fp = fingerprint(settings, [(r["id"], r["prompt"]) for r in records])
    out = io.output("generations")
    stats = generate_resumable(records, _id, out, fp, make_chunk, g, finished=_answered)
    io.extra["fingerprint"] = fp
    empty = sum(not r["answer"] for r in read_jsonl(out))
    return {"generations": len(records), "resumed": stats["resumed"], "empty_answers": empty}


def _id(rec: dict) -> str:
    return rec["id"]


def _answered(rec: dict, request: dict) -> bool:
    return rec.get("prompt") == request["prompt"] and isinstance(rec.get("answer"), str)


@generate.validator
def _trait_file(cfg, io) -> None:
    load_trait(io.input("trait"))


@stage("judge", **PER_TRAIT, params=["persona_vectors.judge"],
       inputs={"generations": Output("generate", "generations"), "trait": TRAIT_FILE},
       outputs={"judgements": f"{OUT}/judgements.jsonl"})
def judge(cfg, io) -> dict:
    """The trait score (the trait's ``eval_prompt``) and coherence of every answer, 0-100."""
    j = cfg.persona_vectors.judge
    trait = load_trait(io.input("trait"))
    records = read_jsonl(io.input("generations"))
    coherence = coherence_prompt(j.coherence_prompt, io.root)
    judge_model = make_judge(j, io.root, load=io.model)
    io.made_with(judge_model.label)
    prompts = [fill_template(trait.eval_prompt, r["question"], r["answer"]) for r in records]
    prompts += [fill_template(coherence, r["question"], r["answer"]) for r in records]
    scores = judge_model.score(prompts, lo=0, hi=100)
    n = len(records)
    rows = [{"id": r["id"], "polarity": r["polarity"], "trait": scores[i], "coherence": scores[n + i]}
            for i, r in enumerate(records)]
    write_jsonl(io.output("judgements"), rows)
    metrics = {"judged": n, "judge_backend_calls": judge_model.backend_calls,
               "unscored": sum(r["trait"] is None or r["coherence"] is None for r in rows)}
    for pol in ("pos", "neg"):
        for key in ("trait", "coherence"):
            metrics[f"{pol}_{key}_mean"] = _mean(r[key] for r in rows if r["polarity"] == pol)
    return metrics


judge.validator(_trait_file)


@stage("activations", **PER_TRAIT, params=["persona_vectors.model", "persona_vectors.filter",
                                           "persona_vectors.activations"],
       inputs={"generations": Output("generate", "generations"), "judgements": Output("judge", "judgements")},
       outputs={"activations": f"{OUT}/activations.safetensors"})
def activations(cfg, io) -> dict:
    """Filter judged pairs, then capture prompt/response means at every layer for the survivors."""
    from persona_ops.interp.capture import capture_means
    from persona_ops.interp.vectors import filter_pairs, require_pairs, save_vectors

    p = cfg.persona_vectors
    records = read_jsonl(io.input("generations"))
    judgements = {r["id"]: r for r in read_jsonl(io.input("judgements"))}
    pairs, counts = filter_pairs(records, judgements, p.filter)
    require_pairs(counts["pairs_passed"], counts["pairs_total"], p.filter, io.item.name)
    loaded = io.model(p.model)
    tensors = {}
    for side, idx in (("pos", 0), ("neg", 1)):
        recs = [pair[idx] for pair in pairs]
        caps = capture_means(loaded, [r["prompt"] for r in recs], [r["answer"] for r in recs],
                             p.activations.batch_size, desc=f"activations {io.item.name} {side}")
        tensors.update({f"{side}.{k}": v for k, v in caps.items()})
    save_vectors(io.output("activations"), tensors, {"trait": io.item.name, "model": loaded.label,
                                                     "ids": [[a["id"], b["id"]] for a, b in pairs]})
    scored = [judgements[r["id"]] for pair in pairs for r in pair]
    return dict(counts, pos_trait_mean_passed=_mean(s["trait"] for s in scored if s["polarity"] == "pos"),
                neg_trait_mean_passed=_mean(s["trait"] for s in scored if s["polarity"] == "neg"))


@stage("vectors", **PER_TRAIT, params=[], inputs={"activations": Output("activations", "activations")},
       outputs={"vectors": f"{OUT}/vectors.safetensors"},
       registers=(Register("vectors", "persona-vector-{item}", "persona-vector"),))
def vectors(cfg, io) -> dict:
    """mean(pos) - mean(neg) per layer and aggregate: ``[num_layers + 1, hidden]`` (registered)."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors, mean_difference, save_vectors

    acts, meta = load_vectors(io.input("activations"))
    meta = decode_metadata(meta)
    pos = {k.split(".", 1)[1]: v for k, v in acts.items() if k.startswith("pos.")}
    neg = {k.split(".", 1)[1]: v for k, v in acts.items() if k.startswith("neg.")}
    vec = mean_difference(pos, neg)
    n_pairs = next(iter(pos.values())).shape[0]
    save_vectors(io.output("vectors"), vec, {"trait": io.item.name, "model": meta.get("model", "unknown"),
                                             "n_pairs": n_pairs})
    io.made_with(meta.get("model", "unknown"))
    norms = vec["response_avg"].norm(dim=-1)
    return {"n_pairs": n_pairs, "num_layers": vec["response_avg"].shape[0] - 1,
            "response_avg_norm_max": float(norms.max()), "response_avg_norm_argmax_layer": int(norms.argmax())}


def _mean(values) -> float:
    vals = [v for v in values if v is not None]
    return sum(vals) / len(vals) if vals else float("nan")


PIPELINE = Pipeline("persona-vectors", (generate, judge, activations, vectors),
                    "Persona vectors: generate -> judge -> activations -> vectors for each trait.")
