"""The cluster's logic without Ray: record replay, the record book, routing, and replicas behind the gateway
(in process, sharing one record book), including replicas that die before or after committing a request."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tests.conftest import blob_scene

pytest.importorskip("fastapi", reason="fastapi is not installed (pip install -e '.[serve]')")
pytest.importorskip("httpx", reason="httpx is not installed (pip install -e '.[dev]')")

from cfr_runtime import Session  # noqa: E402
from cfr_runtime.serve import ServeConfig, StoreLimits, UploadLimits  # noqa: E402
from cfr_runtime.serve.cluster.batching import batching  # noqa: E402
from cfr_runtime.serve.cluster.record import RecordedClick, SessionState  # noqa: E402
from cfr_runtime.serve.cluster.records import CONFLICT, MISSING, OK, RecordBook, Refused  # noqa: E402
from cfr_runtime.serve.cluster.routing import make_session_id, owner_order, tag_of  # noqa: E402
from cfr_runtime.serve.codec import EncodedImage, decode_upload, rle_to_mask  # noqa: E402
from cfr_runtime.serve.store import SessionStore  # noqa: E402
from tests.ray_util import GroupBatcher, InProcessCluster, evict_once  # noqa: E402
from tests.serve_fixtures import FakeClock  # noqa: E402
from tests.serve_fixtures import encode as encode_png  # noqa: E402


@pytest.fixture(scope="module")
def image() -> bytes:
    return encode_png(blob_scene(5, 120, 160)[0])


def session_like(engine, data, ops) -> Session:
    """A plain Session fed the same operations: ("click", x, y, p) / ("mode", cfr, adaptive) / ("undo",) /
    ("reset",)."""
    s = Session(engine)
    s.set_image(decode_upload(data, UploadLimits()))
    for op in ops:
        if op[0] == "click":
            s.add_click(*op[1:])
        elif op[0] == "mode":
            s.cfr, s.adaptive = op[1], op[2]
        else:
            getattr(s, op[0])()
    return s


# ---- record and replay ---------------------------------------------------------------------------------
def test_replay_reproduces_a_session_whose_mode_changed(engine, image):
    """The store's replay primitive with per-click modes: the first click with CFR-2 (3 forwards), later ones
    StdInfer; replaying with the final mode alone would run the first click with 1 forward."""
    ops = [("mode", 2, False), ("click", 80, 60, True), ("mode", 0, False), ("click", 20, 15, False),
           ("click", 100, 70, True)]
    original = session_like(engine, image, ops)
    state = SessionState((RecordedClick(80, 60, True, "CFR-2"), RecordedClick(20, 15, False, "StdInfer"),
                          RecordedClick(100, 70, True, "StdInfer")), "StdInfer")
    store = SessionStore(engine)
    with store.replay("img", EncodedImage(image, UploadLimits()), state.clicks, state.mode) as r:
        assert (r.created, r.kept, r.forwards) == (True, 0, 5)
        rebuilt = r.session
        assert rebuilt.forwards == original.forwards == [3, 1, 1]
        assert np.array_equal(rebuilt.probs, original.probs) and rebuilt.roi == original.roi
        assert SessionState.of(rebuilt) == state
    with store.replay("img", EncodedImage(image, UploadLimits()), state.clicks[:2], state.mode) as r:
        assert (r.created, r.kept, r.forwards) == (False, 2, 0)  # the cached session, undone by one click
        original.undo()
        assert np.array_equal(r.session.probs, original.probs)
    final_mode_only = [c[:3] for c in state.clicks]  # what a record without per-click modes would replay
    with store.replay("img", EncodedImage(image, UploadLimits()), final_mode_only, "StdInfer") as r:
        assert r.kept == 0 and r.session.forwards == [1, 1, 1]  # its first click differs in mode: not reused


# ---- the record book -----------------------------------------------------------------------------------
def test_record_book_compare_and_set_and_redo_information():
    book = RecordBook(StoreLimits())
    s0, s1 = SessionState(), SessionState((RecordedClick(1, 2, True, "StdInfer"),), "StdInfer")
    assert book.create("a.x", b"img", s0, "op0", 10) == 0
    assert book.create("a.x", b"img", s0, "op0", 10) == 0  # a retried create changes nothing
    assert book.commit("a.x", 0, s1, "op1", 20) == (OK, 1)
    assert book.commit("a.x", 0, s0, "op2", 20) == (CONFLICT, 1)  # a stale copy cannot overwrite
    rec = book.fetch("a.x")
    assert (rec.version, rec.last_op, rec.state, rec.prev) == (1, "op1", s1, s0)
    assert book.head("a.x") == (1, "op1") and book.live(["a.x", "b.y"]) == {"a.x": 1}
    assert book.delete("a.x") and book.commit("a.x", 1, s0, "op3", 1) == (MISSING, -1)


def test_record_book_caps_and_expiry_are_cluster_wide():
    clock = FakeClock()
    book = RecordBook(StoreLimits(idle_timeout_s=10, max_sessions=3, max_memory_mb=1.0), clock=clock)
    sids = [f"r{i % 2}.s{i}" for i in range(4)]
    for sid in sids:  # the count cap holds over sessions of both replicas: the oldest goes
        clock.now += 1
        book.create(sid, b"x" * 1000, SessionState(), "c", 1000)
    assert sorted(book.live(sids)) == ["r0.s2", "r1.s1", "r1.s3"] and book.evicted["count"] == 1
    book.head("r1.s1")  # use makes it the most recent
    # r0.s2's replica now reports 1 MB: over the memory cap, the least recently used others go, never r0.s2
    assert book.commit("r0.s2", 0, SessionState(), "o", 2**20) == (OK, 1)
    assert list(book.live(sids)) == ["r0.s2"] and book.evicted["memory"] == 2
    clock.now += 9.5
    assert book.sweep() == 0
    clock.now += 1
    assert book.sweep() == 1 and len(book) == 0 and book.stats()["evicted"]["idle"] == 1


def test_record_book_caps_are_fair_between_clients():
    """The store's fairness rule, cluster-wide: a client flooding sessions evicts its own, not another's; a
    client beyond its share is refused (429) and nothing of the others goes."""
    book = RecordBook(StoreLimits(max_sessions=4, client_max_sessions=3))
    for sid, client in (("a1", "A"), ("a2", "A"), ("a3", "A"), ("b1", "B"), ("a4", "A")):
        assert book.create(sid, b"", SessionState(), "c", 1, client) == 0
    assert sorted(book.live(["a1", "a2", "a3", "a4", "b1"])) == ["a2", "a3", "a4", "b1"]  # A's limit: its own went
    assert book.create("b2", b"", SessionState(), "c", 1, "B") == 0  # B within its share (2 of 4): A's oldest goes
    assert book.create("a5", b"", SessionState(), "c", 1, "A") == 0  # A beyond its share: its own oldest goes
    assert sorted(book.live(["a3", "a4", "a5", "b1", "b2"])) == ["a4", "a5", "b1", "b2"]
    assert book.evicted["count"] == 3 and book.stats()["clients"] == 2
    small = RecordBook(StoreLimits(max_sessions=2))
    small.create("a", b"", SessionState(), "c", 1, "A")
    small.create("b", b"", SessionState(), "c", 1, "B")
    refused = small.create("c", b"", SessionState(), "c", 1, "C")  # three clients, two sessions: share 0.67
    assert isinstance(refused, Refused) and refused.status == 429 and "share" in refused.message
    assert sorted(small.live(["a", "b", "c"])) == ["a", "b"]
    huge = RecordBook(StoreLimits(max_memory_mb=1.0)).create("h", b"", SessionState(), "c", 2 * 2**20, "A")
    assert isinstance(huge, Refused) and huge.status == 413


# ---- routing --------------------------------------------------------------------------------------------
def test_owner_is_the_creator_then_a_stable_heir():
    replicas = ["aaa", "bbb", "ccc", "ddd"]
    sids = [make_session_id(replicas[i % 4], f"tok{i}") for i in range(400)]
    assert all(owner_order(s, replicas)[0] == tag_of(s) for s in sids)
    survivors = ["aaa", "ccc", "ddd"]
    heirs = [owner_order(s, survivors)[0] for s in sids if tag_of(s) == "bbb"]
    assert set(heirs) == set(survivors)  # the dead replica's sessions spread over all survivors
    assert heirs == [owner_order(s, list(reversed(survivors)))[0] for s in sids if tag_of(s) == "bbb"]
    assert all(owner_order(s, survivors)[0] == tag_of(s) for s in sids if tag_of(s) != "bbb")  # others stay
    grown = survivors + ["eee"]
    assert all(owner_order(s, grown)[0] == owner_order(s, survivors)[0] for s in sids if tag_of(s) != "bbb")
    assert tag_of("no-tag") is None


# ---- replicas behind the gateway ------------------------------------------------------------------------
def config(**store) -> ServeConfig:
    return ServeConfig(store=StoreLimits(**store), sweep_interval_s=3600)


def create(client, data, mode="StdInfer") -> str:
    r = client.post(f"/sessions?mode={mode}", content=data, headers={"Content-Type": "image/png"})
    assert r.status_code == 201, r.text
    return r.json()["session_id"]


def click(client, sid, x, y, positive=True):
    r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": x, "y": y, "positive": positive})
    assert r.status_code == 200, r.text
    return r.json()


def test_requests_through_two_replicas_match_a_session(engine, image):
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        assert "<canvas" in client.get("/").text and client.get("/health").json()["status"] == "ok"
        sids = [create(client, image, "CFR-2") for _ in range(6)]
        assert {tag_of(s) for s in sids} == {"r0", "r1"}  # creates spread; ids carry their replica
        sid = sids[0]
        ops = [("mode", 2, False), ("click", 80, 60, True)]
        a = click(client, sid, 80, 60)
        assert a["last_forwards"] == 3
        assert client.put(f"/sessions/{sid}/mode", json={"mode": "StdInfer"}).status_code == 200
        ops += [("mode", 0, False), ("click", 20, 15, False), ("click", 100, 70, True)]
        click(client, sid, 20, 15, False)
        a = click(client, sid, 100, 70)
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
        u = client.post(f"/sessions/{sid}/undo?format=rle").json()
        assert np.array_equal(rle_to_mask(u["mask"]), session_like(engine, image, ops[:-1]).mask)
        assert cluster.served_by.count(tag_of(sid)) >= 5 and cluster.book.head(sid)[0] == 5
        assert client.get(f"/sessions/{sid}").json()["mode"] == "StdInfer"
        health = client.get("/health").json()
        assert health["sessions"] == 6 and health["replica"]["tag"] in ("r0", "r1")
        assert client.delete(f"/sessions/{sid}").status_code == 204
        assert client.get(f"/sessions/{sid}").status_code == 404 and sid not in cluster.book.live([sid])


@pytest.mark.parametrize("when", ["before", "after"])
def test_replica_dies_during_a_click_and_the_session_continues(engine, image, when):
    """The owner dies before running a click, or after committing it (its answer lost): the gateway retries
    once, the heir rebuilds the session from the record, and the click is applied exactly once."""
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        owner = tag_of(sid)
        cluster.kill(owner, when)
        a = click(client, sid, 20, 15, False)
        ops = [("click", 80, 60, True), ("click", 20, 15, False)]
        assert len(a["clicks"]) == 2, "a click applied twice"
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
        heir = [t for t in cluster.alive][0]
        assert heir != owner and cluster.cores[heir].counters["rebuilds"] == 1
        assert cluster.cores[heir].counters["redone"] == (1 if when == "after" else 0)
        a = click(client, sid, 100, 70)
        ops.append(("click", 100, 70, True))
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
        assert cluster.gateway.retries == 1 and cluster.book.head(sid)[0] == 3


def test_stale_copies_on_two_replicas_never_serve_an_old_state(engine, image):
    """Routing is best effort during replica changes, so two replicas can hold copies: the stale one is caught
    by the version check (reads) or the compare-and-set (writes) and rebuilt."""
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        owner = tag_of(sid)
        other = next(t for t in cluster.alive if t != owner)
        click(client, sid, 80, 60)
        # a request that lands on the other replica (as after a routing change) builds a second copy there
        cluster.alive.remove(owner)
        click(client, sid, 20, 15, False)
        cluster.alive.append(owner)
        ops = [("click", 80, 60, True), ("click", 20, 15, False)]
        assert cluster.cores[other].counters["rebuilds"] == 1
        # back on the owner, whose copy is one click behind: a read is checked, a write conflicts then redoes
        got = client.get(f"/sessions/{sid}").json()
        assert len(got["clicks"]) == 2 and cluster.cores[owner].counters["rebuilds"] == 1
        # brought forward by the store's replay from the common prefix: one forward, not both clicks again
        assert cluster.cores[owner].counters["replayed_forwards"] == 1
        cluster.alive.remove(owner)
        click(client, sid, 100, 70)  # the other copy is now stale
        cluster.alive.append(owner)
        a = click(client, sid, 60, 40)
        ops += [("click", 100, 70, True), ("click", 60, 40, True)]
        assert cluster.cores[owner].counters["conflicts"] == 1
        assert len(a["clicks"]) == 4
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)


def test_same_operation_delivered_twice_is_applied_once(engine, image):
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        core = cluster.cores[tag_of(sid)]
        from cfr_runtime.serve.cluster.asgi import HttpRequest

        req = HttpRequest("POST", f"/sessions/{sid}/clicks", b"format=rle",
                          [(b"content-type", b"application/json")], b'{"x": 80, "y": 60}')
        first = cluster.call(client, core.handle, "op-1", req)
        again = cluster.call(client, core.handle, "op-1", req)
        assert first.status == again.status == 200 and first.body == again.body
        assert cluster.book.head(sid)[0] == 1


def test_expiry_and_caps_hold_across_replicas(engine, image):
    clock = FakeClock()
    cluster = InProcessCluster(engine, config(idle_timeout_s=60, max_sessions=4), clock=clock)
    with cluster.client() as client:
        sids = [create(client, image) for _ in range(6)]
        assert {tag_of(s) for s in sids} == {"r0", "r1"}
        for s in sids[:2]:  # the cluster-wide count cap evicted the two oldest, wherever they lived
            assert client.get(f"/sessions/{s}").status_code == 404
        assert client.get("/health").json()["evicted"]["count"] == 2
        click(client, sids[2], 80, 60)
        clock.now += 61
        cluster.book.sweep()
        for s in sids[2:]:
            r = client.post(f"/sessions/{s}/clicks", json={"x": 5, "y": 5})
            assert r.status_code == 404 and r.json()["error"] == "SessionNotFoundError"
        assert client.get("/health").json()["sessions"] == 0
        for core in cluster.cores.values():  # replicas drop the copies of expired records
            cluster.call(client, core.sync)
            assert core.store.recorded_ids() == []


def test_client_identity_is_kept_by_the_record_and_its_caps_hold_cluster_wide(engine, image):
    """Sessions are accounted to the client that made them (here by the X-Client-Id header), on the replica that
    rebuilds them too; a client beyond its cluster-wide share is refused with 429 and leaves no local copy."""
    cfg = ServeConfig(store=StoreLimits(max_sessions=2), sweep_interval_s=3600, client_identity="header")
    cluster = InProcessCluster(engine, cfg)
    with cluster.client() as client:
        alice = {"X-Client-Id": "alice"}
        r = client.post("/sessions", content=image, headers={"Content-Type": "image/png", **alice})
        sid = r.json()["session_id"]
        assert cluster.cores[tag_of(sid)].store.peek(sid).client == "id:alice"
        assert client.post(f"/sessions/{sid}/clicks", json={"x": 80, "y": 60}, headers=alice).status_code == 200
        cluster.kill(tag_of(sid), "before")
        assert client.post(f"/sessions/{sid}/clicks", json={"x": 20, "y": 15}, headers=alice).status_code == 200
        heir = cluster.alive[0]
        assert cluster.cores[heir].store.peek(sid).client == "id:alice"  # rebuilt for the same client
        bob = client.post("/sessions", content=image, headers={"Content-Type": "image/png", "X-Client-Id": "bob"})
        assert bob.status_code == 201
        carol = client.post("/sessions", content=image, headers={"Content-Type": "image/png", "X-Client-Id": "c"})
        assert carol.status_code == 429 and "share" in carol.json()["message"], carol.text
        assert carol.headers["retry-after"] == "5"
        kept = sorted([sid, bob.json()["session_id"]])
        assert sorted(cluster.cores[heir].store.recorded_ids()) == kept  # carol's local copy went with the refusal
        assert sorted(cluster.book.live(kept)) == kept and len(cluster.book) == 2


# ---- batching ---------------------------------------------------------------------------------------------
def test_one_click_is_the_same_batched_or_not(engine, image):
    import threading

    batcher = GroupBatcher(engine, size=3)
    batched_engine = batching(engine, batcher.submit)
    scripts = [[(80, 60, True), (20, 15, False)], [(100, 70, True), (60, 40, True)], [(40, 30, True), (5, 5, False)]]
    masks: dict[int, list] = {}

    def annotate(i):
        s = Session(batched_engine, cfr=1)
        s.set_image(decode_upload(image, UploadLimits()))
        masks[i] = [s.add_click(x, y, p).copy() for x, y, p in scripts[i]]

    threads = [threading.Thread(target=annotate, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert max(batcher.batch_sizes) == 3, batcher.batch_sizes  # forwards of three sessions in one call
    for i, script in enumerate(scripts):
        plain = Session(engine, cfr=1)
        plain.set_image(decode_upload(image, UploadLimits()))
        for k, (x, y, p) in enumerate(script):
            assert np.array_equal(masks[i][k], plain.add_click(x, y, p)), f"session {i} click {k}"


def test_cluster_with_batching_matches_a_session(engine, image):
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    batcher = GroupBatcher(engine, size=1)
    core.store.engine = batching(engine, batcher.submit)
    with cluster.client() as client:
        sid = create(client, image, "CFR-2")
        a = click(client, sid, 80, 60)
        assert a["last_forwards"] == 3 and batcher.batch_sizes == [1, 1, 1]
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, [("mode", 2, False),
                                                                                   ("click", 80, 60, True)]).mask)


# ---- entry points -------------------------------------------------------------------------------------------
def test_app_builder_arguments_and_options_are_checked(monkeypatch):
    from cfr_runtime.errors import InputError
    from cfr_runtime.serve.cluster import ClusterOptions, app_builder, deploy

    seen = {}
    monkeypatch.setattr(deploy, "build_app", lambda model, config, options: seen.update(
        model=model, config=config, options=options) or "app")
    assert app_builder({"replicas": "3", "threads": "1", "idle_timeout": "30", "max_batch_size": "4",
                        "batch_wait_timeout_s": "0.002", "model": "m.onnx"}) == "app"
    assert seen["model"] == "m.onnx" and seen["config"].store.idle_timeout_s == 30.0
    o = seen["options"]
    assert (o.replicas, o.threads, o.max_batch_size, o.batch_wait_timeout_s) == (3, 1, 4, 0.002)
    with pytest.raises(InputError, match="unknown argument 'replica'"):
        app_builder({"replica": 2})
    with pytest.raises(InputError, match="positive"):
        app_builder({"max_sessions": 0})
    with pytest.raises(InputError, match="max_batch_size"):
        ClusterOptions(max_batch_size=0)
    assert deploy._driver_ip("127.0.0.2:6379") == "127.0.0.2" and deploy._driver_ip("10.0.0.5:6379") is None
    assert deploy._driver_ip("auto") is None


@contextlib.contextmanager
def one_click_then_evicting(engine, image):
    """One replica, a session with one click at (80, 60), and its copy set to be dropped by the replica's own
    LRU during the next request (`evict_once`): yields (cluster, core, client, sid, evicted)."""
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        yield cluster, core, client, sid, evict_once(core, sid)


def test_copy_evicted_by_the_local_cap_during_a_request_is_rebuilt(engine, image):
    """A replica's own LRU cap may drop a copy between the version check and the app's lookup (another
    session's create on a worker thread): the record still exists, so the request is served, not 404."""
    with one_click_then_evicting(engine, image) as (cluster, core, client, sid, evicted):
        a = click(client, sid, 20, 15, False)
        assert evicted and len(a["clicks"]) == 2 and core.counters["rebuilds"] == 1
        ops = [("click", 80, 60, True), ("click", 20, 15, False)]
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
        assert cluster.book.head(sid)[0] == 2 and core.store.versions[sid] == 2


def test_idempotency_key_makes_a_client_retry_apply_once(engine, image):
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        headers = {"Idempotency-Key": "click-1"}
        first = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60}, headers=headers)
        again = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60}, headers=headers)
        assert first.status_code == again.status_code == 200
        assert first.json()["mask"] == again.json()["mask"] and len(again.json()["clicks"]) == 1
        other = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60})
        assert len(other.json()["clicks"]) == 2 and cluster.book.head(sid)[0] == 2
        assert float(other.headers["x-cfr-gateway-ms"]) >= float(other.headers["x-cfr-replica-ms"]) > 0


