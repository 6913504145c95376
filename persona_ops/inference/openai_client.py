"""The project's OpenAI-compatible client: the API key read from an environment variable (never
shown), at most ``max_concurrency`` requests in flight, and retries with backoff.

Rate limits (429), server errors (5xx), timeouts and connection errors are retried with
exponential backoff and jitter, honouring ``Retry-After``; other 4xx fail at once. The API
key never appears in an error message. The judge and the ``openai`` generation backend both
call through :class:`OpenAIEndpoint`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import random
import re
from typing import Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import openai

from persona_ops.errors import InputError, TransientError

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_*\-]{4,}")
_MAX_DELAY = 300.0
T = TypeVar("T")
R = TypeVar("R")


def is_local_url(base_url: str | None) -> bool:
    """Whether ``base_url`` points at this machine."""
    return bool(base_url) and (urlparse(base_url).hostname or "") in _LOCAL_HOSTS


def redact(text: str, secret: str | None) -> str:
    """``text`` with the secret and anything that looks like an API key removed."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _KEY_PATTERN.sub("[redacted]", text)


def _retry_after(headers) -> float | None:
    """Seconds from ``retry-after-ms`` / ``retry-after`` (seconds form only)."""
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(name) if headers is not None else None
        if value:
            try:
                return max(0.0, float(value) / scale)
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
    return None


class OpenAIEndpoint:
    """An OpenAI-compatible endpoint as the project uses it: the API key read from the
    environment variable ``api_key_env`` (not needed for a server on this machine, never
    shown), one async client per batch of requests, at most ``max_concurrency`` requests in
    flight, and retries with backoff (see the module docstring). The judge and the
    ``openai`` generation backend (:mod:`persona_ops.inference.backends`) both call through it.
    ``who`` names the caller (a config section) in error messages.
    """

    def __init__(self, who: str, model: str, base_url: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 max_concurrency: int = 16, max_retries: int = 5, timeout: float = 60.0,
                 backoff_base: float = 1.0, backoff_max: float = 60.0):
        if max_concurrency < 1 or max_retries < 0:
            raise InputError(f"{who}: max_concurrency must be >= 1 and max_retries >= 0")
        self.who, self.model, self.base_url = who, model, base_url
        self.max_concurrency, self.max_retries, self.timeout = max_concurrency, max_retries, timeout
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.requests_sent = 0  # HTTP attempts, retries included
        key = os.environ.get(api_key_env)
        if not key:
            if not is_local_url(base_url):
                raise InputError(f"{who}: the environment variable {api_key_env} (API key) is not set")
            key = "not-needed-for-a-local-server"
        self._api_key = key

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEndpoint(model={self.model!r}, base_url={self.base_url!r})"

    def map(self, call: Callable[[openai.AsyncOpenAI, T], Awaitable[R]], items: Sequence[T]) -> list[R]:
        """``call(client, item)`` for every item, concurrently and with retries; results in
        input order. Blocking; usable from any thread, with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.amap(call, items))
        # Called from inside a running loop (a notebook): run ours on a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.amap(call, items)).result()

    async def amap(self, call: Callable[[openai.AsyncOpenAI, T], Awaitable[R]], items: Sequence[T]) -> list[R]:
        """:meth:`map` inside an event loop."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                      timeout=self.timeout) as client:
            async def one(item: T) -> R:
                async with semaphore:
                    return await self._with_retries(call, client, item)

            return list(await asyncio.gather(*(one(item) for item in items)))

    async def _with_retries(self, call, client: openai.AsyncOpenAI, item):
        for attempt in range(self.max_retries + 1):
            delay = None
            try:
                self.requests_sent += 1
                return await call(client, item)
            except openai.APIStatusError as e:
                status = e.status_code
                if status != 429 and status < 500:
                    raise InputError(self._describe(e, f"HTTP {status}")) from None
                delay = _retry_after(e.response.headers)
                reason = f"HTTP {status}"
            except openai.APITimeoutError:
                reason = f"timed out after {self.timeout}s"
            except openai.APIConnectionError:
                reason = "connection error"
            if attempt == self.max_retries:
                raise TransientError(f"{self.who} {self.model}: {reason}; gave up after "
                                     f"{self.max_retries + 1} attempts") from None
            if delay is None:
                step = min(self.backoff_max, self.backoff_base * 2 ** attempt)
                delay = step / 2 + random.uniform(0, step / 2)  # "equal jitter"
            await asyncio.sleep(min(delay, _MAX_DELAY))
        raise AssertionError("unreachable")

    def _describe(self, error: openai.APIStatusError, what: str) -> str:
        # the client unwraps {"error": {...}} bodies; fall back to its own summary
        body = error.body if isinstance(error.body, dict) else {}
        detail = str(body.get("message") or error.message or "")
        where = f" at {self.base_url}" if self.base_url else ""
        return redact(f"{self.who} request to {self.model}{where} failed ({what}, not retried): {detail}",
                      self._api_key)
