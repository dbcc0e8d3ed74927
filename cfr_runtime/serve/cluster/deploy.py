"""`cfr-serve` on a Ray cluster: the deployments, the record store actor, and the entry points.

Layout (one Serve application, "cfr-serve"):

    HTTP -> Serve proxy -> gateway (1+ replicas, stateless)
                              -> sessions (N replicas: an Engine, cfr-serve's app, local session copies)
                                  <-> records (one detached actor on the head node: the record of truth)

Entry points: `serve_on_ray(address, ...)` (what `cfr-serve --ray ADDRESS` calls), `build_app(...)` (a Serve
application to `serve.run`), and `app_builder` for Ray's own CLI and config files:

    serve run cfr_runtime.serve.cluster:app_builder replicas=2 idle_timeout=900
    serve run cluster.yaml            # import_path: cfr_runtime.serve.cluster:app_builder, args: {...}

Ray is imported inside the functions that need it: importing this module costs nothing without the extra.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields, replace
from pathlib import Path

from ...engine import Engine
from ..app import ServeConfig
from ..codec import UploadLimits
from ..store import StoreLimits
from .asgi import HttpRequest, HttpResponse
from .records import LocalRecords, RecordBook
from .serve_mode import haproxy_ingress, ingress_problem

log = logging.getLogger("cfr_runtime.serve.cluster")

APP_NAME = "cfr-serve"


@dataclass(frozen=True)
class ClusterOptions:
    """How the application is laid out on the cluster (the service's own limits stay in `ServeConfig`)."""

    replicas: int = 2  # session replicas, each with its own Engine
    replica_cpus: float = 1.0  # Ray CPUs reserved per session replica (fractions share a node's cores)
    replica_gpus: float = 0.0  # GPUs per session replica (fractions share a card)
    threads: int | None = None  # ONNX Runtime intra-op threads per replica (None: its own default)
    backend: str = "auto"
    max_replicas_per_node: int | None = None  # 1 spreads the session replicas one per node
    # "gateway": HTTP -> gateway -> session replica; a request whose replica dies is retried once, exactly once.
    # "direct": the session replicas are the HTTP ingress (one hop less); a request whose replica dies fails at
    # the client, whose retry is exactly-once only if it sends an Idempotency-Key header.
    ingress: str = "gateway"
    gateway_replicas: int = 1
    gateway_cpus: float = 0.1
    max_ongoing_requests: int = 256  # per session replica; high, so a busy owner queues rather than sheds
    max_batch_size: int = 1  # forwards of different sessions per engine call (@serve.batch); 1: no batching
    batch_wait_timeout_s: float = 0.005  # how long a forward waits for its batch to fill
    sync_interval_s: float = 5.0  # how often a replica drops copies whose record expired elsewhere
    # a click's record commit runs beside its forward (replica module doc); False commits after the forward, as
    # every other write does: only to measure what running it beside saves (bench/serve_cluster_modes.py)
    early_commit: bool = True
    records_name: str = "cfr_serve_records"
    namespace: str = "cfr-serve"  # Ray namespace of the record store actor

    def __post_init__(self):
        from ...errors import InputError

        if min(self.replicas, self.gateway_replicas, self.max_ongoing_requests, self.max_batch_size) < 1:
            raise InputError("replicas, gateway_replicas, max_ongoing_requests and max_batch_size must be >= 1")
        if self.batch_wait_timeout_s < 0:
            raise InputError("batch_wait_timeout_s must be >= 0")
        if self.ingress not in ("gateway", "direct"):
            raise InputError(f"ingress must be 'gateway' or 'direct', got {self.ingress!r}")
        if self.replica_cpus < 0 or self.replica_gpus < 0 or self.gateway_cpus < 0 or self.sync_interval_s <= 0:
            raise InputError("CPU/GPU shares must be >= 0 and sync_interval_s > 0")


def max_request_bytes(upload: UploadLimits) -> int:
    """The largest body the gateway forwards: a CVAT request is the base64 of the largest upload plus JSON."""
    return upload.max_bytes * 4 // 3 + 65536


# ---- the record store ---------------------------------------------------------------------------------------
class RecordStoreActor(LocalRecords):
    """A `RecordBook` behind a Ray actor (async: one event loop, so the book needs no lock), sweeping expired
    records on its own clock. The calls are `LocalRecords`' (one interface for a replica, in process or on a
    cluster); the actor adds only the sweeper, started by the first call that runs on its event loop."""

    def __init__(self, limits: StoreLimits, sweep_interval_s: float):
        super().__init__(RecordBook(limits))
        self.sweep_interval_s = sweep_interval_s
        self._sweeper: asyncio.Task | None = None

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            self.book.sweep()

    async def create(self, sid, data, state, op_id, nbytes, client):
        self._ensure_sweeper()
        return await super().create(sid, data, state, op_id, nbytes, client)

    async def stats(self):
        self._ensure_sweeper()
        return await super().stats()


def record_store(options: ClusterOptions, limits: StoreLimits, sweep_interval_s: float):
    """The application's record store actor, created on first use: detached (it outlives the replicas and the
    driver), on the head node (the failure domain of Serve's controller), restarted (empty) if it crashes."""
    import ray

    return ray.remote(RecordStoreActor).options(
        name=options.records_name, namespace=options.namespace, lifetime="detached", get_if_exists=True,
        num_cpus=0, max_restarts=-1, resources={"node:__internal_head__": 0.001},
    ).remote(limits, sweep_interval_s)


class ActorRecords:
    """The replica's asynchronous view of the record store actor (same methods as `LocalRecords`)."""

    def __init__(self, actor):
        self.actor = actor

    async def create(self, sid, data, state, op_id, nbytes, client):
        return await self.actor.create.remote(sid, data, state, op_id, nbytes, client)

    async def head(self, sid):
        return await self.actor.head.remote(sid)

    async def fetch(self, sid):
        return await self.actor.fetch.remote(sid)

    async def commit(self, sid, expected, state, op_id, nbytes):
        return await self.actor.commit.remote(sid, expected, state, op_id, nbytes)

    async def delete(self, sid):
        return await self.actor.delete.remote(sid)

    async def live(self, sids):
        return await self.actor.live.remote(sids)

    async def stats(self):
        return await self.actor.stats.remote()


# ---- the deployments ----------------------------------------------------------------------------------------
class SessionReplica:
    """One session replica: an Engine, `cfr-serve`'s app and the local copies of the sessions it owns."""

    def __init__(self, model: str, config: ServeConfig, options: ClusterOptions):
        from ray import serve

        from .replica import ReplicaCore

        self.engine = Engine(model, backend=options.backend, threads=options.threads)
        self.tag = serve.get_replica_context().replica_id.unique_id
        records = ActorRecords(record_store(options, config.store, config.sweep_interval_s))
        submit = None
        if options.max_batch_size > self.engine.max_batch:
            log.warning("replica %s: max_batch_size %d but the model runs %d forward(s) per engine call (export it "
                        "with cfr-export --max-batch %d); batches run in calls of %d", self.tag,
                        options.max_batch_size, self.engine.max_batch, options.max_batch_size, self.engine.max_batch)
        if options.max_batch_size > 1:
            # a batch fills only if that many forwards may wait at once: the engine still runs one batch at a time
            config = replace(config, max_concurrent=max(config.max_concurrent, options.max_batch_size))
            # Ray Serve's batcher (runtime-adjustable size and wait), fed from the sessions' worker threads
            self._forward_batch = serve.batch(max_batch_size=options.max_batch_size,
                                              batch_wait_timeout_s=options.batch_wait_timeout_s)(self._run_batch)
            self._batch_thread = ThreadPoolExecutor(1, thread_name_prefix="cfr-batch")  # one engine call at a time
            submit = self._submit
        self.core = ReplicaCore(self.engine, config, records, self.tag, submit=submit,
                                early_commit=options.early_commit)
        self.max_body = max_request_bytes(config.upload)
        self.sync_interval_s = options.sync_interval_s
        self._sync_task: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def http(self, key: str, op_id: str, req: HttpRequest) -> HttpResponse:
        """One forwarded request. `key` (the session id, or "") is what the request router reads."""
        if self._sync_task is None:
            self._loop = asyncio.get_running_loop()
            self._sync_task = self._loop.create_task(self._sync_forever())
        return await self.core.handle(op_id, req)

    async def __call__(self, request):
        """HTTP straight from Serve's proxy (`ingress="direct"`); the request router read the session id."""
        from ...errors import CfrError
        from ..app import error_response
        from .asgi import from_starlette, operation_id, session_id_of, to_starlette

        try:
            req = await from_starlette(request, self.max_body)
        except CfrError as exc:
            return error_response(exc)
        return to_starlette(await self.http(session_id_of(req.path) or "", operation_id(req), req))

    def _submit(self, runner):
        """A session's forward (called in a worker thread, never on the event loop): join a batch, wait for it."""
        return asyncio.run_coroutine_threadsafe(self._forward_batch(runner), self._loop).result()

    async def _run_batch(self, runners: list) -> list:
        self.core.counters["batches"] = self.core.counters.get("batches", 0) + 1
        self.core.counters["batched_forwards"] = self.core.counters.get("batched_forwards", 0) + len(runners)
        return await self._loop.run_in_executor(self._batch_thread, self.engine.run_batch, runners)

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.sync_interval_s)
            try:
                await self.core.sync()
            except Exception as exc:  # the record store restarting: try again next round
                log.warning("replica %s: sync with the record store failed: %s", self.tag, exc)

    async def info(self, key: str = "") -> dict:
        """Who answered and what it holds (tests and benchmarks read it). `key` routes like a session id:
        "<tag>." reaches the replica with that tag while it lives."""
        import os

        import ray

        return {"tag": self.tag, "pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                "sessions": self.core.store.recorded_ids(), "counters": dict(self.core.counters),
                "memory_mb": self.core.store.stats()["memory_mb"], "max_batch": self.engine.max_batch}