def test_a_replica_failure_is_answered_in_the_project_error_format(engine, image):
    cluster = InProcessCluster(engine, config(), n=1)
    with cluster.client() as client:
        sid = create(client, image)

        async def broken(op_id, req):
            raise RuntimeError("boom")

        cluster.cores["r0"].handle = broken
        r = client.post(f"/sessions/{sid}/clicks", json={"x": 5, "y": 5})
        assert r.status_code == 500 and r.json()["error"] == "CfrError" and "RuntimeError" in r.json()["message"]


# ---- a click's commit sent beside its forward ---------------------------------------------------------------
class _Failing:
    """Makes the forwards of clicks at column `x` fail while `on`: with ModelOutputError (as a NaN output does),
    or with an error the app does not answer itself (`crash`: a bug; the ASGI app raises)."""

    def __init__(self, monkeypatch, x: float, crash: bool = False):
        from cfr_runtime.errors import ModelOutputError

        self.on = True
        for name in ("_predict", "_predict_full"):
            real = getattr(Session, name)

            def failing(session, _real=real):
                if self.on and session.clicks[-1].x == x:
                    raise RuntimeError("a bug (test)") if crash else ModelOutputError("the network returned NaN (test)")
                return _real(session)

            monkeypatch.setattr(Session, name, failing)


