"""The machine a timing was taken on: CPU model, the cores this process may use, and the load average, so that
every timing this project prints or commits says how busy the machine was (a shared 2-core machine at load 8
runs everything several times slower than the same machine idle)."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
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
