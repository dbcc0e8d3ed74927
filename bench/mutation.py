"""Mutation testing of the core modules with mutmut: one command, per-module test selection, a report.

    nice -n 10 python bench/mutation.py                       # every module in bench/mutation.toml
    nice -n 10 python bench/mutation.py --modules zoom,clicker
    nice -n 10 python bench/mutation.py --out bench/results/mutation   # the committed report (deliberately)

Why mutmut (3.x): it rewrites each function once into a trampoline that switches mutants by an environment
variable, so a mutant costs a fork of a warm test process, not a re-import of numpy/onnxruntime/torch; it
records which tests execute which function and runs, per mutant, only those; its fork server keeps torch
out of the forking process. cosmic-ray rewrites the file on disk and starts the test command afresh for each
mutant (seconds of imports each), which a 2-core machine cannot afford over ~1,000 mutants.

Each module runs in its own scratch copy (--workdir, outside the repository) with its own test selection
(bench/mutation.toml), so a module's mutants never pull in another module's slow tests. Test models are
exported once per run ($CFR_TEST_MODELS). The report (JSON + Markdown) lists, per module, killed / survived /
timed-out mutants, the score over non-equivalent mutants against the target, every survivor with its diff,
and the equivalent mutants with their reasons. Exit status 1 when a module misses the target.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "bench" / "mutation.toml"
DEFAULT_WORKDIR = Path(os.environ.get("TMPDIR", "/tmp")) / "cfr-mutation"


def _toml_list(values: list[str]) -> str:
    return "[" + ", ".join(json.dumps(v) for v in values) + "]"


def _pytest_ini() -> str:
    """The repository's [tool.pytest.ini_options], so the scratch copy runs the tests as the suite does."""
    opts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    lines = ["[tool.pytest.ini_options]"]
    for key, value in opts.items():
        lines.append(f"{key} = {_toml_list(value) if isinstance(value, list) else json.dumps(value)}")
    return "\n".join(lines) + "\n"


def prepare(name: str, spec: dict, run: dict, workdir: Path) -> Path:
    """A fresh scratch copy of the module's package and the tests, with a [tool.mutmut] for this module."""
    here = workdir / name
    shutil.rmtree(here, ignore_errors=True)
    here.mkdir(parents=True)
    package = spec["source"].split("/")[0]
    shutil.copytree(ROOT / package, here / package, ignore=IGNORE)
    refresh_tests(spec, run, here)
    return here


IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", ".hypothesis")


def refresh_tests(spec: dict, run: dict, here: Path, config: bool = True) -> None:
    """The repository's tests as they are now and (config) the module's [tool.mutmut].

    --survivors copies the tests only: mutmut resets every verdict of a module whose test selection changed, so
    a rerun keeps the first run's selection, and tests for survivors go into files it already selects (the
    tests/test_mut_*.py files; mutmut finds the new tests in them and records which functions they reach)."""
    package = spec["source"].split("/")[0]
    shutil.rmtree(here / "tests", ignore_errors=True)
    shutil.copytree(ROOT / "tests", here / "tests", ignore=IGNORE)
    if not config:
        return
    selection = list(spec["tests"])
    for test in spec.get("exclude_tests", []):
        selection += ["--deselect", test]
    (here / "conftest.py").write_text(ORDER_PLUGIN.format(files=json.dumps(_test_files(spec["tests"]))))
    (here / "pyproject.toml").write_text(
        "[tool.mutmut]\n"
        "also_copy = [\"conftest.py\"]\n"
        f"source_paths = [\"{package}/\"]\n"
        f"only_mutate = [\"{spec['source']}\"]\n"
        f"pytest_add_cli_args_test_selection = {_toml_list(selection)}\n"
        "pytest_add_cli_args = [\"-p\", \"no:cacheprovider\"]\n"
        "process_isolation = \"forkserver\"\n"
        "use_git_change_detection = false\n"
        f"timeout_constant = {float(run['timeout_constant'])}\n"
        f"timeout_multiplier = {float(run['timeout_multiplier'])}\n\n" + _pytest_ini())


