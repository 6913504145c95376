"""Judge settings shared by every pipeline that judges (``judge`` sections of params.yaml)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class JudgeCfg(BaseModel):
    """Which judge scores answers, and how (see ``persona_ops.judge.make_judge``)."""

    model_config = ConfigDict(extra="forbid")
    backend: Literal["local", "openai"] = "local"
    model: str = "embedded"
    revision: str | None = None
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    max_concurrency: int = Field(16, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(60.0, gt=0)
    batch_size: int = Field(8, ge=1)
    answer_prefix: str = ""  # local backend only: prefilled answer text before the number
    cache: str = "cache/judge.sqlite"
