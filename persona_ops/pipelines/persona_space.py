"""The persona-space pipeline (Lu et al. 2026, "The Assistant Axis").

Stages, each ``fn(params, root, ...) -> StageResult``, reading and writing files under
``<root>/<params.out>`` (default ``outputs/persona_space``)::

    transcripts/<role>.jsonl                  roles x instructions x questions x rollouts
    transcripts/<role>.provenance.json        what made it (and the resume fingerprint)
    scores/<role>.scores.jsonl                0-3 role expression per record (not for default)
    activations/<role>_activations.safetensors  response_avg [n, len(layers), H] (header: layers)
    activations/<role>_metadata.json          [{system_prompt_idx, question_idx, rollout_idx}] per row
    persona_space.safetensors                 PCA + Assistant Axis (persona_ops.persona_space)
    persona_space.metrics.json                variance explained, PCs for 70/80/90%, dropped roles, cosines
    role_vectors.safetensors                  one [rows, H] vector per kept role, plus ``default``
    checkpoints/<label>/activations/...       the same transcripts replayed through a checkpoint
    trajectory/trajectory.jsonl, *.png        checkpoints placed in the reference space

Layers follow ``hidden_states`` indexing (0 = embedding output). The default role
(``default.json``) is always included: the axis needs it. Nothing here imports prefect,
mlflow or dvc.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from persona_ops.data import DEFAULT_ROLE, Role, load_questions, load_role
from persona_ops.errors import InputError
from persona_ops.judge.settings import JudgeCfg
from persona_ops.io import provenance, read_json, read_jsonl, write_json, write_jsonl

OUT = Path("outputs/persona_space")
KEY_FIELDS = ("system_prompt_idx", "question_idx", "rollout_idx")


# --- parameters ---------------------------------------------------------------

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelRef(_Section):
    """A model to load: ``embedded``, an HF id[@revision] or a local directory, optionally with a
    LoRA adapter checkpoint on top. Used by every pipeline (``model`` sections of params.yaml)."""

    name: str = "embedded"
    revision: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    adapter: str | None = None  # a LoRA adapter checkpoint directory applied on top




class RolesCfg(_Section):
    dir: str = "data/roles/instructions"
    questions: str = "data/roles/questions.jsonl"
    names: list[str] | None = None  # None = every role file in dir; default is always added
    instructions_limit: int | None = Field(None, ge=1)
    questions_limit: int | None = Field(None, ge=1)
    model_name: str | None = None  # fills {model_name} in default.json; None = derived from model.name


class TranscriptsCfg(_Section):
    backend: Literal["hf", "vllm", "openai"] = "hf"
    rollouts: int = Field(1, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    chunk_size: int = Field(64, ge=1)  # records generated and appended per chunk
    resume: bool = True


class RoleActivationsCfg(_Section):
    layers: list[int] | None = None  # None = [space.layer] (the middle layer when that is None)
    all_layers: bool = False
    batch_size: int = Field(16, ge=1)
    chunk_size: int = Field(256, ge=1)  # records per capture call (bounds host memory)
    resume: bool = True


class RoleVectorsCfg(_Section):
    score_field: Literal["label", "score"] = "label"  # label = most likely integer; score = expected value
    threshold: float = 3.0  # keep samples with score >= threshold (3 = fully plays the role)
    min_count: int = Field(50, ge=1)  # fewer qualifying samples: the role is dropped


class SpaceCfg(_Section):
    layer: int | None = None  # None = num_layers // 2


class CheckpointCfg(_Section):
    label: str
    model: ModelRef
    step: float | None = None


class TrajectoryCfg(_Section):
    checkpoints: list[CheckpointCfg] = Field(default_factory=list)
    n_pcs: int = Field(3, ge=1)
    label_roles: list[str] | None = None  # roles labelled in scatter plots; None = all


class PersonaSpaceParams(_Section):
    """All parameters of the persona-space pipeline."""

    model: ModelRef = Field(default_factory=ModelRef)
    roles: RolesCfg = Field(default_factory=RolesCfg)
    transcripts: TranscriptsCfg = Field(default_factory=TranscriptsCfg)
    judge: JudgeCfg = Field(default_factory=JudgeCfg)
    activations: RoleActivationsCfg = Field(default_factory=RoleActivationsCfg)
    vectors: RoleVectorsCfg = Field(default_factory=RoleVectorsCfg)
    space: SpaceCfg = Field(default_factory=SpaceCfg)
    trajectory: TrajectoryCfg = Field(default_factory=TrajectoryCfg)
    out: str = str(OUT)


# --- paths and shared helpers -------------------------------------------------

def out_dir(params: PersonaSpaceParams, root: Path) -> Path:
    return Path(root) / params.out


def activations_dir(params: PersonaSpaceParams, root: Path, checkpoint: str | None = None) -> Path:
    """The reference model's activations, or a checkpoint's (``checkpoints/<label>/activations``)."""
    base = out_dir(params, root)
    return base / "activations" if checkpoint is None else base / "checkpoints" / checkpoint / "activations"


def role_names(params: PersonaSpaceParams, root: Path) -> list[str]:
    """Roles to process: ``roles.names`` or every ``*.json`` in ``roles.dir``; default first."""
    d = Path(root) / params.roles.dir
    available = sorted(p.stem for p in d.glob("*.json"))
    if not available:
        raise InputError(f"{d}: no role files (*.json)")
    names = available if params.roles.names is None else list(dict.fromkeys(params.roles.names))
    missing = [n for n in names + [DEFAULT_ROLE] if n not in available]
    if missing:
        raise InputError(f"{d}: no role file for {', '.join(missing)} (roles.names); "
                         f"available: {', '.join(available[:20])}{' ...' if len(available) > 20 else ''}")
    return [DEFAULT_ROLE] + [n for n in names if n != DEFAULT_ROLE]


def load_roles(params: PersonaSpaceParams, root: Path) -> list[Role]:
    d = Path(root) / params.roles.dir
    return [load_role(d / f"{n}.json") for n in role_names(params, root)]


def model_short_name(params: PersonaSpaceParams) -> str:
    """``roles.model_name``, else the first word of the model id (``Qwen/Qwen3-32B`` -> ``Qwen3``)."""
    if params.roles.model_name:
        return params.roles.model_name
    from persona_ops.models import EMBEDDED, EMBEDDED_ID

    name = EMBEDDED_ID if params.model.name == EMBEDDED else params.model.name.split("@")[0]
    return name.rstrip("/").split("/")[-1].split("-")[0] or name


def record_key(rec: dict) -> tuple[int, int, int]:
    return tuple(int(rec[k]) for k in KEY_FIELDS)  # type: ignore[return-value]


def _load_model(ref: ModelRef):
    from persona_ops.models import load_model

    loaded = load_model(ref.name, ref.revision, dtype=ref.dtype, device=ref.device)
    if ref.adapter:
        from persona_ops.training import load_adapter_checkpoint

        loaded = load_adapter_checkpoint(loaded, ref.adapter)
    return loaded


def registered_space_name(params: "PersonaSpaceParams") -> str:
    """``persona-space-<model>``: the registry name of this configuration's persona space."""
    import re

    from persona_ops.models import EMBEDDED, EMBEDDED_ID

    name = EMBEDDED_ID if params.model.name == EMBEDDED else params.model.name
    short = name.split("@")[0].rstrip("/").split("/")[-1].lower()
    return "persona-space-" + re.sub(r"[^a-z0-9.]+", "-", short).strip("-")


