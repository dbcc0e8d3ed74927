"""`cfr-serve [MODEL]`: start the annotation service (default model: the bundled tiny ONNX).

The listening socket is bound before the address is printed, so a port in use or a host that does not resolve
is one clear error (exit 2), never a URL printed as if the server ran and then a traceback. Options follow the
shared vocabulary (`cfr_runtime.cli_options`).
"""

from __future__ import annotations

import errno
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
# ---- cfr-serve --ray ADDRESS (issue 18): the same app on a Ray Serve cluster; options in cluster/options.py ----
@ray_options()
# ---- end of the --ray options --------------------------------------------------------------------------------
@log_level_option()
def main(model: Path | None, host: str, port: int, backend: str, threads: int | None, idle_timeout: float,
         max_sessions: int, max_memory_mb: float, max_upload_mb: float, max_pixels: int, max_concurrent: int,
         log_level: str, **cluster) -> None:
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
        from .store import StoreLimits
    except ImportError as exc:
        fail(PROG, f"{exc.name} is missing; install the extra: pip install 'cfr-icl[serve]'")
    config = ServeConfig(
        store=StoreLimits(idle_timeout_s=idle_timeout, max_sessions=max_sessions, max_memory_mb=max_memory_mb),
        upload=UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels),
        sweep_interval_s=max(0.2, min(5.0, idle_timeout / 4)), max_concurrent=max_concurrent)
    # ---- --ray (issue 18): deploy on the cluster and serve until Ctrl-C; the replicas load the model --------
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
