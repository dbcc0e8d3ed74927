"""Fetching a task's image from the one configured Label Studio, and nothing else (no server-side request forgery).

Label Studio sends the ML backend an image *URL* (an upload `/data/upload/...`, local storage
`/data/local-files/?d=...`, or a cloud-storage proxy `/tasks/<id>/resolve/?fileuri=...`), relative to its own
root or absolute. Anyone who can reach cfr-serve can post such a request, so the URL is untrusted: it is
resolved against `LABEL_STUDIO_URL` and fetched only when its scheme, host and port are that server's
(redirects too: a redirect to another origin is refused, not followed). The API key goes to that origin
only. The body is read under cfr-serve's upload byte limit; `TaskImage` hands it to `SessionStore.replay` as
an upload to `POST /sessions` is handled: the header checked against the pixel limits and the memory reserved
from it before a pixel is decoded (`codec.EncodedImage`), and fetched only when no cached session can be used.

API keys: a legacy token (`Authorization: Token <key>`, enabled in Label Studio by
LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true) or a personal access token (a JWT refresh token), which is
exchanged at `/api/token/refresh/` for a short-lived access token sent as `Authorization: Bearer ...`,
as Label Studio's own SDK does.
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InputError
from .codec import EncodedImage, UploadLimits, http_error

ENV_URL = "LABEL_STUDIO_URL"
ENV_KEY = "LABEL_STUDIO_API_KEY"
MAX_REDIRECTS = 3
CLOUD_SCHEMES = ("s3:", "gs:", "azure-blob:")
DEFAULT_PORTS = {"http": 80, "https": 443}


def origin_of(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in; the unit the SSRF rule compares."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        raise http_error(InputError, 400, f"image URL {url!r} has an invalid port") from None
    return scheme, (parts.hostname or "").lower(), port or DEFAULT_PORTS.get(scheme, 0)


@dataclass(frozen=True)
class LabelStudioConfig:
    """Where Label Studio is (`url`: its root, e.g. http://127.0.0.1:8080) and the API key to fetch with."""

    url: str | None = None
    api_key: str | None = None
    timeout_s: float = 30.0

    def __post_init__(self):
        if self.url is not None:
            scheme, host, _ = origin_of(self.url)
            if scheme not in DEFAULT_PORTS or not host:
                raise InputError(f"{ENV_URL} must be an http(s) URL with a host, e.g. http://127.0.0.1:8080, "
                                 f"got {self.url!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> LabelStudioConfig:
        env = os.environ if environ is None else environ
        return cls(url=env.get(ENV_URL) or None, api_key=env.get(ENV_KEY) or None)


def _jwt_claims(token: str) -> dict | None:
    """The payload of a JWT (not verified: Label Studio verifies it), or None when `token` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are checked by `ImageFetcher` (same origin only), never followed blindly by urllib."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ImageFetcher:
    """Fetches and decodes task images from the configured Label Studio; thread-safe."""

    def __init__(self, config: LabelStudioConfig, limits: UploadLimits):
        self.config = config
        self.limits = limits
        # no proxies from the environment: the key must reach Label Studio itself, and only it
        self._opener = urllib.request.build_opener(_NoRedirect, urllib.request.ProxyHandler({}))
        self._access: tuple[str, float] | None = None  # (JWT access token, expiry) for a personal access token
        self._lock = threading.Lock()

    # ---- URLs -------------------------------------------------------------------------------------------
    def resolve(self, url: object, task_id: int | None = None) -> str:
        """The absolute URL of `url` on the configured Label Studio, or an InputError saying why not.

        A cloud-storage URI (s3://, gs://, azure-blob://) becomes Label Studio's own file proxy for the task,
        `/tasks/<id>/presign/?fileuri=<base64>`, as Label Studio's SDK resolves it."""
        if not self.config.url:
            raise http_error(InputError, 503, f"cfr-serve does not know where Label Studio is: start it with "
                                              f"{ENV_URL}=http://<label-studio-host>:<port> and {ENV_KEY}=<token>")
        if not isinstance(url, str) or not url.strip():
            raise http_error(InputError, 400, f"the task's image is not a URL string (got {url!r})")
        url = url.strip()
        if url.startswith(CLOUD_SCHEMES) and task_id is not None:
            url = f"/tasks/{task_id}/presign/?fileuri={base64.urlsafe_b64encode(url.encode()).decode()}"
        base = self.config.url.rstrip("/") + "/"
        absolute = urllib.parse.urljoin(base, url)  # "/data/..." -> on Label Studio; "//host/..." keeps its host
        if origin_of(absolute) != origin_of(base):
            scheme = urllib.parse.urlsplit(absolute).scheme or "?"
            raise http_error(InputError, 400, f"refusing to fetch {_short(url)}: cfr-serve fetches images only "
                                              f"from {ENV_URL} ({_origin_str(base)}), not from {scheme} URLs "
                                              "on other hosts; serve the images through Label Studio (uploads, "
                                              "local storage, or cloud storage without pre-signed URLs)")
        return absolute

    # ---- credentials ------------------------------------------------------------------------------------
    def _authorization(self, refresh: bool = False) -> str | None:
        key = self.config.api_key
        if not key:
            return None
        claims = _jwt_claims(key)
        if claims is None or claims.get("token_type") != "refresh":
            return f"Bearer {key}" if claims is not None else f"Token {key}"
        with self._lock:
            if refresh or self._access is None or self._access[1] < time.time() + 10:
                self._access = self._exchange(key)
            return f"Bearer {self._access[0]}"

    def _exchange(self, refresh_token: str) -> tuple[str, float]:
        url = self.config.url.rstrip("/") + "/api/token/refresh/"
        req = urllib.request.Request(url, data=json.dumps({"refresh": refresh_token}).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=self.config.timeout_s) as resp:
                access = json.loads(resp.read(65536))["access"]
        except (urllib.error.URLError, OSError, ValueError, KeyError, TypeError) as exc:
            raise http_error(InputError, 502, f"Label Studio did not exchange the personal access token in "
                                              f"{ENV_KEY} for an access token ({_reason(exc)}); check the token "
                                              "or use a legacy token") from None
        exp = (_jwt_claims(access) or {}).get("exp")
        return access, float(exp) if isinstance(exp, (int, float)) else time.time() + 60

    # ---- fetching ---------------------------------------------------------------------------------------
    def fetch(self, url: str) -> bytes:
        """The bytes at `url` (already `resolve`d), following same-origin redirects only."""
        retried = False
        for _ in range(MAX_REDIRECTS + 1):
            headers = {}  # no Accept header: Label Studio's file views answer 406 to "Accept: image/*"
            auth = self._authorization()
            if auth:
                headers["Authorization"] = auth
            req = urllib.request.Request(url, headers=headers)
            try:
                with self._opener.open(req, timeout=self.config.timeout_s) as resp:
                    return self._read(resp, url)
            except urllib.error.HTTPError as exc:
                with exc:
                    if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                        target = urllib.parse.urljoin(url, exc.headers["Location"])
                        if origin_of(target) != origin_of(url):
                            raise http_error(InputError, 502, f"Label Studio redirected {_short(url)} to another "
                                                              f"origin ({_origin_str(target)}); cfr-serve fetches "
                                                              f"only from {ENV_URL}. For cloud storage, turn off "
                                                              "'Use pre-signed URLs' in the storage's settings so "
                                                              "Label Studio serves the file itself") from None
                        url = target
                        continue
                    if exc.code == 401 and not retried and _jwt_claims(self.config.api_key or "") is not None:
                        retried = True  # the access token may have expired early: exchange once more
                        self._authorization(refresh=True)
                        continue
                    raise self._http_failure(exc.code, url) from None
            except (urllib.error.URLError, OSError) as exc:
                raise http_error(InputError, 502, f"could not fetch {_short(url)} from Label Studio "
                                                  f"({_reason(exc)}); is {ENV_URL} right and Label Studio up?") \
                    from None
        raise http_error(InputError, 502, f"{_short(url)}: more than {MAX_REDIRECTS} redirects")

    def _read(self, resp, url: str) -> bytes:
        limit = self.limits.max_bytes
        declared = resp.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise http_error(InputError, 413, f"{_short(url)} is {declared} bytes; the upload limit is {limit}")
        data = resp.read(limit + 1)
        if len(data) > limit:
            raise http_error(InputError, 413, f"{_short(url)} passes the upload limit of {limit} bytes")
        return data

    def _http_failure(self, code: int, url: str) -> InputError:
        if code in (401, 403):
            why = (f"set {ENV_KEY} to a Label Studio token (a legacy token needs "
                   "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true on Label Studio) of a user who may see the task"
                   if not self.config.api_key else f"the token in {ENV_KEY} was refused")
            return http_error(InputError, 502, f"Label Studio answered {code} for {_short(url)}: {why}")
        return http_error(InputError, 502, f"Label Studio answered {code} for {_short(url)}")

    def image(self, absolute: str) -> TaskImage:
        """The image at a `resolve`d URL as `SessionStore.replay` takes it (nothing is fetched yet)."""
        return TaskImage(self, absolute)


class TaskImage(EncodedImage):
    """A task's image for `SessionStore.replay`: fetched from Label Studio on first use (only when no cached
    session of the task can be used, so a click on an open task fetches nothing), then its header (for the
    memory reservation and the pixel limits) and its pixels, each once, as `codec.EncodedImage` does."""

    def __init__(self, fetcher: ImageFetcher, url: str):
        super().__init__(b"", fetcher.limits, what=f"image {_short(url)}")
        self.fetcher, self.url = fetcher, url

    @property
    def blob(self) -> bytes:
        if self._blob is None:
            self._blob = self.fetcher.fetch(self.url)
        return self._blob


def _short(url: str, n: int = 120) -> str:
    return repr(url if len(url) <= n else url[:n] + "...")


def _origin_str(url: str) -> str:
    scheme, host, port = origin_of(url)
    return f"{scheme}://{host}:{port}"


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc or type(exc).__name__)
