"""The persona-space pipeline (Lu et al. 2026, "The Assistant Axis").

Stages, each ``fn(params, root, ...) -> StageResult``, reading and writing files under
``<root>/<params.out>`` (default ``outputs/persona_space``)::

    transcripts/<role>.jsonl                  roles x instructions x questions x rollouts
    transcripts/<role>.provenance.json        what made it (and the resume fingerprint)
    scores/<role>.scores.jsonl                0-3 role expression per record (empty for default)
    activations/<role>_activations.safetensors  response_avg [n, len(layers), H] (header: layers)
    activations/<role>_metadata.json          [{system_prompt_idx, question_idx, rollout_idx}] per row
    persona_space.safetensors                 PCA + Assistant Axis (persona_ops.interp.space)
    persona_space.metrics.json                variance explained, PCs for 70/80/90%, dropped roles, cosines
    role_vectors.safetensors                  one [rows, H] vector per kept role, plus ``default``
    capping.safetensors, capping.json         activation-capping spec on the axis (persona_ops.interp.capping)
    checkpoints/<label>/activations/...       the same transcripts replayed through a checkpoint
    trajectory/trajectory.jsonl, *.png        checkpoints placed in the reference space, per family

Layers follow ``hidden_states`` indexing (0 = embedding output). The default role
(``default.json``) is always included: the axis needs it (``roles.names`` must list it).
The transcripts, judge and activations stages take ``role=`` to run one role (what the DVC
stage ``STAGE@role`` does) or run them all. Nothing here imports prefect, mlflow or dvc.
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Callable, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from persona_ops.inference.backends import Backend, OpenAIGenerationCfg, VLLMCfg
from persona_ops.models.adapters import load_model_ref
from persona_ops.models.refs import ModelRef
from persona_ops.data import DEFAULT_ROLE, Role, load_questions, load_role
from persona_ops.errors import InputError
from persona_ops.judge.settings import JudgeCfg
from persona_ops.io import provenance, read_json, read_jsonl, write_json, write_jsonl

OUT = Path("outputs/persona_space")
KEY_FIELDS = ("system_prompt_idx", "question_idx", "rollout_idx")


# --- parameters ---------------------------------------------------------------

class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RolesCfg(_Section):
    dir: str = "data/roles/instructions"
    questions: str = "data/roles/questions.jsonl"
    # the roles, ``default`` included (DVC runs one stage per name); None = every role file in dir,
    # which `persona-ops run` writes out into params.yaml (DVC's foreach needs the list)
    names: list[str] | None = None
    instructions_limit: int | None = Field(None, ge=1)
    questions_limit: int | None = Field(None, ge=1)
    model_name: str | None = None  # fills {model_name} in default.json; None = derived from model.name

    @field_validator("names")
    @classmethod
    def _default_listed_once(cls, names: list[str] | None) -> list[str] | None:
        if names is None:
            return None
        if DEFAULT_ROLE not in names:
            raise ValueError(f"must list {DEFAULT_ROLE!r} (the Assistant Axis needs the default role, "
                             f"and DVC runs one stage per listed role), e.g. [{DEFAULT_ROLE}, pirate, ...]")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"lists {', '.join(dup)} more than once")
        return names


class TranscriptsCfg(_Section):
    backend: Backend = "hf"  # hf (the reference model on the engine) | vllm | openai (see persona_ops.inference.backends)
    rollouts: int = Field(1, ge=1)
    max_new_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.9, gt=0, le=1)
    seed: int = 0
    batch_size: int = Field(32, ge=1)
    chunk_size: int = Field(64, ge=1)  # records generated and appended per chunk
    resume: bool = True
    openai: OpenAIGenerationCfg = Field(default_factory=OpenAIGenerationCfg)
    vllm: VLLMCfg = Field(default_factory=VLLMCfg)


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
    label: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # names a directory and a DVC item
    model: ModelRef
    step: float | None = None
    family: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # families are compared side by side


class TrajectoryCfg(_Section):
    """Checkpoints replaying the reference transcripts. A plain list is one family; with ``family``
    set on every checkpoint the report draws one trajectory per family (labels stay unique)."""

    checkpoints: list[CheckpointCfg] = Field(default_factory=list)
    n_pcs: int = Field(3, ge=1)
    label_roles: list[str] | None = None  # roles labelled in scatter plots; None = all

    @field_validator("checkpoints")
    @classmethod
    def _labels_unique_families_consistent(cls, checkpoints: list[CheckpointCfg]) -> list[CheckpointCfg]:
        labels = [c.label for c in checkpoints]
        dup = sorted({x for x in labels if labels.count(x) > 1})
        if dup:
            raise ValueError(f"checkpoint labels must be unique (across families too); repeated: {', '.join(dup)}")
        if len({c.family is None for c in checkpoints}) > 1:
            raise ValueError("give every checkpoint a family, or none (a plain list is one family); "
                             f"without one: {[c.label for c in checkpoints if c.family is None]}")
        return checkpoints

    def families(self) -> dict[str | None, list[CheckpointCfg]]:
        """Checkpoints by family, in order of first appearance (``{None: all}`` without families)."""
        out: dict[str | None, list[CheckpointCfg]] = {}
        for c in self.checkpoints:
            out.setdefault(c.family, []).append(c)
        return out


class CappingCfg(_Section):
    """Activation capping along this persona space's Assistant Axis (see ``persona_ops.interp.capping``):
    at each layer the axis projection is floored at ``percentile`` of the default Assistant's."""

    layers: list[int] | None = None  # [first, last] hidden_states indices, inclusive; None = the space layer
    percentile: float = Field(25.0, ge=0, le=100)  # the paper's 25th percentile

    @field_validator("layers")
    @classmethod
    def _first_last(cls, layers: list[int] | None) -> list[int] | None:
        if layers is not None and (len(layers) != 2 or not 1 <= layers[0] <= layers[1]):
            raise ValueError("expected [first, last] with 1 <= first <= last (hidden_states indices)")
        return layers


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
    capping: CappingCfg = Field(default_factory=CappingCfg)
    out: str = str(OUT)