class Gateway:
    """The HTTP ingress deployment (see `gateway.GatewayCore`)."""

    def __init__(self, sessions, max_body: int):
        import ray.exceptions

        from .gateway import GatewayCore

        self.sessions = sessions

        async def send(key: str, op_id: str, req: HttpRequest) -> HttpResponse:
            return await self.sessions.http.remote(key, op_id, req)

        self.core = GatewayCore(send, max_body, (ray.exceptions.RayActorError,))

    async def __call__(self, request):
        return await self.core(request)

    async def stats(self) -> dict:
        """Requests retried after their replica failed (through a deployment handle, not HTTP)."""
        return {"retries": self.core.retries}


def gateway_actor_options(options: ClusterOptions, environ: dict[str, str] | None = None) -> dict:
    """The gateway's Ray actor options. Behind HAProxy (Serve's high-throughput mode) the gateway runs on the head
    node: HAProxy runs there and sends each request straight to an ingress replica's own port, at 127.0.0.1 on its
    node and at the node's address elsewhere, while the replica listens on Serve's HTTP host; with that host on
    loopback (as here, and as docs/ray.md advises) a gateway on another node never answers HAProxy's health
    check and every request silently takes the backup path through Serve's Python proxy (measured: +7 ms per
    click, the default mode's cost). The gateway is light (`gateway_cpus`); the session replicas spread as
    configured."""
    actor = {"num_cpus": options.gateway_cpus}
    if haproxy_ingress(environ):
        actor["resources"] = {"node:__internal_head__": 0.001}  # Ray's resource of the head node
    return actor