def _result(metrics: dict, inputs: list[Path], outputs: list[Path], register: dict | None = None):
    # imported here so that importing this module never imports persona_ops.config
    from persona_ops.pipelines.persona_vectors import StageResult

    return StageResult(metrics, inputs, outputs, register or {})


# --- stage 1: transcripts -----------------------------------------------------

def build_role_requests(role: Role, questions: list, tokenizer, params: PersonaSpaceParams) -> list[dict]:
    """One record per instruction x question x rollout, in a fixed order, with its rendered prompt."""
    from persona_ops.chat import chat_messages, render_prompt

    r = params.roles
    systems = role.system_prompts(model_short_name(params))[: r.instructions_limit]
    qs = questions[: r.questions_limit]
    out = []
    for si, system in enumerate(systems):
        for qi, q in enumerate(qs):
            prompt = render_prompt(tokenizer, chat_messages(tokenizer, system or None, q.question))
            for ri in range(params.transcripts.rollouts):
                out.append({"system_prompt_idx": si, "question_idx": qi, "rollout_idx": ri,
                            "system_prompt": system, "question": q.question, "prompt": prompt})
    return out


def _fingerprint(requests: list[dict], params: PersonaSpaceParams, model_label: str) -> str:
    """What the records of a role depend on: prompts, sampling, chunking and the model."""
    t = params.transcripts
    h = hashlib.sha256()
    h.update(json.dumps({"model": model_label, "backend": t.backend, "max_new_tokens": t.max_new_tokens,
                         "temperature": t.temperature, "top_p": t.top_p, "seed": t.seed,
                         "batch_size": t.batch_size, "chunk_size": t.chunk_size}, sort_keys=True).encode())
    for rec in requests:
        h.update(json.dumps([record_key(rec), rec["prompt"]]).encode())
    return h.hexdigest()


