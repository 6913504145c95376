"""Projection: every input text onto every persona vector at the given layers (and the
finetuning shift), correlated with judged trait scores where given.

Writes ``<name>.projections.jsonl`` per input (the inputs are never modified) and
``correlations.json`` into the stage's output directory.
"""

from __future__ import annotations

from pathlib import Path

from persona_ops.errors import InputError
from persona_ops.io import read_jsonl, write_json, write_jsonl
from persona_ops.pipelines.stage import ParamPaths, Pipeline, stage


def output_name(path: Path) -> str:
    """``evil-generations`` for ``.../evil/generations.jsonl``, else the file stem."""
    return f"{path.parent.name}-{path.stem}" if path.stem == "generations" else path.stem


@stage("projection", pipeline="projection", params=["projection"],
       inputs={"texts": ParamPaths("projection.inputs"), "vectors": ParamPaths("projection.vectors")},
       outputs={"projections": "outputs/projections"})
def projection(cfg, io) -> dict:
    import torch

    from persona_ops.interp.geometry import pearson
    from persona_ops.interp.projection import load_texts, project, shift
    from persona_ops.interp.vectors import load_aggregate

    pp = cfg.projection
    vectors = {name: load_aggregate(io.path(p), pp.aggregate) for name, p in pp.vectors.items()}
    loaded = io.model(pp.model)
    base = io.model(pp.base_model) if pp.base_model else None  # the pool switches adapters per use
    out, metrics, columns = io.output("projections"), {}, 0
    for entry in pp.inputs:
        path = io.path(entry.texts)
        records, prompts, answers = load_texts(path, loaded.tokenizer)
        cols = project(loaded, prompts, answers, vectors, pp.layers, pp.types)
        if base is not None:
            cols.update(shift(cols, project(base, prompts, answers, vectors, pp.layers, pp.types)))
        columns = len(cols)
        name = output_name(path)
        write_jsonl(out / f"{name}.projections.jsonl",
                    [{"id": rec.get("id", i), **{c: v[i] for c, v in cols.items()}} for i, rec in enumerate(records)])
        if entry.scores:  # cross-persona correlation of projection with the judged trait score
            scores = {r["id"]: r.get("trait") for r in read_jsonl(io.path(entry.scores))}
            keep = [i for i, rec in enumerate(records) if scores.get(rec.get("id")) is not None]
            y = torch.tensor([scores[records[i]["id"]] for i in keep])
            for c, v in cols.items():
                if "_proj_layer" in c and not c.endswith("_shift") and len(keep) > 2:
                    metrics[f"corr.{name}.{c}"] = pearson(torch.tensor([v[i] for i in keep]), y)
    write_json(out / "correlations.json", metrics)
    return {"inputs": len(pp.inputs), "columns": columns, **metrics}


@projection.validator
def _inputs_given(cfg, io) -> None:
    if not cfg.projection.inputs or not cfg.projection.vectors:
        raise InputError("projection.inputs and projection.vectors must both be set")
    io.check_layers(cfg.projection.model, "projection.layers", cfg.projection.layers, first=0)


PIPELINE = Pipeline("projection", (projection,),
                    "Projections of projection.inputs onto persona vectors (+ finetuning shift), "
                    "correlated with judged scores.")
