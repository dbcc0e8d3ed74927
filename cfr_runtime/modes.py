"""CFR modes by name: one grammar for every command line, bench script and the server's `?mode=`.

    StdInfer        one forward per click (the official evaluation default)
    CFR-n           n extra forwards on the first click (cascade-forward refinement)
    A-CFR-n         at most n extra forwards, stopping once <= 20 pixels change (adaptive CFR)
    CFR-n-all, A-CFR-n-all
                    the same on every click instead of the first (the paper's description)

A name maps to the `Session` keywords (`cfr`, `adaptive`, `cfr_clicks`), so a mode written on a command line,
in a results table and in an HTTP request means the same run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import InputError

MAX_CFR = 100  # extra forwards per click that a command line accepts (the server caps its own requests lower)
_MODE_RE = re.compile(r"^(?:(StdInfer)|(A-)?CFR-(\d{1,3})(-all)?)$")
GRAMMAR = "StdInfer, CFR-n or A-CFR-n (n >= 1; append -all to refine every click, not only the first)"


@dataclass(frozen=True)
class Mode:
    """A CFR mode: `cfr` extra forwards, `adaptive` (A-CFR), `every_click` (CFR on every click, '-all')."""

    cfr: int = 0
    adaptive: bool = False
    every_click: bool = False

    @classmethod
    def parse(cls, text: str, max_cfr: int = MAX_CFR) -> Mode:
        """'A-CFR-4' -> Mode(4, True); raises InputError naming the grammar for anything else."""
        m = _MODE_RE.match(text.strip()) if isinstance(text, str) else None
        if m is None or (not m.group(1) and not 1 <= int(m.group(3)) <= max_cfr):
            raise InputError(f"unknown mode {text!r}; use {GRAMMAR}, n <= {max_cfr}")
        if m.group(1):
            return cls()
        return cls(int(m.group(3)), bool(m.group(2)), bool(m.group(4)))

    def __str__(self) -> str:
        if self.cfr == 0:
            return "StdInfer"
        return f"{'A-' if self.adaptive else ''}CFR-{self.cfr}{'-all' if self.every_click else ''}"

    def session_kwargs(self) -> dict:
        """Keywords for `Session(engine, **mode.session_kwargs())`."""
        kw: dict = {"cfr": self.cfr, "adaptive": self.adaptive}
        if self.every_click:
            kw["cfr_clicks"] = None
        return kw
