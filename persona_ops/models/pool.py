"""Loaded models shared by the stages of one process: each base model is loaded once.

Stages ask the pool for a ``ModelRef``; references that differ only by their LoRA adapter share
one base model in memory. Every adapter is attached once (PEFT, by name) and switched on per
use: the returned ``LoadedModel.activate()`` turns on its adapter, or every adapter off for the
plain base, and the engine, capture and the local judge call it before each use. At most
``max_bases`` base models stay loaded (least recently used evicted), so a judge and a generator
of two different 7B models do not both sit on one GPU unless asked.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from persona_ops.models.adapters import adapter_sha256, check_checkpoint, strip_lora
from persona_ops.models.loading import LoadedModel, load_model, load_tokenizer, model_config
from persona_ops.models.refs import ModelRef, label


def _load_base(ref: ModelRef) -> LoadedModel:
    return load_model(ref.name, ref.revision, dtype=ref.dtype, device=ref.device)


@dataclass
class _Base:
    loaded: LoadedModel
    peft: object | None = None  # the PeftModel wrapping loaded.model once an adapter is attached
    adapters: dict[tuple[str, str], str] = field(default_factory=dict)  # (dir, sha) -> PEFT adapter name
    active: str | None = None


class ModelPool:
    """See the module docstring. ``loads`` counts base-model loads, ``adapter_loads`` attachments."""

    def __init__(self, max_bases: int = 1, loader: Callable[[ModelRef], LoadedModel] = _load_base):
        self.max_bases, self.loader = max_bases, loader
        self._bases: OrderedDict[tuple, _Base] = OrderedDict()
        self.loads = 0
        self.adapter_loads = 0

    @staticmethod
    def key(ref: ModelRef) -> tuple:
        return (ref.name, ref.revision, ref.dtype, ref.device)

    def add(self, ref: ModelRef, loaded: LoadedModel) -> None:
        """Hold an already loaded base model for ``ref`` (its adapter is ignored)."""
        self._bases[self.key(ref)] = _Base(loaded)

    def get(self, ref: ModelRef) -> LoadedModel:
        """The model ``ref`` names, its adapter attached (``ref.adapter`` must be a directory)."""
        base = self._base(ref)
        if not ref.adapter:
            return LoadedModel(base.loaded.model, base.loaded.tokenizer, base.loaded.label,
                               activator=lambda: self._switch(base, None))
        if not isinstance(ref.adapter, str) or ref.needs_resolution:
            raise ValueError(f"unresolved adapter reference {ref.adapter!r}")
        directory = str(check_checkpoint(ref.adapter))
        sha = adapter_sha256(directory)
        name = base.adapters.get((directory, sha))
        if name is None:
            name = self._attach(base, directory)
            base.adapters[(directory, sha)] = name
        model = base.peft
        loaded = LoadedModel(model, base.loaded.tokenizer, label(ref, sha),
                             activator=lambda: self._switch(base, name))
        return loaded.activate()

    def adapter_name(self, ref: ModelRef) -> str:
        """The PEFT name under which :meth:`get` attached ``ref``'s adapter."""
        directory = str(check_checkpoint(ref.adapter))
        return self._base(ref).adapters[(directory, adapter_sha256(directory))]

    def plain(self, ref: ModelRef) -> LoadedModel:
        """The base model with no adapter layers at all (what training wraps in its own LoRA)."""
        base = self._base(ref)
        if base.peft is not None:
            base.peft.unload()  # removes every LoRA layer, weights unmerged
            strip_lora(base.loaded.model)
            base.peft, base.adapters, base.active = None, {}, None
        return base.loaded

    def config(self, ref: ModelRef):
        """The base model's HF config: from memory when loaded, else read without the weights
        (a pool with its own loader loads the model: there is nothing else to read)."""
        key = self.key(ref)
        if key in self._bases:
            return self._bases[key].loaded.model.config
        if self.loader is _load_base:
            return model_config(ref.name, ref.revision)
        return self._base(ref).loaded.model.config

    def tokenizer(self, ref: ModelRef):
        """The base model's tokenizer, read without the weights as :meth:`config`."""
        key = self.key(ref)
        if key in self._bases or self.loader is not _load_base:
            return self._base(ref).loaded.tokenizer
        return load_tokenizer(ref.name, ref.revision)

    def clear(self) -> None:
        self._bases.clear()
        _free_memory()

    def _base(self, ref: ModelRef) -> _Base:
        key = self.key(ref)
        if key in self._bases:
            self._bases.move_to_end(key)
            return self._bases[key]
        while len(self._bases) >= self.max_bases:
            self._bases.popitem(last=False)
            _free_memory()
        self._bases[key] = _Base(self.loader(ref.base))
        self.loads += 1
        return self._bases[key]

    def _attach(self, base: _Base, directory: str) -> str:
        from peft import PeftModel

        name = f"adapter{len(base.adapters)}"
        if base.peft is None:
            strip_lora(base.loaded.model)
            base.peft = PeftModel.from_pretrained(base.loaded.model, directory, adapter_name=name,
                                                  is_trainable=False).eval()
        else:
            base.peft.load_adapter(directory, adapter_name=name, is_trainable=False)
        self.adapter_loads += 1
        base.active = None  # force the switch below
        return name

    @staticmethod
    def _switch(base: _Base, name: str | None) -> None:
        if base.peft is None or base.active == name:
            return
        tuner = base.peft.base_model
        if name is None:
            tuner.disable_adapter_layers()
        else:
            tuner.set_adapter(name, inference_mode=True)
            tuner.enable_adapter_layers()
        base.active = name


def _free_memory() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass

