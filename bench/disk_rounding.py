"""How close float32 click coordinates (and so the click disks) get to the official float64 ones.

    python bench/disk_rounding.py --samples 200000 --size 448

The official predictor maps a click into the crop and flips it in float64 (Python floats) and only then
stores it as float32: y' = fl32(S (y - r0) / h), flipped x'' = fl32(S - x64' - 1). The graphs compute in
float32. Three float32 recipes are compared with the official value over random integer clicks and ROIs:
- `map`: fl32(fl32(S (x - c0)) / fl32(w)), what the full graph does: one rounding of an exact quotient, so
  it should equal the official fl32(fl64(...)) (double rounding is innocuous for division, 24 <= 53 / 2 - 1);
- `flip_today`: fl32((S - 1) - x'), what `ContractGraph` does after the mapping (both contracts today);
- `flip_exact`: fl32(fl32(S (c1 + 1 - x) - w) / fl32(w)), the flip as one exact quotient.
For the flipped coordinates that differ it also counts disk pixels (radius 5, decided in float32 as the
model does) that change. Prints a table; numbers are measured, never hard-coded.
"""

from __future__ import annotations

import argparse

import numpy as np


def disks_differ(y: np.ndarray, xa: np.ndarray, xb: np.ndarray, size: int, radius: float = 5.0) -> np.ndarray:
    """Per sample, how many pixels of the S x S disk differ between centres (y, xa) and (y, xb) (float32)."""
    out = np.zeros(len(y), np.int64)
    r = np.arange(size, dtype=np.float32)
    for k in range(len(y)):
        dy = (r[:, None] - y[k]) ** 2
        a = dy + (r[None, :] - xa[k]) ** 2 <= np.float32(radius * radius)
        b = dy + (r[None, :] - xb[k]) ** 2 <= np.float32(radius * radius)
        out[k] = np.count_nonzero(a != b)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200_000)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--max-side", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    s, n = args.size, args.samples
    w = rng.integers(1, args.max_side, n)
    c0 = rng.integers(0, args.max_side, n)
    x = c0 + rng.integers(0, w)  # clicks inside the ROI (positives always are)
    x64 = s * (x - c0).astype(np.float64) / w
    official_map = x64.astype(np.float32)
    official_flip = (s - x64 - 1).astype(np.float32)
    f32 = np.float32
    graph_map = (f32(s) * (x - c0).astype(f32)) / w.astype(f32)
    flip_today = f32(s - 1) - graph_map
    flip_exact = (f32(s) * (c0 + w - x).astype(f32) - w.astype(f32)) / w.astype(f32)
    y = rng.uniform(0, s - 1, n).astype(np.float32)
    rows = {}
    for name, got, want in (("map", graph_map, official_map), ("flip_today", flip_today, official_flip),
                            ("flip_exact", flip_exact, official_flip)):
        bad = np.flatnonzero(got != want)
        pix = disks_differ(y[bad[:2000]], got[bad[:2000]], want[bad[:2000]], s) if bad.size else np.zeros(0)
        rows[name] = {"differ": int(bad.size), "fraction": bad.size / n,
                      "max_abs": float(np.abs(got.astype(np.float64) - want).max()),
                      "checked_for_disks": int(pix.size), "disks_changed": int(np.count_nonzero(pix)),
                      "disk_pixels_changed": int(pix.sum())}
    print(f"{n} random integer clicks in ROIs up to {args.max_side} px, S = {s}")
    print("| recipe | coordinates != official | max abs diff | disks changed (of those checked) | pixels |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['differ']} ({100 * r['fraction']:.3f}%) | {r['max_abs']:.3g} | "
              f"{r['disks_changed']} of {r['checked_for_disks']} | {r['disk_pixels_changed']} |")
    return rows


if __name__ == "__main__":
    main()