def chunk_seed(seed: int, role: str, chunk: int) -> int:
    """A per-(role, chunk) seed, so a resumed chunk is generated exactly as the first time."""
    return zlib.crc32(f"{seed}:{role}:{chunk}".encode()) & 0x7FFFFFFF


def _read_partial(path: Path, expected: dict[tuple, dict]) -> dict[tuple, dict]:
    """Records of a partial file that match a request; a torn last line (a kill mid-write) is ignored."""
    done: dict[tuple, dict] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").split("\n"):
        try:
            rec = json.loads(line)
            key = record_key(rec)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # empty, torn or foreign line
        req = expected.get(key)
        if req is not None and rec.get("prompt") == req["prompt"] and isinstance(rec.get("response"), str):
            done.setdefault(key, rec)
    return done


def _append(path: Path, records: list[dict]) -> None:
    """Append records in one write, flushed to disk before returning."""
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _transcript_paths(d: Path, role: str) -> dict[str, Path]:
    return {"final": d / f"{role}.jsonl", "provenance": d / f"{role}.provenance.json",
            "partial": d / f"{role}.partial.jsonl", "partial_meta": d / f"{role}.partial.meta.json"}


def generate_role_transcripts(loaded, role: Role, questions: list, params: PersonaSpaceParams, d: Path,
                              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Generate (or resume) one role's transcripts into ``d/<role>.jsonl``.

    Requests are cut into fixed chunks, each generated with its own seed and appended to
    ``<role>.partial.jsonl`` in one flushed write. On resume, records already in the partial
    file are kept and only chunks with missing records are regenerated (whole, so outputs
    equal an uninterrupted run); only the missing records are appended. The complete file
    is written atomically, then the partial files are removed. ``on_chunk(role, i)`` is
    called after chunk ``i`` is on disk. Returns counts.
    """
    from persona_ops.generation import SamplingParams, generate

    t = params.transcripts
    p = _transcript_paths(d, role.name)
    requests = build_role_requests(role, questions, loaded.tokenizer, params)
    fp = _fingerprint(requests, params, loaded.label)
    if t.resume and p["final"].exists() and p["provenance"].exists() \
            and read_json(p["provenance"]).get("fingerprint") == fp:
        for k in ("partial", "partial_meta"):
            p[k].unlink(missing_ok=True)  # a kill after the final write left them behind
        return {"records": len(requests), "generated": 0, "skipped": 1}

    expected = {record_key(r): r for r in requests}
    done: dict[tuple, dict] = {}
    if t.resume and p["partial_meta"].exists() and read_json(p["partial_meta"]).get("fingerprint") == fp:
        done = _read_partial(p["partial"], expected)
        write_jsonl(p["partial"], [done[k] for k in expected if k in done])  # drops torn or stale lines
    else:
        p["partial"].unlink(missing_ok=True)
        write_json(p["partial_meta"], {"role": role.name, "fingerprint": fp})
    resumed = len(done)

    generated = 0
    for ci, start in enumerate(range(0, len(requests), t.chunk_size)):
        chunk = requests[start:start + t.chunk_size]
        if all(record_key(r) in done for r in chunk):
            continue
        sampling = SamplingParams(t.max_new_tokens, t.temperature, t.top_p, chunk_seed(t.seed, role.name, ci))
        answers = generate(loaded, [r["prompt"] for r in chunk], sampling, t.batch_size,
                           desc=f"transcripts {role.name} {ci}")
        new = [dict(r, response=a) for r, a in zip(chunk, answers) if record_key(r) not in done]
        _append(p["partial"], new)
        done.update((record_key(r), r) for r in new)
        generated += len(chunk)
        if on_chunk is not None:
            on_chunk(role.name, ci)

    write_jsonl(p["final"], [done[k] for k in expected])
    prov = provenance(stage="persona_space.transcripts", params=params.model_dump(), model=loaded.label,
                      inputs=[role.path])
    write_json(p["provenance"], {"fingerprint": fp, "records": len(requests), **prov})
    p["partial"].unlink(missing_ok=True)
    p["partial_meta"].unlink(missing_ok=True)
    return {"records": len(requests), "generated": generated, "resumed": resumed, "skipped": 0}


def transcripts(params: PersonaSpaceParams, root: Path, loaded=None,
                on_chunk: Callable[[str, int], None] | None = None) -> "StageResult":
    """Stage 1: generate every role's transcripts (``hf`` backend), resumable at chunk level."""
    if params.transcripts.backend != "hf":
        raise InputError(f"transcripts.backend={params.transcripts.backend!r} is not implemented yet; "
                         "use transcripts.backend=hf")
    root = Path(root)
    roles = load_roles(params, root)  # validate the data before loading a model
    qpath = root / params.roles.questions
    questions = load_questions(qpath)
    loaded = loaded or _load_model(params.model)
    d = out_dir(params, root) / "transcripts"
    d.mkdir(parents=True, exist_ok=True)
    totals = {"records": 0, "generated": 0, "skipped": 0}
    outputs = []
    for role in roles:
        stats = generate_role_transcripts(loaded, role, questions, params, d, on_chunk)
        for k in totals:
            totals[k] += stats.get(k, 0)
        outputs.append(d / f"{role.name}.jsonl")
    metrics = {"roles": len(roles), "records": totals["records"], "generated": totals["generated"],
               "roles_skipped": totals["skipped"]}
    return _result(metrics, [r.path for r in roles] + [qpath], outputs)


def read_transcripts(params: PersonaSpaceParams, root: Path, role: str) -> list[dict]:
    path = out_dir(params, root) / "transcripts" / f"{role}.jsonl"
    if not path.exists():
        raise InputError(f"{path}: no transcripts for role {role!r}; run the transcripts stage first")
    return read_jsonl(path)


# --- stage 2: judge -----------------------------------------------------------

def _label(score, probs: dict[int, float]) -> int | None:
    """The most likely integer answer (ties go to the lower one); None when the score is None."""
    if score is None or not probs:
        return None
    return max(sorted(probs), key=lambda k: probs[k])


def _make_judge(params: PersonaSpaceParams, root: Path):
    from persona_ops.judge import make_judge

    j = params.judge
    return make_judge(j.backend, j.model, revision=j.revision, base_url=j.base_url, api_key_env=j.api_key_env,
                      max_concurrency=j.max_concurrency, max_retries=j.max_retries, timeout=j.timeout,
                      cache_path=Path(root) / j.cache, batch_size=j.batch_size, answer_prefix=j.answer_prefix,
                      dtype=params.model.dtype, device=params.model.device)


def judge_roles(params: PersonaSpaceParams, root: Path, judge=None) -> "StageResult":
    """Stage 2: the 0-3 role-expression score of every response (the default role is skipped).

    Writes ``scores/<role>.scores.jsonl``: one ``{index, system_prompt_idx, question_idx,
    rollout_idx, score, label, probs}`` per transcript record (``index`` = its line), where
    ``score`` is the expected value and ``label`` the most likely integer.
    """
    from persona_ops.judge import fill_template

    root = Path(root)
    roles = [r for r in load_roles(params, root) if not r.is_default]
    judge = judge or _make_judge(params, root)
    d = out_dir(params, root) / "scores"
    inputs, outputs = [], []
    n = unscored = full = 0
    score_sum = 0.0
    for role in roles:
        records = read_transcripts(params, root, role.name)
        prompts = [fill_template(role.eval_prompt, r["question"], r["response"]) for r in records]
        details = judge.score_details(prompts, lo=0, hi=3)
        rows = []
        for i, (rec, det) in enumerate(zip(records, details)):
            label = _label(det.score, det.probs)
            rows.append({"index": i, **{k: rec[k] for k in KEY_FIELDS}, "score": det.score, "label": label,
                         "probs": {str(k): v for k, v in sorted(det.probs.items())}})
            n += 1
            unscored += det.score is None
            full += label == 3
            score_sum += det.score or 0.0
        out = d / f"{role.name}.scores.jsonl"
        write_jsonl(out, rows)
        src = out_dir(params, root) / "transcripts" / f"{role.name}.jsonl"
        write_json(out.with_name(f"{role.name}.scores.provenance.json"),
                   provenance(stage="persona_space.judge", params=params.judge.model_dump(),
                              inputs=[src, role.path], model=judge.label))
        inputs += [src, role.path]
        outputs.append(out)
    metrics = {"roles": len(roles), "judged": n, "unscored": unscored,
               "label3_fraction": full / n if n else float("nan"),
               "mean_score": score_sum / (n - unscored) if n > unscored else float("nan"),
               "judge_backend_calls": getattr(judge, "backend_calls", 0)}
    return _result(metrics, inputs, outputs)


def read_scores(params: PersonaSpaceParams, root: Path, role: str) -> dict[tuple, float | None]:
    """``(system_prompt_idx, question_idx, rollout_idx) -> score`` (the field ``vectors.score_field``)."""
    path = out_dir(params, root) / "scores" / f"{role}.scores.jsonl"
    if not path.exists():
        raise InputError(f"{path}: no scores for role {role!r}; run the judge stage first")
    return {record_key(r): r[params.vectors.score_field] for r in read_jsonl(path)}


# --- stage 3: activations -----------------------------------------------------

def capture_layers(params: PersonaSpaceParams, num_layers: int) -> list[int]:
    """The ``hidden_states`` layers to keep: all, ``activations.layers``, or ``[space layer]``."""
    from persona_ops.persona_space import middle_layer

    if params.activations.all_layers:
        return list(range(num_layers + 1))
    layers = params.activations.layers
    if layers is None:
        layers = [params.space.layer if params.space.layer is not None else middle_layer(num_layers)]
    bad = [x for x in layers if not 0 <= x <= num_layers]
    if bad:
        raise InputError(f"activations.layers: {bad} outside 0..{num_layers} (hidden_states indices)")
    return sorted(set(layers))


def _activation_paths(d: Path, role: str) -> tuple[Path, Path]:
    return d / f"{role}_activations.safetensors", d / f"{role}_metadata.json"


def _activations_current(tensor_path: Path, meta_path: Path, keys: list[dict], layers: list[int],
                         model: str) -> bool:
    from persona_ops.vectors import load_vectors

    if not (tensor_path.exists() and meta_path.exists()) or read_json(meta_path) != keys:
        return False
    header = _decode_header(load_vectors(tensor_path)[1])
    return header.get("layers") == layers and header.get("model") == model


def _decode_header(raw: dict[str, str]) -> dict:
    """safetensors metadata as written by ``save_vectors``: JSON values, plain strings kept as is."""
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out


def role_activations(params: PersonaSpaceParams, root: Path, loaded=None,
                     checkpoint: str | None = None) -> "StageResult":
    """Stage 3: mean residual stream over response tokens at the configured layers, per record.

    ``checkpoint`` (a label in ``trajectory.checkpoints``) replays the reference transcripts
    through that checkpoint into ``checkpoints/<label>/activations``. Records with an empty
    response are skipped (no response tokens); ``<role>_metadata.json`` lists the kept rows.
    """
    from persona_ops.activations import capture_means
    from persona_ops.vectors import save_vectors

    root = Path(root)
    ref = params.model
    if checkpoint is not None:
        ref = next((c.model for c in params.trajectory.checkpoints if c.label == checkpoint), None)
        if ref is None:
            raise InputError(f"checkpoint {checkpoint!r} is not in trajectory.checkpoints "
                             f"{[c.label for c in params.trajectory.checkpoints]}")
    names = role_names(params, root)
    for name in names:  # fail before loading the model
        if not (out_dir(params, root) / "transcripts" / f"{name}.jsonl").exists():
            raise InputError(f"no transcripts for role {name!r}; run the transcripts stage first")
    loaded = loaded or _load_model(ref)
    layers = capture_layers(params, loaded.num_layers)
    d = activations_dir(params, root, checkpoint)
    a = params.activations
    inputs, outputs = [], []
    captured = skipped_roles = empty = 0
    for name in names:
        records = read_transcripts(params, root, name)
        kept = [r for r in records if r["response"].strip()]
        empty += len(records) - len(kept)
        keys = [{k: r[k] for k in KEY_FIELDS} for r in kept]
        tensor_path, meta_path = _activation_paths(d, name)
        inputs.append(out_dir(params, root) / "transcripts" / f"{name}.jsonl")
        outputs += [tensor_path, meta_path]
        if a.resume and _activations_current(tensor_path, meta_path, keys, layers, loaded.label):
            skipped_roles += 1
            continue
        parts = []
        for start in range(0, len(kept), a.chunk_size):
            chunk = kept[start:start + a.chunk_size]
            means = capture_means(loaded, [r["prompt"] for r in chunk], [r["response"] for r in chunk],
                                  a.batch_size, desc=f"activations {name}")
            parts.append(means["response_avg"][:, layers].float().contiguous())
        acts = torch.cat(parts) if parts else torch.zeros(0, len(layers), loaded.hidden_size)
        save_vectors(tensor_path, {"response_avg": acts}, {
            "role": name, "model": loaded.label, "layers": layers, "num_layers": loaded.num_layers,
            "checkpoint": checkpoint or "", "positions": "response"})
        write_json(meta_path, keys)  # written last: its presence marks the role complete
        captured += len(kept)
    metrics = {"roles": len(names), "captured": captured, "roles_skipped": skipped_roles,
               "empty_responses": empty, "layers": len(layers)}
    return _result(metrics, inputs, outputs)


def read_activations(d: Path, role: str) -> tuple[torch.Tensor, list[tuple], dict]:
    """``(response_avg [n, rows, H], keys per row, header)`` of one role; header values decoded."""
    from persona_ops.vectors import load_vectors

    tensor_path, meta_path = _activation_paths(d, role)
    if not (tensor_path.exists() and meta_path.exists()):
        raise InputError(f"{tensor_path}: no activations for role {role!r}; run the activations stage first")
    tensors, raw = load_vectors(tensor_path)
    header = _decode_header(raw)
    keys = [record_key(k) for k in read_json(meta_path)]
    acts = tensors["response_avg"]
    if acts.shape[0] != len(keys):
        raise InputError(f"{tensor_path}: {acts.shape[0]} rows but {len(keys)} entries in {meta_path}")
    return acts, keys, header


# --- stage 4: persona space ---------------------------------------------------

def build_role_vectors(params: PersonaSpaceParams, root: Path, acts_dir: Path, min_count: int | None = None,
                       ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, int], list[int], int]:
    """Role vectors (reference scores, ``vectors.threshold``), the default vector, the roles
    dropped (name -> qualifying count), the captured layers and the model's layer count."""
    from persona_ops.persona_space import count_passing, default_vector, role_vector

    v = params.vectors
    min_count = v.min_count if min_count is None else min_count
    vectors: dict[str, torch.Tensor] = {}
    dropped: dict[str, int] = {}
    default = None
    layers = num_layers = None
    for name in role_names(params, root):
        acts, keys, header = read_activations(acts_dir, name)
        if layers is None:
            layers, num_layers = [int(x) for x in header["layers"]], int(header["num_layers"])
        elif [int(x) for x in header["layers"]] != layers:
            raise InputError(f"{acts_dir}: role {name!r} has layers {header['layers']}, others {layers}")
        if name == DEFAULT_ROLE:
            default = default_vector(acts)
            continue
        scores = read_scores(params, root, name)
        s = [scores.get(k) for k in keys]
        vec = role_vector(acts, s, v.threshold, min_count)
        if vec is None:
            dropped[name] = count_passing(s, v.threshold)
        else:
            vectors[name] = vec
    assert default is not None and layers is not None and num_layers is not None
    return vectors, default, dropped, layers, num_layers