# --- paths and shared helpers -------------------------------------------------

def out_dir(params: PersonaSpaceParams, root: Path) -> Path:
    return Path(root) / params.out


def activations_dir(params: PersonaSpaceParams, root: Path, checkpoint: str | None = None) -> Path:
    """The reference model's activations, or a checkpoint's (``checkpoints/<label>/activations``)."""
    base = out_dir(params, root)
    return base / "activations" if checkpoint is None else base / "checkpoints" / checkpoint / "activations"


def role_names(params: PersonaSpaceParams, root: Path) -> list[str]:
    """Roles to process: ``roles.names`` or every ``*.json`` in ``roles.dir``; default first.
    The files must exist (an InputError names the missing ones)."""
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


def selected_roles(params: PersonaSpaceParams, root: Path, role: str | None = None) -> list[str]:
    """Every role of :func:`role_names`, or only ``role`` (what one DVC stage ``STAGE@role`` runs)."""
    names = role_names(params, root)
    if role is None:
        return names
    if role not in names:
        raise InputError(f"role {role!r} is not in persona_space.roles.names ({', '.join(names)})")
    return [role]


def load_roles(params: PersonaSpaceParams, root: Path, role: str | None = None) -> list[Role]:
    d = Path(root) / params.roles.dir
    return [load_role(d / f"{n}.json") for n in selected_roles(params, root, role)]


def model_short_name(params: PersonaSpaceParams) -> str:
    """``roles.model_name``, else the first word of the model id (``Qwen/Qwen3-32B`` -> ``Qwen3``)."""
    if params.roles.model_name:
        return params.roles.model_name
    from persona_ops.models.loading import EMBEDDED, EMBEDDED_ID

    name = EMBEDDED_ID if params.model.name == EMBEDDED else params.model.name.split("@")[0]
    return name.rstrip("/").split("/")[-1].split("-")[0] or name


def record_key(rec: dict) -> tuple[int, int, int]:
    return tuple(int(rec[k]) for k in KEY_FIELDS)  # type: ignore[return-value]


def registered_space_name(params: "PersonaSpaceParams") -> str:
    """``persona-space-<model>``: the registry name of this configuration's persona space."""
    import re

    from persona_ops.models.loading import EMBEDDED, EMBEDDED_ID

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
    """What the records of a role depend on: prompts, sampling, chunking and what generates
    (``model_label``: the generator's label, which names the backend and its model)."""
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


