"""LoRA adapter checkpoints: find, load onto a base model, unload; and loading a ``ModelRef``."""

from __future__ import annotations

import os
import re
from pathlib import Path

from persona_ops.errors import InputError
from persona_ops.io import read_json
from persona_ops.models.loading import LoadedModel
from persona_ops.models.refs import ModelRef

CHECKPOINT = re.compile(r"checkpoint-(\d+)")


def list_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete adapter checkpoints ``(step, path)`` in ``out_dir``, by step (partial ones skipped)."""
    out_dir = Path(out_dir)
    found = []
    if out_dir.is_dir():
        for p in out_dir.iterdir():
            m = CHECKPOINT.fullmatch(p.name)
            if m and (p / "adapter_config.json").is_file() and (p / "adapter_model.safetensors").is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def _strip_lora(model: torch.nn.Module) -> None:
    """Remove LoRA layers an earlier PEFT wrap injected into ``model`` in place (weights unmerged)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer) and name:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if getattr(parent, child, None) is module:
                setattr(parent, child, module.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config


def load_adapter_checkpoint(base: LoadedModel, checkpoint_dir: str | os.PathLike) -> LoadedModel:
    """``base`` with the adapter of ``checkpoint_dir`` (a ``PeftModel`` in eval mode).

    PEFT injects LoRA layers into ``base.model`` in place (its weights are not changed). Loading
    another checkpoint first strips the previous adapter, so walking a trajectory never nests
    adapters - but an earlier returned model then behaves as the base. :func:`unload_adapter`
    restores the plain base model.
    """
    from peft import PeftModel

    ckpt = Path(checkpoint_dir)
    if not (ckpt / "adapter_config.json").is_file() or not (ckpt / "adapter_model.safetensors").is_file():
        raise InputError(f"{ckpt}: not an adapter checkpoint (expected adapter_config.json and "
                         "adapter_model.safetensors)")
    if isinstance(base.model, PeftModel):
        raise InputError(f"{base.label}: already carries an adapter; pass the base model")
    _strip_lora(base.model)
    model = PeftModel.from_pretrained(base.model, str(ckpt), is_trainable=False).eval()
    state_file = ckpt / "trainer_state.json"
    m = CHECKPOINT.fullmatch(ckpt.name)
    step = read_json(state_file).get("step") if state_file.is_file() else (int(m.group(1)) if m else None)
    return LoadedModel(model=model, tokenizer=base.tokenizer, label=f"{base.label}+{ckpt}@{step}")


def unload_adapter(adapted: LoadedModel) -> LoadedModel:
    """Remove the adapter layers (without merging) and return the base model."""
    model = adapted.model.unload() if hasattr(adapted.model, "unload") else adapted.model
    return LoadedModel(model=model.eval(), tokenizer=adapted.tokenizer, label=adapted.label.split("+", 1)[0])


def load_model_ref(ref: ModelRef):
    """Load the model a ``ModelRef`` names (HF id@revision, local dir or embedded), with its LoRA adapter."""
    from persona_ops.models.loading import load_model

    loaded = load_model(ref.name, ref.revision, dtype=ref.dtype, device=ref.device)
    if ref.adapter:
        import dataclasses

        from persona_ops.io import sha256_file

        loaded = load_adapter_checkpoint(loaded, ref.adapter)
        # the adapter's content in the label: resumable outputs made by a retrained adapter at the
        # same path no longer match (transcript fingerprints, activation headers)
        digest = sha256_file(Path(ref.adapter) / "adapter_model.safetensors")[:12]
        loaded = dataclasses.replace(loaded, label=f"{loaded.label}#{digest}")
    return loaded