def persona_space(params: PersonaSpaceParams, root: Path) -> "StageResult":
    """Stage 4: role vectors, default vector, PCA at the space layer, Assistant Axis, cosines."""
    from persona_ops.persona_space import fit_persona_space, middle_layer, save_persona_space
    from persona_ops.vectors import save_vectors

    root = Path(root)
    base = out_dir(params, root)
    acts_dir = activations_dir(params, root)
    vectors, default, dropped, layers, num_layers = build_role_vectors(params, root, acts_dir)
    layer = params.space.layer if params.space.layer is not None else middle_layer(num_layers)
    if layer not in layers:
        raise InputError(f"space.layer={layer} was not captured (activations have layers {layers}); "
                         "set activations.layers or activations.all_layers")
    if len(vectors) < 2:
        raise InputError(f"only {len(vectors)} roles have >= vectors.min_count={params.vectors.min_count} "
                         f"samples with {params.vectors.score_field} >= {params.vectors.threshold} "
                         f"(dropped: {dropped}); lower vectors.min_count or generate more rollouts")
    space = fit_persona_space(vectors, default, layer, layers)
    names = role_names(params, root)
    inputs = [p for n in names for p in _activation_paths(acts_dir, n)]
    inputs += [base / "scores" / f"{n}.scores.jsonl" for n in names if n != DEFAULT_ROLE]
    prov = provenance(stage="persona_space.space", params=params.model_dump(), inputs=inputs,
                      model=params.model.name)
    space_path, vec_path = base / "persona_space.safetensors", base / "role_vectors.safetensors"
    meta = {"model": params.model.name, "num_layers": num_layers, "threshold": params.vectors.threshold,
            "min_count": params.vectors.min_count, "score_field": params.vectors.score_field,
            "dropped": dropped, "provenance": prov}
    save_persona_space(space_path, space, meta)
    save_vectors(vec_path, {**vectors, "default": default}, {**meta, "layers": layers})
    summary = space.summary()
    report = {**summary, "n_dropped": len(dropped), "dropped_roles": dropped,
              "explained_variance_ratio": [float(x) for x in space.explained_variance_ratio[:50]],
              "pcs_for": space.pcs_for_levels, "layers": layers,
              "axis_pc1_cos_per_layer": {str(L): float(c) for L, c in zip(layers, space.axis_pc1_cos)},
              "default_pcs": [float(x) for x in space.default_coords[:10]],
              "role_pc1": {r: float(x) for r, x in zip(space.roles, space.loadings[:, 0])}}
    metrics_path = base / "persona_space.metrics.json"
    write_json(metrics_path, report)
    metrics = {**summary, "n_dropped": len(dropped)}
    return _result(metrics, inputs, [space_path, vec_path, metrics_path],
                   register={registered_space_name(params): space_path})