def test_a_click_is_committed_while_its_forward_runs_and_answered_after_both(engine, image):
    """The commit of a click is in flight before the app runs the click (the app below waits for it, up to
    5 s; a commit sent after the app would find it never came), and the answer still waits for the commit: a
    record deleted meanwhile makes a click that the app computed answer 404."""
    import asyncio

    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        sent, seen = asyncio.Event(), []
        real_commit, app = cluster.records.commit, core.app

        async def commit(*args):
            sent.set()
            return await real_commit(*args)

        async def waiting_app(scope, receive, send):
            if scope["type"] == "http" and scope["path"].endswith("/clicks"):
                try:
                    await asyncio.wait_for(sent.wait(), 5)
                    seen.append("commit in flight")
                except asyncio.TimeoutError:
                    seen.append("no commit yet")
            await app(scope, receive, send)

        cluster.records.commit, core.app = commit, waiting_app
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60})
        assert r.status_code == 200 and seen == ["commit in flight"]
        assert float(r.headers["x-cfr-early-commit-ms"]) > 0 and core.counters["early_commits"] == 1
        assert cluster.book.head(sid)[0] == 1 and core.store.versions[sid] == 1
        one = session_like(engine, image, [("click", 80, 60, True)])
        assert np.array_equal(rle_to_mask(r.json()["mask"]), one.mask)

        async def deleting_commit(*args):
            cluster.book.delete(sid)  # expired or deleted elsewhere while the forward ran
            return await real_commit(*args)

        cluster.records.commit, core.app = deleting_commit, app
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 20, "y": 15, "positive": False})
        assert r.status_code == 404 and core.store.peek(sid) is None
        cluster.records.commit = real_commit
        # a click the session refuses is not committed early at all (the app answers it)
        sid = create(client, image)
        r = client.post(f"/sessions/{sid}/clicks", json={"x": 5000, "y": 1})
        assert r.status_code == 400 and core.counters["early_commits"] == 2 and cluster.book.head(sid)[0] == 0
        core.early_commit = False  # the benchmarks' comparison: committed after the forward, as before
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 80, "y": 60})
        assert r.status_code == 200 and core.counters["early_commits"] == 2 and cluster.book.head(sid)[0] == 1
        assert float(r.headers["x-cfr-early-commit-ms"]) == 0 and float(r.headers["x-cfr-record-ms"]) > 0


