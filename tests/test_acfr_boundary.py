"""A-CFR's stopping rule at its boundary, on both contracts (issue 21).

A-CFR-n stops after the first extra forward that changes at most `cfr_threshold` mask pixels. On the square
contract the Session counts them; on the full-resolution contract the graph counts them and the Session only
compares the number. A threshold equal to a count must stop there (`<=`, not `<`): the earlier test ran the
full graph at the default threshold only, where no count ever equals it, so `<` passed it. Here the threshold
takes every count that occurs, on a real image with the trained default model.
"""

from __future__ import annotations

import numpy as np
import pytest

from cfr_runtime import Session

CFR = 4


@pytest.fixture(scope="module")
def scene(data_dir):
    from cfr_runtime.datasets import open_dataset

    image, gt = open_dataset(data_dir / "GrabCut")[7].load()
    ys, xs = np.nonzero(gt == 1)
    return image, (int(np.median(xs)), int(np.median(ys)))


@pytest.mark.parametrize("kind", ["square", "full"])
def test_acfr_stops_at_a_threshold_equal_to_the_change(default_engines, scene, kind):
    engine = default_engines[kind]
    image, (x, y) = scene
    masks = []  # the mask after k forwards of the first click, from fixed CFR-k sessions (k = 0..CFR)
    for k in range(CFR + 1):
        fixed = Session(engine, cfr=k)
        fixed.set_image(image)
        masks.append(fixed.add_click(x, y, True))
        assert fixed.forwards == [k + 1]
    changed = [int(np.count_nonzero(masks[i] != masks[i - 1])) for i in range(1, CFR + 1)]
    # restated: stop after forward i + 2 where changed[i] is the first count <= threshold; else all CFR + 1
    def restated(threshold, stop):
        return next((i + 2 for i, c in enumerate(changed) if stop(c, threshold)), CFR + 1)

    thresholds = sorted({0, *changed, max(changed) + 1})
    # the scene makes the boundary matter: for some threshold a strict `<` would stop elsewhere
    assert any(restated(t, int.__le__) != restated(t, int.__lt__) for t in thresholds), changed
    for threshold in thresholds:
        want = restated(threshold, int.__le__)
        s = Session(engine, cfr=CFR, adaptive=True, cfr_threshold=threshold)
        s.set_image(image)
        mask = s.add_click(x, y, True)
        assert s.forwards == [want], f"{kind}: threshold {threshold}, changes {changed}: {s.forwards[0]} forwards"
        assert np.array_equal(mask, masks[want - 1])