def build_app(model: str | Path | None = None, config: ServeConfig | None = None,
              options: ClusterOptions | None = None):
    """The Serve application (gateway + session replicas, or the replicas alone with `ingress="direct"`);
    deploy it with `serve.run(app, route_prefix="/")`."""
    from ray import serve
    from ray.serve.config import RequestRouterConfig

    from ... import default_model
    from .router import SessionRouter

    config = config or ServeConfig()
    options = options or ClusterOptions()
    model = str(Path(model or default_model()).resolve())
    actor_options = {"num_cpus": options.replica_cpus}
    if options.replica_gpus:
        actor_options["num_gpus"] = options.replica_gpus
    sessions = serve.deployment(
        SessionReplica, name="sessions", num_replicas=options.replicas, ray_actor_options=actor_options,
        max_ongoing_requests=options.max_ongoing_requests, max_replicas_per_node=options.max_replicas_per_node,
        request_router_config=RequestRouterConfig(request_router_class=SessionRouter))
    gateway = serve.deployment(
        Gateway, name="gateway", num_replicas=options.gateway_replicas, max_ongoing_requests=1024,
        ray_actor_options=gateway_actor_options(options))
    if options.ingress == "direct":
        return sessions.bind(model, config, options)
    return gateway.bind(sessions.bind(model, config, options), max_request_bytes(config.upload))