def generate_role_transcripts(generator, role: Role, questions: list, params: PersonaSpaceParams, d: Path,
                              on_chunk: Callable[[str, int], None] | None = None) -> dict:
    """Generate (or resume) one role's transcripts into ``d/<role>.jsonl`` with ``generator``
    (:func:`persona_ops.inference.backends.make_generator`: any backend).

    Requests are cut into fixed chunks, each generated with its own seed and appended to
    ``<role>.partial.jsonl`` in one flushed write. On resume, records already in the partial
    file are kept and only chunks with missing records are regenerated (whole, so outputs
    equal an uninterrupted run); only the missing records are appended. The complete file
    is written atomically, then the partial files are removed. ``on_chunk(role, i)`` is
    called after chunk ``i`` is on disk. Returns counts.
    """
    from persona_ops.chat import chat_messages
    from persona_ops.inference.sampling import SamplingParams

    t = params.transcripts
    p = _transcript_paths(d, role.name)
    tok = generator.tokenizer
    requests = build_role_requests(role, questions, tok, params)
    fp = _fingerprint(requests, params, generator.label)
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
        chats = [chat_messages(tok, r["system_prompt"] or None, r["question"]) for r in chunk]  # as in "prompt"
        answers = generator.generate(chats, sampling, t.batch_size)
        new = [dict(r, response=a) for r, a in zip(chunk, answers) if record_key(r) not in done]
        _append(p["partial"], new)
        done.update((record_key(r), r) for r in new)
        generated += len(chunk)
        if on_chunk is not None:
            on_chunk(role.name, ci)

    write_jsonl(p["final"], [done[k] for k in expected])
    prov = provenance(stage="persona_space.transcripts", params=params.model_dump(), model=generator.label,
                      inputs=[role.path])
    write_json(p["provenance"], {"fingerprint": fp, "records": len(requests), **prov})
    p["partial"].unlink(missing_ok=True)
    p["partial_meta"].unlink(missing_ok=True)
    return {"records": len(requests), "generated": generated, "resumed": resumed, "skipped": 0}


def transcripts(params: PersonaSpaceParams, root: Path, loaded=None,
                on_chunk: Callable[[str, int], None] | None = None, role: str | None = None) -> "StageResult":
    """Stage 1: generate every role's transcripts (or only ``role``'s), resumable at chunk level."""
    from persona_ops.inference.backends import make_generator

    root = Path(root)
    roles = load_roles(params, root, role)  # validate the data before loading a model
    qpath = root / params.roles.questions
    questions = load_questions(qpath)
    t = params.transcripts
    if t.backend == "hf":
        loaded = loaded or load_model_ref(params.model)
    generator = make_generator(t, params.model, "persona_space.transcripts", loaded=loaded)
    d = out_dir(params, root) / "transcripts"
    d.mkdir(parents=True, exist_ok=True)
    totals = {"records": 0, "generated": 0, "skipped": 0}
    outputs = []
    for role in roles:
        stats = generate_role_transcripts(generator, role, questions, params, d, on_chunk)
        for k in totals:
            totals[k] += stats.get(k, 0)
        outputs += [d / f"{role.name}.jsonl", d / f"{role.name}.provenance.json"]
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


