"""Holes in the cluster replica's early commit (a click's record commit sent beside its forward, taken back when
the click is not taken after all), found by review (rev18): each test is a behaviour a user notices, on the
in-process cluster (`tests.ray_util.InProcessCluster`, no Ray)."""

from __future__ import annotations

import numpy as np
import pytest

from tests.conftest import blob_scene

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from cfr_runtime.errors import StateError  # noqa: E402
from cfr_runtime.serve.cluster.routing import tag_of  # noqa: E402
from cfr_runtime.serve.codec import http_error, rle_to_mask  # noqa: E402
from cfr_runtime.serve.store import MB  # noqa: E402
from tests.ray_util import InProcessCluster  # noqa: E402
from tests.serve_fixtures import encode as encode_png  # noqa: E402
from tests.test_ray_cluster_logic import click, config, create, one_click_then_evicting, session_like  # noqa: E402


@pytest.fixture(scope="module")
def image() -> bytes:
    return encode_png(blob_scene(5, 120, 160)[0])


def clicks_of(client, sid: str) -> list[tuple]:
    got = client.get(f"/sessions/{sid}")
    assert got.status_code == 200, got.text
    return [(c["x"], c["y"], c["positive"]) for c in got.json()["clicks"]]


def test_an_idempotent_retry_of_a_click_redone_after_a_local_eviction_applies_once(engine, image):
    """The click's copy is evicted while its commit is in flight: the replica rebuilds the state before the
    click from the record and redoes it. The client's retry with the same Idempotency-Key must get the first
    answer, not a second click (the redo path did not remember its answer)."""
    with one_click_then_evicting(engine, image) as (cluster, core, client, sid, evicted):
        key = {"Idempotency-Key": "click-2"}
        body = {"x": 20, "y": 15, "positive": False}
        first = client.post(f"/sessions/{sid}/clicks?format=rle", json=body, headers=key)
        assert evicted and first.status_code == 200, first.text
        again = client.post(f"/sessions/{sid}/clicks?format=rle", json=body, headers=key)
        assert again.status_code == 200 and len(again.json()["clicks"]) == 2, "the retry applied the click twice"
        assert again.json()["mask"] == first.json()["mask"] and cluster.book.head(sid)[0] == 2
        assert clicks_of(client, sid) == [(80.0, 60.0, True), (20.0, 15.0, False)]


def test_a_click_whose_copy_cannot_be_rebuilt_after_its_commit_is_not_kept(engine, image, monkeypatch):
    """The copy is evicted while the click's commit is in flight, and the replica has no memory to rebuild it
    (503): the client is told to retry, so the record must not keep the click, or the retry adds it twice."""
    with one_click_then_evicting(engine, image) as (cluster, core, client, sid, evicted):
        real_rebuild, failed = core.store.rebuild, []

        def no_memory(*args):
            if not failed:
                failed.append(True)
                raise http_error(StateError, 503, "no memory to rebuild the session here (test)")
            return real_rebuild(*args)

        monkeypatch.setattr(core.store, "rebuild", no_memory)
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 20, "y": 15, "positive": False})
        assert evicted and failed and r.status_code == 503, r.text
        assert clicks_of(client, sid) == [(80.0, 60.0, True)], "a click answered 503 is in the record"
        a = click(client, sid, 20, 15, False)  # the client's retry
        assert len(a["clicks"]) == 2
        ops = [("click", 80, 60, True), ("click", 20, 15, False)]
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)


def test_the_cluster_memory_counts_the_click_just_made(engine, image):
    """docs/ray.md: the memory a session counts is its upload plus what its replica holds, reported with every
    commit. A click committed beside its forward reported the size from before the click (its undo history one
    step short), so the cluster-wide cap and /health under-counted every session by one click."""
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sids = [create(client, image) for _ in range(4)]
        for i, sid in enumerate(sids):
            click(client, sid, 80, 60 - i)
        assert core.counters["early_commits"] == 4
        held = sum(core.store.peek(sid).nbytes for sid in sids)
        assert client.get("/health").json()["memory_mb"] == round((4 * len(image) + held) / MB, 2)
        for sid in sids:  # and after an undo (committed after the app), the same figure
            assert client.post(f"/sessions/{sid}/undo").status_code == 200
        held = sum(core.store.peek(sid).nbytes for sid in sids)
        assert client.get("/health").json()["memory_mb"] == round((4 * len(image) + held) / MB, 2)


def test_a_key_reused_for_another_request_never_takes_back_the_click_it_recorded(engine, image):
    """A click answered 200 under an Idempotency-Key, then its replica is lost; the client reuses the key for
    a different click, which the heir refuses. The heir must not take the first click out of the record: the
    client was told it was taken (docs/ray.md: a reused key is refused, it changes nothing)."""
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        key = {"Idempotency-Key": "k-1"}
        r = client.post(f"/sessions/{sid}/clicks", json={"x": 20, "y": 15, "positive": False}, headers=key)
        assert r.status_code == 200
        cluster.alive.remove(tag_of(sid))  # the owner is gone: the heir rebuilds from the record
        r = client.post(f"/sessions/{sid}/clicks", json={"x": 5000, "y": 1}, headers=key)
        assert r.status_code in (400, 409), r.text
        assert clicks_of(client, sid) == [(80.0, 60.0, True), (20.0, 15.0, False)], "an answered click was lost"
        assert not any(core.counters["rolled_back"] for core in cluster.cores.values())


