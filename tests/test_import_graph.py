"""The runtime's modules import one another in one direction only: no import circle, lazy imports included.

A circle (engine -> backends.ort -> engine, as once through `alloc_buffers`) works only as long as one side
imports lazily; moving one import to module level then breaks `import cfr_runtime.backends.ort` in a fresh
interpreter. The test reads every import statement (inside functions too) and looks for a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cfr_runtime",)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def import_edges(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> first-party modules it imports anywhere in its body (`from pkg import submodule` counts as the
    submodule, `from pkg import name` as the package)."""
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.add(sub if sub in modules else base)
        edges[name] = {t for t in targets if t in modules and t != name}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycle_in_the_runtime():
    edges = import_edges(_modules())
    assert "cfr_runtime.contract" in edges["cfr_runtime.backends.ort"]  # the reader sees relative imports
    assert "cfr_runtime.backends.ort" in edges["cfr_runtime.engine"]  # ... and imports inside functions
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


@pytest.mark.parametrize("module", ["cfr_runtime.backends.ort", "cfr_runtime.backends.trt", "cfr_runtime.buffers",
                                    "cfr_runtime.onnx_file", "cfr_runtime.engine"])
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    """Imported first (before anything else of the package), each module loads; and none pulls in torch."""
    code = f"import sys, {module}; assert 'torch' not in sys.modules, 'torch was imported'"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
