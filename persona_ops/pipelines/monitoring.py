"""Steering sweeps and projections: the steer/monitor half of the persona-vector research.

``steering_sweep``: layers x coefficients x steering kind for one trait's vector; every point
answers the trait's eval questions in ONE generation batch (per-row coefficients), is judged
for the trait and coherence, and the best layer/coefficient is reported.
``projection``: projections of texts onto persona vectors (and the finetuning shift).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.errors import InputError
from persona_ops.models.refs import ModelRef

SWEEP_OUT = Path("outputs/steering")


class SteeringParams(BaseModel):
    """``steering`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")
    traits: list[str] = Field(default_factory=lambda: ["evil"], min_length=1)
    aggregate: Literal["response_avg", "prompt_avg", "prompt_last"] = "response_avg"
    layers: list[int] = Field(default_factory=lambda: [10, 20], min_length=1)
    coefs: list[float] = Field(default_factory=lambda: [0.0, 4.0, 8.0], min_length=1)
    kinds: list[Literal["add", "ablate"]] = Field(default_factory=lambda: ["add"], min_length=1)
    positions: Literal["prompt", "response", "all"] = "response"
    questions_limit: int | None = Field(None, ge=1)
    n_per_question: int = Field(1, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(1.0, ge=0)
    seed: int = 0
    batch_size: int = Field(256, ge=1)
    coherence_min: float = 50.0  # the best point must keep mean coherence at least this high


class ProjectionParams(BaseModel):
    """``projection`` in params.yaml."""

    model_config = ConfigDict(extra="forbid")
    inputs: list[str] = Field(default_factory=list)  # generations / chat JSONL / CSV files
    vectors: dict[str, str] = Field(default_factory=dict)  # name -> vector file
    aggregate: Literal["response_avg", "prompt_avg", "prompt_last"] = "response_avg"
    layers: list[int] = Field(default_factory=lambda: [10, 20], min_length=1)
    types: list[str] = Field(default_factory=lambda: ["proj", "prompt_avg_proj", "prompt_last_proj", "cos_sim"])
    model: ModelRef = Field(default_factory=ModelRef)
    base_model: ModelRef | None = None  # set: also the finetuning shift (model minus base_model)
    out: str = "outputs/projections"


def _vector(path: Path, aggregate: str):
    from persona_ops.interp.vectors import load_vectors

    vecs, _ = load_vectors(path)
    if aggregate not in vecs:
        raise InputError(f"{path}: no {aggregate!r} tensor (has {sorted(vecs)})")
    return vecs[aggregate]


def sweep_points(sp: SteeringParams) -> list[dict]:
    return [{"kind": k, "layer": L, "coef": c} for k in sp.kinds for L in sp.layers for c in sp.coefs]


def steering_sweep(params, trait: str, root: Path):
    """Run the sweep for ``trait`` (``params``: the whole validated Params)."""
    import torch

    from persona_ops.data import load_trait
    from persona_ops.inference.engine import generate_text
    from persona_ops.inference.sampling import SamplingParams
    from persona_ops.interp.interventions import Intervention
    from persona_ops.io import provenance, write_json, write_jsonl
    from persona_ops.judge import COHERENCE_PROMPT, fill_template, make_judge
    from persona_ops.models.loading import load_model
    from persona_ops.pipelines.persona_vectors import StageResult, paths
    from persona_ops.chat import chat_messages, render_prompt
    from persona_ops.reports.sweep import plot_sweep

    sp: SteeringParams = params.steering
    root = Path(root)
    trait_path = root / params.traits.dir / "eval" / f"{trait}.json"
    spec = load_trait(trait_path)
    vec_path = paths(root, trait)["vectors"]
    vector = _vector(vec_path, sp.aggregate)
    bad = [L for L in sp.layers if not 1 <= L < vector.shape[0]]
    if bad:
        raise InputError(f"steering.layers {bad}: expected 1..{vector.shape[0] - 1} (layer L = hidden_states[L])")
    m = params.model
    loaded = load_model(m.name, m.revision, dtype=m.dtype, device=m.device)
    questions = spec.questions[: sp.questions_limit] if sp.questions_limit else spec.questions
    points = sweep_points(sp)
    rows = [{"point": p, "question_idx": qi, "question": q, "sample_idx": si, **pt}
            for p, pt in enumerate(points) for qi, q in enumerate(questions) for si in range(sp.n_per_question)]
    tok = loaded.tokenizer
    prompts = [render_prompt(tok, chat_messages(tok, None, r["question"])) for r in rows]
    interventions = []
    for kind in sp.kinds:
        for layer in sp.layers:  # one intervention per (kind, layer); rows of other points get coef 0
            coefs = torch.tensor([r["coef"] if (r["kind"], r["layer"]) == (kind, layer) else 0.0 for r in rows])
            interventions.append(Intervention(kind, layer, vector[layer], coef=coefs, positions=sp.positions))
    sampling = SamplingParams(sp.max_new_tokens, sp.temperature, 1.0, sp.seed)
    answers = generate_text(loaded, prompts, sampling, interventions, batch_size=sp.batch_size, progress=True)
    j = params.judge
    same = (j.backend == "local" and j.model == m.name and j.revision == m.revision)
    judge = make_judge(j.backend, j.model, revision=j.revision, base_url=j.base_url, api_key_env=j.api_key_env,
                       max_concurrency=j.max_concurrency, max_retries=j.max_retries, timeout=j.timeout,
                       cache_path=root / j.cache, batch_size=j.batch_size, answer_prefix=j.answer_prefix,
                       dtype=m.dtype, device=m.device, loaded=loaded if same else None)
    scores = judge.score([fill_template(spec.eval_prompt, r["question"], a) for r, a in zip(rows, answers)]
                         + [fill_template(COHERENCE_PROMPT, r["question"], a) for r, a in zip(rows, answers)])
    n = len(rows)
    for i, (r, a) in enumerate(zip(rows, answers)):
        r.update(answer=a, trait_score=scores[i], coherence=scores[n + i])
    results = summarize(points, rows, sp.coherence_min)
    out = root / SWEEP_OUT / trait
    write_jsonl(out / "sweep.jsonl", rows)
    write_json(out / "results.json", {"trait": trait, "points": results["points"], "best": results["best"],
                                      "provenance": provenance(stage="steering_sweep", params=sp.model_dump(),
                                                               inputs=[trait_path, vec_path], model=loaded.label)})
    png = plot_sweep(results["points"], out / "sweep.png", trait)
    best = results["best"] or {}
    metrics = {"points": len(points), "generations": n, "judge_backend_calls": judge.backend_calls,
               "best_layer": best.get("layer", -1), "best_coef": best.get("coef", float("nan")),
               "best_trait_score": best.get("trait_score", float("nan")),
               "best_coherence": best.get("coherence", float("nan"))}
    return StageResult(metrics, [trait_path, vec_path], [out / "sweep.jsonl", out / "results.json", png])


def summarize(points: list[dict], rows: list[dict], coherence_min: float) -> dict:
    """Mean trait score and coherence per point; the best point = highest trait score among
    points whose mean coherence is at least ``coherence_min`` (None when no point qualifies)."""
    out = []
    for p, pt in enumerate(points):
        mine = [r for r in rows if r["point"] == p]
        t = [r["trait_score"] for r in mine if r["trait_score"] is not None]
        c = [r["coherence"] for r in mine if r["coherence"] is not None]
        out.append({**pt, "trait_score": sum(t) / len(t) if t else None,
                    "coherence": sum(c) / len(c) if c else None, "n": len(mine)})
    ok = [p for p in out if p["trait_score"] is not None and (p["coherence"] or 0) >= coherence_min]
    return {"points": out, "best": max(ok, key=lambda p: p["trait_score"]) if ok else None}


def projection(pp: ProjectionParams, root: Path):
    """Project every input file onto every vector; write ``<out>/<input stem>.projections.jsonl``
    (inputs are never modified) and correlations with judged trait scores when available."""
    from persona_ops.interp.geometry import pearson
    from persona_ops.io import read_jsonl, write_json, write_jsonl
    from persona_ops.models.adapters import load_model_ref
    from persona_ops.pipelines.persona_vectors import StageResult
    from persona_ops.interp.projection import load_texts, project, shift

    import torch

    root = Path(root)
    if not pp.inputs or not pp.vectors:
        raise InputError("projection.inputs and projection.vectors must both be set")
    vectors = {name: _vector(root / p, pp.aggregate) for name, p in pp.vectors.items()}
    loaded = load_model_ref(pp.model)
    base = load_model_ref(pp.base_model) if pp.base_model else None
    out_dir, outputs, metrics = root / pp.out, [], {}
    for inp in pp.inputs:
        path = root / inp
        records, prompts, answers = load_texts(path, loaded.tokenizer)
        cols = project(loaded, prompts, answers, vectors, pp.layers, pp.types)
        if base is not None:
            cols.update(shift(cols, project(base, prompts, answers, vectors, pp.layers, pp.types)))
        name = f"{path.parent.name}-{path.stem}" if path.stem == "generations" else path.stem
        rows = [{"id": rec.get("id", i), **{c: v[i] for c, v in cols.items()}} for i, rec in enumerate(records)]
        out = out_dir / f"{name}.projections.jsonl"
        write_jsonl(out, rows)
        outputs.append(out)
        judged = path.with_name("judgements.jsonl")
        if judged.exists():  # cross-persona correlation of projection with judged trait score
            scores = {r["id"]: r["trait"] for r in read_jsonl(judged)}
            keep = [i for i, rec in enumerate(records) if scores.get(rec.get("id")) is not None]
            y = torch.tensor([scores[records[i]["id"]] for i in keep])
            for c, v in cols.items():
                if "_proj_layer" in c and not c.endswith("_shift") and len(keep) > 2:
                    metrics[f"corr.{name}.{c}"] = pearson(torch.tensor([v[i] for i in keep]), y)
    write_json(out_dir / "correlations.json", metrics)
    metrics_out = {"inputs": len(pp.inputs), "columns": len(cols), **{k: v for k, v in metrics.items()}}
    return StageResult(metrics_out, [root / p for p in pp.inputs] + [root / p for p in pp.vectors.values()],
                       outputs + [out_dir / "correlations.json"])
