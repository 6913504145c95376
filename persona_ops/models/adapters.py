"""LoRA adapter checkpoints on disk: find them, check them, hash them, strip LoRA layers.

A checkpoint directory holds PEFT's ``adapter_config.json`` and ``adapter_model.safetensors``
(and the trainer's ``trainer_state.json``); a training run writes ``checkpoint-<step>/``
directories. Adapters are attached to loaded models by :class:`persona_ops.models.pool.ModelPool`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from persona_ops.errors import InputError
from persona_ops.io import sha256_file

CHECKPOINT = re.compile(r"checkpoint-(\d+)")
WEIGHTS = "adapter_model.safetensors"


def is_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "adapter_config.json").is_file() and (path / WEIGHTS).is_file()


def check_checkpoint(path: str | os.PathLike) -> Path:
    """``path`` if it is an adapter checkpoint, else an ``InputError`` saying what is missing."""
    path = Path(path)
    if not is_checkpoint(path):
        raise InputError(f"{path}: not an adapter checkpoint (expected adapter_config.json and {WEIGHTS})")
    return path


_LAYER = re.compile(r"\.layers\.(\d+)\.")


def check_fits(path: str | os.PathLike, config) -> None:
    """An ``InputError`` when the adapter at ``path`` was trained on a model of another shape than
    ``config`` (an HF config): its LoRA input widths and layer indices against the model's."""
    from safetensors import safe_open

    from persona_ops.models.loading import num_layers

    hidden, layers = config.hidden_size, num_layers(config)
    widths, deepest = set(), -1
    with safe_open(str(Path(path) / WEIGHTS), framework="pt") as f:
        for key in f.keys():
            m = _LAYER.search(key)
            deepest = max(deepest, int(m.group(1))) if m else deepest
            if "lora_A" in key and any(t in key for t in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")):
                widths.add(f.get_slice(key).get_shape()[-1])
    if (widths and widths != {hidden}) or deepest >= layers:
        raise InputError(f"{path}: the adapter was trained on another model (input width {sorted(widths)}, "
                         f"{deepest + 1}+ layers); the base model has hidden {hidden} and {layers} layers")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete adapter checkpoints ``(step, path)`` in ``out_dir``, by step (partial ones skipped)."""
    out_dir = Path(out_dir)
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = CHECKPOINT.fullmatch(p.name)
            if m and is_checkpoint(p):
                found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_dir(out_dir: str | os.PathLike, checkpoint: int | str = "final") -> Path:
    """The checkpoint of a training run's directory: ``checkpoint-<step>``, or the last one."""
    out_dir = Path(out_dir)
    if checkpoint == "final":
        found = list_checkpoints(out_dir)
        if not found:
            raise InputError(f"{out_dir}: no adapter checkpoints (checkpoint-<step>/); train it first")
        return found[-1][1]
    return check_checkpoint(out_dir / f"checkpoint-{int(checkpoint)}")


def adapter_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint's adapter weights: the adapter's identity in labels and the pool."""
    return sha256_file(check_checkpoint(path) / WEIGHTS)


def strip_lora(model: torch.nn.Module) -> None:
    """Remove LoRA layers a PEFT wrap injected into ``model`` in place (weights unmerged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child, None) is module:
                setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
