"""LoRA supervised fine-tuning on chat JSONL: TRL's ``SFTTrainer`` + PEFT, response tokens only.

Output layout of :func:`train_lora` (``out_dir``)::

    checkpoint-<step>/adapter_model.safetensors   LoRA weights (PEFT's safetensors format)
    checkpoint-<step>/adapter_config.json         PEFT config (rank, alpha, targets, rsLoRA)
    checkpoint-<step>/trainer_state.json          step, loss, learning rate, epoch, log so far
    log.jsonl                                     one line per optimizer step (loss, lr, grad norm)
    manifest.json                                 checkpoints (step, loss), config, dataset hash

Checkpoints are written every ``save_every`` optimizer steps and at the end, each into a
hidden temporary directory renamed into place, so a killed run leaves only whole checkpoints.
Nothing is pickled: the trainer's own checkpointing (optimizer/RNG ``.pt`` files) is off,
so a run cannot be resumed mid-way; it is re-run from the start (deterministic under a seed).

Loss mask: :func:`tokenize_chat` renders the chat template on message prefixes to find where
each assistant turn starts and ends, so it works for any template (no template strings are
guessed). By default every assistant turn is trained (as Unsloth's ``train_on_responses_only``
in persona_vectors); ``train_on="last"`` trains only the final response. A turn's trained tokens
are its content and the template's end-of-turn text (e.g. ``<|im_end|>\\n``), so the model learns
to stop.

Packing (``packing=True``, the default): a micro-batch's conversations are concatenated into one row
with no padding (:func:`pack_examples`); ``position_ids`` restart at 0 for each conversation, so
attention stays inside it (transformers masks block-diagonally for SDPA/eager; on a GPU the trainer
switches SDPA to PyTorch's flash-attention varlen kernel, :func:`packed_attention`) and no label
crosses a boundary. A step's ``batch_size * grad_accum`` conversations are split into equal
micro-batches as large as the token budget allows (:func:`micro_batch_size`); the loss is the sum
over the step's trained tokens divided by their count either way, so the updates equal the padded
ones up to float rounding.

Training-time interventions (preventative steering, CAFT): ``interventions`` takes a list of
:class:`persona_ops.interp.interventions.Intervention` (hooks on decoder block ``L-1`` for layer ``L``,
positions read off each training batch) or any ``model -> context manager`` factory, entered
around the whole training loop.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field

from persona_ops.chat import encode, render, render_prompt
from persona_ops.errors import InputError
from persona_ops.interp.interventions import Intervention, Steerer
from persona_ops.io import sha256_text, write_json, write_text
from persona_ops.models.loading import LoadedModel, decoder_layers

log = logging.getLogger(__name__)

IGNORE = -100
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

TrainingIntervention = Callable[[torch.nn.Module], AbstractContextManager]


# --- configuration -----------------------------------------------------------------

class LoraConfigSpec(BaseModel):
    """LoRA adapter shape; defaults are persona_vectors' (r 32, alpha 64, dropout 0, rsLoRA)."""

    model_config = ConfigDict(extra="forbid")
    rank: int = Field(32, ge=1)
    alpha: float = Field(64.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # Only the names present in the model are used; none present is an error.
    target_modules: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS), min_length=1)
    rslora: bool = True


class TrainConfig(BaseModel):
    """SFT hyperparameters; defaults are persona_vectors' (lr 1e-5, linear, warmup 5, wd 0.01,
    batch 2 x accumulation 8, max length 2048, one epoch). AdamW in torch (not 8-bit)."""

    model_config = ConfigDict(extra="forbid")
    lora: LoraConfigSpec = Field(default_factory=LoraConfigSpec)
    learning_rate: float = Field(1e-5, gt=0)
    lr_scheduler: str = "linear"
    warmup_steps: int = Field(5, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)  # overrides epochs when set
    batch_size: int = Field(2, ge=1)
    grad_accum: int = Field(8, ge=1)
    max_length: int = Field(2048, ge=8)
    seed: int = 0
    save_every: int | None = Field(None, ge=1)  # optimizer steps; None = the final checkpoint only
    limit: int | None = Field(None, ge=1)  # train on the first N conversations
    train_on: Literal["all", "last"] = "all"  # which assistant turns carry loss
    optim: str = "adamw_torch"
    max_grad_norm: float = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    packing: bool = True  # concatenate each micro-batch's conversations into one row (no padding)
    # most tokens in one packed micro-batch; None: PACKED_TOKENS with the varlen kernel, else batch_size conversations
    packed_tokens: int | None = Field(None, ge=8)


