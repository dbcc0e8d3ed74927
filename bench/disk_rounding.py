"""Click disks: the official float64 decision, the old float32 graphs, the host decision, and what it costs.

    python bench/disk_rounding.py --out bench/results/parity                 # + --official CHECKOUT (below)
    python bench/disk_rounding.py --official /path/to/CFR-ICL-Interactive-Segmentation --old-model OLD.onnx \
        --out bench/results/parity

The official predictor maps clicks into the zoom-in crop and flips them in float64 and its `DistMaps` decides
fl32(fl32(i - y)^2) + fl32(fl32(j - x)^2) <= r^2 with the subtraction in float64 (see cfr_runtime/disks.py).
Parts (each prints a table; the JSON + Markdown go to --out, a new temporary folder when --out is not given,
and existing files there are not replaced without --overwrite):

1. `rounding`: random integer clicks in random ROIs (as the clicker and the zoom-in make them; every other ROI
   with the side of an evaluation image or a round crop size, where ties happen), S = --size.
   For the plain and the flipped click: how often the previous graphs' float32 arithmetic (mapping
   fl32(S (y - r0)) / fl32(h), flip (S - 1) - x', distances from float32 centres) gives another disk than the
   official one, and how often the host rows (`cfr_runtime.disks`) do (must be 0).
2. `official` (with --official): the official `DistMaps` itself, imported from the checkout, on random float64
   clicks (plain and flipped, several clicks per map, full S x S maps) against the disks placed from host rows.
3. `cost`: the host's time to decide the disk rows of one forward (p50 / p99 over --repeats >= 100 calls) for
   1 to 2P clicks, and the graph's time to draw the disks, old recipe (distances from float32 points) against
   new (placing rows), as two small ONNX graphs on ONNX Runtime CPU (batch 2 = flip, P = 24, S x S), interleaved.
   With --old-model (an ONNX file of contract version 2, e.g. `git show 6a26c3a:cfr_runtime/assets/default.onnx`)
   the whole forward of that file against the new default model, interleaved on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import start_record, write_results  # noqa: E402
from cfr_runtime.disks import (  # noqa: E402
    click_disk_rows,
    fill_disk_rows,
    flipped_x,
    net_clicks,
    place_rows,
    write_disk_rows,
)

RADIUS = 5
# sides of whole evaluation images (the first click's zoom-in box) and round crop sizes: S / side has a short
# binary fraction there, so mapped clicks and pixels can be exactly r apart, where float32 and float64 can differ
TIE_SIDES = np.array([200, 240, 300, 320, 321, 400, 427, 480, 481, 500, 600, 640, 800, 1024])


def _window(y: float, x: float, y0: int, x0: int, n: int, dy: np.ndarray, dx: np.ndarray) -> np.ndarray:
    """bool n x n window at (y0, x0) of the disk of centre (y, x) with differences computed by dy/dx."""
    rows = np.arange(y0, y0 + n)
    cols = np.arange(x0, x0 + n)
    a, b = dy(rows, y), dx(cols, x)
    return (a * a)[:, None] + (b * b)[None, :] <= np.float32(RADIUS * RADIUS)


def rounding(samples: int, size: int, max_side: int, seed: int) -> dict:
    """Part 1: disks of the previous float32 graphs and of the host rows against the official float64 ones."""
    rng = np.random.default_rng(seed)
    f32 = np.float32
    h = rng.integers(1, max_side, samples)
    w = rng.integers(1, max_side, samples)
    # every other box has the side of a whole evaluation image (the first click's box) or of a round crop:
    # S / side then has a short binary fraction, which is where the official and float32 results can tie
    h[1::2], w[1::2] = rng.choice(TIE_SIDES, (2, samples // 2))
    r0, c0 = rng.integers(0, max_side, samples), rng.integers(0, max_side, samples)
    y, x = r0 + rng.integers(0, h), c0 + rng.integers(0, w)  # clicks inside the ROI (positives always are)
    off64 = lambda idx, c: (idx.astype(np.float64) - c).astype(f32)  # noqa: E731  official: fl32(i - y64)
    off32 = lambda idx, c: idx.astype(f32) - f32(c)  # noqa: E731  old graphs: float32 centre and subtraction
    counts = {k: 0 for k in ("plain_old_differs", "flip_old_differs", "plain_host_differs", "flip_host_differs")}
    pixels = {"plain_old": 0, "flip_old": 0}
    n = 2 * RADIUS + 4
    for k in range(samples):
        yx64 = net_clicks(np.array([[y[k], x[k]]]), (int(r0[k]), int(r0[k] + h[k] - 1), int(c0[k]),
                                                     int(c0[k] + w[k] - 1)), size)[0]
        y32 = f32(f32(size) * f32(y[k] - r0[k])) / f32(h[k])  # the old graphs' mapping (full graph; square: same)
        x32 = f32(f32(size) * f32(x[k] - c0[k])) / f32(w[k])
        for name, cx64, cx32 in (("plain", yx64[1], x32), ("flip", flipped_x(yx64[1], size), f32(size - 1) - x32)):
            y0, x0 = int(np.floor(yx64[0])) - RADIUS - 1, int(np.floor(cx64)) - RADIUS - 1
            want = _window(yx64[0], cx64, y0, x0, n, off64, off64)
            old = _window(y32, cx32, y0, x0, n, off32, off32)
            rows = click_disk_rows(np.array([yx64[0]]), np.array([cx64]), RADIUS)
            rows[..., 0] -= y0
            rows[..., 1:] -= x0
            host = place_rows(rows, n, n)
            diff = int(np.count_nonzero(old != want))
            counts[f"{name}_old_differs"] += diff > 0
            pixels[f"{name}_old"] += diff
            counts[f"{name}_host_differs"] += not np.array_equal(host, want)
    out = {"samples": samples, "size": size, "max_side": max_side, **counts,
           "plain_old_pixels": pixels["plain_old"], "flip_old_pixels": pixels["flip_old"]}
    print(f"\n## 1. {samples} random integer clicks in ROIs up to {max_side} px, S = {size}: disks that differ from "
          "the official float64 decision")
    print("| disk | previous float32 graphs | host rows (cfr_runtime.disks) |\n|---|---|---|")
    for name in ("plain", "flip"):
        print(f"| {name} | {out[f'{name}_old_differs']} ({100 * out[f'{name}_old_differs'] / samples:.3f} %), "
              f"{out[f'{name}_old_pixels']} pixels | {out[f'{name}_host_differs']} |")
    return out


def official_check(checkout: Path, maps: int, size: int, seed: int) -> dict:
    """Part 2: the official DistMaps (imported from the checkout) against disks placed from host rows."""
    import torch

    sys.path.insert(0, str(checkout.resolve()))
    from isegm.model.ops import DistMaps  # the official module; nothing of it is copied here

    dist = DistMaps(norm_radius=RADIUS, spatial_scale=1.0, cpu_mode=False, use_disks=True)
    rng = np.random.default_rng(seed)
    bad = old_bad = 0
    n_clicks = 3
    for _ in range(maps):
        h, w = (int(v) for v in rng.choice(TIE_SIDES, 2))
        roi = (0, h - 1, 0, w - 1)
        yx = np.stack([rng.integers(0, h, n_clicks), rng.integers(0, w, n_clicks)], 1)
        net = net_clicks(yx, roi, size)
        flip = np.stack([net[:, 0], flipped_x(net[:, 1], size)], 1)
        rows = [[(float(a), float(b), i) for i, (a, b) in enumerate(pts)] + [(-1, -1, -1)] * n_clicks
                for pts in (net, flip)]
        with torch.no_grad():
            got = dist.get_coord_features(torch.tensor(rows, dtype=torch.float64), 2, size, size)[:, 0].numpy() > 0
        mine = np.empty((1, 2, 2 * n_clicks, 2 * RADIUS + 2, 3), np.float32)
        fill_disk_rows(mine, net, [True] * n_clicks, RADIUS, size)
        for f in range(2):
            bad += not np.array_equal(place_rows(mine[0, f, :n_clicks], size, size), got[f])
            old = np.zeros((size, size), bool)
            for a, b in (net, flip)[f].astype(np.float32):
                old |= (((np.arange(size, dtype=np.float32)[:, None] - a) ** 2
                         + (np.arange(size, dtype=np.float32)[None, :] - b) ** 2) <= RADIUS * RADIUS)
            old_bad += not np.array_equal(old, got[f])
    out = {"maps": 2 * maps, "clicks_per_map": n_clicks, "host_differs": bad, "float32_differs": old_bad,
           "checkout": str(checkout)}
    print(f"\n## 2. official DistMaps ({checkout}) on {2 * maps} maps of {n_clicks} float64 clicks (plain + flipped), "
          f"S = {size}\nhost rows differ on {bad} maps; float32 centres differ on {old_bad}")
    return out


def _percentiles(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)), "samples": len(a)}


def host_cost(size: int, points: int, repeats: int) -> dict:
    """Part 3a: one forward's `write_disk_rows` (map, flip, decide, place in the buffer) for n clicks."""
    rng = np.random.default_rng(0)
    out = {}
    buf = np.empty((1, 2, 2 * points, 2 * RADIUS + 2, 3), np.float32)
    for n in sorted({1, 5, 10, 20, 2 * points}):
        yx = np.stack([rng.integers(0, 480, n), rng.integers(0, 640, n)], 1).astype(np.float64)
        pos = np.arange(n) % 2 == 0
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            write_disk_rows(buf, yx, pos, (10, 470, 20, 630), size, RADIUS)
            times.append(1e3 * (time.perf_counter() - t))
        out[str(n)] = _percentiles(times)
    print(f"\n## 3a. host: disk rows of one forward (map + flip + decide), {repeats} calls each")
    print("| clicks | p50 us | p99 us |\n|---|---|---|")
    for n, r in out.items():
        print(f"| {n} | {1e3 * r['p50_ms']:.1f} | {1e3 * r['p99_ms']:.1f} |")
    return out


