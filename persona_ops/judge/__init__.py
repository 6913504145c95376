"""LLM-as-judge scoring: the logprob-weighted 0-100 (or 0-3) score, cached.

Backends: ``LocalJudge`` (a local HF model; every number scored as a whole
continuation) and ``OpenAIJudge`` (any OpenAI-compatible endpoint; top-20 logprobs
of the first token). ``make_judge`` builds either behind the SQLite ``JudgeCache``.
``LocalJudge`` is imported lazily, so the OpenAI path does not need torch loaded.
"""

from persona_ops.judge.cache import CachedJudge, CachedScore, JudgeCache, cache_key, make_judge
from persona_ops.judge.prompts import COHERENCE_PROMPT, coherence_prompt, fill_template
from persona_ops.judge.scoring import MIN_MASS, aggregate_score, aggregate_token_logprobs, numeric_probs, parse_int

__all__ = [
    "COHERENCE_PROMPT", "CachedJudge", "coherence_prompt", "CachedScore", "JudgeCache", "LocalJudge", "MIN_MASS",
    "OpenAIJudge", "aggregate_score", "aggregate_token_logprobs", "cache_key", "fill_template",
    "make_judge", "numeric_probs", "parse_int",
]


def __getattr__(name: str):
    if name == "LocalJudge":
        from persona_ops.judge.local import LocalJudge

        return LocalJudge
    if name == "OpenAIJudge":
        from persona_ops.judge.openai_backend import OpenAIJudge

        return OpenAIJudge
    raise AttributeError(f"module 'persona_ops.judge' has no attribute {name!r}")