@dataclass
class TrainResult:
    """What a run produced: checkpoints in step order and the per-step training log."""

    out_dir: Path
    checkpoints: list[tuple[int, Path]]
    log: list[dict]  # one entry per optimizer step: step, loss, learning_rate, ...
    num_examples: int
    num_dropped: int  # conversations with no trained token left after truncation
    seconds: float
    steps_per_second: float
    extra: dict = field(default_factory=dict)

    @property
    def losses(self) -> list[float]:
        return [e["loss"] for e in self.log]

    @property
    def final_checkpoint(self) -> Path:
        return self.checkpoints[-1][1]


# --- tokenisation with a response-only loss mask -------------------------------------------

def assistant_spans(tokenizer, messages: list[dict], train_on: str = "all") -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans ``[start, end)`` of the trained assistant turns.

    For assistant turn ``i``: ``start = len(render_prompt(messages[:i]))`` (the prompt as generation
    sees it) and ``end = len(render(messages[:i+1]))``. Both renders must be prefixes of the full
    chat; templates that rewrite earlier turns (e.g. drop past reasoning) only support ``last``.
    """
    if train_on not in ("all", "last"):
        raise InputError(f"train_on: expected all|last, got {train_on!r}")
    try:
        full = render(tokenizer, messages, generation_prompt=False)
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
        if train_on == "last":
            turns = turns[-1:]
        spans = []
        for i in turns:
            prompt = render_prompt(tokenizer, messages[:i])
            upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1], generation_prompt=False)
            if not upto.startswith(prompt):
                raise InputError("the chat template renders an assistant turn that does not extend its "
                                 "generation prompt; cannot locate the response tokens")
            if not full.startswith(upto):
                raise InputError("the chat template rewrites earlier turns when later ones follow; "
                                 "use train_on=last for this template")
            if len(upto) > len(prompt):
                spans.append((len(prompt), len(upto)))
    except InputError:
        raise
    except Exception as e:  # jinja errors: e.g. a template that rejects the system role
        raise InputError(f"chat template failed on a conversation: {e}") from None
    if not spans:
        raise InputError("no assistant turn to train on in a conversation")
    return full, spans


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None,
                  train_on: str = "all") -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` for one conversation; labels are ``-100`` outside trained turns.

    The text is tokenised segment by segment (prompt, response, prompt, ...), so each prompt
    segment is exactly the tokens generation would see and the mask boundaries are exact
    token boundaries. Labels are not shifted (HF models shift internally). ``max_length``
    keeps the first tokens.
    """
    full, spans = assistant_spans(tokenizer, messages, train_on)
    ids: list[int] = []
    labels: list[int] = []
    cursor = 0
    for start, end in spans:
        prompt_ids = encode(tokenizer, full[cursor:start]) if start > cursor else []
        resp_ids = encode(tokenizer, full[start:end])
        ids += prompt_ids + resp_ids
        labels += [IGNORE] * len(prompt_ids) + resp_ids
        cursor = end
    if cursor < len(full):
        tail = encode(tokenizer, full[cursor:])
        ids += tail
        labels += [IGNORE] * len(tail)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


# --- packing ------------------------------------------------------------------------