def _test_files(tests: list[str]) -> list[str]:
    """The selection's files in the order the module lists them (its own fast tests first)."""
    return list(dict.fromkeys(t.split("::")[0] for t in tests))


# The scratch copy's root conftest.py. mutmut hands each mutant's covering tests to pytest as a set (a random
# order per process) with -x; this puts them back in the module's order (bench/mutation.toml lists its own
# fast tests first) and, within a file, fastest first by mutmut's measured durations, so a killed mutant costs
# its cheapest killing test instead of whichever slow end-to-end test the hash order drew first. Files stay
# together, so a module-scoped fixture is set up once.
ORDER_PLUGIN = '''"""Written by bench/mutation.py: runs each mutant's tests in the module's order, fastest first."""
import json
from pathlib import Path

FILES = {files}


def pytest_collection_modifyitems(session, config, items):
    try:
        durations = json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"]
    except (OSError, ValueError, KeyError):
        durations = {{}}
    rank = {{f: i for i, f in enumerate(FILES)}}
    kills = _kills_so_far()

    def key(item):
        path = item.nodeid.split("::")[0]
        cost = kills.get(item.nodeid)
        return cost is None, cost or 0.0, rank.get(path, len(rank)), durations.get(item.nodeid, 0.0)

    items.sort(key=key)


def _kills_so_far():
    """The tests that killed earlier mutants of the same function in this run (mutmut-costs.jsonl), with the mean
    CPU seconds those kills cost: the mutants of one function tend to die by the same tests, so they go first,
    the cheapest killer first (the order never changes a verdict: a mutant survives only if every test passes)."""
    import os
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if "__mutmut_" not in mutant:
        return {{}}
    function = mutant.rsplit("__mutmut_", 1)[0]
    kills = {{}}
    try:
        lines = Path(os.environ.get("CFR_MUTANT_COSTS", "mutmut-costs.jsonl")).read_text().splitlines()
    except OSError:
        return kills
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:  # a line being written by the other worker
            continue
        if row.get("killer") and row["mutant"].rsplit("__mutmut_", 1)[0] == function:
            kills.setdefault(row["killer"], []).append(row.get("cpu", 0.0))
    return {{test: sum(cpu) / len(cpu) for test, cpu in kills.items()}}


def pytest_sessionfinish(session, exitstatus):
    """One line per mutant in mutmut-costs.jsonl: its CPU seconds since mutmut forked its process (a forked
    child's counters start at zero; the commands its tests ran are included), the tests' wall seconds and the
    tests run, so the report can say which mutants and functions cost the run."""
    import os, resource, time
    mutant = os.environ.get("MUTANT_UNDER_TEST", "")
    if not mutant or mutant in ("fail", "stats", "list_all_tests") or mutant.startswith("mutant_generation"):
        return
    cpu = sum(getattr(resource.getrusage(w), f) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
              for f in ("ru_utime", "ru_stime"))
    line = json.dumps({{"mutant": mutant, "cpu": round(cpu, 3), "wall": round(time.time() - _START[0], 3),
                       "tests": session.testscollected, "ran": _RAN[0], "killer": _KILLER[0], "exit": int(exitstatus)}})
    path = Path(os.environ.get("CFR_MUTANT_COSTS", "mutmut-costs.jsonl"))
    with path.open("a") as f:  # one short write per line: appends from two workers do not interleave
        f.write(line + "\\n")


_START, _RAN, _KILLER = [0.0], [0], [None]


def pytest_sessionstart(session):
    import time
    _START[0] = time.time()


def pytest_runtest_logreport(report):
    if report.when == "call":
        _RAN[0] += 1
    if report.failed and _KILLER[0] is None:
        _KILLER[0] = report.nodeid
'''


def export_models(names: set[str], folder: Path) -> None:
    """The test models the selected modules need, exported once (tests/conftest.py defines them)."""
    sys.path.insert(0, str(ROOT))
    from tests.conftest import export_test_model

    for name in sorted(names):
        out = folder / name
        if not out.is_dir():  # exported beside, then renamed: a concurrent run never sees half an export
            tmp = folder / f".{name}.{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            export_test_model(name, tmp)
            try:
                tmp.rename(out)
            except OSError:  # another run finished the same export first
                shutil.rmtree(tmp, ignore_errors=True)


