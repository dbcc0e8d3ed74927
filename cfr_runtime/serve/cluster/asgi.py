"""An HTTP request as plain data, and the in-process call of an ASGI app with it.

The gateway turns each HTTP request into an `HttpRequest` and hands it to a replica, which runs it through the
very app `cfr-serve` runs (`create_app`): one implementation of every route, error and page, on one machine
or many. Plain dataclasses of bytes and strings, so Ray pickles them cheaply.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field

SESSION_PATH = re.compile(r"^/sessions/([^/]+)(?:/.*)?$")


@dataclass
class HttpRequest:
    method: str
    path: str
    query: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass
class HttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes


IDEMPOTENCY_HEADER = b"idempotency-key"
MAX_KEY_CHARS = 128


async def from_starlette(request, max_body: int) -> HttpRequest:
    """The request as data, its body read up to `max_body` bytes (InputError 413 beyond, before reading on)."""
    from ..codec import read_body

    body = await read_body(request, max_body)
    scope = request.scope
    return HttpRequest(request.method, scope["path"], scope.get("query_string", b""), list(scope["headers"]), body,
                       tuple(scope["client"]) if scope.get("client") else None)


def to_starlette(answer: HttpResponse, extra: list[tuple[bytes, bytes]] = ()):
    from starlette.responses import Response

    response = Response(answer.body, status_code=answer.status)
    response.raw_headers = [*answer.headers, *extra]
    return response


def operation_id(req: HttpRequest) -> str:
    """The id that makes a retried write apply once: the client's `Idempotency-Key` header when it sends one
    (then its own retries are safe too), else a fresh random id (retries made on the client's behalf keep it)."""
    import secrets

    for name, value in req.headers:
        if name.lower() == IDEMPOTENCY_HEADER and 0 < len(value) <= MAX_KEY_CHARS:
            return "k:" + value.decode("latin-1")
    return secrets.token_hex(8)


def session_id_of(path: str) -> str | None:
    """The session id a request addresses (/sessions/{sid}...), or None for the page, creates, health, CVAT."""
    m = SESSION_PATH.match(path)
    return m.group(1) if m else None


async def call_asgi(app, req: HttpRequest) -> HttpResponse:
    """Run one request through an ASGI app in this process and collect the whole response."""
    scope = {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
        "method": req.method, "scheme": "http", "path": req.path, "raw_path": req.path.encode("latin-1"),
        "root_path": "", "query_string": req.query, "headers": [(k.lower(), v) for k, v in req.headers],
        "client": req.client, "server": ("127.0.0.1", 80),
    }
    done = asyncio.Event()
    sent_body = False

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": req.body, "more_body": False}
        await done.wait()  # a streaming response listens for a disconnect: there is none until it has finished
        return {"type": "http.disconnect"}

    status, headers, chunks = 500, [], []

    async def send(message):
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    try:
        await app(scope, receive, send)
    finally:
        done.set()
    return HttpResponse(status, headers, b"".join(chunks))
