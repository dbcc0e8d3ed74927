"""A session's record of truth: what must survive a replica.

The record is the uploaded bytes, the clicks in order, each with the mode it ran with, and the current mode.
Per-click modes matter because a mode change applies to later clicks only (CFR-3 on the first click runs 4
forwards, StdInfer one): replaying with the final mode alone would not give the same masks. Everything else a
replica holds (decoded image, probability maps, undo history, runner buffers) is a cache that the store's
replay primitive (`store.advance`, via `replica.ClusterStore.rebuild`) rebuilds exactly, because the engine is
deterministic for a given input (bit-identical on CPU). Plain data, so Ray pickles it cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ..store import RecordedSession, Step, as_step


class RecordedClick(NamedTuple):
    """One click as recorded: image pixels (x column, y row), polarity and the mode it ran with. An
    (x, y, positive, mode) tuple, the click format `SessionStore.replay` and `store.advance` take."""

    x: float
    y: float
    positive: bool
    mode: str


@dataclass(frozen=True)
class SessionState:
    """What a session is, apart from its image: the recorded clicks in order and the current mode."""

    clicks: tuple[RecordedClick, ...] = ()
    mode: str = "StdInfer"

    @classmethod
    def of(cls, session: RecordedSession) -> SessionState:
        return cls(tuple(RecordedClick(c.x, c.y, c.positive, m) for c, m in session.steps), session.mode)

    @property
    def steps(self) -> list[Step]:
        """The clicks as `store.advance` takes them: (Click, mode)."""
        return [as_step(c, self.mode) for c in self.clicks]