_CWD_LOCK = threading.RLock()


@contextmanager
def _cwd(path: Path):
    """mutmut reads its scratch copy from the working directory, which the lanes' threads share: one at a time."""
    with _CWD_LOCK:
        old = Path.cwd()
        os.chdir(path)
        try:
            yield
        finally:
            os.chdir(old)


def _mutmut(name: str, args: list[str], here: Path, env: dict, log_name: str, fresh: bool = False) -> float:
    """`mutmut run ARGS` in the module's scratch copy; returns the CPU seconds it used (its own and every process
    it reaped: the fork server and each mutant's test process), measured per run so concurrent lanes stay apart.

    fresh: a first run, whose stats run executes every selected test on the unmutated code and stops mutmut if
    one fails; mutmut's "clean tests" run that follows would run them all again (minutes for the export
    modules), so it is skipped (SKIP_CLEAN). Reruns (--survivors, --resume) keep it: their stats are loaded."""
    shown = " ".join(args[:4]) + (f" ... ({len(args) - 2} mutants)" if len(args) > 4 else "")
    cmd = [sys.executable, "-c", SKIP_CLEAN, "run", *args] if fresh else ["mutmut", "run", *args]
    return _timed(name, f"mutmut run {shown}", cmd, here, env, log_name)


SKIP_CLEAN = """
import sys
from mutmut.workers.isolation import MutantRunner
for runner in MutantRunner.__subclasses__():
    runner.run_clean_tests = lambda self, tests: 0  # the stats run just ran them, and passed
from mutmut.__main__ import cli
sys.argv[0] = "mutmut"
cli()
"""


