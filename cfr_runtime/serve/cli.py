"""`cfr-serve [MODEL]`: start the annotation service (default model: the bundled tiny ONNX).

The listening socket is bound before the address is printed, so a port in use or a host that does not resolve
is one clear error (exit 2), never a URL printed as if the server ran and then a traceback. Options follow the
shared vocabulary (`cfr_runtime.cli_options`).
"""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path

import click

from ..cli_options import (
    POSITIVE_FLOAT,
    POSITIVE_INT,
    backend_option,
    command,
    fail,
    log_level_option,
    model_argument,
    option,
    threads_option,
)
from .cluster.options import check_without_ray, cluster_options, ray_options

PROG = "cfr-serve"


def listen(host: str, port: int) -> socket.socket:
    """A bound, listening TCP socket for (host, port), or a CfrError-style exit naming the address and why."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        fail(PROG, f"--host {host}: cannot resolve it ({exc.strerror}); use an address such as 127.0.0.1 "
                   "(this machine only) or 0.0.0.0 (every interface)")
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart over TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            fail(PROG, f"{host}:{port} is already in use (another cfr-serve, or another server); stop it or "
                       "choose another --port")
        if exc.errno in (errno.EACCES, errno.EPERM):
            fail(PROG, f"not allowed to listen on {host}:{port} (ports below 1024 need privileges); "
                       "choose a --port from 1024 up")
        fail(PROG, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    sock.set_inheritable(True)
    return sock


# ---- issue 16's limits (serve2 block): which Host names are served, who is who, how much each client may take --
# Each option maps onto one field of ServeConfig, StoreLimits or UploadLimits (defaults equal: tests/test_serve_cli.py
# checks it); docs/serve-security.md explains what each limit stops.
WILDCARD_HOSTS = ("0.0.0.0", "::", "[::]", "")
IDENTITIES = ("address", "header")  # fairness.IDENTITIES (not imported: --help must not load the app; a test checks)
DEFAULT_CLIENT_HEADER = "x-client-id"


class HostName(click.ParamType):
    """A name the Host (and Origin) header may carry: a DNS name or an address, optionally with a port (ignored,
    as HostGuard compares names), or * for any."""

    name = "name"

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip().lower()
        if not re.fullmatch(r"\*|[a-z0-9_.:\[\]-]+", text):
            self.fail(f"{value!r} is not a host name; give the name alone, as the browser's address bar shows it "
                      "without scheme or path (e.g. annot.example.org or 192.168.1.5), or * for any", param, ctx)
        return text


class HeaderName(click.ParamType):
    """An HTTP header name (an RFC 9110 token), lower-cased."""

    name = "header"

    def convert(self, value, param, ctx) -> str:
        text = str(value).strip()
        if not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", text):
            self.fail(f"{value!r} is not an HTTP header name (letters, digits and -, e.g. X-Client-Id)", param, ctx)
        return text.lower()


def limit_options(f):
    """The options of this block, in --help order."""
    decorators = [
        option("--allowed-host", "allowed_hosts", type=HostName(), multiple=True, metavar="NAME",
               help="A Host name the server answers to, besides localhost, 127.0.0.1 and ::1 and --host (unless "
                    "--host is 0.0.0.0 or ::); repeatable. Requests naming another Host get 400 and pages of other "
                    "origins 403 (DNS rebinding, cross-site requests). * answers any Host: only behind a proxy "
                    "that checks it."),
        option("--client-identity", type=click.Choice(IDENTITIES), default="address", show_default=True,
               help="Who a request is accounted to for the per-client limits and the fair queue: address (the "
                    "peer's IP; everyone behind one proxy or NAT is one client) or header (the --client-header "
                    "value, else the address; anyone can send any value, so only behind a proxy that "
                    "authenticates users and sets it)."),
        option("--client-header", type=HeaderName(), default=None, metavar="NAME",
               help="With --client-identity header: the header that names the client [default: X-Client-Id]."),
        option("--client-max-inflight", type=POSITIVE_INT, default=32, show_default=True, metavar="N",
               help="Requests one client may have queued or running at once; more are answered 429."),
        option("--queue-timeout", type=POSITIVE_FLOAT, default=120.0, show_default=True, metavar="S",
               help="Longest wait in seconds for a worker slot; a request still waiting is answered 503."),
        option("--client-max-sessions", type=POSITIVE_INT, default=32, show_default=True, metavar="N",
               help="Sessions one client may hold; its own least recently used idle session makes way for a new "
                    "one, and when all are in use a new one is answered 429."),
        option("--max-side", type=POSITIVE_INT, default=12_000, show_default=True, metavar="PX",
               help="Longest image side accepted (width or height), checked on the header before decoding."),
    ]
    for deco in reversed(decorators):
        f = deco(f)
    return f


def _allowed_hosts(host: str, extra: tuple[str, ...], loopback: tuple[str, ...]) -> tuple[str, ...]:
    """The Host allowlist: the loopback names, the --allowed-host names and --host unless it is a wildcard."""
    names = [*loopback, *extra]
    if host.strip().lower() not in WILDCARD_HOSTS:
        names.append(host.strip().lower())
    return tuple(dict.fromkeys(names))


def _client_header(identity: str, header: str | None) -> str:
    if header is not None and identity != "header":
        raise click.UsageError(f"--client-header {header} is used only with --client-identity header "
                               f"(the identity is {identity!r})")
    return header or DEFAULT_CLIENT_HEADER
# ---- end of issue 16's limits block ---------------------------------------------------------------------------


@command(PROG)
@model_argument(required=False)
@option("--host", default="127.0.0.1", show_default=True,
        help="Address to listen on: 127.0.0.1 serves this machine only, 0.0.0.0 every interface.")
@option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="TCP port to listen on.")
@backend_option()
@threads_option()
@option("--idle-timeout", type=POSITIVE_FLOAT, default=900.0, show_default=True,
        help="Seconds before an idle session expires.")
@option("--max-sessions", type=POSITIVE_INT, default=64, show_default=True,
        help="LRU cap on live sessions.")
@option("--max-memory-mb", type=POSITIVE_FLOAT, default=2048.0, show_default=True,
        help="LRU cap on the memory all sessions hold (images, maps, undo history).")
@option("--max-upload-mb", type=POSITIVE_FLOAT, default=20.0, show_default=True,
        help="Largest upload body.")
@option("--max-pixels", type=POSITIVE_INT, default=40_000_000, show_default=True,
        help="Largest image (W x H), checked on the header before decoding.")
@option("--max-concurrent", type=POSITIVE_INT, default=2, show_default=True,
        help="Forwards run at once; further clicks queue (about the number of cores).")
@limit_options
# ---- cfr-serve --ray ADDRESS (issue 18): the same app on a Ray Serve cluster; options in cluster/options.py ----
@ray_options()
# ---- end of the --ray options --------------------------------------------------------------------------------
@log_level_option()
def main(model: Path | None, host: str, port: int, backend: str, threads: int | None, idle_timeout: float,
         max_sessions: int, max_memory_mb: float, max_upload_mb: float, max_pixels: int, max_concurrent: int,
         allowed_hosts: tuple[str, ...], client_identity: str, client_header: str | None, client_max_inflight: int,
         queue_timeout: float, client_max_sessions: int, max_side: int, log_level: str, **cluster) -> None:
    """Serve MODEL (an ONNX file or TensorRT plan from cfr-export; default: the bundled tiny model) over HTTP.

    Open http://HOST:PORT/ for the annotation page; the API is described at /docs. With --ray ADDRESS the same
    service runs on a Ray cluster (docs/ray.md).
    """
    try:
        import uvicorn

        from .. import default_model
        from ..engine import Engine
        from .app import ServeConfig, create_app
        from .codec import UploadLimits
        from .security import LOOPBACK_HOSTS
        from .store import StoreLimits
    except ImportError as exc:
        fail(PROG, f"{exc.name} is missing; install the extra: pip install 'cfr-icl[serve]'")
    header = _client_header(client_identity, client_header)  # usage errors before the model loads
    config = ServeConfig(
        store=StoreLimits(idle_timeout_s=idle_timeout, max_sessions=max_sessions, max_memory_mb=max_memory_mb,
                          client_max_sessions=client_max_sessions),
        upload=UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, max_side=max_side),
        sweep_interval_s=max(0.2, min(5.0, idle_timeout / 4)), max_concurrent=max_concurrent,
        allowed_hosts=_allowed_hosts(host, allowed_hosts, LOOPBACK_HOSTS), client_identity=client_identity,
        client_header=header, client_max_inflight=client_max_inflight, queue_timeout_s=queue_timeout)
    # ---- --ray (issue 18): deploy on the cluster and serve until Ctrl-C; the replicas load the model and each
    # runs this same config (Host guard, gate, per-client limits), the record store keeps the caps cluster-wide --
    if cluster["ray"] is None:
        check_without_ray(click.get_current_context())
    else:
        from .cluster import serve_on_ray

        options = cluster_options(model, threads=threads, backend=backend, **cluster)
        serve_on_ray(cluster["ray"], model, config, options, host=host, port=port)
        return
    # ---- end of the --ray block ------------------------------------------------------------------------------
    engine = Engine(model or default_model(), backend=backend, threads=threads)  # a CfrError exits 2
    app = create_app(engine, config)
    sock = listen(host, port)
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"{PROG}: {engine!r}\n{PROG}: http://{shown}:{port}/", err=True)
    try:
        uvicorn.Server(uvicorn.Config(app, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()


if __name__ == "__main__":
    main()