def pack_examples(examples: Sequence[dict]) -> dict:
    """Collate tokenised conversations (``input_ids``, ``labels``) into one row with no padding.

    ``position_ids`` restart at 0 for each conversation. transformers reads that as separate
    sequences and masks attention block-diagonally (``masking_utils.find_packed_sequence_indices``,
    SDPA and eager), but only when the forward gets no ``attention_mask`` and no cache; the model
    makes a cache when ``use_cache`` is on (its config's default), and then the conversations attend
    to each other, so the batch carries ``use_cache=False``. ``cu_seq_lens_*`` and ``max_length_*``
    give varlen kernels the same boundaries without a device sync. The first label of each
    conversation is ignored, so a conversation's last token is never trained to predict the next
    one's first (a padded batch has no such target either).
    """
    lengths = [len(e["input_ids"]) for e in examples]
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    labels = torch.cat([torch.as_tensor(e["labels"], dtype=torch.long) for e in examples])
    labels[position_ids == 0] = IGNORE
    cu_seq_lens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return {"input_ids": torch.cat([torch.as_tensor(e["input_ids"], dtype=torch.long) for e in examples])[None],
            "labels": labels[None], "position_ids": position_ids[None],
            "cu_seq_lens_q": cu_seq_lens, "cu_seq_lens_k": cu_seq_lens,
            "max_length_q": max(lengths), "max_length_k": max(lengths), "use_cache": False}


PACKED_TOKENS = 8192  # default token budget of a packed micro-batch when attention runs per conversation
PACKED_ATTENTION = "packed_varlen"  # the transformers attention implementation packed_attention registers


def micro_batch_size(cfg: TrainConfig, longest: int, varlen: bool) -> int:
    """Conversations per forward. Padded: ``batch_size``. Packed: the largest divisor of the step's
    ``batch_size * grad_accum`` conversations whose row fits the token budget even if each were
    ``longest`` tokens (at least 1), so every step still holds exactly that many conversations.
    The budget is ``packed_tokens``; unset, it is :data:`PACKED_TOKENS` when attention runs per
    conversation (``varlen``), else rows keep ``batch_size`` conversations, since SDPA and eager
    attend over the whole row (a cost that grows with the square of its length)."""
    budget = cfg.packed_tokens or (PACKED_TOKENS if varlen else None)
    if not cfg.packing or budget is None:
        return cfg.batch_size
    step = cfg.batch_size * cfg.grad_accum
    return max(d for d in range(1, step + 1) if step % d == 0 and (d == 1 or d * longest <= budget))


def _varlen_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """Causal attention inside each conversation of a packed row ``[1, heads, T, head_dim]``, with
    PyTorch's flash-attention varlen kernel (the op behind ``torch.nn.attention.varlen``): only the
    blocks inside each conversation are computed. Grouped KV heads are supported by the kernel."""
    if kwargs.get("cu_seq_lens_q") is None or query.shape[0] != 1:
        raise InputError(f"{PACKED_ATTENTION} attention takes packed batches only (see pack_examples)")
    cu, longest = kwargs["cu_seq_lens_q"], kwargs["max_length_q"]
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, heads, head_dim]
    out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, longest, longest, dropout, True, False,
                                                  scale=scaling)[0]
    return out[None], None


def varlen_attention_usable(model, cfg: TrainConfig) -> bool:
    """Whether packed training swaps SDPA for the varlen kernel: packing, SDPA, and a bf16/fp16
    model on a CUDA GPU of compute capability 8.0 or more (what PyTorch's flash attention needs)."""
    param = next(model.parameters())
    return (cfg.packing and model.config._attn_implementation == "sdpa" and param.device.type == "cuda"
            and param.dtype in (torch.bfloat16, torch.float16)
            and torch.cuda.get_device_capability(param.device) >= (8, 0))


@contextmanager
def packed_attention(model) -> Iterator[None]:
    """Run ``model`` with the varlen attention (packed batches only) and restore its own afterwards."""
    from transformers import AttentionInterface

    current = model.config._attn_implementation
    AttentionInterface.register(PACKED_ATTENTION, _varlen_attention)
    model.set_attn_implementation(PACKED_ATTENTION)
    try:
        yield
    finally:
        model.set_attn_implementation(current)


# --- checkpoints ------------------------------------------------------------------

