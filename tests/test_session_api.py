"""Bad input gets one project exception with an actionable message; a property-based fuzz of the API."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cfr_runtime import CfrError, InputError, Session, StateError
from cfr_runtime.session import Click


@pytest.fixture(scope="module")
def session(tiny_engine):
    return Session(tiny_engine)


@pytest.mark.parametrize("image,match", [
    (np.zeros((20, 30), np.uint8), "grayscale"),
    (np.zeros((20, 30, 4), np.uint8), "RGBA"),
    (np.zeros((20, 30, 3), np.float32), "dtype must be uint8.*astype"),
    (np.zeros((20, 30, 3), np.uint16), "dtype must be uint8"),
    (np.zeros((0, 30, 3), np.uint8), "empty"),
    (np.zeros((20, 30, 2), np.uint8), "3 channels"),
    (np.zeros((2, 20, 30, 3), np.uint8), "H x W x 3"),
    ([[1, 2, 3]], "numpy array"),
])
def test_bad_images(session, image, match):
    with pytest.raises(InputError, match=match):
        session.set_image(image)


def test_clicks_before_image_and_empty_undo(tiny_engine):
    s = Session(tiny_engine)
    with pytest.raises(StateError, match="set_image"):
        s.add_click(1, 1)
    with pytest.raises(StateError, match="set_image"):
        s.undo()
    s.set_image(np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(StateError, match="no clicks"):
        s.undo()


@pytest.mark.parametrize("x,y", [(-1, 5), (5, -0.5), (30, 5), (5, 20), (float("nan"), 1), (1, float("inf"))])
def test_clicks_outside(session, x, y):
    session.set_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(InputError, match="outside the 30x20 image"):
        session.add_click(x, y)


def test_click_type_and_limit(tiny_engine):
    s = Session(tiny_engine)
    s.set_image(np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(InputError, match="numbers"):
        s.add_click("3", 4)
    for i in range(tiny_engine.contract.max_points):
        s.add_click(i % 30, 1, True)
    with pytest.raises(InputError, match="at most 24 positive clicks"):
        s.add_click(1, 1, True)
    s.add_click(1, 1, False)  # negatives still have room


def test_bad_session_options(tiny_engine):
    with pytest.raises(CfrError):
        Session(tiny_engine, cfr=-1)
    with pytest.raises(CfrError):
        Session(tiny_engine, cfr_clicks=0)


ops = st.lists(st.one_of(
    st.tuples(st.just("click"), st.one_of(st.floats(-5, 40), st.just(float("nan")), st.integers(-3, 40)),
              st.one_of(st.floats(-5, 30), st.just(float("inf")), st.integers(-3, 30)), st.booleans()),
    st.tuples(st.just("undo")), st.tuples(st.just("reset"))), max_size=8)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(h=st.integers(1, 24), w=st.integers(1, 36), seq=ops)
def test_fuzz_session(tiny_engine, h, w, seq):
    """Whatever the sequence: each operation succeeds exactly when its input is valid (a click inside the
    image, an undo with a click to undo) and is otherwise refused with the project error that names it; the
    state stays consistent (mask shape, click count). Issue 21: catching every CfrError let an API that
    refused everything pass."""
    import math

    s = Session(tiny_engine, cfr=1, adaptive=True)
    s.set_image(np.random.default_rng(h * w).integers(0, 255, (h, w, 3), dtype=np.uint8))
    expected = 0
    for op in seq:
        if op[0] == "click":
            x, y = op[1], op[2]
            if math.isfinite(x) and math.isfinite(y) and 0 <= x < w and 0 <= y < h:
                mask = s.add_click(x, y, op[3])
                expected += 1
                assert mask.shape == (h, w) and mask.dtype == bool
                assert s.clicks[-1] == Click(float(x), float(y), op[3])
            else:
                with pytest.raises(InputError, match="outside the"):
                    s.add_click(x, y, op[3])
        elif op[0] == "undo":
            if expected:
                s.undo()
                expected -= 1
            else:
                with pytest.raises(StateError, match="no clicks"):
                    s.undo()
        else:
            s.reset()
            expected = 0
        assert len(s.clicks) == expected == len(s.forwards)
        assert s.probs.shape == (h, w) and np.isfinite(s.probs).all()
        assert (s.roi is None) == (expected == 0)