def config_from(idle_timeout: float = 900.0, max_sessions: int = 64, max_memory_mb: float = 2048.0,
                max_upload_mb: float = 20.0, max_pixels: int = 40_000_000, max_concurrent: int = 2,
                allowed_hosts: Sequence[str] | str = (), client_identity: str = "address",
                client_header: str = "x-client-id", client_max_inflight: int = 32, queue_timeout: float = 120.0,
                client_max_sessions: int = 32, max_side: int = 12_000) -> ServeConfig:
    """`cfr-serve`'s limits as a ServeConfig (the same names, defaults and sweep interval rule as its CLI, whose
    `--allowed-host` is `allowed_hosts` here: names answered besides the loopback ones, a list or a
    comma-separated string; "*" answers any)."""
    from ...errors import InputError
    from ..security import LOOPBACK_HOSTS

    if min(idle_timeout, max_sessions, max_memory_mb, max_upload_mb, max_pixels, max_concurrent, client_max_inflight,
           queue_timeout, client_max_sessions, max_side) <= 0:
        raise InputError("limits must be positive")
    if isinstance(allowed_hosts, str):
        allowed_hosts = allowed_hosts.split(",")
    extra = [h.strip().lower() for h in allowed_hosts if h.strip()]
    return ServeConfig(
        store=StoreLimits(idle_timeout_s=idle_timeout, max_sessions=max_sessions, max_memory_mb=max_memory_mb,
                          client_max_sessions=client_max_sessions),
        upload=UploadLimits(max_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, max_side=max_side),
        sweep_interval_s=max(0.2, min(5.0, idle_timeout / 4)), max_concurrent=max_concurrent,
        allowed_hosts=tuple(dict.fromkeys([*LOOPBACK_HOSTS, *extra])), client_identity=client_identity,
        client_header=client_header.strip().lower(), client_max_inflight=client_max_inflight,
        queue_timeout_s=queue_timeout)


# app_builder's keys for config_from, with how a Serve config's string value is read
LIMIT_KEYS = {"idle_timeout": float, "max_sessions": int, "max_memory_mb": float, "max_upload_mb": float,
              "max_pixels": int, "max_concurrent": int, "allowed_hosts": lambda v: v, "client_identity": str,
              "client_header": str, "client_max_inflight": int, "queue_timeout": float, "client_max_sessions": int,
              "max_side": int}


def app_builder(args: dict):
    """For `serve run cfr_runtime.serve.cluster:app_builder key=value ...` and Serve config files. Keys: model,
    the `ClusterOptions` fields and `cfr-serve`'s limits (`LIMIT_KEYS`: idle_timeout, max_sessions, ...,
    allowed_hosts, client_identity, ...; see `config_from`)."""
    from ...errors import InputError

    args = dict(args or {})
    model = args.pop("model", None)
    option_types = {f.name: f.type for f in fields(ClusterOptions)}
    limits, options = {}, {}
    for key, value in args.items():
        if key in LIMIT_KEYS:
            try:
                limits[key] = LIMIT_KEYS[key](value)
            except (TypeError, ValueError):
                raise InputError(f"{key}: {value!r} is not a valid value") from None
        elif key in option_types:
            options[key] = _coerce(key, value, ClusterOptions.__dataclass_fields__[key].default)
        else:
            raise InputError(f"unknown argument {key!r}; use model, {', '.join(LIMIT_KEYS)} or "
                             f"{', '.join(option_types)}")
    return build_app(model, config_from(**limits), ClusterOptions(**options))