# --- stage 5: trajectories ----------------------------------------------------

def trajectory_point(params: PersonaSpaceParams, root: Path, checkpoint_acts: Path, space,
                     label: str = "", step: float | None = None) -> dict:
    """Place one checkpoint in the reference persona space.

    ``checkpoint_acts`` holds the checkpoint's ``<role>_activations.safetensors`` over the
    reference transcripts; role vectors use the *reference* scores and threshold (the same
    samples at every checkpoint), without ``min_count`` (the reference space already chose
    its roles). Returns a JSON-ready record (see ``persona_space.checkpoint_coordinates``).
    """
    from persona_ops.persona_space import checkpoint_coordinates

    vectors, default, _, layers, _ = build_role_vectors(params, root, Path(checkpoint_acts), min_count=1)
    rec = checkpoint_coordinates(space, vectors, default, layers, params.trajectory.n_pcs)
    return {"checkpoint": label, "step": step, **rec}


def trajectory(params: PersonaSpaceParams, root: Path) -> "StageResult":
    """Stage 5: a trajectory point per ``trajectory.checkpoints`` entry, a JSONL file and plots."""
    from persona_ops.persona_space import load_persona_space

    root = Path(root)
    base = out_dir(params, root)
    if not params.trajectory.checkpoints:
        raise InputError("trajectory.checkpoints is empty; list {label, model: {name, revision}} entries")
    space_path = base / "persona_space.safetensors"
    if not space_path.exists():
        raise InputError(f"{space_path}: no persona space; run the persona_space stage first")
    space = load_persona_space(space_path)
    records, inputs = [], [space_path]
    for c in params.trajectory.checkpoints:
        d = activations_dir(params, root, c.label)
        records.append(trajectory_point(params, root, d, space, c.label, c.step))
        inputs.append(d)
    out = base / "trajectory"
    write_jsonl(out / "trajectory.jsonl", records)
    pngs = plot_trajectory(records, out, space, params.trajectory.label_roles)
    d0, d1 = records[0]["default"]["axis"], records[-1]["default"]["axis"]
    metrics = {"checkpoints": len(records), "default_axis_first": d0, "default_axis_last": d1,
               "default_axis_change": d1 - d0,
               "axis_cos_reference_min": min(r["axis_cos_reference"] for r in records)}
    return _result(metrics, inputs, [out / "trajectory.jsonl", *pngs])


