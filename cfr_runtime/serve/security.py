"""Requests a browser can be tricked into sending, refused before they reach an endpoint.

A web page open in the annotator's browser can send "simple" cross-site requests (POST with a text/plain,
form-encoded or multipart body, or no Content-Type at all) to a cfr-serve on localhost without a CORS
preflight; it cannot read the answer, but it can make the server decode and compute (issue 16, case 4). So:
- JSON endpoints take only `application/json` (which needs a preflight, and cfr-serve answers none), uploads
  only `image/*` or `application/octet-stream`, and both require the header.
- The Host header must name the server (`ServeConfig.allowed_hosts`; default: loopback names only): a page
  that rebinds its own DNS name to 127.0.0.1 (DNS rebinding) sends its own name as Host and is refused.
- A request carrying an Origin header (browsers add it to cross-origin and to POST requests) must come from
  an allowed host too, so even a same-port page on another name cannot drive the API.
Non-browser clients (curl, CVAT's server, nuclio) send no Origin and the Host they were given.
"""

from __future__ import annotations

import json
from urllib.parse import urlsplit

from ..errors import InputError
from .codec import http_error

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
JSON_TYPE = "application/json"
UPLOAD_TYPES = ("application/octet-stream",)  # and image/*


def host_name(value: str) -> str:
    """'Example.org:8000' -> 'example.org'; '[::1]:8000' -> '::1'."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


def content_type(request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


def require_json(request, what: str) -> None:
    """415 unless the request says its body is JSON."""
    ctype = content_type(request)
    if ctype != JSON_TYPE:
        raise http_error(InputError, 415, (
            f"the {what} must be sent as Content-Type: application/json, not {ctype or 'no Content-Type'} "
            "(other types are what a cross-site web page can send without asking)"))


def require_upload_type(request) -> None:
    """415 unless the request says its body is an image (image/* or application/octet-stream)."""
    ctype = content_type(request)
    if not (ctype.startswith("image/") or ctype in UPLOAD_TYPES):
        raise http_error(InputError, 415, (
            f"Content-Type {ctype or '(none)'} is not accepted; send the image file as the body with its "
            "image/... type or application/octet-stream (curl --data-binary @img.jpg -H 'Content-Type: "
            "image/jpeg')"))


class HostGuard:
    """ASGI middleware: refuse a Host (400) or Origin (403) outside `allowed` ('*' allows any)."""

    def __init__(self, app, allowed: tuple[str, ...] = LOOPBACK_HOSTS):
        self.app = app
        self.any = "*" in allowed
        self.allowed = {host_name(h) for h in allowed if h != "*"}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.any:
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = host_name(headers.get("host", ""))
        if host and host not in self.allowed:
            return await refuse(send, 400, f"Host {host!r} is not served here; allowed: "
                                           f"{sorted(self.allowed)} (cfr-serve --allowed-host NAME adds one)")
        origin = headers.get("origin")
        if origin is not None:
            origin_host = host_name(urlsplit(origin).netloc) if origin != "null" else "null"
            if origin_host not in self.allowed:
                return await refuse(send, 403, f"requests from pages on {origin!r} are not accepted; "
                                               "open the cfr-serve page itself, or call the API without a browser")
        return await self.app(scope, receive, send)


async def refuse(send, status: int, message: str) -> None:
    body = json.dumps({"error": "InputError", "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
