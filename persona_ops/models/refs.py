"""References to models: what every ``model`` section of params.yaml holds, and its one label.

A ``ModelRef`` names a base model (``embedded``, an HF id[@revision] or a local directory) and
optionally a LoRA adapter on top, given as a directory, a registry URI (``models:/name@alias``,
``models:/name/N``) or the stage that makes it (``{stage: finetune, checkpoint: final}``). The
runner resolves registry URIs and stage references to a directory before a stage runs
(:func:`ModelRef.resolved`), so library code only ever sees directories.
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.names import Name

EMBEDDED = "embedded"
EMBEDDED_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_REVISION = "gguf-q4_1"
REGISTRY_PREFIX = "models:/"


class StageAdapter(BaseModel):
    """An adapter made by a stage of this project: ``{stage: finetune, checkpoint: final}``
    (``item`` for stages that run per item; ``checkpoint`` a step number or ``final``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    stage: Name
    item: Name | None = None
    checkpoint: int | Literal["final"] = "final"


class ModelRef(BaseModel):
    """A model to load, optionally with a LoRA adapter on top (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = EMBEDDED
    revision: str | None = None
    dtype: str = "auto"  # auto = bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    adapter: Union[StageAdapter, str, None] = None  # a directory, a models:/ URI or a stage's adapter
    # set by resolution: where the adapter came from (a registry URI or "stage finetune ..."), for labels
    adapter_source: str | None = Field(None, exclude=True)

    @property
    def base(self) -> "ModelRef":
        """The same model without its adapter."""
        return ModelRef(name=self.name, revision=self.revision, dtype=self.dtype, device=self.device)

    def resolved(self, adapter_dir: str, source: str | None = None) -> "ModelRef":
        """This reference with its adapter replaced by a local directory."""
        return self.model_copy(update={"adapter": adapter_dir, "adapter_source": source})

    @property
    def needs_resolution(self) -> bool:
        return isinstance(self.adapter, StageAdapter) or (
            isinstance(self.adapter, str) and self.adapter.startswith(REGISTRY_PREFIX))


def split_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``id@revision`` -> ``(id, revision)``; an explicit ``revision`` wins; a local path with an
    ``@`` stays whole."""
    from pathlib import Path

    if "@" in name and not Path(name).exists():
        name, _, rev = name.partition("@")
        revision = revision or rev
    return name, revision


def base_label(name: str, revision: str | None = None) -> str:
    """``id@revision`` of a base model (``main`` when no revision is given)."""
    name, revision = split_revision(name, revision)
    if name == EMBEDDED:
        return f"{EMBEDDED_ID}@{EMBEDDED_REVISION}"
    return f"{name}@{revision or 'main'}"


def label(ref: ModelRef, adapter_sha256: str | None = None) -> str:
    """The one label of a model in provenance, MLflow tags and resume fingerprints:
    ``id@revision`` plus ``+<adapter>#<sha256[:12]>`` with an adapter."""
    out = base_label(ref.name, ref.revision)
    if ref.adapter:
        out += f"+{ref.adapter_source or ref.adapter}"
        if adapter_sha256:
            out += f"#{adapter_sha256[:12]}"
    return out


def slug(ref: ModelRef) -> str:
    """A short registry-safe name: ``smollm2-135m-instruct``, plus the revision when given and
    the adapter's name (``...-pirate`` for ``outputs/finetune/pirate/checkpoint-36``)."""
    name, revision = split_revision(ref.name, ref.revision)
    parts = [(EMBEDDED_ID if name == EMBEDDED else name).rstrip("/").split("/")[-1]]
    if revision and name != EMBEDDED:
        parts.append(revision)
    if ref.adapter:
        source = (ref.adapter_source or str(ref.adapter)).rstrip("/")
        if source.startswith(REGISTRY_PREFIX):
            adapter = re.split(r"[@/]", source[len(REGISTRY_PREFIX):])[0]
        else:
            pieces = [p for p in source.split("/") if p]
            adapter = pieces[-2] if len(pieces) > 1 and re.fullmatch(r"checkpoint-\d+|final", pieces[-1]) \
                else pieces[-1]
        parts.append(adapter)
    return re.sub(r"[^a-z0-9.]+", "-", "-".join(parts).lower()).strip("-")