def plot_trajectory(records: list[dict], out: Path, space=None, label_roles: list[str] | None = None,
                    ) -> list[Path]:
    """PNG plots of a trajectory: ``pc_scatter.png`` (PC1-PC2 per checkpoint, roles labelled),
    ``axis_projection.png`` and ``pc_coordinates.png`` (vs checkpoint) and ``default_path.png``
    (the default Assistant's path over the reference roles). Returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from persona_ops.io import atomic_path

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    labels = [r["checkpoint"] or str(i) for i, r in enumerate(records)]
    steps = [r.get("step") for r in records]
    x = steps if all(s is not None for s in steps) else list(range(len(records)))
    roles = sorted({n for r in records for n in r["roles"]})
    shown = set(roles if label_roles is None else label_roles)
    n_pcs = min(r["n_pcs"] for r in records)
    paths = []

    def save(fig, name: str) -> None:
        path = out / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    def pc(place: dict, i: int) -> float:
        return place["pcs"][i] if len(place["pcs"]) > i else 0.0

    # 1. PC1-PC2 scatter per checkpoint
    cols = min(4, len(records))
    rows = -(-len(records) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False, sharex=True, sharey=True)
    for ax, rec, lab in zip(axes.flat, records, labels):
        xs = [pc(rec["roles"][n], 0) for n in rec["roles"]]
        ys = [pc(rec["roles"][n], 1) for n in rec["roles"]]
        ax.scatter(xs, ys, s=12, c="tab:blue", alpha=0.7)
        for n, a, b in zip(rec["roles"], xs, ys):
            if n in shown:
                ax.annotate(n, (a, b), fontsize=6, alpha=0.8)
        ax.scatter([pc(rec["default"], 0)], [pc(rec["default"], 1)], marker="*", s=160, c="tab:red",
                   label="default Assistant")
        ax.set_title(lab, fontsize=9)
        ax.set_xlabel("PC1")
        ax.set_ylabel("PC2")
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    save(fig, "pc_scatter.png")

    # 2. axis projection vs checkpoint
    fig, ax = plt.subplots(figsize=(7, 4))
    for n in roles:
        ys = [r["roles"][n]["axis"] if n in r["roles"] else float("nan") for r in records]
        ax.plot(x, ys, color="grey", lw=0.6, alpha=0.5)
    ax.plot(x, [r["role_mean"]["axis"] for r in records], "k--", lw=1.5, label="role mean")
    ax.plot(x, [r["default"]["axis"] for r in records], "o-", color="tab:red", lw=2, label="default Assistant")
    ax.set_xticks(x, labels, rotation=30, fontsize=7)
    ax.set_ylabel("projection on the Assistant Axis")
    ax.legend(fontsize=8)
    save(fig, "axis_projection.png")

    # 3. PC coordinates vs checkpoint
    fig, axes = plt.subplots(1, n_pcs, figsize=(4.2 * n_pcs, 3.6), squeeze=False)
    for i, ax in enumerate(axes[0]):
        for n in roles:
            ys = [pc(r["roles"][n], i) if n in r["roles"] else float("nan") for r in records]
            ax.plot(x, ys, color="grey", lw=0.6, alpha=0.5)
        ax.plot(x, [pc(r["role_mean"], i) for r in records], "k--", lw=1.5, label="role mean")
        ax.plot(x, [pc(r["default"], i) for r in records], "o-", color="tab:red", lw=2, label="default")
        ax.set_title(f"PC{i + 1}")
        ax.set_xticks(x, labels, rotation=30, fontsize=7)
    axes[0][0].legend(fontsize=7)
    save(fig, "pc_coordinates.png")

    # 4. the default Assistant's path in PC1-PC2 over the reference roles
    fig, ax = plt.subplots(figsize=(6, 5))
    if space is not None:
        ref = space.loadings
        ax.scatter(ref[:, 0], ref[:, 1] if ref.shape[1] > 1 else torch.zeros(len(ref)), s=10, c="lightgrey",
                   label="reference roles")
    px = [pc(r["default"], 0) for r in records]
    py = [pc(r["default"], 1) for r in records]
    ax.plot(px, py, "-", color="tab:red", lw=1)
    ax.scatter(px, py, c=range(len(px)), cmap="viridis", s=40, zorder=3)
    for a, b, lab in zip(px, py, labels):
        ax.annotate(lab, (a, b), fontsize=7)
    ax.set_xlabel("PC1")
    ax.set_ylabel("PC2")
    ax.set_title("default Assistant across checkpoints")
    ax.legend(fontsize=7)
    save(fig, "default_path.png")
    return paths


STAGES = {"transcripts": transcripts, "judge": judge_roles, "activations": role_activations,
          "persona_space": persona_space, "trajectory": trajectory}
