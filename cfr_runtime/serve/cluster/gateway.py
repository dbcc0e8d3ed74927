"""The cluster's HTTP ingress: forwards every request to the replica that owns its session, retrying once.

It parses nothing but the path: `/sessions/{id}/...` gives the routing key (the session id, which Serve's
request router maps to its replica, see `routing`); everything else (the page, creates, health, CVAT) goes to
any replica. Each request gets an operation id that a retry keeps, so a write whose replica died after
committing it is not applied twice (`replica.ReplicaCore`); a client that retries on its own sends an
`Idempotency-Key` header, which becomes the operation id. The body limit is checked here too, so an
oversized upload is refused before it crosses the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response

from ...errors import CfrError, StateError
from ..app import error_response
from ..codec import http_error
from .asgi import HttpRequest, HttpResponse, from_starlette, operation_id, session_id_of, to_starlette

log = logging.getLogger("cfr_runtime.serve.cluster")

Send = Callable[[str, str, HttpRequest], Awaitable[HttpResponse]]


class GatewayCore:
    """`send(key, op_id, request)` delivers a request to a replica (a Serve deployment handle on a cluster);
    exceptions of the `retryable` types mean the replica died or became unreachable and are retried once."""

    def __init__(self, send: Send, max_body: int, retryable: tuple[type[BaseException], ...],
                 attempts: int = 2, retry_pause_s: float = 0.05):
        self.send, self.max_body, self.retryable = send, max_body, retryable
        self.attempts, self.retry_pause_s = attempts, retry_pause_s
        self.retries = 0

    async def __call__(self, request: Request) -> Response:
        """Forward one request; the answer carries `x-cfr-gateway-ms`, the time from here to the replica and back."""
        start = time.perf_counter()
        try:
            req = await from_starlette(request, self.max_body)
        except CfrError as exc:
            return error_response(exc)
        key = session_id_of(req.path) or ""
        op_id = operation_id(req)
        for attempt in range(self.attempts):
            try:
                answer = await self.send(key, op_id, req)
                break
            except self.retryable as exc:
                log.warning("%s %s: replica failed (%s); %s", req.method, req.path, type(exc).__name__,
                            "retrying" if attempt + 1 < self.attempts else "giving up")
                if attempt + 1 == self.attempts:
                    return error_response(http_error(
                        StateError, 503, "the replica serving this request failed and so did its successor; "
                                         "retry in a moment"))
                self.retries += 1
                await asyncio.sleep(self.retry_pause_s)
            except Exception as exc:  # a bug or a broken replica: the project's error format, not Ray's traceback
                log.exception("%s %s failed in a replica", req.method, req.path)
                return error_response(http_error(CfrError, 500, f"the replica failed on this request "
                                                                f"({type(exc).__name__}); see the replica's log"))
        return to_starlette(answer, [(b"x-cfr-gateway-ms", b"%.3f" % ((time.perf_counter() - start) * 1000))])