@pytest.mark.parametrize("crash", [False, True])
def test_a_click_whose_forward_fails_after_its_commit_is_taken_back(engine, image, monkeypatch, crash):
    cluster = InProcessCluster(engine, config(), n=1)
    core = cluster.cores["r0"]
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        _Failing(monkeypatch, 20, crash)
        r = client.post(f"/sessions/{sid}/clicks?format=rle", json={"x": 20, "y": 15, "positive": False})
        assert (r.status_code, r.json()["error"]) == ((500, "CfrError") if crash else (400, "ModelOutputError")), r.text
        one = SessionState((RecordedClick(80, 60, True, "StdInfer"),), "StdInfer")
        rec = cluster.book.fetch(sid)
        assert core.counters["rolled_back"] == 1 and rec.state == one and rec.version == 3
        assert rec.last_op.endswith(":undone") and core.store.versions[sid] == 3
        a = click(client, sid, 100, 70)  # the session goes on from where it was; nothing conflicts
        ops = [("click", 80, 60, True), ("click", 100, 70, True)]
        assert len(a["clicks"]) == 2 and core.counters["conflicts"] == core.counters["rebuilds"] == 0
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)


def test_a_click_committed_by_a_replica_that_died_is_taken_back_when_it_fails_on_the_heir(engine, image, monkeypatch):
    """The owner committed a click beside its forward and died before its answer; the gateway's retry reaches
    the heir, where the click fails (its forward): the record is put back, the client gets the error, and a
    retry of the click (a new request) is applied once."""
    cluster = InProcessCluster(engine, config())
    with cluster.client() as client:
        sid = create(client, image)
        click(client, sid, 80, 60)
        owner = tag_of(sid)
        one = cluster.book.fetch(sid).state
        two = SessionState((*one.clicks, RecordedClick(20.0, 15.0, False, "StdInfer")), "StdInfer")
        assert cluster.book.commit(sid, 1, two, "op-died", 0) == (OK, 2)  # what the owner sent before dying
        cluster.alive.remove(owner)
        heir = cluster.cores[cluster.alive[0]]
        failing = _Failing(monkeypatch, 20)
        from cfr_runtime.serve.cluster.asgi import HttpRequest

        req = HttpRequest("POST", f"/sessions/{sid}/clicks", b"format=rle", [(b"content-type", b"application/json")],
                          b'{"x": 20, "y": 15, "positive": false}')
        r = cluster.call(client, heir.handle, "op-died", req)
        assert r.status == 400 and b"ModelOutputError" in r.body
        rec = cluster.book.fetch(sid)
        assert rec.state == one and rec.version == 3 and heir.counters["rolled_back"] == 1
        failing.on = False
        a = click(client, sid, 20, 15, False)
        ops = [("click", 80, 60, True), ("click", 20, 15, False)]
        assert len(a["clicks"]) == 2 and cluster.book.head(sid)[0] == 4
        assert np.array_equal(rle_to_mask(a["mask"]), session_like(engine, image, ops).mask)