def judge_roles(params: PersonaSpaceParams, root: Path, judge=None, role: str | None = None) -> "StageResult":
    """Stage 2: the 0-3 role-expression score of every response of every role (or only ``role``).

    Writes ``scores/<role>.scores.jsonl``: one ``{index, system_prompt_idx, question_idx,
    rollout_idx, score, label, probs}`` per transcript record (``index`` = its line), where
    ``score`` is the expected value and ``label`` the most likely integer. The default role is
    not judged (its vector uses every sample): its file is empty and no judge is loaded for it.
    """
    from persona_ops.judge import fill_template

    root = Path(root)
    roles = load_roles(params, root, role)
    records_by_role = {r.name: read_transcripts(params, root, r.name) for r in roles}  # before loading a judge
    if judge is None and any(not r.is_default for r in roles):
        judge = _make_judge(params, root)
    d = out_dir(params, root) / "scores"
    inputs, outputs = [], []
    n = unscored = full = 0
    score_sum = 0.0
    for role in roles:
        records = [] if role.is_default else records_by_role[role.name]
        prompts = [fill_template(role.eval_prompt, r["question"], r["response"]) for r in records]
        details = judge.score_details(prompts, lo=0, hi=3) if prompts else []
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
        prov_path = out.with_name(f"{role.name}.scores.provenance.json")
        write_json(prov_path, provenance(stage="persona_space.judge", params=params.judge.model_dump(),
                                         inputs=[src, role.path], model=judge.label if judge else None))
        inputs += [src, role.path]
        outputs += [out, prov_path]
    metrics = {"roles": sum(not r.is_default for r in roles), "judged": n, "unscored": unscored,
               "judge_backend_calls": getattr(judge, "backend_calls", 0)}
    if n:  # not for the default role alone
        metrics.update(label3_fraction=full / n,
                       mean_score=score_sum / (n - unscored) if n > unscored else float("nan"))
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
    from persona_ops.interp.space import middle_layer

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
                         model: str, transcripts_sha256: str) -> bool:
    """Whether a role's activation files were made from these transcripts, layers and model."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors

    if not (tensor_path.exists() and meta_path.exists()) or read_json(meta_path) != keys:
        return False
    header = decode_metadata(load_vectors(tensor_path)[1])
    return (header.get("layers") == layers and header.get("model") == model
            and header.get("transcripts_sha256") == transcripts_sha256)


def role_activations(params: PersonaSpaceParams, root: Path, loaded=None,
                     checkpoint: str | None = None, role: str | None = None) -> "StageResult":
    """Stage 3: mean residual stream over response tokens at the configured layers, per record,
    for every role (or only ``role``).

    ``checkpoint`` (a label in ``trajectory.checkpoints``) replays the reference transcripts
    through that checkpoint into ``checkpoints/<label>/activations``. Records with an empty
    response are skipped (no response tokens); ``<role>_metadata.json`` lists the kept rows.
    A role whose files match its transcripts (sha256), layers and model is skipped.
    """
    from persona_ops.interp.capture import capture_means
    from persona_ops.io import sha256_file
    from persona_ops.interp.vectors import save_vectors

    root = Path(root)
    ref = params.model
    if checkpoint is not None:
        ref = next((c.model for c in params.trajectory.checkpoints if c.label == checkpoint), None)
        if ref is None:
            raise InputError(f"checkpoint {checkpoint!r} is not in trajectory.checkpoints "
                             f"{[c.label for c in params.trajectory.checkpoints]}")
    names = selected_roles(params, root, role)
    for name in names:  # fail before loading the model
        if not (out_dir(params, root) / "transcripts" / f"{name}.jsonl").exists():
            raise InputError(f"no transcripts for role {name!r}; run the transcripts stage first")
    loaded = loaded or load_model_ref(ref)
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
        source = out_dir(params, root) / "transcripts" / f"{name}.jsonl"
        source_sha = sha256_file(source)
        inputs.append(source)
        outputs += [tensor_path, meta_path]
        if a.resume and _activations_current(tensor_path, meta_path, keys, layers, loaded.label, source_sha):
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
            "checkpoint": checkpoint or "", "positions": "response", "transcripts_sha256": source_sha})
        write_json(meta_path, keys)  # written last: its presence marks the role complete
        captured += len(kept)
    metrics = {"roles": len(names), "captured": captured, "roles_skipped": skipped_roles,
               "empty_responses": empty, "layers": len(layers)}
    return _result(metrics, inputs, outputs)


def read_activations(d: Path, role: str) -> tuple[torch.Tensor, list[tuple], dict]:
    """``(response_avg [n, rows, H], keys per row, header)`` of one role; header values decoded."""
    from persona_ops.interp.vectors import decode_metadata, load_vectors

    tensor_path, meta_path = _activation_paths(d, role)
    if not (tensor_path.exists() and meta_path.exists()):
        raise InputError(f"{tensor_path}: no activations for role {role!r}; run the activations stage first")
    tensors, raw = load_vectors(tensor_path)
    header = decode_metadata(raw)
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
    from persona_ops.interp.space import count_passing, default_vector, role_vector

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
    from persona_ops.interp.space import fit_persona_space, middle_layer, save_persona_space
    from persona_ops.interp.vectors import save_vectors

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


# --- stage 4b: the capping spec -----------------------------------------------

def capping(params: PersonaSpaceParams, root: Path) -> "StageResult":
    """The activation-capping spec of this persona space's Assistant Axis (``persona_ops.interp.capping``).

    At each layer of ``capping.layers`` the floor is ``capping.percentile`` of the default
    Assistant's projections (one per default sample). Writes ``capping.safetensors`` (what
    ``load_capping`` and ``serve-model --capping`` read; registered as ``capping-spec-<model>``)
    and ``capping.json`` (per-layer tau and floor, readable).
    """
    from persona_ops.interp.capping import CONVENTION, compute_capping, layer_range, save_capping
    from persona_ops.interp.space import load_persona_space

    root = Path(root)
    base, acts_dir = out_dir(params, root), activations_dir(params, root)
    space_path = base / "persona_space.safetensors"
    if not space_path.exists():
        raise InputError(f"{space_path}: no persona space; run the persona_space stage first")
    space = load_persona_space(space_path)
    acts, _, header = read_activations(acts_dir, DEFAULT_ROLE)
    c = params.capping
    spec = compute_capping(space.axis, space.layers, acts, header["layers"], layer_range(c.layers, space.layer),
                           c.percentile, int(header["num_layers"]))
    inputs = [space_path, *_activation_paths(acts_dir, DEFAULT_ROLE)]
    prov = provenance(stage="persona_space.capping", params=c.model_dump(), inputs=inputs,
                      model=header.get("model"))
    spec_path, summary_path = base / "capping.safetensors", base / "capping.json"
    save_capping(spec_path, spec, {"model": header.get("model"), "provenance": prov})
    write_json(summary_path, {
        "spec": spec_path.name, "percentile": c.percentile, "convention": CONVENTION,
        "n_default_samples": int(acts.shape[0]), "model": header.get("model"),
        "layers": {str(L): {"tau": float(t), "assistant_floor": float(f)}
                   for L, t, f in zip(spec.layers, spec.tau, spec.floors)}, "provenance": prov})
    metrics = {"layers": len(spec.layers), "percentile": c.percentile, "n_default_samples": int(acts.shape[0]),
               "floor_min": float(spec.floors.min()), "floor_max": float(spec.floors.max())}
    name = registered_space_name(params).replace("persona-space-", "capping-spec-", 1)
    return _result(metrics, inputs, [spec_path, summary_path], register={name: spec_path})


# --- stage 5: trajectories ----------------------------------------------------

def trajectory_point(params: PersonaSpaceParams, root: Path, checkpoint_acts: Path, space,
                     label: str = "", step: float | None = None) -> dict:
    """Place one checkpoint in the reference persona space.

    ``checkpoint_acts`` holds the checkpoint's ``<role>_activations.safetensors`` over the
    reference transcripts; role vectors use the *reference* scores and threshold (the same
    samples at every checkpoint), without ``min_count`` (the reference space already chose
    its roles). Returns a JSON-ready record (see ``persona_space.checkpoint_coordinates``).
    """
    from persona_ops.interp.space import checkpoint_coordinates

    vectors, default, _, layers, _ = build_role_vectors(params, root, Path(checkpoint_acts), min_count=1)
    rec = checkpoint_coordinates(space, vectors, default, layers, params.trajectory.n_pcs)
    return {"checkpoint": label, "step": step, **rec}


def trajectory(params: PersonaSpaceParams, root: Path) -> "StageResult":
    """Stage 5: a trajectory point per ``trajectory.checkpoints`` entry, a JSONL file and plots
    (one line per model family). Metrics ``default_axis_*`` are the first family's; with several
    families each also gets ``<family>/default_axis_change``."""
    from persona_ops.interp.space import load_persona_space
    from persona_ops.reports.trajectory import group_by_family, plot_trajectory

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
        records.append({**trajectory_point(params, root, d, space, c.label, c.step), "family": c.family})
        inputs.append(d)
    out = base / "trajectory"
    write_jsonl(out / "trajectory.jsonl", records)
    pngs = plot_trajectory(records, out, space, params.trajectory.label_roles)
    families = group_by_family(records)
    change = {f: recs[-1]["default"]["axis"] - recs[0]["default"]["axis"] for f, recs in families.items()}
    first = next(iter(families.values()))
    metrics = {"checkpoints": len(records), "families": len(families),
               "default_axis_first": first[0]["default"]["axis"], "default_axis_last": first[-1]["default"]["axis"],
               "default_axis_change": next(iter(change.values())),
               "axis_cos_reference_min": min(r["axis_cos_reference"] for r in records)}
    if len(families) > 1:
        metrics.update({f"{f}/default_axis_change": v for f, v in change.items()})
    return _result(metrics, inputs, [out / "trajectory.jsonl", *pngs])


STAGES = {"transcripts": transcripts, "judge": judge_roles, "activations": role_activations,
          "persona_space": persona_space, "capping": capping, "trajectory": trajectory}
