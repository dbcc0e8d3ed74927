"""Sessions of the service: unguessable ids, one lock each, expiry by idle time, LRU caps on count and memory.

The Engine is shared; every `Session` owns its Runner (buffers bound once), so sessions run concurrently
and only the clicks of one session are serialised, by that session's lock.
"""

from __future__ import annotations

import ctypes
import gc
import re
import secrets
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..engine import Engine
from ..errors import InputError, SessionNotFoundError
from ..session import Session

MODE_RE = re.compile(r"^(?:(StdInfer)|(A-)?CFR-(\d{1,2}))$")
MAX_CFR = 32


def parse_mode(mode: str) -> tuple[int, bool]:
    """'StdInfer' -> (0, False), 'CFR-n' -> (n, False), 'A-CFR-n' -> (n, True)."""
    m = MODE_RE.match(mode.strip()) if isinstance(mode, str) else None
    if m is None or (not m.group(1) and not 1 <= int(m.group(3)) <= MAX_CFR):
        raise InputError(f"unknown mode {mode!r}; use StdInfer, CFR-n or A-CFR-n with 1 <= n <= {MAX_CFR}")
    if m.group(1):
        return 0, False
    return int(m.group(3)), bool(m.group(2))


def format_mode(cfr: int, adaptive: bool) -> str:
    if cfr == 0:
        return "StdInfer"
    return f"{'A-' if adaptive else ''}CFR-{cfr}"


@dataclass(frozen=True)
class StoreLimits:
    idle_timeout_s: float = 900.0
    max_sessions: int = 64
    max_memory_mb: float = 2048.0


@dataclass
class Entry:
    """One annotation session: the runtime Session plus what the service needs around it."""

    id: str
    session: Session
    last_used: float
    nbytes: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: str | None = None  # set for sessions opened by an adapter (e.g. the CVAT image digest)

    @property
    def mode(self) -> str:
        return format_mode(self.session.cfr, self.session.adaptive)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.session.probs.shape
        return w, h


def release_memory() -> None:
    """Hand freed heap pages back to the OS after evictions (glibc keeps them otherwise); no-op elsewhere."""
    gc.collect()  # evicted sessions caught in reference cycles (e.g. by a traceback) go now, not at some later gc
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


class SessionStore:
    """Thread-safe map of live sessions. `clock` is injectable so tests can expire sessions instantly."""

    def __init__(self, engine: Engine, limits: StoreLimits | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.limits = limits or StoreLimits()
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._keys: dict[str, str] = {}
        self._lock = threading.Lock()
        self.evicted = {"idle": 0, "count": 0, "memory": 0}

    # ---- lifecycle -------------------------------------------------------------------------------
    def create(self, rgb: np.ndarray, mode: str = "StdInfer", key: str | None = None) -> Entry:
        cfr, adaptive = parse_mode(mode)
        session = Session(self.engine, cfr=cfr, adaptive=adaptive)
        session.set_image(rgb)
        entry = Entry(secrets.token_urlsafe(24), session, self.clock(), session.nbytes, key=key)
        with self._lock:
            self._entries[entry.id] = entry
            if key is not None:
                self._keys[key] = entry.id
            evicted = self._enforce(keep=entry.id)
        if evicted:
            release_memory()
        return entry

    def get(self, sid: str) -> Entry:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise SessionNotFoundError(f"no session {sid[:8]}...: it never existed or has expired; "
                                           "upload the image again (POST /sessions)")
            entry.last_used = self.clock()
            self._entries.move_to_end(sid)
            return entry

    def by_key(self, key: str) -> Entry | None:
        with self._lock:
            sid = self._keys.get(key)
        if sid is None:
            return None
        try:
            return self.get(sid)
        except SessionNotFoundError:
            return None

    def delete(self, sid: str) -> None:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise SessionNotFoundError(f"no session {sid[:8]}...: it never existed or has expired")
            self._drop(entry)
        release_memory()

    def touched(self, entry: Entry) -> None:
        """Call after a session changed (its undo history grows with clicks) to re-apply the memory cap."""
        nbytes = entry.session.nbytes
        with self._lock:
            entry.nbytes = nbytes
            entry.last_used = self.clock()
            evicted = self._enforce(keep=entry.id)
        if evicted:
            release_memory()

    def sweep(self) -> int:
        """Drop sessions idle for longer than the timeout (never one in the middle of a click); returns how many."""
        deadline = self.clock() - self.limits.idle_timeout_s
        with self._lock:
            stale = [e for e in self._entries.values() if e.last_used < deadline and not e.lock.locked()]
            for entry in stale:
                self._drop(entry)
            self.evicted["idle"] += len(stale)
        if stale:
            release_memory()
        return len(stale)

    def stats(self) -> dict:
        with self._lock:
            return {"sessions": len(self._entries), "memory_mb": round(self._total() / 2**20, 2),
                    "evicted": dict(self.evicted), "limits": {
                        "idle_timeout_s": self.limits.idle_timeout_s, "max_sessions": self.limits.max_sessions,
                        "max_memory_mb": self.limits.max_memory_mb}}

    def __len__(self) -> int:
        return len(self._entries)

    # ---- internals (store lock held) ---------------------------------------------------------------
    def _total(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def _drop(self, entry: Entry) -> None:
        self._entries.pop(entry.id, None)
        if entry.key is not None and self._keys.get(entry.key) == entry.id:
            del self._keys[entry.key]

    def _enforce(self, keep: str) -> int:
        """Evict least recently used sessions (never `keep`) until both caps hold."""
        evicted = 0
        cap = self.limits.max_memory_mb * 2**20
        for entry in list(self._entries.values()):
            over_count = len(self._entries) > self.limits.max_sessions
            over_memory = self._total() > cap
            if not (over_count or over_memory):
                break
            if entry.id == keep:
                continue
            self._drop(entry)
            self.evicted["count" if over_count else "memory"] += 1
            evicted += 1
        return evicted