def _save_checkpoint(model, out_dir: Path, step: int, state: dict) -> Path:
    """Write ``checkpoint-<step>`` into a hidden temp dir, then rename it into place."""
    final = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # save_embedding_layers=False: embeddings are never trained here, and "auto" may look up the hub.
        model.save_pretrained(str(tmp), safe_serialization=True, save_embedding_layers=False)
        (tmp / "README.md").unlink(missing_ok=True)  # PEFT's boilerplate model card
        write_json(tmp / "trainer_state.json", state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


# --- training-time interventions -------------------------------------------------------

def training_positions(attention_mask: torch.Tensor, labels: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompt, response)`` masks ``[B, T]`` of a training batch, in the project's meaning:
    response = positions whose output predicts a trained token, and the trained tokens;
    prompt = real tokens that are not trained (so the last prompt token is in both)."""
    real = attention_mask.bool()
    if labels is None:
        return real, torch.zeros_like(real)
    trained = (labels != IGNORE) & real
    predicts = torch.zeros_like(trained)
    predicts[:, :-1] = trained[:, 1:]
    return real & ~trained, real & (trained | predicts)


def steering_during_training(interventions: Sequence[Intervention]) -> TrainingIntervention:
    """A factory that applies ``interventions`` to every training forward of a model."""

    @contextmanager
    def attach(model: torch.nn.Module) -> Iterator[Steerer]:
        steerer = Steerer(decoder_layers(model), interventions)

        def set_positions(module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask")
            if mask is None:  # a packed row: no padding, and its labels ignore each conversation's first token
                mask = torch.ones_like(ids)
            steerer.set_positions(*training_positions(mask, kwargs.get("labels")))

        handle = model.register_forward_pre_hook(set_positions, with_kwargs=True)
        try:
            with steerer:
                yield steerer
        finally:
            handle.remove()

    return attach


def _intervention_context(interventions, model) -> AbstractContextManager:
    if interventions is None:
        return nullcontext()
    if callable(interventions):
        return interventions(model)
    specs = list(interventions)
    if not all(isinstance(s, Intervention) for s in specs):
        raise InputError("interventions: expected Intervention objects or a model -> context manager factory")
    return steering_during_training(specs)(model) if specs else nullcontext()


# --- training ----------------------------------------------------------------------

def _target_modules(model: torch.nn.Module, wanted: Sequence[str]) -> list[str]:
    present = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    found = [t for t in wanted if t in present]
    if not found:
        raise InputError(f"lora.target_modules: none of {list(wanted)} in the model; "
                         f"linear layers present: {sorted(present)}")
    return found


def _trainable_columns(examples: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: TrainConfig
                       ) -> tuple[dict, int]:
    """``input_ids``/``labels`` columns cut to ``max_length``; conversations left with no trained
    token are dropped (their count is returned)."""
    ids_all, labels_all = [], []
    for ids, labels in examples:
        ids, labels = list(ids[: cfg.max_length]), list(labels[: cfg.max_length])
        if any(x != IGNORE for x in labels):
            ids_all.append(ids)
            labels_all.append(labels)
    if not ids_all:
        raise InputError(f"no conversation keeps a response token within max_length={cfg.max_length}")
    return {"input_ids": ids_all, "labels": labels_all}, len(examples) - len(ids_all)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    stale = [p for p in out_dir.glob("checkpoint-*") if p.is_dir()] + \
        [p for p in (out_dir / "manifest.json", out_dir / "log.jsonl") if p.exists()]
    if stale and not overwrite:
        raise InputError(f"{out_dir}: already holds a training run ({stale[0].name}); "
                         "pass overwrite=True or choose another out_dir")
    for p in stale:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    for p in out_dir.glob(".checkpoint-*.partial-*"):
        shutil.rmtree(p, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


class _Recorder:
    """Collects the per-step log and writes checkpoints, log and manifest as training goes."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, manifest: dict):
        self.out_dir, self.cfg, self.manifest = out_dir, cfg, manifest
        self.log: list[dict] = []
        self.saved: dict[int, Path] = {}

    def record(self, step: int, logs: dict) -> None:
        entry = {"step": step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        self.log.append(entry)
        log.info("step %d loss %.4f lr %.3g", step, entry["loss"], entry.get("learning_rate", float("nan")))

    def save(self, model, step: int, epoch: float | None, complete: bool = False) -> None:
        last = self.log[-1] if self.log else {}
        state = {"step": step, "loss": last.get("loss"), "learning_rate": last.get("learning_rate"),
                 "epoch": epoch, "base": self.manifest["base"], "seed": self.cfg.seed,
                 "log_history": [e for e in self.log if e["step"] <= step]}
        self.saved[step] = _save_checkpoint(model, self.out_dir, step, state)
        self.flush(complete)

    def flush(self, complete: bool = False) -> None:
        write_text(self.out_dir / "log.jsonl", "".join(json.dumps(e) + "\n" for e in self.log))
        by_step = {e["step"]: e for e in self.log}
        self.manifest["checkpoints"] = [
            {"step": s, "path": p.name, "loss": by_step.get(s, {}).get("loss"),
             "learning_rate": by_step.get(s, {}).get("learning_rate")}
            for s, p in sorted(self.saved.items())]
        self.manifest["complete"] = complete
        write_json(self.out_dir / "manifest.json", self.manifest)


def _make_callback(recorder: _Recorder):
    from transformers import TrainerCallback

    class _CheckpointCallback(TrainerCallback):
        # on_log follows on_step_end, so a checkpoint's state already has its step's loss.
        def on_log(self, args, state, control, logs=None, model=None, **kwargs):
            if not logs or "loss" not in logs:
                return
            recorder.record(state.global_step, logs)
            every = recorder.cfg.save_every
            if every and state.global_step % every == 0 and state.global_step not in recorder.saved:
                recorder.save(model, state.global_step, state.epoch)

    return _CheckpointCallback()


def train_lora(loaded: LoadedModel, dataset: list[list[dict]], cfg: TrainConfig | None,
               out_dir: str | os.PathLike, progress: bool = True,
               interventions: Sequence[Intervention] | TrainingIntervention | None = None,
               overwrite: bool = False) -> TrainResult:
    """Fine-tune a LoRA adapter on chat conversations; return the checkpoints and the log.

    Conversations are tokenised with :func:`tokenize_chat` (loss on the assistant turns only), then
    trained by :func:`train_tokenized`, which says what happens to ``loaded.model``.
    """
    cfg = cfg or TrainConfig()
    conversations = dataset[: cfg.limit] if cfg.limit else list(dataset)
    examples = [tokenize_chat(loaded.tokenizer, m, cfg.max_length, cfg.train_on) for m in conversations]
    return train_tokenized(loaded, examples, cfg, out_dir, progress, interventions, overwrite,
                           dataset_sha256=sha256_text(json.dumps(conversations, sort_keys=True, ensure_ascii=False)))


def train_tokenized(loaded: LoadedModel, examples: Sequence[tuple[Sequence[int], Sequence[int]]],
                    cfg: TrainConfig | None, out_dir: str | os.PathLike, progress: bool = True,
                    interventions: Sequence[Intervention] | TrainingIntervention | None = None,
                    overwrite: bool = False, *, dataset_sha256: str | None = None,
                    callbacks: Sequence = ()) -> TrainResult:
    """Fine-tune a LoRA adapter on tokenised conversations ``(input_ids, labels)`` (labels ``-100``
    where no loss is taken, unshifted, as :func:`tokenize_chat` makes them).

    TRL's ``SFTTrainer`` runs the loop: with ``packing`` it gets :func:`pack_examples` as collator and
    micro-batches of :func:`micro_batch_size` conversations, else its default padding collator and
    ``batch_size``. ``loaded.tokenizer`` only has to name a pad token. ``callbacks`` are extra
    ``transformers.TrainerCallback`` objects. ``loaded.model`` is used in place: LoRA layers are injected
    for training and removed afterwards (even on error), leaving the base weights, mode, attention
    implementation and ``requires_grad`` as they were. fp32 on CPU; bf16 autocast when the model is
    bf16 (GPU), adapters kept in fp32.
    """
    import datasets
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, set_seed
    from trl import SFTConfig, SFTTrainer

    cfg = cfg or TrainConfig()
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, overwrite)
    model = loaded.model
    if hasattr(model, "peft_config"):
        raise InputError(f"{loaded.label}: the model already carries LoRA layers; unload them first")
    examples = examples[: cfg.limit] if cfg.limit else examples
    columns, dropped = _trainable_columns(examples, cfg)
    train_set = Dataset.from_dict(columns)
    if dataset_sha256 is None:
        dataset_sha256 = sha256_text(json.dumps([[list(i), list(lab)] for i, lab in examples]))
    targets = _target_modules(model, cfg.lora.target_modules)
    varlen = varlen_attention_usable(model, cfg)
    micro = micro_batch_size(cfg, max(len(ids) for ids in columns["input_ids"]), varlen)
    accumulation = cfg.batch_size * cfg.grad_accum // micro if cfg.packing else cfg.grad_accum

    device = loaded.device
    bf16 = next(model.parameters()).dtype == torch.bfloat16
    manifest = {"base": loaded.label, "format": "peft-lora-safetensors", "config": cfg.model_dump(),
                "target_modules": targets, "num_examples": len(columns["input_ids"]),
                "num_dropped": dropped, "dataset_sha256": dataset_sha256, "checkpoints": [],
                "complete": False}
    recorder = _Recorder(out_dir, cfg, manifest)

    # Everything training changes on the shared model, restored in `finally`.
    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    pad_ids = (model.config.pad_token_id, getattr(model.generation_config, "pad_token_id", None))
    own_forward = "forward" in vars(model)  # TRL's fused LM head patches the instance's forward

    set_seed(cfg.seed)  # LoRA A is initialised from the global RNG
    peft_model = get_peft_model(model, LoraConfig(
        r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
        use_rslora=cfg.lora.rslora, bias="none", task_type="CAUSAL_LM"))
    args = SFTConfig(
        output_dir=str(out_dir), seed=cfg.seed, data_seed=cfg.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_steps,
        weight_decay=cfg.weight_decay, num_train_epochs=cfg.epochs, max_steps=cfg.max_steps or -1,
        optim=cfg.optim, max_grad_norm=cfg.max_grad_norm, max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing, bf16=bf16, fp16=False,
        use_cpu=device.type == "cpu", logging_strategy="steps", logging_steps=1,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=not progress,
        dataloader_num_workers=0, label_names=["labels"])
    bars = datasets.is_progress_bar_enabled()
    start = time.perf_counter()
    try:
        if not progress:
            datasets.disable_progress_bars()  # SFTTrainer's dataset preparation maps
        trainer = SFTTrainer(model=peft_model, args=args, train_dataset=train_set,
                             data_collator=pack_examples if cfg.packing else None,
                             processing_class=loaded.tokenizer,
                             callbacks=[_make_callback(recorder), *callbacks])
        if not progress:
            trainer.remove_callback(PrinterCallback)
        with packed_attention(model) if varlen else nullcontext(), _intervention_context(interventions, peft_model):
            attention = model.config._attn_implementation
            output = trainer.train()
        step = trainer.state.global_step
        if step not in recorder.saved:
            recorder.save(peft_model, step, trainer.state.epoch, complete=True)
        else:
            recorder.flush(complete=True)
    finally:
        if bars:
            datasets.enable_progress_bars()
        peft_model.unload()
        if not own_forward:
            vars(model).pop("forward", None)
        if cfg.gradient_checkpointing:
            model.gradient_checkpointing_disable()
            if hasattr(model, "disable_input_require_grads"):
                model.disable_input_require_grads()
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.config.pad_token_id = pad_ids[0]
        if pad_ids[1] is not None:
            model.generation_config.pad_token_id = pad_ids[1]
        model.train(was_training)
    seconds = time.perf_counter() - start
    steps = trainer.state.global_step
    return TrainResult(
        out_dir=out_dir, checkpoints=sorted(recorder.saved.items()), log=recorder.log,
        num_examples=len(columns["input_ids"]), num_dropped=dropped, seconds=seconds,
        steps_per_second=output.metrics.get("train_steps_per_second", steps / seconds if seconds else math.nan),
        extra={"train_runtime": output.metrics.get("train_runtime"), "target_modules": targets,
               "micro_batch": micro, "grad_accum": accumulation, "attention": attention})
