"""Every figure of README.md and of the project's docs pages is backed by a committed result file (issue 21).

docs/figures.md lists, per page, each figure as it is printed there, the result file(s) that hold it and the
command that remakes them. This test checks, for every row:

- the figure's text is on the page (so an edited figure must be edited in the list too);
- the file exists, and all the figure's numbers appear on one line of it, equal or equal after rounding to
  the decimals the page prints (so a re-run that changes the numbers, or a page figure that matches no
  result, fails here); a row whose file cell is `= EXPR` is a figure derived by that arithmetic, and a file
  named `size:PATH` stands for the size of PATH in MB;

and, for the pages it audits, that every figure on them (a number with ms, s, %, x, MB, GB or minutes, a m:ss
duration, any number with decimals) is covered by a listed figure or by a row of the "Not measurements"
table, so a new figure without a file fails CI. Pure text processing: it runs in well under a second.
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ROOT

LIST = ROOT / "docs" / "figures.md"
# Not audited: this list itself (every other page is: docs/ray.md and docs/large-models.md joined last).
NOT_AUDITED = {"docs/figures.md"}

NUMBER = re.compile(r"(?<![\w@.\-])-?\d+(?:,\d{3})*(?:\.\d+)?(?:e-?\d+)?(?!\d|\.\d)")
# What the audit treats as a figure: a number with a unit (ms, s, %, a ratio's x, MB, GB, minutes), a m:ss
# duration, or any number with decimals (NoC, IoU, differences); a ratio is written `1.8x` (`4 x 60` is a shape).
FIGURE = re.compile(r"(?<![\w@.\-])\d+(?:,\d{3})*(?:\.\d+)?\s?(?:ms|us|µs|s|%|MB|GB|min|minutes|seconds)(?![\w])"
                    r"|(?<![\w@.\-])\d+(?:\.\d+)?x(?![\w])"
                    r"|(?<![\w:])\d{1,2}:\d\d(?![\w:])"
                    r"|(?<![\w@.\-])\d+\.\d+(?:e-?\d+)?(?!\d|\.\d)")


def normalize(text: str) -> str:
    """Page text as the list quotes it: no emphasis or code marks, one space for any run of white space."""
    text = text.replace("−", "-").replace("**", "").replace("`", "")
    return re.sub(r"\s+", " ", text)


def numbers(text: str) -> list[str]:
    return [m.group(0).replace(",", "").lstrip("-") for m in NUMBER.finditer(text.replace("−", "-"))]


def same(figure: str, value: str) -> bool:
    """`figure` as printed equals `value` from a result file, exactly or rounded to the figure's decimals."""
    if figure == value:
        return True
    try:
        v = abs(float(value))
    except ValueError:
        return False
    if "e" in figure:
        mantissa = figure.split("e")[0]
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        return float(f"{v:.{decimals}e}") == float(figure)
    decimals = len(figure.split(".")[1]) if "." in figure else 0
    return f"{v:.{decimals}f}" == figure


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def evaluate(expr: str) -> float:
    """A derived figure's arithmetic (numbers, + - * /, parentheses only)."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError(f"not plain arithmetic: {expr!r}")
    return ev(ast.parse(expr.replace(",", ""), mode="eval"))


@dataclass
class Row:
    page: str
    figures: list[str]  # snippets as printed on the page
    files: list[str]  # result files, or ["= EXPR"]
    line: int  # in docs/figures.md


def _cells(line: str) -> list[str]:
    """Cells of a Markdown table row; `\\|` inside a cell is a literal bar."""
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip().replace("\\|", "|") for c in cells]


def _code(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def parse_list(path: Path = LIST) -> tuple[list[Row], list[Row]]:
    """(figure rows, not-a-measurement rows) of docs/figures.md. Sections `## <page>` hold `| figure | file |
    command |` tables; the section `## Not measurements` holds `| page | text | why |`."""
    rows, exempt, section = [], [], None
    for k, line in enumerate(path.read_text().split("\n"), 1):
        if line.startswith("## "):
            section = line[3:].strip().strip("`")
            continue
        if not line.startswith("|") or re.match(r"^\|[\s:|-]+\|$", line) or section is None:
            continue
        cells = _cells(line)
        if section == "Not measurements":
            if cells[0] == "page":
                continue
            exempt.append(Row(cells[0].strip("`"), _code(cells[1]), [], k))
        elif section.endswith(".md"):
            if cells[0] == "figure":
                continue
            files = [cells[1].strip()] if cells[1].strip().startswith("=") else _code(cells[1])
            rows.append(Row(section, _code(cells[0]), files, k))
    return rows, exempt


ROWS, EXEMPT = parse_list() if LIST.exists() else ([], [])


def _page(name: str) -> str:
    path = ROOT / name
    assert path.is_file(), f"docs/figures.md names a page that does not exist: {name}"
    return normalize(path.read_text())


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.page}:{r.line}:{(r.figures or ['?'])[0][:40]}" for r in ROWS])
def test_figure_is_on_its_page_and_in_its_file(row: Row):
    where = f"docs/figures.md line {row.line}"
    assert row.figures, f"{where}: no figure (quote it in backticks as the page prints it)"
    assert row.files, f"{where}: no result file: a figure needs one (or `= EXPR` if derived)"
    page = _page(row.page)
    for fig in row.figures:
        assert normalize(fig) in page, f"{where}: `{fig}` is not on {row.page} (edited there but not here?)"
        nums = numbers(fig)
        assert nums, f"{where}: `{fig}` has no number"
        if row.files[0].startswith("="):
            assert len(nums) == 1, f"{where}: a derived figure is one number"
            expr = row.files[0][1:].strip()
            assert same(nums[0], repr(evaluate(expr))), f"{where}: `{fig}` is not {expr} = {evaluate(expr):.6g}"
            continue
        lines = []
        for name in row.files:
            if name.startswith("size:"):  # a file's size in MB (10^6 bytes), e.g. of a shipped model
                path = ROOT / name[len("size:"):]
                assert path.is_file(), f"{where}: {path} does not exist"
                lines.append(repr(path.stat().st_size / 1e6))
                continue
            path = ROOT / name
            assert path.is_file(), f"{where}: result file {name} does not exist (is it committed?)"
            lines += path.read_text(errors="replace").split("\n")
        found = any(all(any(same(n, v) for v in numbers(text)) for n in nums) for text in lines)
        assert found, f"{where}: no line of {', '.join(row.files)} holds all of {nums} (from `{fig}` on {row.page})"


def audited_pages() -> list[str]:
    pages = ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))]
    return [p for p in pages if p not in NOT_AUDITED]


def _spans(text: str, snippets: list[str]) -> list[tuple[int, int]]:
    out = []
    for s in snippets:
        s = normalize(s)
        start = text.find(s)
        while start >= 0:
            out.append((start, start + len(s)))
            start = text.find(s, start + 1)
    return out


@pytest.mark.parametrize("page", audited_pages())
def test_every_figure_is_listed(page: str):
    """A figure on an audited page (see FIGURE) is a listed figure or a listed non-measurement (a setting, a
    tolerance, a citation, arithmetic)."""
    text = _page(page)
    covered = _spans(text, [f for r in ROWS if r.page == page for f in r.figures]
                     + [f for r in EXEMPT if r.page == page for f in r.figures])
    loose = [m.group(0) for m in FIGURE.finditer(text)
             if not any(a <= m.start() and m.end() <= b for a, b in covered)]
    assert not loose, f"{page}: figures with no row in docs/figures.md: {loose}"


def test_the_list_covers_the_pages():
    """The checks above are not vacuous: the list parses into rows for README and the measurement pages."""
    pages = {r.page for r in ROWS}
    assert {"README.md", "docs/benchmarks.md", "docs/training.md", "docs/parity.md"} <= pages, pages
    assert len(ROWS) >= 40


@pytest.mark.parametrize("fig, value, ok", [
    ("13.26", "13.26", True), ("1870", "1869.7", True), ("5.4e-7", "5.36e-07", True), ("0.28", "0.280", True),
    ("2075", "2075.4", True), ("13.26", "13.24", False), ("1.5", "1.46", True), ("1.5", "1.44", False),
    ("79", "78.4", False), ("3.0e-5", "2.96e-05", True), ("3.0e-5", "3.06e-05", False),
])
def test_rounding_rule(fig, value, ok):
    assert same(fig, value) is ok


def test_numbers_skip_names_and_keep_signs_and_separators():
    assert numbers("NoC@90 13.26 on fp32, CFR-4 and 2,075 ms (−0.08); 5.4e-7. 1:52") == \
        ["13.26", "2075", "0.08", "5.4e-7", "1", "52"]
    assert evaluate("84.238 / 18.337") == pytest.approx(4.5939, abs=1e-4)
    with pytest.raises(ValueError):
        evaluate("__import__('os')")
