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
import time
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

    def key(item):
        path = item.nodeid.split("::")[0]
        return rank.get(path, len(rank)), durations.get(item.nodeid, 0.0)

    items.sort(key=key)
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


@contextmanager
def _cwd(path: Path):
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _mutmut(name: str, args: list[str], here: Path, env: dict, log_name: str) -> float:
    """`mutmut run ARGS` in the module's scratch copy; returns the CPU seconds it used."""
    cmd = ["mutmut", "run", *args]
    print(f"[{name}] {' '.join(cmd)}  (in {here})", flush=True)
    cpu0 = _children_cpu()
    with (here / log_name).open("w") as log:
        proc = subprocess.run(cmd, cwd=here, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        print(f"[{name}] mutmut exited {proc.returncode}; see {here / log_name}", file=sys.stderr)
    return _children_cpu() - cpu0


def _commit() -> str:
    """The repository's commit, with '+dirty' when tracked files differ from it (the copy tested them)."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def _children_cpu() -> float:
    """User + system CPU seconds of every finished descendant (mutmut, its fork server, each mutant's run)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


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

    meta = json.loads((here / "mutants" / (spec["source"] + ".meta")).read_text())
    globs = spec.get("functions", ["*"])
    statuses = {k: status_by_exit_code[v] for k, v in meta["exit_code_by_key"].items()
                if any(fnmatch.fnmatchcase(k, g) for g in globs)}
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
    return {"module": name, "source": spec["source"], "functions": globs, "scope": spec.get("scope", ""),
            "tests": spec["tests"], "selection_used": used,
            "exclude_tests": spec.get("exclude_tests", []), "mutants": total, "counts": counts,
            "score": detected / scored if scored else 1.0, "survivors": survivors, "equivalents": equivalents}


def unchecked(spec: dict, here: Path) -> list[str]:
    """In-scope mutants of an interrupted run that have no verdict yet."""
    meta = json.loads((here / "mutants" / (spec["source"] + ".meta")).read_text())
    globs = spec.get("functions", ["*"])
    return sorted(k for k, v in meta["exit_code_by_key"].items()
                  if v is None and any(fnmatch.fnmatchcase(k, g) for g in globs))


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
    lines.append(f"Sum of the modules' CPU minutes: {total:.1f}; on 2 idle cores (2 mutants at once) a cold "
                 f"`python bench/mutation.py --modules all` is expected to take about {total / 2:.0f} minutes of wall "
                 "time (an estimate from these measured CPU times: mutmut's clean and stats runs use one core, "
                 "so the real figure is somewhat longer).")
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
    ap.add_argument("--max-children", type=int, default=None, help="mutants tested at once (default: config)")
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
    children = args.max_children or run["max_children"]
    workdir, out = args.workdir.resolve(), (args.out or args.workdir / "report").resolve()
    shared = Path(os.environ.get("CFR_SHARED", ROOT.parent / "shared")).resolve()
    base_env = dict(os.environ, CFR_SHARED=str(shared), CFR_TEST_MODELS=str(workdir / "models"),
                    PYTHONDONTWRITEBYTECODE="1")
    base_env.pop("CFR_TRACE_CACHE", None)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    start = time.time()
    if not (args.report_only or args.survivors):
        export_models({m for n in names for m in modules[n].get("models", [])}, workdir / "models")
    results = []
    command = " ".join(["python", "bench/mutation.py", *(argv if argv is not None else sys.argv[1:])])
    for name in names:
        spec = modules[name]
        here = workdir / name
        t0 = time.time()
        # the export modules: torch's trace made once per run and copied for every later mutant (tests/conftest.py)
        env = dict(base_env, CFR_TRACE_CACHE=str(workdir / "traces")) if spec.get("trace_cache") else base_env
        if args.survivors:  # the last run's survivors again, against the tests as they are now
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
            cpu = _mutmut(name, ["--max-children", str(children), *spec.get("functions", [])], here, env, "mutmut.log")
            # CPU seconds: what the module costs on an idle machine, whatever the load
            (here / "run.json").write_text(json.dumps({
                "seconds": time.time() - t0, "cpu_seconds": cpu, "commit": commit, "max_children": children,
                "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()), "command": command}))
        result = collect(name, spec, here)
        result.update(json.loads((here / "run.json").read_text()) if (here / "run.json").is_file() else {})
        c = result["counts"]
        print(f"[{name}] {result['mutants']} mutants: {c}; score {result['score']:.1%}", flush=True)
        results.append(result)

    import mutmut

    report = {"meta": {"command": " ".join(["python", "bench/mutation.py", *(argv or sys.argv[1:])]),
                       "commit": _commit(), "mutmut": mutmut.__version__,
                       "machine": f"{platform.node()} {platform.processor() or platform.machine()}, "
                                  f"{os.cpu_count()} CPUs, Python {platform.python_version()}",
                       "load_before": load_before, "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
                       "seconds": time.time() - start, "max_children": children, "target": run["target"]},
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


if __name__ == "__main__":
    sys.exit(main())
