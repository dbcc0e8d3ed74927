"""`SessionStore.replay`, the stateless rule every adapter (CVAT, Label Studio, Ray) stands on: the answer to a
click list is a fresh Session's answer to that list in that order, whatever the cache held before."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from cfr_runtime import Session
from cfr_runtime.serve.store import SessionStore, StoreLimits, common_prefix
from cfr_runtime.session import Click
from tests.conftest import blob_scene


@pytest.fixture(scope="module")
def scene():
    rgb, _ = blob_scene(3, 120, 160)
    return rgb


def fresh(engine, rgb, clicks, cfr=0, adaptive=False) -> Session:
    s = Session(engine, cfr=cfr, adaptive=adaptive)
    s.set_image(rgb)
    for c in clicks:
        s.add_click(c.x, c.y, c.positive)
    return s


P1, P2, P3 = Click(80, 60, True), Click(100, 70, True), Click(60, 50, True)
N1 = Click(10, 10, False)


def replay_mask(store, rgb, clicks, mode="StdInfer", key="img"):
    loads = []

    def image():
        loads.append(1)
        return rgb

    with store.replay(key, image, clicks, mode) as r:
        assert r.session.clicks == list(clicks)
        return r.session.mask.copy(), r, len(loads)


def test_replay_p1_p2_after_p2_equals_fresh(engine, scene):
    """Issue 16, case 5: a cached [P2] must not turn a request for [P1, P2] into the session [P2, P1]."""
    ref = fresh(engine, scene, [P1, P2]).mask
    assert not np.array_equal(ref, fresh(engine, scene, [P2, P1]).mask)  # the order matters on this scene
    store = SessionStore(engine)
    replay_mask(store, scene, [P2])
    mask, r, loads = replay_mask(store, scene, [P1, P2])
    assert np.array_equal(mask, ref), f"{np.count_nonzero(mask != ref)} px differ from a fresh Session"
    assert (r.kept, r.forwards, r.created, loads) == (0, 2, False, 0)  # the cached session, fully replayed


def test_replay_reuses_only_exact_prefixes(engine, scene):
    store = SessionStore(engine)
    _, r, loads = replay_mask(store, scene, [P1])
    assert (r.created, loads, r.forwards) == (True, 1, 1)
    mask, r, loads = replay_mask(store, scene, [P1, N1])  # extends the cached [P1]: one click's forwards
    assert (r.kept, r.forwards, r.created, loads) == (1, 1, False, 0)
    assert np.array_equal(mask, fresh(engine, scene, [P1, N1]).mask)
    mask, r, _ = replay_mask(store, scene, [P1, P2])  # undo N1 back to [P1], then add P2
    assert (r.kept, r.forwards) == (1, 1)
    assert np.array_equal(mask, fresh(engine, scene, [P1, P2]).mask)
    mask, r, _ = replay_mask(store, scene, [P1])  # a pure undo runs nothing
    assert (r.kept, r.forwards) == (1, 0)
    assert np.array_equal(mask, fresh(engine, scene, [P1]).mask)
    assert len(store) == 1


def test_replay_repeated_points_count(engine, scene):
    """A point sent twice is two clicks: [A] does not stand in for [A, A], nor [A, A] for [A]."""
    store = SessionStore(engine)
    _, r, _ = replay_mask(store, scene, [P1, P1])
    assert r.forwards == 2
    _, r, _ = replay_mask(store, scene, [P1])  # one copy must be undone
    assert (r.kept, r.forwards) == (1, 0)
    mask, r, _ = replay_mask(store, scene, [P1, P1, P2])  # the second P1 must be added again
    assert (r.kept, r.forwards) == (1, 2)
    assert np.array_equal(mask, fresh(engine, scene, [P1, P1, P2]).mask)
    assert common_prefix([P1, P2], [P2, P1]) == 0 and common_prefix([P1], [P1, P1]) == 1


def test_replay_mode_is_part_of_the_key(engine, scene):
    store = SessionStore(engine)
    replay_mask(store, scene, [P1], "StdInfer")
    mask, r, loads = replay_mask(store, scene, [P1], "CFR-2")  # CFR changes the first click: no reuse
    assert (r.created, loads, r.forwards) == (True, 1, 3)
    assert np.array_equal(mask, fresh(engine, scene, [P1], cfr=2).mask)


def test_replay_refused_click_leaves_a_valid_cache(engine, scene):
    from cfr_runtime.errors import InputError

    store = SessionStore(engine)
    with pytest.raises(InputError, match="outside"):
        with store.replay("img", lambda: scene, [P1, Click(1000, 1, True)]):
            pass
    mask, r, _ = replay_mask(store, scene, [P1, P2])
    assert r.kept == 1 and np.array_equal(mask, fresh(engine, scene, [P1, P2]).mask)


def test_replay_refuses_clicks_placed_on_another_size(engine, scene):
    """`size` (Label Studio's percentages are of the image it showed): a cached or new session on an image of
    another size is refused before a click is applied, and the cache stays as it was."""
    from cfr_runtime.errors import InputError

    store = SessionStore(engine)
    h, w = scene.shape[:2]
    with store.replay("img", lambda: scene, [P1], size=(w, h)) as r:
        assert r.session.clicks == [P1]
    for size in ((w + 1, h), (w, h - 1)):
        with pytest.raises(InputError, match=f"placed on a {size[0]}x{size[1]} image, but the image is {w}x{h}"):
            with store.replay("img", lambda: scene, [P1, P2], size=size):
                pass
    assert [e.session.clicks for e in store.by_key("img|StdInfer")] == [[P1]]  # nothing applied, still cached
    fresh_store = SessionStore(engine)
    with pytest.raises(InputError, match="placed on a"):
        with fresh_store.replay("img", lambda: scene, [P1], size=(w, h + 5)):
            pass
    assert [e.session.clicks for e in fresh_store.by_key("img|StdInfer")] == [[]]  # opened, no click applied


def test_forget_drops_a_key_prefix_in_every_mode(engine, scene):
    from cfr_runtime.errors import InputError

    store = SessionStore(engine)
    for key, mode in (("task|7|a", "StdInfer"), ("task|7|a", "CFR-2"), ("task|7|b", "StdInfer"),
                      ("task|70|a", "StdInfer")):
        with store.replay(key, lambda: scene, [P1], mode):
            pass
    sid = store.create(scene).id  # a page session: no key
    assert len(store) == 5
    assert store.forget("task|7|") == 3
    assert sorted(k for k in store._keys) == ["task|70|a|StdInfer"] and store.get(sid)
    assert store.forget("task|7|") == 0
    with pytest.raises(InputError, match="prefix"):
        store.forget("")
    assert len(store) == 2


@pytest.mark.parametrize("per_key", [1, 3])
def test_replay_interleaved_requests_never_see_each_others_clicks(engine, scene, per_key):
    """Threads replaying different lists on one frame: every answer equals its own fresh Session."""
    lists = [[P1], [P2, P1], [P1, N1], [P3, P2, N1], [P1, P1]]
    refs = [fresh(engine, scene, c).mask for c in lists]
    store = SessionStore(engine, StoreLimits(max_per_key=per_key))
    errors: list[str] = []

    def worker(k: int) -> None:
        for i in range(6):
            j = (k + i) % len(lists)
            with store.replay("img", lambda: scene, lists[j]) as r:
                if r.session.clicks != lists[j] or not np.array_equal(r.session.mask, refs[j]):
                    errors.append(f"thread {k} request {i}: list {j} answered with {r.session.clicks}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert 1 <= len(store.by_key("img|StdInfer")) <= per_key
