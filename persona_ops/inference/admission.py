"""Admission control for the model server: a bounded number of requests inside, the rest refused at once.

A request that finds the server full gets 429 with ``Retry-After`` before its body is read, so
memory stays bounded however many clients connect: at most ``capacity`` requests (those decoding
and those waiting for the batch) hold a body of at most ``max_body_bytes``. This sits in front of
the app as ASGI middleware and knows nothing of how the app schedules the requests it admits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from starlette.responses import Response


@dataclass
class Admission:
    """How many requests are inside (``inside``, at most ``capacity``), the most ever (``peak``) and
    how many were refused for a full server (``refused``). Changed on the event loop only."""

    capacity: int
    inside: int = 0
    peak: int = 0
    refused: int = 0

    def try_enter(self) -> bool:
        if self.inside >= self.capacity:
            self.refused += 1
            return False
        self.inside += 1
        self.peak = max(self.peak, self.inside)
        return True

    def leave(self) -> None:
        self.inside -= 1


class AdmissionMiddleware:
    """ASGI middleware admitting requests to ``paths`` through ``admission``; others pass.

    ``refuse(status, message, headers)`` builds the error response (429 when full, 413 for a
    body over ``max_body_bytes``). An admitted request's body is read here, within the limit,
    and handed to the app as one message.
    """

    def __init__(self, app, admission: Admission, paths: set[str], max_body_bytes: int, retry_after_s: int,
                 refuse: Callable[..., Response]):
        self.app, self.admission, self.paths = app, admission, paths
        self.max_body_bytes, self.retry_after_s, self.refuse = max_body_bytes, retry_after_s, refuse

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        if not self.admission.try_enter():
            response = self.refuse(429, f"the server is busy ({self.admission.capacity} requests in progress or "
                                        f"queued); retry after {self.retry_after_s} s",
                                   headers={"Retry-After": str(self.retry_after_s)})
            return await response(scope, receive, send)
        try:
            body = await self._read_body(receive)
            if body is None:
                response = self.refuse(413, f"request body over {self.max_body_bytes} bytes")
                return await response(scope, receive, send)
            await self.app(scope, _replay(body, receive), send)
        finally:
            self.admission.leave()

    async def _read_body(self, receive) -> bytes | None:
        """The whole body, or None once it passes the limit (the client disconnecting ends it early)."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


def _replay(body: bytes, receive):
    """An ASGI ``receive`` giving ``body`` as one message, then the client's later messages (disconnect)."""
    sent = False

    async def replay():
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
