"""Where the pipelines' answers and role transcripts come from: ``hf`` | ``vllm`` | ``openai``.

- ``hf`` (default): the local model through the generation engine
  (:func:`persona_ops.inference.engine.generate_text`).
- ``vllm``: offline ``vllm.LLM(...).generate`` on the same model (and LoRA adapter); the
  optional extra ``persona-ops[vllm]``, imported only when chosen.
- ``openai``: any OpenAI-compatible chat-completions server (OpenAI, ``vllm serve``,
  ``persona-ops serve-model``); the API key is read from the environment variable named by
  ``api_key_env`` and never logged; requests are concurrent, bounded and retried like the
  judge's (:class:`persona_ops.inference.openai_client.OpenAIEndpoint`).

A pipeline builds a generator once (:func:`make_generator`) and calls
``generator.generate(chats, sampling, batch_size)`` with chat message lists; prompts are
rendered with the reference model's tokenizer (``generator.tokenizer``), which is also what
the recorded ``prompt`` fields and the later activation stages use.

Seeds: ``hf`` seeds one generator per call with ``sampling.seed``. ``vllm`` and ``openai``
send each run of identical consecutive chats (the samples / rollouts of one prompt) as one
request with ``n`` = its length and ``seed = sampling.seed + run index``, so a call is
reproducible as far as the engine or server honours seeds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Literal, Protocol, Sequence

from pydantic import BaseModel, ConfigDict, Field

from persona_ops.errors import InputError
from persona_ops.inference.sampling import SamplingParams

Backend = Literal["hf", "vllm", "openai"]
_MAX_N = 16  # completions per OpenAI request (servers cap n; ours at 32)


class EndpointCfg(BaseModel):
    """An OpenAI-compatible server (the ``openai`` sections of params.yaml: generation and judge)."""

    model_config = ConfigDict(extra="forbid")
    base_url: str | None = None  # None = https://api.openai.com/v1
    model: str | None = None  # the served model's name (required with backend=openai)
    api_key_env: str = "OPENAI_API_KEY"  # the NAME of the variable holding the key
    max_concurrency: int = Field(16, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout: float = Field(300.0, gt=0)
    backoff_base: float = Field(1.0, ge=0)  # seconds before the first retry (doubling, with jitter) ...
    backoff_max: float = Field(60.0, ge=0)  # ... up to this; a server's Retry-After wins


class VLLMCfg(BaseModel):
    """The ``vllm`` backend's engine settings (``<section>.vllm`` in params.yaml)."""

    model_config = ConfigDict(extra="forbid")
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)


class GenerationCfg(BaseModel):
    """Where answers come from and how they are sampled (generation sections of params.yaml)."""

    model_config = ConfigDict(extra="forbid")
    backend: Backend = "hf"  # hf (the local model on the engine) | vllm | openai
    batch_size: int = Field(32, ge=1)  # hf: rows per generation batch
    sampling: SamplingParams = Field(default_factory=SamplingParams)
    openai: EndpointCfg = Field(default_factory=EndpointCfg)
    vllm: VLLMCfg = Field(default_factory=VLLMCfg)


class TextGenerator(Protocol):
    label: str  # what generates (provenance and resume fingerprints)
    tokenizer: object  # the reference model's: renders the prompts

    def generate(self, chats: Sequence[list[dict]], sampling, batch_size: int = 32) -> list[str]:
        """One answer per chat, in input order."""


def make_generator(cfg: GenerationCfg, model, section: str, load=None) -> TextGenerator:
    """The generator ``cfg.backend`` names, for the reference ``model`` (a resolved ``ModelRef``).

    ``section`` names ``cfg`` in error messages. ``hf`` loads ``model`` with ``load`` (a stage's
    ``io.model``: the run's shared pool); the other backends load only its tokenizer, which
    renders the prompts the records keep.
    """
    if cfg.backend == "hf":
        if load is None:
            raise ValueError("the hf backend needs a model loader")
        return HFGenerator(load(model))
    from persona_ops.models.loading import load_tokenizer

    vllm = _import_vllm(section) if cfg.backend == "vllm" else None  # before loading anything
    tokenizer = load_tokenizer(model.name, model.revision)
    if vllm is not None:
        return VLLMGenerator(vllm, model, cfg.vllm, tokenizer)
    if cfg.backend == "openai":
        return OpenAIGenerator(cfg.openai, section, tokenizer)
    raise InputError(f"{section}.backend: expected hf, vllm or openai, got {cfg.backend!r}")


def _runs(chats: Sequence[list[dict]], max_n: int | None = None) -> list[tuple[int, int]]:
    """``(start, length)`` of each run of identical consecutive chats (at most ``max_n`` long)."""
    runs: list[tuple[int, int]] = []
    for i, chat in enumerate(chats):
        if runs and chats[runs[-1][0]] == chat and (max_n is None or runs[-1][1] < max_n):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


class HFGenerator:
    """The local model through the generation engine."""

    def __init__(self, loaded):
        self.loaded, self.tokenizer, self.label = loaded, loaded.tokenizer, loaded.label

    def generate(self, chats: Sequence[list[dict]], sampling, batch_size: int = 32) -> list[str]:
        from persona_ops.chat import render_prompt
        from persona_ops.inference.engine import generate_text

        return generate_text(self.loaded, [render_prompt(self.tokenizer, c) for c in chats], sampling,
                             batch_size=batch_size, progress=True)