def _coerce(key: str, value, default):
    if value is None or value == "None":
        return None
    if isinstance(default, bool):
        return str(value).lower() in ("1", "true", "yes")
    if isinstance(default, int) or key in ("threads", "max_replicas_per_node"):
        return int(value)
    if isinstance(default, float):
        return float(value)
    return str(value)


def _driver_ip(address: str) -> str | None:
    """A driver on a node that Ray knows by a loopback address (a local test cluster) must say so; on a real
    cluster Ray works it out."""
    host = address.rsplit(":", 1)[0] if ":" in address else address
    try:
        return host if ipaddress.ip_address(host).is_loopback else None
    except ValueError:
        return None


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse at once a head address where nothing listens: `ray.init` would retry it for minutes (measured
    5.5 min on Ray 2.60) before giving up. "auto" and ray:// addresses are left to Ray."""
    import socket

    from ...errors import InputError

    host, sep, port = address.rpartition(":")
    if not sep or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise InputError(f"cannot reach the Ray cluster at {address!r}: {exc.strerror or exc}; start one with "
                         "`ray start --head` and give its address (host:port, default port 6379), or 'auto' on a "
                         "node of the cluster") from None


def serve_on_ray(address: str, model: str | Path | None = None, config: ServeConfig | None = None,
                 options: ClusterOptions | None = None, host: str = "127.0.0.1", port: int = 8000,
                 proxy_location: str = "EveryNode", block: bool = True) -> str:
    """Deploy on the Ray cluster at `address` ("auto", or the head's host:port) and, with `block`, serve until
    Ctrl-C, then take the application down. Returns the URL. What `cfr-serve --ray ADDRESS` runs."""
    from ...errors import ContractError, InputError

    try:
        import ray
        from ray import serve
    except ImportError:
        raise InputError("Ray Serve is not installed; pip install 'cfr-icl[ray]'") from None
    if model is not None and not Path(model).is_file():
        raise ContractError(f"{model}: no such model file (on a cluster it must exist at this path on every node)")
    options = options or ClusterOptions()
    problem = ingress_problem(options.ingress)
    if problem:
        raise InputError(problem)
    check_reachable(address)
    try:
        ray.init(address=address, namespace=options.namespace, _node_ip_address=_driver_ip(address),
                 logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError, SystemExit) as exc:  # Ray exits when the GCS is unreachable
        raise InputError(f"cannot join the Ray cluster at {address!r} ({type(exc).__name__}: {exc}); start one "
                         "with `ray start --head` or give the head's host:port") from None
    url = f"http://{host}:{port}/"
    try:
        serve.start(http_options={"host": host, "port": port}, proxy_location=proxy_location)
        serve.run(build_app(model, config, options), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"cfr-serve: on Ray at {address}: {options.replicas} session replicas\ncfr-serve: {url}",
              file=sys.stderr)
        if not haproxy_ingress():
            print("cfr-serve: note: Ray Serve's default Python HTTP proxy is in front; its high-throughput mode "
                  "(RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1 for every `ray start` and for "
                  "cfr-serve) routes each click several times faster (docs/ray.md)", file=sys.stderr)
        while block:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if block:  # Ctrl-C, also while deploying: take the application down (its sessions end with it)
            shutdown(options)
    return url


def shutdown(options: ClusterOptions | None = None) -> None:
    """Take the application down and end its record store (every session is gone after this)."""
    import ray
    from ray import serve

    options = options or ClusterOptions()
    serve.delete(APP_NAME)
    try:
        ray.kill(ray.get_actor(options.records_name, namespace=options.namespace))
    except ValueError:
        pass
