"""Ray Serve's two modes side by side: the routing overhead per click of `cfr-serve --ray` with Serve's default
Python HTTP proxy against its high-throughput mode (HAProxy ingress + RAY_SERVE_THROUGHPUT_OPTIMIZED=1); and,
with `--modes default,fast,fast-commit-after`, the high-throughput mode with a click's record commit sent after
its forward instead of beside it (what running it beside saves, measured in the same run).

Serve reads those variables once per process, at import, in the driver and in every process of the cluster, so
one cluster cannot hold both modes: this runs `bench/serve_cluster.py --setups 1 --skip-curve` in a fresh
subprocess (its own 2-node cluster) per round, alternating the modes (default, fast, default, fast, ...), so that
both see the same drift of the machine's load, with a pause between rounds for the last cluster's processes to
go. Each round measures >= 100 interleaved clicks against plain cfr-serve (the routing overhead: Ray's client
latency minus the app's own time, minus the same for plain cfr-serve). MODEL defaults to the bundled model.
Prints and writes, per mode, every
round's overhead, its median and the breakdown of the median round; and each mode's median over fast's.

    python bench/serve_cluster_modes.py --rounds 3 --tag modes_cpu_tiny -o bench/results/ray
    python bench/serve_cluster_modes.py --rounds 3 --modes fast,fast-commit-after --tag commit_cpu_tiny

Writes <tag>.json/.md under --out (default out/bench/ray; existing files are never replaced without --overwrite).
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import command_line, describe, machine, write_results  # noqa: E402
from cfr_runtime import default_model  # noqa: E402
from cfr_runtime.cli_options import (  # noqa: E402
    POSITIVE_INT,
    command,
    dataset_option,
    model_argument,
    option,
    out_option,
    overwrite_option,
    refuse_existing,
)

# mode: (serve_cluster.py --serve-mode, --commit)
MODES = {"default": ("default", "beside"), "fast": ("fast", "beside"), "fast-commit-after": ("fast", "after")}


def one_round(mode: str, model: Path, dataset: Path, single_clicks: int, work: Path) -> dict:
    """One serve_cluster.py run in `mode`: its overhead section (and the environment it recorded)."""
    tag = f"{mode}_{int(time.time() * 1000)}"
    serve_mode, commit = MODES[mode]
    cmd = [sys.executable, str(ROOT / "bench" / "serve_cluster.py"), str(model),
           "--serve-mode", serve_mode, "--commit", commit, "--setups", "1", "--skip-curve", "--clients", "2",
           "--clicks", "2",
           "--single-clicks", str(single_clicks), "--batch-size", "1", "--dataset", str(dataset),
           "--tag", tag, "-o", str(work)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise click.ClickException(f"serve_cluster.py --serve-mode {serve_mode} --commit {commit} failed (exit "
                                   f"{done.returncode}):\n"
                                   + (done.stdout + done.stderr)[-3000:])
    r = json.loads((work / f"{tag}.json").read_text())
    o = r["overhead"]
    hidden = o["ray_breakdown_p50_ms"]["the commit's round trip, sent beside the forward (hidden)"]
    if (hidden > 0) != (commit == "beside"):  # never label a run with a mode its replicas did not run
        raise click.ClickException(f"mode {mode}: the replicas committed clicks {'beside' if hidden > 0 else 'after'} "
                                   f"their forward, not {commit} (p50 of x-cfr-early-commit-ms: {hidden} ms)")
    return {"mode": mode, "overhead_ms": o["routing_overhead_outside_app_p50_ms"],
            "raw_overhead_ms": o["routing_overhead_p50_ms"], "breakdown_ms": o["ray_breakdown_p50_ms"],
            "ray_click_ms": o["ray"]["click_ms"], "plain_click_ms": o["plain"]["click_ms"],
            "serve_env": r.get("ray_serve_env", {}), "click_commit": commit,
            "haproxy_processes": r.get("haproxy_processes"), "haproxy_servers": r.get("haproxy_servers"),
            "load_average": r["load_average"]}


@command("serve_cluster_modes.py")
@model_argument(required=False)
@dataset_option(default=ROOT.parent / "shared" / "data" / "GrabCut",
                help="Images for the client [default: ../shared/data/GrabCut; synthetic scenes if absent].")
@option("--rounds", type=POSITIVE_INT, default=3, show_default=True, help="Runs per mode (alternated).")
@option("--single-clicks", type=click.IntRange(min=100), default=120, show_default=True,
        help="Clicks per server in each run's overhead phase (p99 needs at least 100).")
@option("--pause-s", type=click.FloatRange(min=0), default=30.0, show_default=True,
        help="Pause between rounds, for the last cluster's processes to end.")
@option("--modes", "modes_arg", default="default,fast", show_default=True,
        help="Comma-separated modes, alternated in each round: " + ", ".join(MODES) + " (it needs fast).")
@option("--tag", default="modes", show_default=True, help="Result file name: <tag>.json/.md.")
@out_option(default=ROOT / "out" / "bench" / "ray", shown="out/bench/ray",
            help="Folder for the results (pass bench/results/ray to update the committed results on purpose).")
@overwrite_option("<tag>.json/.md in --out")
def main(model: Path | None, dataset: Path, rounds: int, single_clicks: int, pause_s: float, modes_arg: str,
         tag: str, out: Path, overwrite: bool) -> None:
    """Routing overhead of cfr-serve --ray in Ray Serve's default and high-throughput modes, alternated."""
    modes = list(dict.fromkeys(m.strip() for m in modes_arg.split(",") if m.strip()))
    if "fast" not in modes or any(m not in MODES for m in modes):
        raise click.BadParameter(f"comma-separated modes out of {', '.join(MODES)}, fast among them; got "
                                 f"{modes_arg!r}", param_hint="--modes")
    stem = out / tag
    if not overwrite:
        refuse_existing([stem.with_suffix(".json"), stem.with_suffix(".md")],
                        "pass --overwrite to replace it, or choose another --out or --tag")
    model = model or default_model()  # the bundled batch-1 graph: no export per round (--batch-size 1 needs no axis)
    started = machine()
    work = Path(tempfile.mkdtemp(prefix="serve_modes_"))
    runs = []
    for i in range(rounds):
        for mode in modes:
            if runs:
                time.sleep(pause_s)
            print(f"round {i + 1}/{rounds}, {mode} ...", file=sys.stderr)
            runs.append(one_round(mode, model, dataset, single_clicks, work))
    result = {"machine": f"{platform.machine()}, {started['cpu']}, {started['cores']} usable cores",
              "python": platform.python_version(), "load_average": {"start": started, "end": machine()},
              "command": command_line(), "runs": runs,
              "modes": {}}
    for mode in modes:
        mine = [r for r in runs if r["mode"] == mode]
        values = [r["overhead_ms"] for r in mine]
        median_run = sorted(mine, key=lambda r: r["overhead_ms"])[len(mine) // 2]
        result["modes"][mode] = {"overhead_ms": values, "median_ms": round(float(np.median(values)), 2),
                                 "breakdown_of_median_run_ms": median_run["breakdown_ms"],
                                 "serve_env": mine[0]["serve_env"], "click_commit": mine[0]["click_commit"]}
    m = result["modes"]
    result["ratio_over_fast"] = {mode: round(m[mode]["median_ms"] / m["fast"]["median_ms"], 2)
                                 for mode in modes if mode != "fast"}
    write_results(stem, result, markdown(result))


def markdown(r: dict) -> str:
    la = r["load_average"]
    lines = ["# cfr-serve --ray: routing overhead per click in Ray Serve's modes", "",
             f"Machine: {describe(la['start'], la['end'])} ({r['machine']}).", "", f"`{r['command']}`", "",
             "Each run: a fresh 2-node cluster on loopback, 1 session replica behind the gateway, one client, "
             "clicks interleaved with plain cfr-serve; overhead = (Ray click latency - its server_ms) - (the same "
             "for plain cfr-serve), p50. Modes alternated.", "",
             "| mode | Serve environment | a click's record commit | overhead per click, p50, each run | median |",
             "|---|---|---|---|---|"]
    for mode, x in r["modes"].items():
        env = x["serve_env"] or "defaults (Python HTTP proxy)"
        runs = ", ".join(f"{v:+.2f} ms" for v in x["overhead_ms"])
        lines.append(f"| {mode} | {env} | {x['click_commit']} its forward | {runs} | **{x['median_ms']:+.2f} ms** |")
    over = "; ".join(f"{mode} over fast: {v}x" for mode, v in r["ratio_over_fast"].items())
    lines += ["", f"Medians, {over}. Target: <= 5 ms.", "",
              "Where the time goes in each mode's median run (p50 per click, from the gateway's and replica's "
              "timing headers):", ""]
    for mode, x in r["modes"].items():
        parts = "; ".join(f"{k}: {v:.2f} ms" for k, v in x["breakdown_of_median_run_ms"].items() if v is not None)
        lines.append(f"- {mode}: {parts}")
    haps = [run["haproxy_processes"] for run in r["runs"] if run["mode"] == "fast"]
    lines += ["", f"HAProxy processes seen during each fast run: {haps}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
