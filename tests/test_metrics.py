"""IoU, NoC and the summary at their boundaries (issue 21): IoU exactly at the threshold, the click cap, an
instance reaching the target on the last click, the ignore label, the mIoU curve's carry-forward."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cfr_runtime.metrics import iou, noc, reached, summarize


def test_iou_ignores_label_minus_one_on_both_sides():
    gt = np.array([[1, 1, 0, -1], [0, 0, -1, 1]])
    pred = np.array([[1, 0, 1, 1], [0, 0, 1, 1]], bool)
    # valid pixels: 6; object {0, 1, 7}; pred ∩ valid {0, 2, 7}: inter {0, 7} = 2, union {0, 1, 2, 7} = 4
    assert iou(gt, pred) == 0.5
    assert iou(gt, gt == 1) == 1.0
    assert iou(np.full((2, 2), -1), np.ones((2, 2), bool)) == 1.0  # nothing valid: both empty there
    assert iou(np.zeros((2, 2), int), np.ones((2, 2), bool)) == 0.0


def test_noc_threshold_is_inclusive_and_capped():
    assert noc([0.85], 0.85) == 1
    assert noc([0.8499, 0.85], 0.85) == 2
    assert noc([0.1, 0.2, 0.9], 0.85, max_clicks=2) == 2  # reached only after the cap: the cap
    assert noc([0.1, 0.9], 0.85, max_clicks=2) == 2 and noc([0.9, 0.1], 0.85, max_clicks=2) == 1
    assert noc([], 0.85, max_clicks=3) == 3
    assert reached([0.1, 0.85], 0.85) and not reached([0.1, 0.84], 0.85)
    assert not reached([0.1, 0.2, 0.9], 0.85, max_clicks=2) and reached([0.1, 0.9], 0.85, max_clicks=2)
    assert not reached([0.5] * 20 + [0.9], 0.85) and reached([0.5] * 19 + [0.9], 0.85)  # default cap: 20
    assert noc([0.5] * 20 + [0.9], 0.85) == 20


def test_summary_counts_and_curve():
    runs = [[0.5, 0.86, 0.91, 0.96], [0.9], [0.2, 0.3, 0.95], [0.1, 0.2, 0.3]]
    s = summarize(runs, max_clicks=3)
    assert s["instances"] == 4
    assert s["noc"] == {"0.85": pytest.approx((2 + 1 + 3 + 3) / 4), "0.9": pytest.approx((3 + 1 + 3 + 3) / 4),
                        "0.95": 3.0}
    # '>=3@t': NoC at the cap, reached on the last click or never
    assert s["over_max"] == {"0.85": 2, "0.9": 3, "0.95": 4}
    assert s["never_reached"] == {"0.85": 1, "0.9": 1, "0.95": 3}
    # per click, each run's IoU, its last value carried forward once it stopped
    want = np.mean([[0.5, 0.86, 0.91], [0.9, 0.9, 0.9], [0.2, 0.3, 0.95], [0.1, 0.2, 0.3]], axis=0)
    assert np.allclose(s["miou_per_click"], want) and len(s["miou_per_click"]) == 3


def test_summary_default_cap_and_thresholds():
    s = summarize([[0.5] * 19 + [0.9]])
    assert set(s["noc"]) == {"0.85", "0.9", "0.95"} and s["noc"]["0.85"] == 20.0
    assert s["over_max"]["0.85"] == 1 and s["never_reached"]["0.85"] == 0
    assert len(s["miou_per_click"]) == 20 and s["miou_per_click"][0] == 0.5
    s = summarize([[0.9]], thresholds=(0.5,), max_clicks=2)
    assert s["noc"] == {"0.5": 1.0} and s["miou_per_click"] == [0.9, 0.9]


def test_summary_of_nothing():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice": an empty run is NaN by decision
        s = summarize([], max_clicks=4)
    assert s["instances"] == 0 and all(math.isnan(v) for v in s["noc"].values())
    assert s["over_max"] == {"0.85": 0, "0.9": 0, "0.95": 0} and s["miou_per_click"] == [0.0] * 4
    s = summarize([[]], max_clicks=2)  # an instance without clicks counts as IoU 0
    assert s["miou_per_click"] == [0.0, 0.0] and s["noc"]["0.85"] == 2.0
