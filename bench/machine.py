"""The machine a timing was taken on: CPU model, the cores this process may use, and the load average, so that
every timing this project prints or commits says how busy the machine was (a shared 2-core machine at load 8
runs everything several times slower than the same machine idle).

Also the rest of what every bench script records and writes the same way: the command line it was started
with, and its <stem>.json/.md pair (`write_results`), so that no script keeps its own copy of either."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from cfr_runtime.fileio import commit, staged_file


def cpu_name() -> str:
    """The CPU model (Linux /proc/cpuinfo), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """CPU model, usable cores and the 1-minute load average now (call again at the end of a run)."""
    return {"cpu": cpu_name(), "cores": len(os.sched_getaffinity(0)), "load_average": round(os.getloadavg()[0], 2)}


def describe(start: dict, end: dict | None = None) -> str:
    """'AMD EPYC 7B13, 2 cores, load average 0.3 -> 4.1' (one line for a report)."""
    load = f"{start['load_average']:.1f}" + (f" -> {end['load_average']:.1f}" if end else "")
    return f"{start['cpu']}, {start['cores']} cores, load average {load}"


def start_record() -> dict:
    """command, machine (CPU model), cpu_count and load_average_start (all three averages): the header that
    disk_rounding.py and parity_compare.py open their results with (their committed results and Markdown read
    these keys); the caller adds load_average_end (`list(os.getloadavg())`) when the run is done."""
    return {"command": " ".join(["python", *sys.argv]), "machine": cpu_name(), "cpu_count": os.cpu_count(),
            "load_average_start": list(os.getloadavg())}


def command_line() -> str:
    """'python bench/x.py --flag value': how this run was started, with the script as it was given (relative
    when it was), in / separators, for the "command" of a result."""
    return "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])


def write_results(stem: Path, result: dict, md: str, show: bool = True) -> None:
    """Write <stem>.json (`result`, indent 1) and <stem>.md (`md`), making the folder if needed, each whole or
    not at all (cfr_runtime.fileio.staged_file: a kill mid-write leaves the earlier file, never half of one);
    then print the Markdown (unless show=False) and where the two files went."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    for path, text in ((stem.with_name(stem.name + ".json"), json.dumps(result, indent=1)),
                       (stem.with_name(stem.name + ".md"), md)):
        with staged_file(path) as staged:
            staged.write_text(text)
            commit(staged, path)
    if show:
        print(md)
    print(f"wrote {stem}.json and {stem.name}.md")