def test_a_click_body_over_the_json_limit_never_reaches_the_record(engine, image):
    """The app refuses a click body over `max_json_bytes` (413) before reading it. The early commit parsed the
    whole body first (up to the gateway's upload limit: 27 MB by default, about 0.75 s of the replica's event
    loop for every session on it, measured with pydantic 2 for a JSON array) and committed the click, then took
    it back: two record writes for a request that was never going to be taken."""
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        body = b'{"x": 80, "y": 60' + b" " * (core.config.max_json_bytes + 1) + b"}"
        r = client.post(f"/sessions/{sid}/clicks", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert cluster.book.head(sid)[0] == 0 and core.counters["early_commits"] == core.counters["rolled_back"] == 0
        assert clicks_of(client, sid) == []


def test_a_click_whose_caller_went_away_leaves_its_copy_and_record_agreeing(engine, image, monkeypatch):
    """The client disconnects while its click's forward runs (Ray Serve then cancels the replica's call): the
    forward goes on in its worker thread and the session takes the click. The copy must not then serve a state
    that its record does not hold (the take-back saw the session mid-forward, before it had taken the click)."""
    import asyncio
    import threading

    from cfr_runtime import Session
    from cfr_runtime.serve.cluster.asgi import HttpRequest

    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        started, go = threading.Event(), threading.Event()
        for name in ("_predict", "_predict_full"):
            real = getattr(Session, name)

            def held(session, _real=real):
                if session.clicks[-1].x == 20:
                    started.set()
                    go.wait(10)
                return _real(session)

            monkeypatch.setattr(Session, name, held)
        req = HttpRequest("POST", f"/sessions/{sid}/clicks", b"format=rle", [(b"content-type", b"application/json")],
                          b'{"x": 20, "y": 15, "positive": false}')

        async def cancelled_mid_forward():
            call = asyncio.ensure_future(core.handle("op-gone", req))
            for _ in range(500):
                if started.is_set():
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            try:
                await call
            except asyncio.CancelledError:
                pass
            go.set()
            return started.is_set()

        assert cluster.call(client, cancelled_mid_forward)
        served = clicks_of(client, sid)
        recorded = [(c.x, c.y, c.positive) for c in cluster.book.fetch(sid).state.clicks]
        assert served == recorded, f"the copy serves {served}, its record holds {recorded}"


@pytest.mark.xfail(strict=True, reason="open hole (rev18 report): a click committed beside its forward is visible to "
                                       "other replicas before it is known to be taken; one that builds on it during a "
                                       "routing change makes the take-back impossible")
def test_a_failed_click_that_another_replica_built_on_is_not_answered_as_not_taken(engine, image, monkeypatch):
    """Two replicas write one session for a moment (routing disagrees while the replica set changes): the owner
    commits click X beside its forward, the other replica commits click Y on top of that record, then X's
    forward fails. The owner cannot take X back, and answers the failure (400) while the record keeps X, whose
    forward fails again on every replay."""
    import asyncio

    from cfr_runtime.serve.cluster.record import RecordedClick
    from tests.test_ray_cluster_logic import _Failing

    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        owner = cluster.cores[tag_of(sid)]
        app, raced = owner.app, []

        async def raced_app(scope, receive, send):
            if scope["type"] == "http" and scope["path"].endswith("/clicks") and not raced:
                for _ in range(100):  # until the early commit has landed (one turn of the loop, in process)
                    if cluster.book.head(sid)[0] == 2:
                        break
                    await asyncio.sleep(0)
                rec = cluster.book.fetch(sid)  # the other replica: a click on top of what it reads
                y = (*rec.state.clicks, RecordedClick(100.0, 70.0, True, "StdInfer"))
                raced.append(cluster.book.commit(sid, rec.version, type(rec.state)(y, rec.state.mode), "other", 0))
            await app(scope, receive, send)

        owner.app = raced_app
        _Failing(monkeypatch, 20)
        r = client.post(f"/sessions/{sid}/clicks", json={"x": 20, "y": 15, "positive": False})
        assert raced and raced[0][0] == "ok"
        kept = [c.x for c in cluster.book.fetch(sid).state.clicks]
        assert r.status_code == 200 or 20.0 not in kept, f"answered {r.status_code}, but the record keeps {kept}"


def test_an_app_that_crashes_after_the_click_ran_leaves_no_copy_ahead_of_its_record(engine, image):
    """The app raises after the session took the click (a bug past the forward, e.g. in the answer): the record
    is put back, so the local copy, one click ahead of it, must not be kept as current, or the next read serves
    a click the record does not hold."""
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        app, crashed = core.app, []

        async def crashing_after(scope, receive, send):
            async def sink(message):
                pass

            await app(scope, receive, sink if not crashed else send)
            if scope["type"] == "http" and scope["path"].endswith("/clicks") and not crashed:
                crashed.append(True)
                raise RuntimeError("a bug after the click ran (test)")

        core.app = crashing_after
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 20, "y": 15, "positive": False})
        assert crashed and r.status_code == 500, r.text
        assert clicks_of(client, sid) == [(80.0, 60.0, True)], "a copy ahead of its record served the read"
        a = click(client, sid, 100, 70)
        ops = [("click", 80, 60, True), ("click", 100, 70, True)]
        assert len(a["clicks"]) == 2 and np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
