"""The commands of README.md and docs/*.md stay true (issue 20).

- Every `cfr-*`, `python bench/*.py`, `python -m trainer.cli` and `torchrun ... -m trainer.cli` command in a
  ```bash block is parsed against its command line (option names, values, ranges; nothing runs), so a renamed
  option or a stale example fails here.
- The blocks marked `<!-- test: run -->` (the README's tour and a few cheap ones) run as written, in order, in
  a scratch copy of a fresh clone (the repository's files linked in, `../shared` beside it), each command
  within a time limit, and must exit 0.
- The test command README shows is the one CI runs, and every relative link of these pages resolves.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import click
import pytest

from tests.conftest import ROOT, SHARED, need

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_MARK = "<!-- test: run -->"
COMMAND_TIMEOUT_S = 600  # per command; generous for a shared 2-core machine


def bash_blocks(path: Path) -> list[tuple[int, bool, str]]:
    """(line number, marked to run, text) of every ```bash block of a page."""
    lines, out, k = path.read_text().split("\n"), [], 0
    while k < len(lines):
        if lines[k].strip() == "```bash":
            start = k
            previous = next((x.strip() for x in reversed(lines[:k]) if x.strip()), "")
            k += 1
            body = []
            while k < len(lines) and lines[k].strip() != "```":
                body.append(lines[k])
                k += 1
            out.append((start + 1, previous == RUN_MARK, "\n".join(body)))
        k += 1
    return out


def commands(text: str) -> list[list[str]]:
    """Shell words of each command of a block: continuations joined, comments dropped, split at && and ;."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for line in joined.split("\n"):
        words, current = shlex.split(line, comments=True), []
        for w in words + [";"]:
            if w in ("&&", ";", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(w)
    return out


def _bench_command(script: str) -> click.Command | None:
    """The click command of a bench script (None for a script outside the shared vocabulary: not checked)."""
    if not (ROOT / script).is_file():
        pytest.fail(f"the docs name {script}, which does not exist")
    module = importlib.import_module("bench." + Path(script).stem)
    for name in ("cli", "main"):
        if isinstance(getattr(module, name, None), click.Command):
            return getattr(module, name)
    return None


def resolve(words: list[str]) -> tuple[click.Command, list[str]] | None:
    """The click command a documented command line invokes and its arguments; None for other programs."""
    from cfr_runtime.cli_eval import main as eval_main
    from cfr_runtime.serve.cli import main as serve_main
    from export.cli import main as export_main
    from trainer.cli import main as train_main

    tools = {"cfr-eval": eval_main, "cfr-export": export_main, "cfr-train": train_main, "cfr-serve": serve_main}
    modules = {"trainer.cli": train_main, "cfr_runtime.serve": serve_main, "cfr_runtime.cli_eval": eval_main,
               "export.cli": export_main}
    head = words[0]
    if head in tools:
        return tools[head], words[1:]
    if head in ("python", "python3"):
        if words[1] == "-m" and words[2] in modules:
            return modules[words[2]], words[3:]
        if words[1] == "-m" and words[2] == "pytest":
            return None
        if words[1].startswith("bench/") and words[1].endswith(".py"):
            cmd = _bench_command(words[1])
            return (cmd, words[2:]) if cmd is not None else None
    if head == "torchrun" and "-m" in words and words[words.index("-m") + 1] in modules:
        k = words.index("-m")
        return modules[words[k + 1]], words[k + 2:]
    return None  # another program (pip, curl, nuctl, ...): not this project's command line


def _all_commands():
    for page in PAGES:
        for lineno, _, text in bash_blocks(page):
            for words in commands(text):
                yield pytest.param(words, id=f"{page.relative_to(ROOT)}:{lineno}:{' '.join(words)[:60]}")


@pytest.mark.parametrize("words", list(_all_commands()))
def test_documented_command_parses(words, monkeypatch):
    found = resolve(words)
    if found is None:
        return
    cmd, args = found
    assert not any("$" in a for a in args), f"unexpanded shell variable in {words}"
    monkeypatch.chdir(ROOT)
    try:
        with cmd.make_context(cmd.name, list(args)):
            pass
    except click.ClickException as exc:
        pytest.fail(f"`{' '.join(words)}` does not parse: {exc.format_message()}")


def test_pages_have_commands_to_check():
    """The extraction finds the commands (a broken parser must not make the test above vacuous)."""
    found = [w for p in PAGES for _, _, t in bash_blocks(p) for w in commands(t) if resolve(w)]
    tools = {w[0] if w[0] != "python" else w[1] for w in found}
    assert {"cfr-eval", "cfr-export", "cfr-train", "cfr-serve", "bench/latency.py", "bench/pareto.py",
            "bench/main_job.py", "bench/serve_load.py"} <= tools, tools
    assert any(run for p in PAGES for _, run, _ in bash_blocks(p))


def _sandbox(tmp: Path) -> Path:
    """A scratch copy of a fresh clone: the repository's tracked top-level entries linked in (no out/, runs/,
    results/), with ../shared beside it."""
    clone = tmp / "clone"
    clone.mkdir()
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    for top in sorted({t.split("/")[0] for t in tracked} or {p.name for p in ROOT.iterdir()}):
        (clone / top).symlink_to(ROOT / top)
    (tmp / "shared").symlink_to(need(SHARED).resolve())
    return clone


def _run_blocks():
    for page in PAGES:
        for lineno, run, text in bash_blocks(page):
            if run:
                yield pytest.param(text, id=f"{page.relative_to(ROOT)}:{lineno}")


@pytest.mark.parametrize("text", list(_run_blocks()))
def test_marked_block_runs_as_written(text, tmp_path):
    clone = _sandbox(tmp_path)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    for words in commands(text):
        argv = [sys.executable, *words[1:]] if words[0] in ("python", "python3") else words
        out = subprocess.run(argv, cwd=clone, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
        assert out.returncode == 0, f"`{' '.join(words)}` exited {out.returncode}:\n{out.stderr[-3000:]}"


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().strip().split("\n")
    assert ci[-1].strip() == "python3 -m pytest -q"
    assert "python3 -m pytest -q" in (ROOT / "README.md").read_text()


def test_relative_links_resolve():
    missing = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if not re.match(r"[a-z]+://", target) and not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