def _timed(name: str, what: str, cmd: list[str], here: Path, env: dict, log_name: str) -> float:
    print(f"[{name}] {what}  (in {here})", flush=True)
    with (here / log_name).open("w") as log:
        proc = subprocess.Popen(cmd, cwd=here, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        print(f"[{name}] {cmd[0]} exited {proc.returncode}; see {here / log_name}", file=sys.stderr)
    return usage.ru_utime + usage.ru_stime


# mutmut's own first step (copy the sources, write every mutant into the trampolined copy, the .meta with no
# verdicts), run alone so that the runner knows the mutants' names before testing any: `mutmut run` finds the
# copy up to date afterwards and keeps it (its mtime check), so nothing is generated twice.
GENERATE = """
import os
from mutmut.__main__ import (copy_also_copy_files, copy_src_dir, create_mutants, setup_source_paths,
                             store_lines_covered_by_tests)
from mutmut.mutation.trampoline import set_mutant_under_test
set_mutant_under_test("mutant_generation")
os.makedirs("mutants", exist_ok=True)
copy_src_dir(); copy_also_copy_files(); setup_source_paths(); store_lines_covered_by_tests(); create_mutants(1)
"""


def generate(name: str, here: Path, env: dict) -> float:
    return _timed(name, "generating the mutants", [sys.executable, "-c", GENERATE], here, env, "mutmut-generate.log")


def verdicts(spec: dict, here: Path) -> dict[str, int | None]:
    """mutmut's exit code (None: not run yet) of every generated mutant of the module's functions
    (bench/mutation.toml `functions`, default all), from the scratch copy's .meta."""
    meta = json.loads((here / "mutants" / (spec["source"] + ".meta")).read_text())
    globs = spec.get("functions", ["*"])
    return {k: v for k, v in meta["exit_code_by_key"].items() if any(fnmatch.fnmatchcase(k, g) for g in globs)}


def in_scope(spec: dict, here: Path) -> list[str]:
    """Every generated mutant of the module's functions."""
    return sorted(verdicts(spec, here))


def listed_equivalents(spec: dict, here: Path, mutants: list[str]) -> list[str]:
    """The mutants whose function and mutated line are listed as equivalent in bench/mutation.toml, matched
    exactly as collect() matches survivors: a listing whose line no longer occurs matches nothing."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant

    listed = {(e["function"], e["mutant"]) for e in spec.get("equivalent", [])}
    functions = {f for f, _ in listed}
    found = []
    with _cwd(here):
        for mutant in mutants:
            function = _function(mutant)
            if function in functions:
                added = " / ".join(_added_lines(get_diff_for_mutant(mutant, path=spec["source"])))
                if (function, added) in listed:
                    found.append(mutant)
    return found


def mark_survived(spec: dict, here: Path, mutants: list[str]) -> None:
    """Record `mutants` as survivors without running them (exit code 0 in mutmut's .meta): collect() then
    reports them as the equivalents they are listed as."""
    path = here / "mutants" / (spec["source"] + ".meta")
    meta = json.loads(path.read_text())
    for m in mutants:
        meta["exit_code_by_key"][m] = 0
    path.write_text(json.dumps(meta))


def _commit() -> str:
    """The repository's commit, with '+dirty' when tracked files differ from it (the copy tested them)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def _added_lines(diff: str) -> list[str]:
    return [line[1:].strip() for line in diff.splitlines() if line.startswith("+") and not line.startswith("+++")]


def _function(mutant: str) -> str:
    """'cfr_runtime.zoom.x_expand_box__mutmut_3' -> 'expand_box'; methods -> 'Class.method'."""
    key = mutant.rsplit(".", 1)[-1].split("__mutmut_")[0]
    if key.startswith("xǁ"):
        return key[2:].replace("ǁ", ".")
    return key[2:]


def collect(name: str, spec: dict, here: Path) -> dict:
    """Statuses of the module's in-scope mutants; diffs of the survivors; equivalents applied."""
    from mutmut.mutation.diff_apply import get_diff_for_mutant
    from mutmut.stats import status_by_exit_code

    globs = spec.get("functions", ["*"])
    statuses = {k: status_by_exit_code[v] for k, v in verdicts(spec, here).items()}
    equivalent = {(e["function"], e["mutant"]): e["reason"] for e in spec.get("equivalent", [])}
    survivors, equivalents, counts = [], [], {}
    with _cwd(here):
        for mutant, status in sorted(statuses.items()):
            if status in ("survived", "no tests", "suspicious"):
                diff = get_diff_for_mutant(mutant, path=spec["source"])
                function, added = _function(mutant), " / ".join(_added_lines(diff))
                reason = equivalent.get((function, added))
                if reason is not None:
                    status = "equivalent"
                    equivalents.append({"mutant": mutant, "function": function, "line": added, "reason": reason})
                else:
                    survivors.append({"mutant": mutant, "status": status, "function": function, "diff": diff})
            counts[status] = counts.get(status, 0) + 1
    total = len(statuses)
    detected = counts.get("killed", 0) + counts.get("timeout", 0) + counts.get("segfault", 0)
    # "not checked": a run stopped before it reached them (the report says so); scored over the mutants tested
    scored = total - counts.get("equivalent", 0) - counts.get("not checked", 0)
    # the selection the run used (its scratch copy's [tool.mutmut]; reruns keep it), which may predate the toml's
    used = tomllib.loads((here / "pyproject.toml").read_text())["tool"]["mutmut"]["pytest_add_cli_args_test_selection"]
    costs = {}
    if (here / "mutmut-costs.jsonl").is_file():  # the last line per mutant (a rerun appends)
        for line in (here / "mutmut-costs.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row["mutant"] in statuses:
                costs[row["mutant"]] = row
    return {"module": name, "source": spec["source"], "functions": globs, "scope": spec.get("scope", ""),
            "mutant_cpu_seconds": sum(r["cpu"] for r in costs.values()), "mutants_costed": len(costs),
            "costliest": sorted(costs.values(), key=lambda r: -r["cpu"])[:5],
            "tests": spec["tests"], "selection_used": used,
            "exclude_tests": spec.get("exclude_tests", []), "mutants": total, "counts": counts,
            "score": detected / scored if scored else 1.0, "survivors": survivors, "equivalents": equivalents}


def unchecked(spec: dict, here: Path) -> list[str]:
    """In-scope mutants of an interrupted run that have no verdict yet."""
    return sorted(k for k, v in verdicts(spec, here).items() if v is None)


def markdown(report: dict) -> str:
    m = report["meta"]
    cpu = sum(r.get("cpu_seconds", 0) for r in report["modules"])
    wall = sum(r.get("seconds", 0) for r in report["modules"])
    out = [f"# Mutation testing: {', '.join(r['module'] for r in report['modules'])}", "",
           f"Report command: `{m['command']}` at commit {m['commit']}; each module's own run command, commit and "
           "times are in the JSON (`modules[].command`).  ",
           f"mutmut {m['mutmut']}, {m['machine']}, mutants at once per module in the JSON; load average "
           f"{m['load_before']} before the report, each module's after its run in the JSON; {wall / 60:.1f} min wall, "
           f"{cpu / 60:.1f} CPU min over the modules' runs.", "",
           *([f"**Timed run**: this command took {m['seconds'] / 60:.1f} minutes from start to report ({m['lanes']} "
              f"lanes, mutants at once in each: {m['max_children']}), load average {m['load_before']} when it "
              f"started, {m['load_after']} at the end.", ""] if m.get("timed") and m.get("lanes") else []),
           f"Score = (killed + timed out) / (mutants - equivalent - not run); target {m['target']:.0%} per module.", "",
           "Minutes: wall time under the load of the moment; CPU minutes: what the module's run used, whatever the "
           "load (user + system time of mutmut and every test process it forked).", "",
           "Not run: mutants a run stopped before reaching (out of time); the score is over the mutants tested.", "",
           "| module | mutants | killed | timeout | survived | no tests | equivalent | not run | score | minutes | "
           "CPU min | commit |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["modules"]:
        c = r["counts"]
        out.append(f"| {r['source']} ({r['module']}) | {r['mutants']} | {c.get('killed', 0)} | {c.get('timeout', 0)} | "
                   f"{c.get('survived', 0)} | {c.get('no tests', 0)} | {c.get('equivalent', 0)} | "
                   f"{c.get('not checked', 0)} | "
                   f"{r['score']:.1%} | {r.get('seconds', 0) / 60:.1f} | {r.get('cpu_seconds', 0) / 60:.1f} | "
                   f"{r.get('commit', '?')} |")
    out += ["", "## Cost of a cold `--modules all`", "", *_cold_estimate(report["modules"])]
    scoped = [r for r in report["modules"] if r["functions"] != ["*"]]
    if scoped:
        out += ["", "## Modules scoped to some functions", ""]
        out += [f"- {r['source']} ({r['module']}): {', '.join(f'`{g}`' for g in r['functions'])}"
                + (f". {r['scope']}" if r.get("scope") else "") for r in scoped]
    stopped = [r for r in report["modules"] if r.get("interrupted") and not r.get("resumed")]
    if stopped:
        out += ["", "## Runs stopped before the end (out of time; their untested mutants are 'not run')", ""]
        out += [f"- {r['source']} ({r['module']}): {r['interrupted']}: `{r['command']}`" for r in stopped]
    resumed = [(r, x) for r in report["modules"] for x in r.get("resumed", [])]
    if resumed:
        out += ["", "## Interrupted runs continued (`--resume`; the table adds up the parts)", ""]
        out += [f"- {r['source']} ({r['module']}): {r.get('interrupted', '')}; continued with {x['mutants']} mutants, "
                f"{x['max_children']} at once, at commit {x['commit']}, {x['seconds'] / 60:.1f} min, "
                f"{x['cpu_seconds'] / 60:.1f} CPU min: `{x['command']}`" for r, x in resumed]
    reruns = [(r, x) for r in report["modules"] for x in r.get("reruns", [])]
    if reruns:
        out += ["", "## Reruns of survivors (`--survivors`, after tests were added for them)", ""]
        out += [f"- {r['source']}: {len(x['mutants'])} mutants at commit {x['commit']}, "
                f"{x['seconds'] / 60:.1f} min: `{x['command']}`" for r, x in reruns]
    costed = [r for r in report["modules"] if r.get("costliest")]
    if costed:
        out += ["", "## Where the CPU goes (round-5 runner: `mutmut-costs.jsonl`, each mutant's test process)", "",
                "| module | mutants costed | their CPU min | rest of the run (generation, stats run, mutmut) CPU min "
                "| costliest mutants (CPU s, tests run, killing test) |", "|---|---:|---:|---:|---|"]
        for r in costed:
            worst = "; ".join(f"`{c['mutant'].rsplit('.', 1)[-1]}` {c['cpu']:.1f} s, {c['ran']} tests, "
                              f"{(c['killer'] or 'survived').split('::')[-1]}" for c in r["costliest"][:3])
            out.append(f"| {r['module']} | {r['mutants_costed']} | {r['mutant_cpu_seconds'] / 60:.1f} | "
                       f"{(r.get('cpu_seconds', 0) - r['mutant_cpu_seconds']) / 60:.1f} | {worst} |")
    skipped = [r for r in report["modules"] if r.get("equivalent_not_run")]
    if skipped:
        out += ["", "Listed equivalents recorded without a run (`--run-equivalent` runs them): "
                + ", ".join(f"{r['module']} {r['equivalent_not_run']}" for r in skipped) + "."]
    for r in report["modules"]:
        if r["survivors"]:
            out += ["", f"## Survivors in {r['source']}", ""]
            for s in r["survivors"]:
                out += [f"- `{s['mutant']}` ({s['status']})", "", "```diff", s["diff"], "```", ""]
        if r["equivalents"]:
            out += ["", f"## Equivalent mutants in {r['source']}", ""]
            out += [f"- `{e['function']}`: `{e['line']}`: {e['reason']}" for e in r["equivalents"]]
    return "\n".join(out) + "\n"


def _cold_estimate(modules: list[dict]) -> list[str]:
    """The CPU minutes a cold run of every module would use, from each module's measured run, and the wall time
    that gives on 2 idle cores. A module whose run covered only part of its mutants (stopped, or a part whose CPU
    time was not measured) is scaled by mutants per CPU minute, and says so."""
    lines, total, scaled, missing = [], 0.0, [], []
    for r in modules:
        cpu = r.get("cpu_seconds", 0) / 60
        measured = r["mutants"] - r["counts"].get("not checked", 0) - r.get("cpu_unmeasured_mutants", 0)
        if cpu <= 0 or measured < max(10, r["mutants"] // 20):  # too few mutants to scale from
            missing.append(f"{r['module']} ({r['mutants']} mutants)")
            continue
        if measured < r["mutants"]:
            cpu *= r["mutants"] / measured
            scaled.append(f"{r['module']} ({measured} of {r['mutants']} mutants measured: {cpu:.1f})")
        total += cpu
    old = [r["module"] for r in modules if "equivalent_not_run" not in r and r.get("cpu_seconds", 0) > 0]
    lines.append(f"Sum of the modules' CPU minutes: {total:.1f}; on 2 idle cores (two lanes) a cold "
                 f"`python bench/mutation.py --modules all` is expected to take about {total / 2:.0f} minutes of wall "
                 "time (an estimate from these measured CPU times, not a timed run; the last module of each lane "
                 "runs alone, so the real figure is somewhat longer).")
    if old:
        lines += ["", "Measured with the runner before round 5 (mutmut's clean rerun and the listed equivalents "
                  "included, so these overstate what the current runner spends): " + ", ".join(old) + "."]
    if missing:
        lines += ["", "Not in the sum (no run measured enough of their mutants): " + "; ".join(missing) + "."]
    if scaled:
        lines.append("")
        lines.append("Scaled from part of a module's mutants (CPU minutes per mutant times all its mutants): "
                     + "; ".join(scaled) + ".")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modules", default="all", help="comma-separated names from bench/mutation.toml, or 'all'")
    ap.add_argument("--max-children", type=int, default=None, help="mutants tested at once in each lane (default: "
                    "the config's cores divided among the lanes, times its oversubscribe)")
    ap.add_argument("--lanes", type=int, default=None, help="modules run at once (default: the config's, at most "
                    "one per module): two lanes of one mutant keep both cores busy through each module's serial "
                    "steps (generation, mutmut's stats and clean runs), where one lane of two leaves one idle")
    ap.add_argument("--run-equivalent", action="store_true", help="also run the mutants listed as equivalent in "
                    "bench/mutation.toml (by default they are recorded as surviving without a run: their listed "
                    "reason is the verdict, and each would run every test that reaches its function)")
    ap.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR, help="scratch copies (outside the repo)")
    ap.add_argument("--out", type=Path, default=None, help="report folder (default: <workdir>/report; the "
                    "committed report is bench/results/mutation, written only when named)")
    ap.add_argument("--report-only", action="store_true", help="rebuild the report from the last run")
    ap.add_argument("--survivors", action="store_true", help="rerun only the last run's surviving mutants, with the "
                    "tests as they are now (after adding tests for them); the report notes the rerun")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted run in --workdir (its run.json "
                    "written by hand when it was stopped): the in-scope mutants without a verdict")
    ap.add_argument("--limit", type=int, default=None, help="with --resume: at most this many of the mutants "
                    "without a verdict (a part that ends by itself, so its CPU time is measured; stopping a run "
                    "loses the CPU time of its unreaped test processes)")
    args = ap.parse_args(argv)

    config = tomllib.loads(CONFIG.read_text())
    run, modules = config["run"], config["module"]
    names = list(modules) if args.modules == "all" else args.modules.split(",")
    unknown = [n for n in names if n not in modules]
    if unknown:
        ap.error(f"unknown module(s) {unknown}; bench/mutation.toml has {sorted(modules)}")
    lanes = max(1, min(args.lanes or run["lanes"], len(names)))
    children = args.max_children or max(1, run["cores"] // lanes) * run.get("oversubscribe", 1)
    workdir, out = args.workdir.resolve(), (args.out or args.workdir / "report").resolve()
    shared = Path(os.environ.get("CFR_SHARED", ROOT.parent / "shared")).resolve()
    base_env = dict(os.environ, CFR_SHARED=str(shared), CFR_TEST_MODELS=str(workdir / "models"),
                    PYTHONDONTWRITEBYTECODE="1")
    base_env.pop("CFR_TRACE_CACHE", None)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.time()
    if not (args.report_only or args.survivors):
        export_models({m for n in names for m in modules[n].get("models", [])}, workdir / "models")
    command = " ".join(["python", "bench/mutation.py", *(argv if argv is not None else sys.argv[1:])])

    def one(name: str) -> dict:
        return run_module(name, modules[name], run, args, workdir, base_env, command, children)

    # the costliest modules first (the last committed report's CPU minutes), each taken by the next free lane
    last = _last_cpu(ROOT / "bench" / "results" / "mutation" / "mutation.json")
    order = sorted(names, key=lambda n: -last.get(n, float("inf")))
    with ThreadPoolExecutor(max_workers=lanes) as pool:
        done = dict(zip(order, pool.map(one, order)))
    results = [done[n] for n in names]

    import mutmut

    report = {"meta": {"command": " ".join(["python", "bench/mutation.py", *(argv or sys.argv[1:])]),
                       "commit": _commit(), "mutmut": mutmut.__version__,
                       "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
                       "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                       "seconds": time.time() - start, "max_children": children, "lanes": lanes,
                       "timed": not (args.report_only or args.survivors or args.resume),
                       "target": run["target"]},
              "modules": results}
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "mutation"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
    stem.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {stem.with_suffix('.json')} and {stem.with_suffix('.md')}")
    missed = [r["module"] for r in results if r["score"] < run["target"]]
    if missed:
        print(f"below the {run['target']:.0%} target: {', '.join(missed)}", file=sys.stderr)
    return 1 if missed else 0


def _last_cpu(report_path: Path) -> dict[str, float]:
    """Each module's CPU seconds in the committed report: the lanes' scheduling order. A module without a
    complete measured run is left out, so it counts as the costliest and goes first (round 5's cold run left
    export_cli, never measured, for last, where it ran alone on one core)."""
    try:
        report = json.loads(report_path.read_text())
    except (OSError, ValueError):
        return {}
    return {r["module"]: float(r["cpu_seconds"]) for r in report["modules"]
            if r.get("cpu_seconds") and not r.get("interrupted")}


def run_module(name: str, spec: dict, run: dict, args: argparse.Namespace, workdir: Path, base_env: dict,
               command: str, children: int) -> dict:
    """One module's run (fresh, --survivors, --resume or --report-only) and its collected result."""
    here = workdir / name
    t0 = time.time()
    # the export modules: torch's trace made once per run and copied for every later mutant (tests/conftest.py)
    env = dict(base_env, CFR_TRACE_CACHE=str(workdir / "traces")) if spec.get("trace_cache") else base_env
    env = dict(env, CFR_MUTANT_COSTS=str(here / "mutmut-costs.jsonl"))  # each mutant's cost (ORDER_PLUGIN)
    if args.survivors:  # the last run's survivors again, against the tests as they are now
        with _CWD_LOCK:
            mutants = [s["mutant"] for s in collect(name, spec, here)["survivors"]]
        if not mutants:
            print(f"[{name}] no survivors to rerun", flush=True)
        else:
            commit = _commit()
            refresh_tests(spec, run, here, config=False)
            cpu = _mutmut(name, ["--max-children", str(children), *mutants], here, env, "mutmut-survivors.log")
            record = json.loads((here / "run.json").read_text())
            record.setdefault("reruns", []).append({"command": command, "commit": commit, "mutants": mutants,
                                                    "seconds": time.time() - t0, "cpu_seconds": cpu})
            (here / "run.json").write_text(json.dumps(record))
    elif args.resume:
        # an interrupted run, continued (e.g. with more --max-children once the machine is freer): the
        # in-scope mutants without a verdict, with the tests as they are now and the first run's selection
        # (changing it would make mutmut reset every verdict); finished verdicts stand
        mutants, commit = unchecked(spec, here)[:args.limit], _commit()
        refresh_tests(spec, run, here, config=False)
        cpu = _mutmut(name, ["--max-children", str(children), *mutants], here, env, "mutmut-resume.log") \
            if mutants else 0.0
        record = json.loads((here / "run.json").read_text())  # the interrupted part's, written when stopped
        record.setdefault("resumed", []).append({"command": command, "commit": commit, "mutants": len(mutants),
                                                 "seconds": time.time() - t0, "cpu_seconds": cpu,
                                                 "max_children": children})
        record["seconds"] += record["resumed"][-1]["seconds"]
        record["cpu_seconds"] += cpu
        record["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
        (here / "run.json").write_text(json.dumps(record))
    elif not args.report_only:
        commit = _commit()  # of the sources and tests copied now
        here = prepare(name, spec, run, workdir)
        cpu = generate(name, here, env)
        mutants = in_scope(spec, here)
        with _CWD_LOCK:
            skipped = [] if args.run_equivalent else listed_equivalents(spec, here, mutants)
        mark_survived(spec, here, skipped)
        todo = sorted(set(mutants) - set(skipped))
        cpu += _mutmut(name, ["--max-children", str(children), *todo], here, env, "mutmut.log", fresh=True)
        # CPU seconds: what the module costs on an idle machine, whatever the load
        (here / "run.json").write_text(json.dumps({
            "seconds": time.time() - t0, "cpu_seconds": cpu, "commit": commit, "max_children": children,
            "equivalent_not_run": len(skipped), "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "command": command}))
    with _CWD_LOCK:
        result = collect(name, spec, here)
    result.update(json.loads((here / "run.json").read_text()) if (here / "run.json").is_file() else {})
    c = result["counts"]
    print(f"[{name}] {result['mutants']} mutants: {c}; score {result['score']:.1%}", flush=True)
    return result


if __name__ == "__main__":
    sys.exit(main())
