"""Ray Serve's high-throughput mode (HAProxy as the HTTP ingress + RAY_SERVE_THROUGHPUT_OPTIMIZED=1), the
configuration docs/ray.md recommends and measures: bench/serve_cluster.py run end to end in a subprocess (Serve
reads the variables once, at import, so this pytest process, which imported Serve in its default mode, cannot
host the driver). The benchmark starts its own 2-node cluster on loopback and checks every answer's mask
against a local Session; here we check that it passed, that HAProxy really answered, and that the overhead phase
has its 100+ clicks. `--ingress direct` in that mode is refused up front, with a message, not deep in Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")

from cfr_runtime import default_model  # noqa: E402
from cfr_runtime.errors import InputError  # noqa: E402
from cfr_runtime.serve import cli  # noqa: E402
from cfr_runtime.serve.cluster.serve_mode import FAST_SERVE_ENV, ingress_problem  # noqa: E402
from tests.ray_util import require_haproxy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_direct_ingress_behind_haproxy_is_refused_before_anything_starts(monkeypatch):
    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    result = CliRunner().invoke(cli.main, ["--ray", "127.0.0.1:1", "--ingress", "direct"])
    assert result.exit_code == 2, result.output
    assert "--ingress direct cannot run behind Ray Serve's HAProxy ingress" in result.output
    assert "use --ingress gateway" in result.output
    # the gateway is fine in that mode, and direct is fine without it
    assert ingress_problem("gateway", {"RAY_SERVE_ENABLE_HA_PROXY": "1"}) is None
    assert ingress_problem("direct", {"RAY_SERVE_ENABLE_HA_PROXY": "0"}) is None
    assert ingress_problem("direct", {}) is None


def test_serve_on_ray_refuses_direct_behind_haproxy_before_joining(monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed")
    from cfr_runtime.serve.cluster.deploy import ClusterOptions, serve_on_ray

    monkeypatch.setenv("RAY_SERVE_ENABLE_HA_PROXY", "1")
    joined = []
    monkeypatch.setattr("cfr_runtime.serve.cluster.deploy.check_reachable", lambda address: joined.append(address))
    with pytest.raises(InputError, match="HAProxy ingress"):
        serve_on_ray("127.0.0.1:1", options=ClusterOptions(ingress="direct"), block=False)
    assert joined == []  # refused before it tried the cluster


def test_the_gateway_runs_beside_haproxy_on_the_head_node():
    """HAProxy reaches an ingress replica on another node at that node's address, where a replica listening on a
    loopback HTTP host does not answer; so behind HAProxy the gateway is placed on the head node, where HAProxy
    runs (the end-to-end test below checks that HAProxy then sends the clicks to it, not to its backup)."""
    from cfr_runtime.serve.cluster.deploy import ClusterOptions, gateway_actor_options

    options = ClusterOptions(gateway_cpus=0.25)
    behind = gateway_actor_options(options, {"RAY_SERVE_ENABLE_HA_PROXY": "1"})
    assert behind == {"num_cpus": 0.25, "resources": {"node:__internal_head__": 0.001}}
    assert gateway_actor_options(options, {}) == {"num_cpus": 0.25}  # Serve's proxies run on every node


def test_fast_mode_end_to_end_on_a_two_node_cluster(tmp_path):
    require_haproxy()
    cmd = [sys.executable, str(ROOT / "bench" / "serve_cluster.py"), str(default_model()), "--serve-mode", "fast",
           "--setups", "1", "--clients", "2", "--clicks", "3", "--single-clicks", "100", "--batch-size", "1",
           "--skip-curve", "--dataset", str(tmp_path / "none"), "--tag", "fast", "-o", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((tmp_path / "fast.json").read_text())
    assert r["ray_serve_env"] == FAST_SERVE_ENV
    assert r["haproxy_processes"] >= 1  # HAProxy, not Serve's Python proxy, took the HTTP port
    # ... and sent the clicks straight to the gateway replica, not to its backup (Serve's Python proxy), which it
    # uses only while the replica fails its health check: as it did whenever the gateway landed on the worker node
    servers = r["haproxy_servers"].values()
    replicas, backup = [x for x in servers if not x["backup"]], [x for x in servers if x["backup"]]
    assert replicas and all(x["status"] == "UP" for x in replicas), r["haproxy_servers"]
    assert sum(x["requests"] for x in replicas) >= 100, r["haproxy_servers"]
    assert sum(x["requests"] for x in backup) < 10, r["haproxy_servers"]
    loads = [r["plain_load"], *r["ray_load"]]
    assert [x["errors"] for x in loads] == [0] * len(loads)  # every mask equal to a local Session's
    assert sum(x["clicks_total"] for x in r["ray_load"]) == 2 * 3
    assert r["overhead"]["ray"]["click_ms"]["n"] >= 100 and r["overhead"]["plain"]["click_ms"]["n"] >= 100
