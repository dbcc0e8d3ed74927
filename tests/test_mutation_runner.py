"""bench/mutation.py's own pieces that run without mutmut: the per-mutant cost lines its conftest writes (the
report's "Where the CPU goes"), the test order, and the equivalents recorded without a run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import mutation  # noqa: E402


def _scratch(tmp_path: Path, files: list[str]) -> Path:
    (tmp_path / "conftest.py").write_text(mutation.ORDER_PLUGIN.format(files=json.dumps(files)))
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_slow.py").write_text("def test_slow_first_by_name():\n    assert True\n")
    (tmp_path / "tests" / "test_own.py").write_text(
        "def test_b_passes():\n    assert True\n\n\ndef test_a_kills():\n    assert False, 'the mutant'\n")
    return tmp_path


def _pytest(here: Path, env: dict, *args: str, stop_at_first: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pytest", *(["-x"] if stop_at_first else []), "-q",
                           "-p", "no:cacheprovider", "-p", "no:randomly", "--rootdir", str(here), *args],
                          cwd=here, env=env, capture_output=True, text=True)


def test_a_mutants_cost_line_names_its_killer_and_the_tests_it_ran(tmp_path, monkeypatch):
    here = _scratch(tmp_path, ["tests/test_own.py", "tests/test_slow.py"])
    costs = tmp_path / "costs.jsonl"
    env = dict(os.environ, MUTANT_UNDER_TEST="pkg.mod.x_f__mutmut_3", CFR_MUTANT_COSTS=str(costs))
    # the module's own file first (its order in the list), whatever order pytest was given
    result = _pytest(here, env, "tests/test_slow.py", "tests/test_own.py")
    assert result.returncode == 1, result.stdout
    (row,) = [json.loads(line) for line in costs.read_text().splitlines()]
    assert row["mutant"] == "pkg.mod.x_f__mutmut_3" and row["exit"] == 1 and row["tests"] == 3
    assert row["killer"] == "tests/test_own.py::test_a_kills"
    assert row["ran"] == 2  # test_b_passes, then the killer; -x stops before test_slow.py
    assert row["cpu"] > 0 and row["wall"] >= 0


def test_no_cost_line_outside_a_mutants_run(tmp_path):
    here = _scratch(tmp_path, ["tests/test_slow.py"])
    costs = tmp_path / "costs.jsonl"
    for mutant in ("", "stats", "mutant_generation"):  # clean, stats and generation runs
        env = dict(os.environ, MUTANT_UNDER_TEST=mutant, CFR_MUTANT_COSTS=str(costs))
        _pytest(here, env, "tests/test_slow.py")
    assert not costs.exists()


def test_equivalents_are_recorded_as_survivors_and_only_them(tmp_path):
    meta = tmp_path / "mutants" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"pkg.mod.x_f__mutmut_1": None, "pkg.mod.x_f__mutmut_2": None},
                                "hash_by_function_name": {"f": "h"}}))
    mutation.mark_survived({"source": "pkg/mod.py"}, tmp_path, ["pkg.mod.x_f__mutmut_2"])
    data = json.loads(meta.read_text())
    assert data["exit_code_by_key"] == {"pkg.mod.x_f__mutmut_1": None, "pkg.mod.x_f__mutmut_2": 0}
    assert data["hash_by_function_name"] == {"f": "h"}  # mutmut's own fields kept
    assert mutation.in_scope({"source": "pkg/mod.py", "functions": ["pkg.mod.x_f__mutmut_1*"]}, tmp_path) == [
        "pkg.mod.x_f__mutmut_1"]


def test_cold_estimate_scales_partial_runs_and_names_the_older_runner():
    rows = [{"module": "a", "mutants": 100, "counts": {"killed": 100}, "cpu_seconds": 600, "equivalent_not_run": 0},
            {"module": "b", "mutants": 100, "counts": {"killed": 50, "not checked": 50}, "cpu_seconds": 300},
            {"module": "c", "mutants": 100, "counts": {"killed": 3, "not checked": 97}, "cpu_seconds": 60}]
    text = "\n".join(mutation._cold_estimate(rows))
    assert "Sum of the modules' CPU minutes: 20.0" in text and "about 10 minutes" in text  # 10 + 5 x 2
    assert "c (100 mutants)" in text  # too few measured to scale
    assert "b (50 of 100 mutants measured: 10.0)" in text
    assert "runner before round 5" in text and ": b, c." in text


def test_the_test_that_killed_a_function_s_mutants_goes_first(tmp_path):
    here = _scratch(tmp_path, ["tests/test_own.py", "tests/test_slow.py"])
    (here / "tests" / "test_slow.py").write_text("def test_slow_kills_too():\n    assert False\n")
    costs = tmp_path / "costs.jsonl"
    rows = [{"mutant": "pkg.mod.x_f__mutmut_1", "killer": "tests/test_slow.py::test_slow_kills_too", "cpu": 1.0},
            {"mutant": "pkg.mod.x_f__mutmut_2", "killer": "tests/test_own.py::test_a_kills", "cpu": 9.0},
            {"mutant": "pkg.mod.x_f__mutmut_4", "killer": "tests/test_own.py::test_a_kills", "cpu": 7.0},
            {"mutant": "pkg.mod.x_g__mutmut_1", "killer": "tests/test_own.py::test_b_passes", "cpu": 0.1},
            {"mutant": "pkg.mod.x_g__mutmut_2", "killer": "tests/test_own.py::test_b_passes", "cpu": 0.1}]
    lines = [json.dumps(r) for r in rows]
    costs.write_text("\n".join(lines[:2] + ['{"torn'] + lines[2:]) + "\n")  # a damaged line is skipped
    env = dict(os.environ, MUTANT_UNDER_TEST="pkg.mod.x_f__mutmut_3", CFR_MUTANT_COSTS=str(costs))
    assert _pytest(here, env, "tests/test_own.py", "tests/test_slow.py").returncode == 1
    row = json.loads(costs.read_text().splitlines()[-1])
    # f's cheapest killer first (by the mean cost of its kills of f; g's cheap kills do not count), before the
    # module's own file
    assert row["mutant"] == "pkg.mod.x_f__mutmut_3" and row["ran"] == 1
    assert row["killer"] == "tests/test_slow.py::test_slow_kills_too"


def test_unmeasured_modules_are_scheduled_first(tmp_path):
    report = tmp_path / "mutation.json"
    report.write_text(json.dumps({"modules": [
        {"module": "big", "cpu_seconds": 600.0}, {"module": "small", "cpu_seconds": 30.0},
        {"module": "stopped", "cpu_seconds": 900.0, "interrupted": "stopped after 3 of 300"},
        {"module": "never", "cpu_seconds": 0.0}]}))
    assert mutation._last_cpu(report) == {"big": 600.0, "small": 30.0}
    assert mutation._last_cpu(tmp_path / "missing.json") == {}
    last = mutation._last_cpu(report)
    order = sorted(["small", "big", "stopped", "new", "never"], key=lambda n: -last.get(n, float("inf")))
    assert order[:3] == ["stopped", "new", "never"] and order[3:] == ["big", "small"]


def test_only_a_timed_run_says_how_long_it_took():
    row = {"module": "a", "source": "pkg/a.py", "functions": ["*"], "mutants": 1, "counts": {"killed": 1},
           "score": 1.0, "survivors": [], "equivalents": [], "seconds": 60, "cpu_seconds": 60}
    meta = {"command": "python bench/mutation.py", "commit": "abc", "mutmut": "3.8.1", "machine": "vm",
            "load_before": "5.03", "load_after": "1.58", "seconds": 3552.0, "max_children": 1, "lanes": 2,
            "target": 0.9}
    timed = mutation.markdown({"meta": dict(meta, timed=True), "modules": [row]})
    assert ("**Timed run**: this command took 59.2 minutes from start to report (2 lanes, mutants at once in "
            "each: 1), load average 5.03 when it started, 1.58 at the end.") in timed
    assert "Timed run" not in mutation.markdown({"meta": dict(meta, timed=False), "modules": [row]})


def test_verdicts_are_the_module_s_functions_only(tmp_path):
    meta = tmp_path / "mutants" / "pkg" / "mod.py.meta"
    meta.parent.mkdir(parents=True)
    meta.write_text(json.dumps({"exit_code_by_key": {"pkg.mod.x_f__mutmut_1": 1, "pkg.mod.x_f__mutmut_2": None,
                                                     "pkg.mod.x_g__mutmut_1": None}}))
    spec = {"source": "pkg/mod.py", "functions": ["pkg.mod.x_f__mutmut_*"]}
    assert mutation.verdicts(spec, tmp_path) == {"pkg.mod.x_f__mutmut_1": 1, "pkg.mod.x_f__mutmut_2": None}
    assert mutation.unchecked(spec, tmp_path) == ["pkg.mod.x_f__mutmut_2"]
    assert mutation.unchecked({"source": "pkg/mod.py"}, tmp_path) == ["pkg.mod.x_f__mutmut_2", "pkg.mod.x_g__mutmut_1"]


def test_the_killer_is_the_first_failing_test(tmp_path):
    here = _scratch(tmp_path, ["tests/test_own.py", "tests/test_slow.py"])
    (here / "tests" / "test_slow.py").write_text("def test_fails_later():\n    assert False\n")
    costs = tmp_path / "costs.jsonl"
    env = dict(os.environ, MUTANT_UNDER_TEST="pkg.mod.x_f__mutmut_1", CFR_MUTANT_COSTS=str(costs))
    assert _pytest(here, env, "tests", stop_at_first=False).returncode == 1
    row = json.loads(costs.read_text())
    assert row["ran"] == 3 and row["killer"] == "tests/test_own.py::test_a_kills"
