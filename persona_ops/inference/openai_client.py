"""The project's OpenAI-compatible client: the API key read from an environment variable (never
shown), at most ``max_concurrency`` requests in flight, and retries with backoff.

Rate limits (429), server errors (5xx), timeouts, dropped connections and unusable 200 replies
(a malformed body, or one the caller rejects with :class:`UnusableReply`, e.g. no logprobs) are
retried with exponential backoff and jitter, honouring ``Retry-After``; other 4xx fail at once.
A failed request does not stop the others: each result is handed to ``on_result`` as it
arrives (so the caller can keep it), and once every request has finished, one error says how
many failed and why: :class:`~persona_ops.errors.TransientError` when only network, rate-limit
or server failures outlasted the retries (a later attempt may succeed),
:class:`~persona_ops.errors.ServiceError` when a reply stayed unusable or a request was refused
(a retry cannot help). 401/403/404 concern every request: the requests not yet sent are not sent.
The API key never appears in an error message. The judge and the ``openai`` generation backend
both call through :class:`OpenAIEndpoint`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import random
import re
from collections import Counter
from typing import Awaitable, Callable, Sequence, TypeVar
from urllib.parse import urlparse

import openai
import pydantic

from persona_ops.errors import InputError, ServiceError, TransientError

_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
_KEY_PATTERN = re.compile(r"\bsk-[A-Za-z0-9_*\-]{4,}")
_MAX_DELAY = 300.0
_ENDPOINT_WIDE = {401, 403, 404}  # a bad key, no access, a wrong URL or model: every request would fail
_REASONS_SHOWN = 3
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


class UnusableReply(Exception):
    """Raised by a request function when a 200 reply lacks what it needs (e.g. logprobs): retried
    like a server error, then reported as a :class:`~persona_ops.errors.ServiceError`."""


class _Failed(Exception):
    """One request's final failure: why, and whether a later attempt may succeed."""

    def __init__(self, reason: str, transient: bool, endpoint_wide: bool = False):
        super().__init__(reason)
        self.reason, self.transient, self.endpoint_wide = reason, transient, endpoint_wide


_NOT_SENT = "not sent"


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

    def map(self, call: Callable[[openai.AsyncOpenAI, T], Awaitable[R]], items: Sequence[T],
            on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """``call(client, item)`` for every item, concurrently and with retries; results in
        input order, and each one passed to ``on_result(index, result)`` as soon as it arrives.
        Blocking; usable from any thread, with or without a running event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(self.amap(call, items, on_result))
        # Called from inside a running loop (a notebook): run ours on a helper thread.
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self.amap(call, items, on_result)).result()

    async def amap(self, call: Callable[[openai.AsyncOpenAI, T], Awaitable[R]], items: Sequence[T],
                   on_result: Callable[[int, R], None] | None = None) -> list[R]:
        """:meth:`map` inside an event loop. Every request runs to its end before a failure is
        raised (see the module docstring); ``on_result`` runs on the loop's thread, one at a time."""
        semaphore = asyncio.Semaphore(self.max_concurrency)
        stop: list[_Failed] = []  # an endpoint-wide refusal: send nothing more

        async with openai.AsyncOpenAI(api_key=self._api_key, base_url=self.base_url, max_retries=0,
                                      timeout=self.timeout) as client:
            async def one(index: int, item: T) -> R:
                async with semaphore:
                    if stop:
                        raise _Failed(_NOT_SENT, stop[0].transient)
                    try:
                        result = await self._with_retries(call, client, item)
                    except _Failed as e:
                        if e.endpoint_wide:
                            stop.append(e)
                        raise
                if on_result is not None:
                    on_result(index, result)
                return result

            outcomes = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)), return_exceptions=True)
        for outcome in outcomes:  # a bug (in ``call`` or ``on_result``) is raised as it is
            if isinstance(outcome, BaseException) and not isinstance(outcome, _Failed):
                raise outcome
        failures = [o for o in outcomes if isinstance(o, _Failed)]
        if failures:
            raise self._summary(failures, len(items))
        return list(outcomes)

    async def _with_retries(self, call, client: openai.AsyncOpenAI, item):
        for attempt in range(self.max_retries + 1):
            delay = None
            try:
                self.requests_sent += 1
                return await call(client, item)
            except openai.APIStatusError as e:
                status = e.status_code
                if status != 429 and status < 500:
                    raise _Failed(self._refusal(e), transient=False, endpoint_wide=status in _ENDPOINT_WIDE) from None
                if getattr(e, "code", None) == "insufficient_quota":  # a 429 no wait cures: the account is out
                    raise _Failed(self._refusal(e), transient=False, endpoint_wide=True) from None
                delay = _retry_after(e.response.headers)
                reason, transient = f"HTTP {status}", True
            except openai.APITimeoutError:
                reason, transient = f"timed out after {self.timeout}s", True
            except openai.APIConnectionError:
                reason, transient = "connection error", True
            except (json.JSONDecodeError, pydantic.ValidationError, openai.APIResponseValidationError):
                reason, transient = "malformed reply body", False
            except UnusableReply as e:
                reason, transient = str(e), False
            except InputError as e:  # the caller found the reply wrong in a way a retry cannot change
                raise _Failed(redact(str(e), self._api_key), transient=False) from None
            if attempt == self.max_retries:
                raise _Failed(f"{reason}; gave up after {self.max_retries + 1} attempts", transient)
            if delay is None:
                step = min(self.backoff_max, self.backoff_base * 2 ** attempt)
                delay = step / 2 + random.uniform(0, step / 2)  # "equal jitter"
            await asyncio.sleep(min(delay, _MAX_DELAY))
        raise AssertionError("unreachable")

    def _summary(self, failures: list[_Failed], total: int) -> Exception:
        """One error for every failed request: transient only if each failure was."""
        sent = [f for f in failures if f.reason != _NOT_SENT]
        reasons = Counter(f.reason for f in sent)
        shown = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(_REASONS_SHOWN))
        if len(reasons) > _REASONS_SHOWN:
            shown += f"; {len(reasons) - _REASONS_SHOWN} other reasons"
        unsent = len(failures) - len(sent)
        where = f" at {self.base_url}" if self.base_url else ""
        message = (f"{self.who} {self.model}{where}: {len(sent)} of {total} requests failed ({shown})"
                   + (f", {unsent} not sent" if unsent else "") + f"; {total - len(failures)} succeeded")
        error = TransientError if all(f.transient for f in sent) else ServiceError
        return error(redact(message, self._api_key))

    def _refusal(self, error: openai.APIStatusError) -> str:
        # the client unwraps {"error": {...}} bodies; fall back to its own summary
        body = error.body if isinstance(error.body, dict) else {}
        detail = str(body.get("message") or error.message or "")
        return redact(f"HTTP {error.status_code}, not retried: {detail}", self._api_key)
