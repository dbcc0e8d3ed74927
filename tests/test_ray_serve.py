"""cfr-serve on a real local Ray cluster: a head and a worker node started by the test (`ray start` on loopback
addresses), the application deployed with one session replica per node, HTTP through Serve's proxy on
127.0.0.1. Masks must equal a local Session's bit for bit, through a replica SIGKILLed while 8 clients click,
and sessions expire on every replica; forwards are batched across sessions in one engine call (the model is the
shipped default checkpoint exported with a batch axis; the bundled batch-1 graph where torch is missing).
Skips only where Ray is not installed (fails there instead with CFR_REQUIRE_RAY=1, as in CI)."""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest

from tests.conftest import blob_scene

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
httpx = pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")
from tests.ray_util import LocalRayCluster, require_ray_serve  # noqa: E402
from tests.serve_fixtures import encode as encode_png  # noqa: E402

require_ray_serve()  # skips where Ray is not installed; fails instead under CI (CFR_REQUIRE_RAY=1)

from cfr_runtime import Engine, Session, default_model  # noqa: E402
from cfr_runtime.serve.cluster import APP_NAME, ClusterOptions, build_app, config_from  # noqa: E402
from cfr_runtime.serve.cluster.routing import tag_of  # noqa: E402
from cfr_runtime.serve.codec import UploadLimits, decode_upload, rle_to_mask  # noqa: E402

IDLE_S = 12.0
# forwards batched across sessions (Ray Serve's @serve.batch): every mask below is compared with an unbatched Session
OPTIONS = ClusterOptions(replicas=2, replica_cpus=0.5, threads=1, sync_interval_s=1.0, max_batch_size=4,
                         batch_wait_timeout_s=0.01, max_replicas_per_node=1)


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> str:
    """The model every replica and the local reference Session load: with a batch axis of 4 where torch can
    export it, so batched forwards run as one engine call."""
    try:
        from export.onnx_export import export_onnx
        from trainer.default_model import default_checkpoint
    except ImportError:
        return str(default_model())
    return str(export_onnx(default_checkpoint(), tmp_path_factory.mktemp("b4"), max_batch=4)[0])


@pytest.fixture(scope="module")
def cluster(model):
    from ray import serve

    with LocalRayCluster(cpus_per_node=2) as c:
        ray = c.connect(namespace=OPTIONS.namespace)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": c.http_port}, proxy_location="HeadOnly")
            serve.run(build_app(model, config_from(idle_timeout=IDLE_S), OPTIONS), name=APP_NAME, route_prefix="/")
            c.model = model
            c.url = f"http://127.0.0.1:{c.http_port}"
            c.handle = serve.get_deployment_handle("sessions", APP_NAME)
            yield c
        finally:
            try:
                serve.shutdown()
            finally:
                ray.shutdown()


@pytest.fixture(scope="module")
def engine(model) -> Engine:
    return Engine(model)


