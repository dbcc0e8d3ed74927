"""Click disks decided on the host with the official float64 arithmetic, and placed exactly by every graph."""

from __future__ import annotations

import numpy as np
import pytest

from cfr_runtime.disks import (
    click_disk_rows,
    fill_disk_rows,
    flipped_x,
    net_clicks,
    official_disks,
    place_rows,
    stencil_rows,
    write_disk_rows,
)

S, R = 448, 5


def _float32_disk(y: float, x: float) -> np.ndarray:
    """The previous graphs' recipe: float32 centre, float32 subtraction."""
    a = np.arange(S, dtype=np.float32)[:, None] - np.float32(y)
    b = np.arange(S, dtype=np.float32)[None, :] - np.float32(x)
    return a * a + b * b <= np.float32(R * R)


def test_the_issues_tie_is_inside():
    """A click mapped to (120.4, 198.8) (columns 172 and 284 of a 640-wide box: 0.7 c) and pixel (119, 194): offsets
    (1.4, 4.8), d^2 = 25 in real arithmetic. The official float64 subtraction gets 25.0 (inside); float32
    centres get 25.00001 (outside). The host rows say inside."""
    y, x = net_clicks(np.array([[172.0, 284.0]]), (0, 639, 0, 639), S)[0]
    assert (y, x) == (448 * 172 / 640, 448 * 284 / 640)
    assert official_disks(y, x, S, S, R)[119, 194] and not _float32_disk(y, x)[119, 194]
    assert place_rows(click_disk_rows(np.array([y]), np.array([x]), R), S, S)[119, 194]


def test_host_rows_equal_the_official_decision_pixel_for_pixel():
    """Random float64 clicks, plain and flipped, half of them mapped from box sides that make ties (640, 480, 321
    ...): the placed host rows equal the official per-pixel decision on the whole S x S grid; the float32 recipe
    differs on some of them (so the sample has ties and this test could fail)."""
    rng = np.random.default_rng(20261130)
    float32_differs = 0
    for k in range(600):
        if k % 2:
            side = int(rng.choice([200, 240, 320, 321, 400, 480, 481, 500, 640, 800]))
            yx = net_clicks(rng.integers(0, side, (1, 2)).astype(np.float64), (0, side - 1, 0, side - 1), S)[0]
        else:
            yx = rng.uniform(-2.0, S + 1.0, 2)
        for x in (yx[1], flipped_x(yx[1], S)):
            want = official_disks(yx[0], x, S, S, R)
            got = place_rows(click_disk_rows(np.array([yx[0]]), np.array([x]), R), S, S)
            assert np.array_equal(got, want), f"click ({yx[0]!r}, {x!r})"
            float32_differs += not np.array_equal(_float32_disk(yx[0], x), want)
    print(f"float32 centres give another disk on {float32_differs} of 1200 disks")
    assert float32_differs > 0


def test_disk_rows_layout():
    """Positives from row 0, negatives from row P, in click order; flipped block second; padding -1; too many
    clicks refused."""
    p = 3
    out = np.zeros((1, 2, 2 * p, stencil_rows(R), 3), np.float32)
    yx = np.array([[10.0, 20.0], [30.0, 40.0], [50.0, 60.0]])
    fill_disk_rows(out, yx, [True, False, True], R, S)
    for slot, (y, x) in ((0, yx[0]), (1, yx[2]), (p, yx[1])):
        assert np.array_equal(out[0, 0, slot], click_disk_rows(np.array([y]), np.array([x]), R)[0])
        assert np.array_equal(out[0, 1, slot], click_disk_rows(np.array([y]), flipped_x(np.array([x]), S), R)[0])
    assert (out[0, :, [2, p + 1, p + 2]] == -1).all()
    assert place_rows(out[0, 0, :1], S, S).sum() == official_disks(10.0, 20.0, S, S, R).sum() > 0
    with pytest.raises(ValueError, match="takes 3 of each"):
        fill_disk_rows(out, np.zeros((4, 2)), [True] * 4, R, S)
    write_disk_rows(out, np.zeros((0, 2)), [], (0, 9, 0, 9), S, R)
    assert (out == -1).all()


def test_graph_places_host_rows_exactly(tmp_path):
    """`place_disks` (torch, and exported to ONNX Runtime) draws exactly the pixels of the host rows, for a flip
    batch with padding; in a half-precision model the disks stay exact (0/1)."""
    import onnxruntime as ort
    import torch

    from trainer.models.plainvit import place_disks

    rng = np.random.default_rng(7)
    p, size = 6, 96
    out = np.empty((1, 2, 2 * p, stencil_rows(R), 3), np.float32)
    yx = np.concatenate([rng.uniform(-3, size + 2, (5, 2)), [[0.0, 0.0], [size - 1.0, size - 1.0]]])
    positive = [True, False, True, True, False, False, True]
    fill_disk_rows(out, yx, positive, R, size)
    want = np.stack([np.stack([place_rows(out[0, f, g * p:(g + 1) * p], size, size) for g in range(2)])
                     for f in range(2)])
    rows = torch.from_numpy(out[0])
    got = place_disks(rows, size, size)
    assert got.dtype == torch.float32 and np.array_equal(got.numpy().astype(bool), want)
    assert want[0, 0].any() and want[0, 1].any() and want[1, 0].any()

    class Place(torch.nn.Module):
        def forward(self, r):
            return place_disks(r, size, size)

    path = tmp_path / "place.onnx"
    torch.onnx.export(Place(), (rows,), str(path), input_names=["r"], output_names=["d"], opset_version=17,
                      dynamo=False)
    onnx_out = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"r": out[0]})[0]
    assert np.array_equal(onnx_out.astype(bool), want)
    assert np.array_equal(place_disks(rows, size, size).half().float().numpy().astype(bool), want)


def test_reference_loop_disks_are_the_official_ones():
    """The model's `click_disks` on float64 points (what the official-style loop feeds it) subtracts in float64
    and rounds once, as the official DistMaps; on float32 points it is the float32 recipe."""
    import torch

    from trainer.models.plainvit import click_disks

    y, x = net_clicks(np.array([[172.0, 284.0]]), (0, 639, 0, 639), S)[0]
    pts = [[[y, x, 0.0], [-1.0, -1.0, -1.0]]]
    d64 = click_disks(torch.tensor(pts, dtype=torch.float64), S, S, R)[0, 0].numpy().astype(bool)
    d32 = click_disks(torch.tensor(pts, dtype=torch.float32), S, S, R)[0, 0].numpy().astype(bool)
    assert np.array_equal(d64, official_disks(y, x, S, S, R)) and np.array_equal(d32, _float32_disk(y, x))
    assert d64[119, 194] and not d32[119, 194]