def graph_cost(size: int, points: int, repeats: int, tmp: Path) -> dict:
    """Part 3b: the disk part of the graph alone, old (float32 distances from points) vs new (placing rows)."""
    import onnxruntime as ort
    import torch

    from trainer.models.plainvit import click_disks, place_disks

    class Old(torch.nn.Module):
        def forward(self, pts):
            return click_disks(pts, size, size, RADIUS)

    class New(torch.nn.Module):
        def forward(self, rows):
            return place_disks(rows, size, size)

    rng = np.random.default_rng(1)
    n = 10  # clicks per map
    yx = rng.uniform(0, size - 1, (n, 2))
    pts = np.full((2, 2 * points, 3), -1, np.float32)
    pts[0, :n, :2] = yx
    pts[1, :n, :2] = np.stack([yx[:, 0], flipped_x(yx[:, 1], size)], 1)
    rows = np.empty((1, 2, 2 * points, 2 * RADIUS + 2, 3), np.float32)
    fill_disk_rows(rows, yx, [True] * n, RADIUS, size)
    rows = rows[0]  # (2, 2P, K, 3): the batch of two the flip makes
    sessions = {}
    for name, module, arg in (("old", Old(), pts), ("new", New(), rows)):
        path = tmp / f"{name}.onnx"
        torch.onnx.export(module, (torch.from_numpy(arg),), str(path), input_names=["x"], output_names=["d"],
                          opset_version=17, dynamo=False)
        sessions[name] = (ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), arg)
    same = np.array_equal(sessions["old"][0].run(None, {"x": pts})[0].astype(bool),
                          sessions["new"][0].run(None, {"x": rows})[0].astype(bool))
    times = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, (sess, arg) in sessions.items():
            t = time.perf_counter()
            sess.run(None, {"x": arg})
            times[name].append(1e3 * (time.perf_counter() - t))
    out = {name: _percentiles(ms) for name, ms in times.items()}
    out["clicks"], out["same_disks_on_these_clicks"] = n, bool(same)
    print(f"\n## 3b. graph: drawing the disks of a flip batch (2 x {2 * points} rows, {n} clicks), S = {size}, "
          f"ONNX Runtime CPU, {repeats} interleaved runs")
    print("| recipe | p50 ms | p99 ms |\n|---|---|---|")
    for name in ("old", "new"):
        print(f"| {name} | {out[name]['p50_ms']:.3f} | {out[name]['p99_ms']:.3f} |")
    return out


