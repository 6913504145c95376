"""A judge behind any OpenAI-compatible endpoint (OpenAI, vLLM, ``persona-ops serve-model``).

One user message per prompt, ``max_tokens=1, temperature=0, logprobs=True,
top_logprobs=20, seed=0``; the score aggregates the first token's top-20 logprobs
(persona_vectors' method). Requests go through :class:`persona_ops.inference.openai_client.OpenAIEndpoint`
(concurrency bound, retries, the key never shown).
"""

from __future__ import annotations

import openai

from persona_ops.inference.openai_client import OpenAIEndpoint
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

    def score_prompts(self, prompts: list[str], lo: int = 0, hi: int = 100
                      ) -> list[tuple[float | None, dict[int, float]]]:
        """Score each prompt (blocking); usable from any thread, with or without an event loop."""
        tops = self.endpoint.map(self._top_logprobs, prompts)
        return [self._aggregate(top, lo, hi) for top in tops]

    async def ascore_prompts(self, prompts: list[str], lo: int = 0, hi: int = 100
                             ) -> list[tuple[float | None, dict[int, float]]]:
        """Score each prompt concurrently (at most ``max_concurrency`` requests in flight)."""
        tops = await self.endpoint.amap(self._top_logprobs, prompts)
        return [self._aggregate(top, lo, hi) for top in tops]

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
    """The first generated token's top logprobs; empty when the response has none."""
    try:
        content = response.choices[0].logprobs.content
        return [(t.token, t.logprob) for t in content[0].top_logprobs]
    except (AttributeError, IndexError, TypeError):
        return []
