"""Time one command and record it as a result: wall time, exit status, the machine and its load average at the
start and the end, the exact command, the commit, and the last lines of its output.

    python bench/timed.py --name tests_full -o bench/results/timings -- python3 -m pytest -q
    python bench/timed.py --name export_vit_base_448 -o bench/results/timings -- \\
        cfr-export out/vitb_random.pth -o out/vitb --fp16 --verify-seed 1234 --overwrite

Why: the docs quote how long the main job, the test suite, an export or a compile takes. On this workplace's
shared 2-core CPU the same command runs several times slower when other jobs hold the cores, so a duration
is only a figure together with the load it was taken under and the command that reproduces it; this script
writes all three into `<out>/<name>.json` and `<name>.md` (never replacing them without --overwrite), so every
such figure in README.md and docs/ has a file behind it (docs/figures.md).

The command's output is passed through as it runs and its last lines (where `cfr-export` prints its max
differences, pytest its summary) are kept in the record. The script exits with the command's status.
"""

from __future__ import annotations

import datetime
import json
import shlex
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.machine import describe, machine  # noqa: E402
from cfr_runtime.cli_options import command, option, out_option, overwrite_option, refuse_existing  # noqa: E402

TAIL_LINES = 40


def _commit() -> str | None:
    """HEAD, with "+changes" when the checkout has uncommitted changes (the timing then includes them)."""
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    if head.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           capture_output=True, text=True).stdout.strip()
    return head.stdout.strip() + ("+changes" if dirty else "")


def time_command(argv: list[str], tail_lines: int = TAIL_LINES) -> dict:
    """Run `argv` in the checkout, echoing its output, and return the record (without writing it)."""
    commit = _commit()  # before the command runs: the checkout it ran from
    start, t0 = machine(), time.perf_counter()
    tail: deque[str] = deque(maxlen=tail_lines)
    try:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace")
    except OSError as exc:
        from cfr_runtime.errors import InputError

        raise InputError(f"cannot start {argv[0]!r}: {exc.strerror or exc}") from exc
    assert proc.stdout is not None
    for line in proc.stdout:
        sys.stdout.write(line)
        sys.stdout.flush()
        tail.append(line.rstrip("\n"))
    returncode = proc.wait()
    seconds = time.perf_counter() - t0
    end = machine()
    return {"command": shlex.join(argv), "seconds": round(seconds, 1), "minutes": f"{int(seconds // 60)}:"
            f"{int(seconds % 60):02d}", "returncode": returncode, "machine": {"start": start, "end": end},
            "commit": commit, "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "output_tail": list(tail)}


def markdown(name: str, record: dict) -> str:
    m = record["machine"]
    lines = [f"# {name}: {record['seconds']} s ({record['minutes']}), exit status {record['returncode']}", "",
             f"Machine: {describe(m['start'], m['end'])}; {record['date']}; commit {record['commit']}.", "",
             "Command (run from the checkout):", "", "```bash", record["command"], "```", "",
             "Last lines of its output:", "", "```text", *record["output_tail"], "```", ""]
    return "\n".join(lines)


@command("timed.py")
@option("--name", required=True, metavar="NAME", help="Result name: writes NAME.json and NAME.md in --out.")
@out_option(default=ROOT / "out" / "bench", shown="out/bench",
            help="Folder for the JSON + Markdown (pass bench/results/timings to add a committed result).")
@overwrite_option("NAME.json / NAME.md in --out")
@click.argument("argv", nargs=-1, required=True, metavar="-- COMMAND...")
def cli(name: str, out: Path, overwrite: bool, argv: tuple[str, ...]) -> dict:
    """Run COMMAND (after `--`) in the checkout and record its wall time with the machine, its load average at
    the start and the end, the command and the last lines of its output; see the module docstring of
    bench/timed.py."""
    if "/" in name or name.startswith("."):
        raise click.BadParameter("a plain file name stem (no folders)", param_hint="--name")
    paths = [out / f"{name}.json", out / f"{name}.md"]
    if not overwrite:
        refuse_existing(paths, "pass --overwrite to replace it, or choose another --name")
    record = time_command(list(argv))
    out.mkdir(parents=True, exist_ok=True)
    paths[0].write_text(json.dumps(record, indent=1) + "\n")
    paths[1].write_text(markdown(name, record))
    print(f"timed.py: {record['command']} took {record['seconds']} s ({record['minutes']}), exit status "
          f"{record['returncode']}, on {describe(record['machine']['start'], record['machine']['end'])}; "
          f"wrote {paths[0]}", file=sys.stderr)
    if record["returncode"] != 0:
        sys.exit(record["returncode"] if 0 < record["returncode"] < 256 else 1)
    return record


def main(argv: list[str] | None = None) -> dict:
    """Run as from the command line (errors print `timed.py: error: ...` and exit 2); returns the record."""
    return cli.main(argv, standalone_mode=False)


if __name__ == "__main__":
    cli()
