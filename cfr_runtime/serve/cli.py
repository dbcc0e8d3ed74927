"""`cfr-serve [MODEL]`: start the annotation service (default model: the bundled tiny ONNX)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import CfrError


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--backend", default="auto", show_default=True, help="Engine backend: auto, ort or trt.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own).")
@click.option("--idle-timeout", type=float, default=900.0, show_default=True, help="Seconds before an idle "
              "session expires.")
@click.option("--max-sessions", type=int, default=64, show_default=True, help="LRU cap on live sessions.")
@click.option("--max-memory-mb", type=float, default=2048.0, show_default=True,
              help="LRU cap on the memory all sessions hold (images, maps, undo history).")
@click.option("--max-upload-mb", type=float, default=20.0, show_default=True, help="Largest upload body.")
@click.option("--max-pixels", type=int, default=40_000_000, show_default=True, help="Largest image (W x H).")
@click.option("--max-concurrent", type=int, default=2, show_default=True,
              help="Forwards run at once; further clicks queue (about the number of cores).")
@click.option("--log-level", default="warning", show_default=True)
def main(model: Path | None, host: str, port: int, backend: str, threads: int | None, idle_timeout: float,
         max_sessions: int, max_memory_mb: float, max_upload_mb: float, max_pixels: int, max_concurrent: int,
         log_level: str) -> None:
    """Serve MODEL (an ONNX file or TensorRT plan from cfr-export; default: the bundled tiny model) over HTTP.

    Open http://HOST:PORT/ for the annotation page; the API is described at /docs.
    """
    try:
        import uvicorn

        from .. import default_model
        from ..engine import Engine
        from .app import ServeConfig, create_app
        from .codec import UploadLimits
        from .store import StoreLimits
    except ImportError as exc:
        click.echo(f"cfr-serve: error: {exc.name} is missing; install the extra: pip install 'cfr-icl[serve]'",
                   err=True)
        sys.exit(2)
    if min(idle_timeout, max_sessions, max_memory_mb, max_upload_mb, max_pixels, max_concurrent) <= 0:
        click.echo("cfr-serve: error: limits must be positive", err=True)
        sys.exit(2)
    try:
        engine = Engine(model or default_model(), backend=backend, threads=threads)
    except CfrError as exc:
        click.echo(f"cfr-serve: error: {exc}", err=True)
        sys.exit(2)
    config = ServeConfig(
        store=StoreLimits(idle_timeout_s=idle_timeout, max_sessions=max_sessions, max_memory_mb=max_memory_mb),
        upload=UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels),
        sweep_interval_s=max(0.2, min(5.0, idle_timeout / 4)), max_concurrent=max_concurrent)
    app = create_app(engine, config)
    click.echo(f"cfr-serve: {engine!r}\ncfr-serve: http://{host}:{port}/", err=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level)


if __name__ == "__main__":
    main()
