"""Sessions of the service: unguessable ids, one lock each, expiry by idle time, LRU caps on count and memory.

The Engine is shared; every `Session` owns its Runner (buffers bound once), so sessions run concurrently
and only the clicks of one session are serialised, by that session's lock.

Stateless protocols (CVAT, Label Studio, a Ray replica) go through one primitive, `SessionStore.replay`: the
request's click list is the truth and a cached session is only a way to get its answer sooner.
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
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..engine import Engine
from ..errors import InputError, SessionNotFoundError
from ..session import Click, Session

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
    # cached sessions per (image, mode) for `replay`: two annotators on one frame each keep a session to
    # extend instead of undoing each other's clicks; a request that finds all of them busy waits for one
    max_per_key: int = 4


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


@dataclass(frozen=True)
class Replayed:
    """What `SessionStore.replay` hands out: the entry (locked for the caller), how much cached work it kept."""

    entry: Entry
    kept: int  # clicks of the cached session kept (the longest common ordered prefix)
    forwards: int  # forwards this call ran
    created: bool  # no cached session could be used: a new one was opened from the image

    @property
    def session(self) -> Session:
        return self.entry.session


def as_click(c: Click | Sequence) -> Click:
    """A Click from a Click or an (x, y, positive) triple (the click list format of the adapters)."""
    if isinstance(c, Click):
        return c
    try:
        x, y, positive = c
    except (TypeError, ValueError):
        raise InputError(f"a click is (x, y, positive), got {c!r}") from None
    return Click(x, y, positive)


def common_prefix(have: Sequence[Click], wanted: Sequence[Click]) -> int:
    """Length of the longest common ordered prefix: position by position, so a point repeated twice counts
    twice (a multiset or membership test would let [A] stand in for [A, A], or [B, A] for [A, B])."""
    n = 0
    for a, b in zip(have, wanted):
        if a != b:
            break
        n += 1
    return n


class SessionStore:
    """Thread-safe map of live sessions. `clock` is injectable so tests can expire sessions instantly."""

    def __init__(self, engine: Engine, limits: StoreLimits | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.engine = engine
        self.limits = limits or StoreLimits()
        self.clock = clock
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._keys: dict[str, list[str]] = {}  # adapter key -> ids of the cached sessions for it
        self._lock = threading.Lock()
        self.evicted = {"idle": 0, "count": 0, "memory": 0}

    # ---- lifecycle -------------------------------------------------------------------------------
    def create(self, rgb: np.ndarray, mode: str = "StdInfer", key: str | None = None,
               locked: bool = False) -> Entry:
        """A new session on `rgb`; `key` files it under an adapter key; `locked` hands it out with its lock
        held (the caller releases it), so no other request can touch it before the caller's first use."""
        cfr, adaptive = parse_mode(mode)
        session = Session(self.engine, cfr=cfr, adaptive=adaptive)
        session.set_image(rgb)
        entry = Entry(secrets.token_urlsafe(24), session, self.clock(), session.nbytes, key=key)
        if locked:
            entry.lock.acquire()
        with self._lock:
            self._entries[entry.id] = entry
            if key is not None:
                self._keys.setdefault(key, []).append(entry.id)
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

    def by_key(self, key: str) -> list[Entry]:
        """The cached sessions filed under an adapter key (most recently used last)."""
        with self._lock:
            return [self._entries[sid] for sid in self._keys.get(key, ()) if sid in self._entries]

    @contextmanager
    def replay(self, key: str, image: Callable[[], np.ndarray], clicks: Sequence[Click | Sequence],
               mode: str = "StdInfer") -> Iterator[Replayed]:
        """The stateless rule: a session in exactly the state of a fresh `Session(mode)` on the image, fed
        `clicks` one by one in the order given.

            with store.replay(digest, lambda: decode(blob), [(x, y, True), ...], "CFR-4") as r:
                mask = r.session.mask        # read everything you need inside the block

        key: the image's identity (e.g. the SHA-256 of its bytes); the mode is added to it, since CFR changes
          the result of the first click. image: called only when no cached session can be used, returns the
          H x W x 3 uint8 RGB image. clicks: Click or (x, y, positive), in the order they are to be applied.
        The order is the caller's protocol decision and must be documented there (the CVAT adapter: every
        positive point in the order sent, then every negative point).

        Reuse is exact or not at all: a cached session of this key and mode is kept only up to the longest
        common *ordered* prefix of its clicks and `clicks` (undone past it, then the rest added), so a cached
        [P2] never serves a request for [P1, P2], and a point repeated twice counts twice. Requests on the
        same image interleave safely: the session is locked from the choice until the block ends, so no
        request sees another's clicks. Up to `limits.max_per_key` sessions are cached per key; a request
        takes the idle one sharing the longest prefix, opens a new one while there are fewer, and otherwise
        waits for the busiest-matching one. A click refused by the Session (outside the image, too many)
        raises InputError and leaves that session holding a prefix of `clicks`, still a valid cache.
        """
        wanted = [as_click(c) for c in clicks]
        cfr, adaptive = parse_mode(mode)
        mode = format_mode(cfr, adaptive)
        key = f"{key}|{mode}"
        entry, created = self._checkout(key, image, mode, wanted)
        try:
            session = entry.session
            have = session.clicks
            kept = common_prefix(have, wanted)
            for _ in range(len(have) - kept):
                session.undo()
            forwards = 0
            for c in wanted[kept:]:
                session.add_click(c.x, c.y, c.positive)
                forwards += session.forwards[-1]
            yield Replayed(entry, kept, forwards, created)
        finally:
            entry.lock.release()
            self.touched(entry)

    def _checkout(self, key: str, image: Callable[[], np.ndarray], mode: str,
                  wanted: list[Click]) -> tuple[Entry, bool]:
        """An entry of `key` with its lock held: the idle one with the longest common prefix, else a new one
        (fewer than max_per_key cached), else wait for the one with the longest common prefix."""
        with self._lock:
            pool = [self._entries[sid] for sid in self._keys.get(key, ()) if sid in self._entries]
            pool.sort(key=lambda e: common_prefix(e.session.clicks, wanted), reverse=True)
            for entry in pool:
                if entry.lock.acquire(blocking=False):
                    self._use(entry)
                    return entry, False
            full = len(pool) >= self.limits.max_per_key
        if not full:
            return self.create(image(), mode, key=key, locked=True), True
        entry = pool[0]
        entry.lock.acquire()
        with self._lock:
            if entry.id in self._entries:
                self._use(entry)
        return entry, False

    def _use(self, entry: Entry) -> None:
        entry.last_used = self.clock()
        self._entries.move_to_end(entry.id)

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
        ids = self._keys.get(entry.key) if entry.key is not None else None
        if ids is not None and entry.id in ids:
            ids.remove(entry.id)
            if not ids:
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
