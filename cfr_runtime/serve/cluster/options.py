"""The command-line options of `cfr-serve --ray ADDRESS` (and of bench/serve_cluster.py), in the shared
vocabulary of `cfr_runtime.cli_options`, and their translation into `ClusterOptions`.

    --ray ADDRESS          the Ray cluster: "auto" (the one this machine belongs to) or the head's host:port
    --replicas N           session replicas, each with its own Engine (default 2)
    --replica-cpus F       Ray CPUs reserved per replica (fractions share a node's cores)
    --replica-gpus F       GPUs per replica (fractions share a card)
    --batch-size N         forwards of different sessions in one engine call (1: none); the model must have a
                           batch axis of at least N (cfr-export --max-batch N)
    --batch-wait-ms F      how long a forward waits for its batch to fill
    --ingress KIND         gateway (a request whose replica dies is retried once, exactly once) or direct (one
                           hop less; a client retry is exactly-once only with an Idempotency-Key header)

Each of them except --ray needs --ray; a bad value or combination is a usage error (`<tool>: error: ...`, exit
2) before anything is started. Importing this module imports no Ray.

Ray Serve's high-throughput mode (`RAY_SERVE_ENABLE_HA_PROXY=1` and `RAY_SERVE_THROUGHPUT_OPTIMIZED=1` in the
environment of `ray start` and of cfr-serve; docs/ray.md) replaces Serve's Python HTTP proxy with HAProxy, which
balances the ingress deployment's replicas itself: it works with the gateway ingress (the session router runs
behind the gateway), not with `--ingress direct` (Ray refuses a request router on the ingress deployment then).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ...cli_options import POSITIVE_FLOAT, POSITIVE_INT, option
from .deploy import ClusterOptions
from .serve_mode import ingress_problem

F = Callable[..., Any]
NON_NEGATIVE = click.FloatRange(min=0)
INGRESSES = ("gateway", "direct")
DEFAULTS = ClusterOptions()
# the options that only mean something on a cluster (name -> flag, for the message when --ray is missing)
CLUSTER_ONLY = {"replicas": "--replicas", "replica_cpus": "--replica-cpus", "replica_gpus": "--replica-gpus",
                "batch_size": "--batch-size", "batch_wait_ms": "--batch-wait-ms", "ingress": "--ingress"}


def ray_options(address_required: bool = False) -> Callable[[F], F]:
    """The cluster options as click decorators; the callback gets ray, replicas, replica_cpus, replica_gpus,
    batch_size, batch_wait_ms and ingress."""
    decorators = [
        option("--ray", "ray", metavar="ADDRESS", required=address_required, default=None,
               help="Serve on the Ray cluster at ADDRESS ('auto', or the head's host:port): an HTTP ingress and "
                    "--replicas session replicas, sessions routed to their replica and kept in a record store "
                    "that survives a lost replica (docs/ray.md). Needs the ray extra."),
        option("--replicas", type=POSITIVE_INT, default=DEFAULTS.replicas, show_default=True, metavar="N",
               help="With --ray: session replicas, each with its own Engine and sessions."),
        option("--replica-cpus", type=NON_NEGATIVE, default=DEFAULTS.replica_cpus, show_default=True, metavar="F",
               help="With --ray: Ray CPUs reserved per session replica (fractions share a node's cores)."),
        option("--replica-gpus", type=NON_NEGATIVE, default=DEFAULTS.replica_gpus, show_default=True, metavar="F",
               help="With --ray: GPUs per session replica (fractions share a card)."),
        option("--batch-size", type=POSITIVE_INT, default=DEFAULTS.max_batch_size, show_default=True, metavar="N",
               help="With --ray: forwards of different sessions run in one engine call (1: no batching); the "
                    "model needs a batch axis of at least N (cfr-export --max-batch N)."),
        option("--batch-wait-ms", type=POSITIVE_FLOAT, default=DEFAULTS.batch_wait_timeout_s * 1000,
               show_default=True, metavar="MS",
               help="With --ray and --batch-size > 1: how long a forward waits for its batch to fill."),
        option("--ingress", type=click.Choice(INGRESSES), default=DEFAULTS.ingress, show_default=True,
               help="With --ray: gateway (a request whose replica dies is retried once, applied once) or direct "
                    "(the session replicas take HTTP themselves: one hop less, no retry on the client's behalf)."),
    ]

    def apply(f: F) -> F:
        for decorate in reversed(decorators):
            f = decorate(f)
        return f
    return apply


def given(ctx: click.Context, name: str) -> bool:
    """Whether the user set option `name` (on the command line or through the environment)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source not in (click.core.ParameterSource.DEFAULT,
                                                 click.core.ParameterSource.DEFAULT_MAP)


def check_without_ray(ctx: click.Context) -> None:
    """Refuse cluster options given without --ray (they would be ignored silently)."""
    stray = [flag for name, flag in CLUSTER_ONLY.items() if given(ctx, name)]
    if stray:
        raise click.UsageError(f"{', '.join(stray)} {'needs' if len(stray) == 1 else 'need'} --ray ADDRESS (a Ray "
                               "cluster to serve on); without --ray cfr-serve is one process")


def model_max_batch(model: Path | None) -> int:
    """The batch axis of `model` (the bundled default when None): its contract's max_batch; 1 for a TensorRT
    plan (built for batch 1 here). Raises the Engine's own errors for a file that is not a model."""
    from ... import default_model

    path = Path(model or default_model())
    if path.suffix.lower() != ".onnx":
        return 1
    from ...backends.ort import read_contract_from_file

    return read_contract_from_file(path).max_batch


def cluster_options(model: Path | None, replicas: int, replica_cpus: float, replica_gpus: float, batch_size: int,
                    batch_wait_ms: float, ingress: str, threads: int | None = None, backend: str = "auto",
                    ray: str | None = None, **extra) -> ClusterOptions:
    """`ClusterOptions` from the command line, after the checks that need the model: a --batch-size the model's
    batch axis cannot run is refused (a batch-1 graph would run the batch one forward at a time: only the wait
    would change). `--ingress direct` under Ray Serve's HAProxy ingress is refused (`ingress_problem`)."""
    problem = ingress_problem(ingress)
    if problem:
        raise click.UsageError(problem)
    if batch_size > 1:
        axis = model_max_batch(model)
        if axis < batch_size:
            what = "has no batch axis" if axis == 1 else f"takes batches of at most {axis}"
            raise click.UsageError(
                f"--batch-size {batch_size}: the model {what}; export it with one (cfr-export CHECKPOINT -o DIR "
                f"--max-batch {batch_size}) and serve DIR/model.onnx, or leave --batch-size at 1")
    return ClusterOptions(replicas=replicas, replica_cpus=replica_cpus, replica_gpus=replica_gpus, threads=threads,
                          backend=backend, max_batch_size=batch_size, batch_wait_timeout_s=batch_wait_ms / 1000,
                          ingress=ingress, **extra)