def replicas(cluster, want: int = 2, timeout: float = 60) -> dict[str, dict]:
    """tag -> info of the live session replicas (asked until `want` distinct ones answered)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < want:
        if time.monotonic() > deadline:
            raise AssertionError(f"only replicas {sorted(seen)} answered")
        info = cluster.handle.info.remote("").result(timeout_s=30)
        seen[info["tag"]] = info
    return {tag: cluster.handle.info.remote(tag + ".").result(timeout_s=30) for tag in seen}


def local_mask(engine, data, clicks, mode=(0, False)):
    s = Session(engine, cfr=mode[0], adaptive=mode[1])
    s.set_image(decode_upload(data, UploadLimits()))
    for x, y, p in clicks:
        s.add_click(x, y, p)
    return s.mask


def clicks_for(seed: int, n: int) -> list[tuple[float, float, bool]]:
    rng = np.random.default_rng(seed)
    return [(float(rng.integers(0, 160)), float(rng.integers(0, 120)), bool(i == 0 or rng.random() < 0.6))
            for i in range(n)]


def test_masks_equal_a_local_session_on_two_nodes(cluster, engine):
    reps = replicas(cluster)
    assert len({info["node_id"] for info in reps.values()}) == 2, "one session replica per node"
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        assert "<canvas" in client.get("/").text
        # the replicas run cfr-serve's own app: its Host guard (DNS rebinding) holds through Serve's proxy too
        r = client.get("/health", headers={"Host": "rebind.example"})
        assert r.status_code == 400 and "rebind.example" in r.text, r.text
        data = encode_png(blob_scene(7, 120, 160)[0])
        sids = []
        for _ in range(6):
            r = client.post("/sessions?mode=CFR-2", content=data, headers={"Content-Type": "image/png"})
            assert r.status_code == 201, r.text
            sids.append(r.json()["session_id"])
        assert {tag_of(s) for s in sids} <= set(reps)
        # click in sessions of both replicas where the creates reached both (the router picks by load)
        clicked = [next(s for s in sids if tag_of(s) == t) for t in sorted({tag_of(s) for s in sids})]
        clicked += [s for s in sids[:-1] if s not in clicked][:3 - len(clicked)]
        for i, sid in enumerate(clicked):
            clicks = clicks_for(i, 4)
            for k, (x, y, p) in enumerate(clicks):
                r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": p})
                assert r.status_code == 200, r.text
                want = local_mask(engine, data, clicks[:k + 1], (2, False))
                assert np.array_equal(rle_to_mask(r.json()["mask"]), want)
            assert client.put(f"/sessions/{sid}/mode", json={"mode": "StdInfer"}).json()["mode"] == "StdInfer"
            u = client.post(f"/sessions/{sid}/undo?format=rle").json()
            assert np.array_equal(rle_to_mask(u["mask"]), local_mask(engine, data, clicks[:3], (2, False)))
            assert len(client.get(f"/sessions/{sid}").json()["clicks"]) == 3
        health = client.get("/health").json()
        assert health["sessions"] >= 6 and health["limits"]["idle_timeout_s"] == IDLE_S
        assert client.delete(f"/sessions/{sids[-1]}").status_code == 204
        assert client.get(f"/sessions/{sids[-1]}").status_code == 404
    after = replicas(cluster)
    for sid in clicked:  # every request of a session went to the replica that created it: no rebuilds
        assert sid in after[tag_of(sid)]["sessions"]
        assert after[tag_of(sid)]["counters"].get("batched_forwards", 0) > 0, after  # through @serve.batch
    assert all(info["counters"]["rebuilds"] == 0 for info in after.values())
    assert all(info["max_batch"] == Engine(cluster.model).max_batch for info in after.values())


def test_replica_sigkilled_while_eight_clients_click(cluster, engine):
    """8 annotators click; one session replica's worker process is SIGKILLed in the middle. Every answer is
    200 with the mask a local Session gives for the same clicks (no 404, no lost or doubled click)."""
    reps = replicas(cluster)
    data = encode_png(blob_scene(11, 120, 160)[0])
    n_clicks, kill_after = 8, 3
    progress = [0] * 8
    errors: list[str] = []
    sids: list[str | None] = [None] * 8

    def annotate(i: int) -> None:
        clicks = clicks_for(100 + i, n_clicks)
        try:
            with httpx.Client(base_url=cluster.url, timeout=120) as client:
                r = client.post("/sessions", content=data, headers={"Content-Type": "image/png"})
                assert r.status_code == 201, r.text
                sid = sids[i] = r.json()["session_id"]
                for k, (x, y, p) in enumerate(clicks):
                    r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": p})
                    if r.status_code != 200:
                        errors.append(f"client {i} click {k}: {r.status_code} {r.text[:200]}")
                        return
                    got = r.json()
                    if len(got["clicks"]) != k + 1:
                        errors.append(f"client {i} click {k}: session has {len(got['clicks'])} clicks")
                        return
                    if not np.array_equal(rle_to_mask(got["mask"]), local_mask(engine, data, clicks[:k + 1])):
                        errors.append(f"client {i} click {k}: mask differs from the local Session's")
                        return
                    progress[i] = k + 1
        except Exception as exc:  # noqa: BLE001 - reported below with the others
            errors.append(f"client {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=annotate, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 120
    while min(progress) < kill_after and not errors and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not errors, errors
    # the victim: the replica on the worker node (the head keeps Serve's controller and the record store)
    victim = next(info for info in reps.values() if info["node_id"] != ray_head_node_id())
    victim_sessions = [s for s in sids if s and tag_of(s) == victim["tag"]]
    os.kill(victim["pid"], signal.SIGKILL)
    for t in threads:
        t.join(180)
    assert not any(t.is_alive() for t in threads), f"clients still running: progress {progress}"
    assert not errors, errors
    assert progress == [n_clicks] * 8
    assert victim_sessions, "no session lived on the killed replica"
    now = replicas(cluster)
    assert victim["tag"] not in now
    assert sum(info["counters"]["rebuilds"] for info in now.values()) >= len(victim_sessions)
    gateway = serve_handle("gateway").stats.remote().result(timeout_s=30)
    print(f"sessions on the killed replica: {len(victim_sessions)}; requests the gateway retried: "
          f"{gateway['retries']}; rebuilds: {[info['counters'] for info in now.values()]}")


def serve_handle(name: str):
    from ray import serve

    return serve.get_deployment_handle(name, APP_NAME)


def ray_head_node_id() -> str:
    import ray

    return next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])


def test_sessions_expire_on_every_replica(cluster):
    replicas(cluster)
    data = encode_png(blob_scene(3, 120, 160)[0])
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        # new sessions go to either replica by load; after the SIGKILL test the gateway's router may learn of the
        # restarted replica a little later than `replicas()` (the driver's handle) does: keep creating, spaced
        # out, until both replicas hold one (bounded: 30 sessions, about 8 s, well inside the 12 s idle timeout)
        sids = []
        while len({tag_of(s) for s in sids}) < 2 and len(sids) < 30:
            sids.append(client.post("/sessions", content=data, headers={"Content-Type": "image/png"})
                        .json()["session_id"])
            client.post(f"/sessions/{sids[-1]}/clicks", json={"x": 80, "y": 60})
            if len(sids) >= 10:
                time.sleep(0.25)
        assert len({tag_of(s) for s in sids}) == 2, f"sessions on both replicas ({len(sids)} made)"
        before = client.get("/health").json()
        time.sleep(IDLE_S + config_from(idle_timeout=IDLE_S).sweep_interval_s + 2 * OPTIONS.sync_interval_s + 1)
        for sid in sids:
            r = client.post(f"/sessions/{sid}/clicks", json={"x": 10, "y": 10})
            assert r.status_code == 404 and r.json()["error"] == "SessionNotFoundError", r.text
        health = client.get("/health").json()
        assert health["sessions"] == 0
        assert health["evicted"]["idle"] >= before["evicted"]["idle"] + len(sids)
    for info in replicas(cluster).values():
        assert info["sessions"] == [], f"replica {info['tag']} still holds copies of expired sessions"


def test_direct_ingress_routes_by_path_and_dedupes_by_idempotency_key(cluster, engine):
    """The session replicas as the HTTP ingress (one hop less): Serve's proxy hands the request to the request
    router, which reads the session id from the path; a client retry with the same Idempotency-Key applies once."""
    from dataclasses import replace

    from ray import serve

    serve.run(build_app(cluster.model, config_from(idle_timeout=IDLE_S), replace(OPTIONS, ingress="direct")),
              name=APP_NAME, route_prefix="/")
    reps = replicas(cluster)
    data = encode_png(blob_scene(13, 120, 160)[0])
    with httpx.Client(base_url=cluster.url, timeout=60) as client:
        sids = [client.post("/sessions", content=data, headers={"Content-Type": "image/png"}).json()["session_id"]
                for _ in range(4)]
        assert {tag_of(s) for s in sids} <= set(reps)
        for i, sid in enumerate(sids):
            clicks = clicks_for(200 + i, 3)
            for k, (x, y, p) in enumerate(clicks):
                r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": p},
                                headers={"Idempotency-Key": f"{sid}-{k}"})
                assert r.status_code == 200, r.text
                assert np.array_equal(rle_to_mask(r.json()["mask"]), local_mask(engine, data, clicks[:k + 1]))
            again = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 1, "y": 1, "positive": False},
                                headers={"Idempotency-Key": f"{sid}-2"})  # a retry of the last click
            assert again.status_code == 200 and len(again.json()["clicks"]) == 3
    after = replicas(cluster)
    assert all(info["counters"]["rebuilds"] == 0 for info in after.values()), "a session left its replica"
    assert all(sid in after[tag_of(sid)]["sessions"] for sid in sids)