def _import_vllm(section: str):
    try:
        import vllm
    except ImportError:
        raise InputError(f"{section}.backend=vllm needs vLLM, which is not installed: "
                         "pip install 'persona-ops[vllm]' (Linux with a CUDA GPU), "
                         f"or choose {section}.backend=hf") from None
    return vllm


def _vllm_dtype(dtype: str) -> str:
    """``model.dtype`` for vLLM, ``auto`` meaning what it means to the hf backend (bfloat16 on a GPU,
    float32 on a CPU): vLLM's own ``auto`` downcasts an fp32 checkpoint to bfloat16 on a CPU too."""
    import torch
    from vllm.platforms import current_platform

    from persona_ops.models.loading import resolve_dtype

    return str(resolve_dtype(dtype, torch.device(current_platform.device_type))).removeprefix("torch.")


class VLLMGenerator:
    """Offline vLLM on the reference model (its LoRA adapter through a ``LoRARequest``)."""

    def __init__(self, vllm, model, cfg: VLLMCfg, tokenizer):
        from persona_ops.models.adapters import adapter_sha256
        from persona_ops.models.loading import model_source
        from persona_ops.models.refs import label

        path, kwargs = model_source(model.name, model.revision)
        self.tokenizer, self._vllm = tokenizer, vllm
        self.label = "vllm:" + label(model, adapter_sha256(model.adapter) if model.adapter else None)
        lora = {}
        self._lora = None
        if model.adapter:
            from vllm.lora.request import LoRARequest

            rank = json.loads((Path(model.adapter) / "adapter_config.json").read_text()).get("r", 16)
            lora = {"enable_lora": True, "max_lora_rank": max(8, int(rank))}
            self._lora = LoRARequest("adapter", 1, str(model.adapter))
        self.llm = vllm.LLM(model=path, tokenizer=path, revision=kwargs.get("revision"),
                            dtype=_vllm_dtype(model.dtype),
                            tensor_parallel_size=cfg.tensor_parallel_size,
                            gpu_memory_utilization=cfg.gpu_memory_utilization, max_model_len=cfg.max_model_len,
                            **lora)

    def generate(self, chats: Sequence[list[dict]], sampling, batch_size: int = 32) -> list[str]:
        """vLLM schedules its own batches (``batch_size`` is unused)."""
        from persona_ops.chat import encode, render_prompt

        runs = _runs(chats)
        # token ids, so vLLM adds no second BOS to a rendered template
        prompts = [{"prompt_token_ids": encode(self.tokenizer, render_prompt(self.tokenizer, chats[start]))}
                   for start, _ in runs]
        params = [self._vllm.SamplingParams(n=n, temperature=sampling.temperature, top_p=sampling.top_p,
                                            max_tokens=sampling.max_new_tokens, seed=sampling.seed + r)
                  for r, (_, n) in enumerate(runs)]
        outputs = self.llm.generate(prompts, params, use_tqdm=True, lora_request=self._lora)
        return [o.text.strip() for out in outputs for o in sorted(out.outputs, key=lambda o: o.index)]


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible server."""

    def __init__(self, cfg: EndpointCfg, section: str, tokenizer):
        from persona_ops.inference.openai_client import OpenAIEndpoint

        if not cfg.model:
            raise InputError(f"{section}.openai.model: the served model's name is required with "
                             f"{section}.backend=openai")
        self.cfg, self.tokenizer = cfg, tokenizer
        self.label = f"openai:{cfg.model}@{cfg.base_url or 'https://api.openai.com/v1'}"
        self.endpoint = OpenAIEndpoint(f"{section} (openai backend)", cfg.model, cfg.base_url, cfg.api_key_env,
                                       cfg.max_concurrency, cfg.max_retries, cfg.timeout, cfg.backoff_base,
                                       cfg.backoff_max)

    def generate(self, chats: Sequence[list[dict]], sampling, batch_size: int = 32,
                 on_result: Callable[[range, list[str]], None] | None = None) -> list[str]:
        """Requests run ``max_concurrency`` at a time (``batch_size`` is unused).

        ``on_result(indices, answers)`` receives the answers of each request (the chats at
        ``indices``) as it arrives, so a caller can keep them when other requests fail; the error
        comes once every request has ended (see :class:`~persona_ops.inference.openai_client.OpenAIEndpoint`).
        """
        from persona_ops.inference.openai_client import UnusableReply

        async def complete(client, job: tuple[int, tuple[int, int]]) -> list[str]:
            r, (start, n) = job
            resp = await client.chat.completions.create(
                model=self.cfg.model, messages=chats[start], n=n, temperature=sampling.temperature,
                top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=sampling.seed + r)
            try:
                answers = [(c.message.content or "").strip() for c in sorted(resp.choices, key=lambda c: c.index)]
            except (AttributeError, TypeError):
                raise UnusableReply("reply without choices") from None
            if len(answers) != n:
                raise InputError(f"{self.label}: asked for n={n} completions, got {len(answers)} "
                                 "(does the server support n > 1?)")
            return answers

        def keep(j: int, answers: list[str]) -> None:
            start, n = jobs[j][1]
            on_result(range(start, start + n), answers)

        jobs = list(enumerate(_runs(chats, _MAX_N)))
        results = self.endpoint.map(complete, jobs, keep if on_result is not None else None)
        return [a for answers in results for a in answers]
