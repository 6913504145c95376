"""A judge behind any OpenAI-compatible endpoint (OpenAI, vLLM, ``persona-ops serve-model``).

One user message per prompt, ``max_tokens=1, temperature=0, logprobs=True,
top_logprobs=20, seed=0``; the score aggregates the first token's top-20 logprobs
(persona_vectors' method). Requests go through :class:`persona_ops.inference.openai_client.OpenAIEndpoint`
(concurrency bound, retries, the key never shown). A reply without those logprobs is unusable, not
a "no score": it is retried and, if it stays so, reported; only a reply whose numeric mass is too
small scores ``None``.
"""

from __future__ import annotations

from typing import Callable

import openai

from persona_ops.inference.openai_client import OpenAIEndpoint, UnusableReply
from persona_ops.judge.scoring import MIN_MASS, aggregate_score, numeric_probs


class OpenAIJudge:
    """Logprob judge over the chat-completions API; ``label`` keys the cache."""

    def __init__(self, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 16, max_retries: int = 5, timeout: float = 60.0,
                 backoff_base: float = 1.0, backoff_max: float = 60.0):
        self.endpoint = OpenAIEndpoint("judge", model, base_url, api_key_env, max_concurrency, max_retries,
                                       timeout, backoff_base, backoff_max)
        self.model, self.base_url = model, base_url
        self.label = f"openai:{model}"

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIJudge(model={self.model!r}, base_url={self.base_url!r})"

    @property
    def requests_sent(self) -> int:
        """HTTP attempts, retries included."""
        return self.endpoint.requests_sent

    def score_prompts(self, prompts: list[str], lo: int = 0, hi: int = 100,
                      on_result: Callable[[int, tuple[float | None, dict[int, float]]], None] | None = None
                      ) -> list[tuple[float | None, dict[int, float]]]:
        """Score each prompt (blocking); usable from any thread, with or without an event loop.

        ``on_result(i, (score, probs))`` receives each judgement as it arrives, so a caller keeps
        what finished when other requests fail (the error is raised once all have ended)."""
        return self.endpoint.map(self._scorer(lo, hi), prompts, on_result)

    async def ascore_prompts(self, prompts: list[str], lo: int = 0, hi: int = 100, on_result=None
                             ) -> list[tuple[float | None, dict[int, float]]]:
        """:meth:`score_prompts` inside an event loop (at most ``max_concurrency`` requests in flight)."""
        return await self.endpoint.amap(self._scorer(lo, hi), prompts, on_result)

    def _scorer(self, lo: int, hi: int):
        async def score(client: openai.AsyncOpenAI, prompt: str) -> tuple[float | None, dict[int, float]]:
            return self._aggregate(await self._top_logprobs(client, prompt), lo, hi)

        return score

    @staticmethod
    def _aggregate(top: list[tuple[str, float]], lo: int, hi: int) -> tuple[float | None, dict[int, float]]:
        probs = numeric_probs(top, lo, hi)
        return aggregate_score(probs, lo, hi, MIN_MASS), probs

    async def _top_logprobs(self, client: openai.AsyncOpenAI, prompt: str) -> list[tuple[str, float]]:
        """(token, logprob) pairs of the first answer token (one attempt; the endpoint retries)."""
        response = await client.chat.completions.create(
            model=self.model, messages=[{"role": "user", "content": prompt}], max_tokens=1,
            temperature=0, logprobs=True, top_logprobs=20, seed=0)
        return _first_token_top(response)


def _first_token_top(response) -> list[tuple[str, float]]:
    """The first generated token's top logprobs; :class:`UnusableReply` when the reply has none.

    An answer that ended at once (no token, ``finish_reason="stop"``) has no number in it: an
    empty list, so it scores ``None`` like a refusal."""
    try:
        choice = response.choices[0]
        content = choice.logprobs.content
        if content == [] and not choice.message.content and choice.finish_reason == "stop":
            return []
        top = [(t.token, float(t.logprob)) for t in content[0].top_logprobs]
    except (AttributeError, IndexError, TypeError, ValueError):
        top = []
    if not top:
        raise UnusableReply("reply without logprobs")
    return top