def model_cost(old_model: Path, repeats: int) -> dict:
    """Part 3c: a whole forward of an old (contract 2) ONNX file against the new default model, interleaved."""
    import onnxruntime as ort

    import cfr_runtime
    from cfr_runtime.backends.ort import read_contract
    from cfr_runtime.contract import Contract

    new_path = Path(cfr_runtime.default_model())
    new = ort.InferenceSession(str(new_path), providers=["CPUExecutionProvider"])
    old = ort.InferenceSession(str(old_model), providers=["CPUExecutionProvider"])
    contract = read_contract(new, str(new_path))
    meta = Contract.from_json(old.get_modelmeta().custom_metadata_map["cfr_icl.contract"])
    s, p = contract.input_size, contract.max_points
    if meta.input_size != s or meta.max_points != p:
        raise SystemExit(f"--old-model has S={meta.input_size}, P={meta.max_points}; the default has S={s}, P={p}")
    rng = np.random.default_rng(2)
    image = rng.random((1, 3, s, s), dtype=np.float32)
    prev = np.zeros((1, 1, s, s), np.float32)
    yx = np.stack([rng.integers(0, 480, 6), rng.integers(0, 640, 6)], 1).astype(np.float64)
    pos = np.array([True, False] * 3)
    roi = (0, 479, 0, 639)
    points = np.full((1, 2 * p, 3), -1, np.float32)
    net = net_clicks(yx, roi, s)
    points[0, :3] = np.c_[net[pos], np.arange(0, 6, 2)]
    points[0, p:p + 3] = np.c_[net[~pos], np.arange(1, 6, 2)]
    rows = np.empty(contract.disk_rows_shape, np.float32)
    times = {"old": [], "new": [], "new_host": []}
    for _ in range(repeats):
        t = time.perf_counter()
        old.run(None, {"image": image, "prev_mask": prev, "points": points})
        times["old"].append(1e3 * (time.perf_counter() - t))
        t = time.perf_counter()
        write_disk_rows(rows, yx, pos, roi, s, contract.disk_radius)
        t1 = time.perf_counter()
        new.run(None, {"image": image, "prev_mask": prev, "disk_rows": rows})
        times["new"].append(1e3 * (time.perf_counter() - t))
        times["new_host"].append(1e3 * (t1 - t))
    out = {name: _percentiles(ms) for name, ms in times.items()}
    out["old_model"], out["new_model"] = str(old_model), str(new_path.relative_to(ROOT))
    print(f"\n## 3c. whole forward, S = {s}, 6 clicks, {repeats} interleaved runs: old file (float32 disks in the "
          "graph) vs new default (host rows + placing)")
    print("| forward | p50 ms | p99 ms |\n|---|---|---|")
    for name, label in (("old", "old graph"), ("new", "new: host rows + graph"), ("new_host", "of which host rows")):
        print(f"| {label} | {out[name]['p50_ms']:.3f} | {out[name]['p99_ms']:.3f} |")
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--max-side", type=int, default=4000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official", type=Path, default=None, help="official isegm checkout (part 2)")
    ap.add_argument("--official-maps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=300, help="timed calls per row of part 3 (>= 100 for p99)")
    ap.add_argument("--points", type=int, default=24)
    ap.add_argument("--old-model", type=Path, default=None, help="a contract-2 ONNX file of the default (part 3c)")
    ap.add_argument("--no-cost", action="store_true", help="skip part 3")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    if args.repeats < 100 and not args.no_cost:
        ap.error("--repeats must be >= 100 (p99 is reported)")
    out_dir = args.out or Path(tempfile.mkdtemp(prefix="disk_rounding_"))
    targets = [out_dir / "disk_rounding.json", out_dir / "disk_rounding.md"]
    if not args.overwrite and any(p.exists() for p in targets):
        ap.error(f"{out_dir} already has disk_rounding.json/.md; pass --overwrite to replace them")
    result = {**start_record(), "rounding": rounding(args.samples, args.size, args.max_side, args.seed)}
    if args.official:
        result["official"] = official_check(args.official, args.official_maps, args.size, args.seed)
    if not args.no_cost:
        result["host_cost"] = host_cost(args.size, args.points, args.repeats)
        with tempfile.TemporaryDirectory() as tmp:
            result["graph_cost"] = graph_cost(args.size, args.points, args.repeats, Path(tmp))
        if args.old_model:
            result["model_cost"] = model_cost(args.old_model, args.repeats)
    result["load_average_end"] = list(os.getloadavg())
    write_results(out_dir / "disk_rounding", result, render_md(result), show=False)
    return result


def render_md(r: dict) -> str:
    ro = r["rounding"]
    lines = ["# Click disks: official float64 decision vs the previous float32 graphs vs host rows", "",
             f"Command: `{r['command']}`  ", f"Machine: {r['machine']}, {r['cpu_count']} cores; load average "
             f"{r['load_average_start'][0]:.2f} at the start, {r['load_average_end'][0]:.2f} at the end.", "",
             f"## Rounding ({ro['samples']} random integer clicks in ROIs up to {ro['max_side']} px, S = {ro['size']})",
             "", "| disk | previous float32 graphs: disks (pixels) differing | host rows: disks differing |",
             "|---|---|---|"]
    for name in ("plain", "flip"):
        lines.append(f"| {name} | {ro[f'{name}_old_differs']} ({100 * ro[f'{name}_old_differs'] / ro['samples']:.3f} %)"
                     f" ({ro[f'{name}_old_pixels']}) | {ro[f'{name}_host_differs']} |")
    if "official" in r:
        o = r["official"]
        lines += ["", f"## Against the official DistMaps ({o['maps']} maps of {o['clicks_per_map']} float64 clicks,"
                  f" {o['checkout']})", "", f"Host rows differ on **{o['host_differs']}** maps; float32 centres "
                  f"differ on {o['float32_differs']}."]
    if "host_cost" in r:
        lines += ["", "## Cost: host disk rows per forward", "", "| clicks | p50 us | p99 us | calls |",
                  "|---|---|---|---|"]
        lines += [f"| {n} | {1e3 * v['p50_ms']:.1f} | {1e3 * v['p99_ms']:.1f} | {v['samples']} |"
                  for n, v in r["host_cost"].items()]
        g = r["graph_cost"]
        lines += ["", f"## Cost: drawing the disks in the graph (flip batch, {g['clicks']} clicks, ONNX Runtime "
                  "CPU)", "", "| recipe | p50 ms | p99 ms | runs |", "|---|---|---|---|"]
        lines += [f"| {k} | {g[k]['p50_ms']:.3f} | {g[k]['p99_ms']:.3f} | {g[k]['samples']} |" for k in ("old", "new")]
    if "model_cost" in r:
        m = r["model_cost"]
        lines += ["", f"## Cost: whole forward, `{m['old_model']}` (old) vs `{m['new_model']}` (new)", "",
                  "| forward | p50 ms | p99 ms | runs |", "|---|---|---|---|"]
        for k, label in (("old", "old graph"), ("new", "new: host rows + graph"), ("new_host", "of which host rows")):
            lines.append(f"| {label} | {m[k]['p50_ms']:.3f} | {m[k]['p99_ms']:.3f} | {m[k]['samples']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
