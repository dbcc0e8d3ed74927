"""A session's record of truth, and the replay that rebuilds a live session from it.

The record is what must survive a replica: the uploaded bytes, the clicks in order, and the mode. Every click
carries the mode it ran with, because a mode change applies to later clicks only (CFR-3 on the first click
runs 4 forwards, StdInfer one), so replaying with the final mode alone would not give the same masks.
Everything else a replica holds (decoded image, probability maps, undo history, runner buffers) is a cache:
`replay` rebuilds it exactly, because the engine is deterministic for a given input (bit-identical on CPU).

This module imports no Ray; it is the part the rest of the project (a shared "session from a click list"
primitive, stateless protocols) can reuse or replace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...engine import Engine
from ...session import Session
from ..codec import UploadLimits, decode_upload
from ..store import format_mode, parse_mode
from .batching import BatchingEngine


@dataclass(frozen=True)
class RecordedClick:
    """One click as recorded: image pixels (x column, y row), polarity and the mode it ran with."""

    x: float
    y: float
    positive: bool
    mode: str


@dataclass(frozen=True)
class SessionState:
    """What a session is, apart from its image: the recorded clicks in order and the current mode."""

    clicks: tuple[RecordedClick, ...] = ()
    mode: str = "StdInfer"


class RecordedSession(Session):
    """A Session that remembers which mode each of its clicks ran with (the rest is Session's own)."""

    def __init__(self, *args, **kwargs):
        self.click_modes: list[str] = []
        super().__init__(*args, **kwargs)

    def add_click(self, x: float, y: float, positive: bool = True):
        mask = super().add_click(x, y, positive)
        self.click_modes.append(format_mode(self.cfr, self.adaptive))
        return mask

    def undo(self):
        mask = super().undo()
        self.click_modes.pop()
        return mask

    def reset(self) -> None:
        super().reset()
        self.click_modes.clear()

    @property
    def mode(self) -> str:
        return format_mode(self.cfr, self.adaptive)

    def state(self) -> SessionState:
        clicks = tuple(RecordedClick(c.x, c.y, c.positive, m) for c, m in zip(self.clicks, self.click_modes))
        return SessionState(clicks, self.mode)


def new_session(engine: Engine | BatchingEngine, mode: str) -> RecordedSession:
    cfr, adaptive = parse_mode(mode)
    return RecordedSession(engine, cfr=cfr, adaptive=adaptive)


def replay(engine: Engine | BatchingEngine, data: bytes, state: SessionState, upload: UploadLimits) -> RecordedSession:
    """The session a record describes: a fresh session on the decoded upload, fed the clicks in order, each
    under its own mode, then set to the current mode. Equal, mask for mask, to the session that was recorded."""
    session = new_session(engine, state.mode)
    session.set_image(decode_upload(data, upload))
    for click in state.clicks:
        session.cfr, session.adaptive = parse_mode(click.mode)
        session.add_click(click.x, click.y, click.positive)
    session.cfr, session.adaptive = parse_mode(state.mode)
    return session
