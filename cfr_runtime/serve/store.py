"""Sessions of the service: unguessable ids, one lock each, expiry by idle time, caps on count and memory that
are reserved before work and shared fairly between clients.

The Engine is shared; every `Session` owns its Runner (buffers bound once), so sessions run concurrently
and only the clicks of one session are serialised, by that session's lock.

Stateless protocols (CVAT, Label Studio, a Ray replica) go through one primitive, `SessionStore.replay`: the
request's click list is the truth and a cached session is only a way to get its answer sooner. Its core,
`advance`, brings any session to a click list (each click under its own mode, where the list says one); a Ray
replica rebuilding a session from its record uses it directly (`cluster.replica.ClusterStore.rebuild`).

Memory: every session is accounted at `memory.resident_bytes` (what it really holds, not just
`Session.nbytes`), and a new one is reserved at `memory.creation_bytes` from the image header before a pixel
is decoded. Room is made by evicting idle sessions (never one in use), least recently used first, under one
fairness rule: a client's own sessions can always make way for it, another client's only while the
requesting client stays within its fair share (the cap divided by the clients holding memory). So one client
flooding uploads evicts its own sessions, not everyone's; what cannot be made room for is refused (413 when
it could never fit, 429 when the client is at its own limit or beyond its share, 503 when the server is full
of other clients' sessions that are in use or within their share).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from ..engine import Engine
from ..errors import InputError, SessionNotFoundError, StateError
from ..session import Click, Session
from .codec import http_error
from .memory import creation_bytes, release_memory, resident_bytes

ANONYMOUS = "-"
MB = 2**20

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
    # sessions one client may hold; its own least recently used idle session makes way for a new one
    client_max_sessions: int = 32


class BusyError(StateError):
    """The server cannot take the request now (memory held by other clients' sessions in use, a full queue)."""


class ImageSource(Protocol):
    """An image `replay` may need: its header first (to reserve memory), then the pixels."""

    def header(self): ...  # -> codec.ImageHeader (width, height)

    def __call__(self) -> np.ndarray: ...


Step = tuple[Click, str]  # a click and the mode it ran with


class RecordedSession(Session):
    """A Session that remembers the mode each click ran with. A mode change applies to later clicks only
    (CFR-3 on the first click runs 4 forwards, StdInfer one), so a click list without modes cannot rebuild a
    session whose mode changed between clicks; with them `advance` can, and can reuse any cached session
    exactly. Every session of the store is one."""

    def __init__(self, *args, **kwargs):
        self.click_modes: list[str] = []
        super().__init__(*args, **kwargs)

    @property
    def mode(self) -> str:
        return format_mode(self.cfr, self.adaptive)

    @property
    def steps(self) -> list[Step]:
        """The clicks in order, each with the mode it ran with."""
        return list(zip(self.clicks, self.click_modes))

    def add_click(self, x: float, y: float, positive: bool = True) -> np.ndarray:
        mask = super().add_click(x, y, positive)
        self.click_modes.append(self.mode)
        return mask

    def undo(self) -> np.ndarray:
        mask = super().undo()
        self.click_modes.pop()
        return mask

    def reset(self) -> None:
        super().reset()
        self.click_modes.clear()


def steps_of(session: Session, mode: str) -> list[Step]:
    """A session's clicks with their modes (`mode` for each, for a Session that does not record them)."""
    return session.steps if isinstance(session, RecordedSession) else [(c, mode) for c in session.clicks]


@dataclass
class Entry:
    """One annotation session: the runtime Session plus what the service needs around it."""

    id: str
    session: Session
    last_used: float
    nbytes: int = 0  # accounted: memory.resident_bytes
    lock: threading.Lock = field(default_factory=threading.Lock)
    key: str | None = None  # set for sessions opened by an adapter (e.g. the CVAT image digest)
    client: str = ANONYMOUS
    # serialises the HTTP requests of one session on the event loop, before they take a worker thread and a
    # forward slot (the threading lock alone would park a worker, and a slot, behind another click)
    alock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def mode(self) -> str:
        return format_mode(self.session.cfr, self.session.adaptive)

    @property
    def size(self) -> tuple[int, int]:
        h, w = self.session.probs.shape
        return w, h

    @property
    def busy(self) -> bool:
        return self.lock.locked() or self.alock.locked()


class Reservation:
    """Memory held for a session being created; `create` turns it into the session's account, otherwise
    `release` (or leaving the `with` block) gives it back."""

    def __init__(self, store: SessionStore, client: str, nbytes: int):
        self.store, self.client, self.nbytes = store, client, nbytes

    def release(self) -> None:
        if self.nbytes:
            with self.store._lock:
                self.store._reserved[self.client] -= self.nbytes
                if self.store._reserved[self.client] <= 0:
                    del self.store._reserved[self.client]
            self.nbytes = 0

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


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


def as_step(c: Click | Sequence, mode: str) -> Step:
    """(Click, mode) from a Click or (x, y, positive) (run under `mode`) or (x, y, positive, mode)."""
    if not isinstance(c, Click) and isinstance(c, Sequence) and len(c) == 4:
        return as_click(c[:3]), format_mode(*parse_mode(c[3]))
    return as_click(c), mode


def advance(session: Session, wanted: Sequence[Step], mode: str) -> tuple[int, int]:
    """Bring `session` to the state of a fresh Session fed `wanted` in order, each click under its own mode, and
    leave it in `mode` (for the clicks to come). Reuse is exact or not at all: the session keeps its longest
    common ordered prefix with `wanted` (click and mode alike), is undone past it, then the rest is added.
    Returns (clicks kept, forwards run). A click the Session refuses raises InputError and leaves it holding a
    prefix of `wanted`, in `mode`."""
    have = steps_of(session, format_mode(session.cfr, session.adaptive))
    kept = common_prefix(have, wanted)
    for _ in range(len(have) - kept):
        session.undo()
    forwards = 0
    try:
        for click, click_mode in wanted[kept:]:
            session.cfr, session.adaptive = parse_mode(click_mode)
            session.add_click(click.x, click.y, click.positive)
            forwards += session.forwards[-1]
    finally:
        session.cfr, session.adaptive = parse_mode(mode)
    return kept, forwards


def common_prefix(have: Sequence, wanted: Sequence) -> int:
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
        self._reserved: Counter[str] = Counter()  # client -> bytes reserved for sessions being created
        self._opening: Counter[str] = Counter()  # replay key -> sessions being opened for it
        self._lock = threading.Lock()
        self.evicted = {"idle": 0, "count": 0, "memory": 0}

    # ---- memory ----------------------------------------------------------------------------------
    def reserve(self, width: int, height: int, client: str = ANONYMOUS) -> Reservation:
        """Reserve what a new session on a width x height image will need, before decoding it; evicts idle
        sessions by the fairness rule (module doc) to make room. Raises InputError 413 (never fits),
        StateError 429 (the client's own limits or share) or BusyError 503 (full of others' sessions)."""
        need = creation_bytes(height, width, self.engine.contract)
        return self._hold(need, client, 1, f"a {width}x{height} image needs about {need / MB:.0f} MB to annotate")

    def hold(self, nbytes: int, client: str = ANONYMOUS) -> Reservation:
        """Hold `nbytes` of the cap for something that is not a session (a request body being read and
        kept while its request waits), by the same rules as `reserve`."""
        return self._hold(nbytes, client, 0, f"a request of {nbytes / MB:.0f} MB")

    def _hold(self, need: int, client: str, new: int, what: str) -> Reservation:
        cap = int(self.limits.max_memory_mb * MB)
        if need > cap:
            raise http_error(InputError, 413, f"{what}; the server's limit is {cap / MB:.0f} MB "
                                              "(cfr-serve --max-memory-mb)")
        with self._lock:
            evicted = self._make_room(client, need, new)
            self._reserved[client] += need
        if evicted:
            release_memory()
        return Reservation(self, client, need)

    def account(self, entry: Entry) -> int:
        """Re-measure a session after it changed (its undo history grows with clicks) and re-apply the caps;
        returns the sessions evicted."""
        nbytes = resident_bytes(entry.session)
        with self._lock:
            entry.nbytes = nbytes
            entry.last_used = self.clock()
            evicted = self._make_room(entry.client, 0, 0, keep=entry.id, strict=False)
        if evicted:
            release_memory()
        return evicted

    touched = account  # the name the HTTP endpoints used before reservations

    # ---- lifecycle -------------------------------------------------------------------------------
    def new_id(self) -> str:
        """An unguessable session id (a cluster replica prefixes its own tag)."""
        return secrets.token_urlsafe(24)

    def create(self, rgb: np.ndarray, mode: str = "StdInfer", key: str | None = None, locked: bool = False,
               client: str = ANONYMOUS, reservation: Reservation | None = None, sid: str | None = None) -> Entry:
        """A new session on `rgb` for `client`. `key` files it under an adapter key; `locked` hands it out
        with its lock held (the caller releases it), so no other request can touch it before the caller's
        first use. Without a `reservation` one is made here (after the decode: callers that decode should
        reserve first, from the header). `sid`: the id to file it under instead of a new one (a cluster
        replica rebuilding a session that another replica created; the caller makes sure it is free)."""
        cfr, adaptive = parse_mode(mode)
        if reservation is None:
            reservation = self.reserve(rgb.shape[1], rgb.shape[0], client)
        with reservation:
            session = RecordedSession(self.engine, cfr=cfr, adaptive=adaptive)
            session.set_image(rgb)
            entry = Entry(sid or self.new_id(), session, self.clock(), resident_bytes(session), key=key,
                          client=client)
            if locked:
                entry.lock.acquire()
            with self._lock:
                self._reserved[client] -= reservation.nbytes
                if self._reserved[client] <= 0:
                    del self._reserved[client]
                reservation.nbytes = 0
                self._entries[entry.id] = entry
                if key is not None:
                    self._keys.setdefault(key, []).append(entry.id)
                evicted = self._make_room(client, 0, 0, keep=entry.id, strict=False)
        if evicted:
            release_memory()
        return entry

    def get(self, sid: str) -> Entry:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise SessionNotFoundError(f"no session {sid[:8]}...: it never existed or has expired; "
                                           "upload the image again (POST /sessions)")
            self._use(entry)
            return entry

    def by_key(self, key: str) -> list[Entry]:
        """The cached sessions filed under an adapter key (most recently used last)."""
        with self._lock:
            return [self._entries[sid] for sid in self._keys.get(key, ()) if sid in self._entries]

    @contextmanager
    def replay(self, key: str, image: ImageSource | Callable[[], np.ndarray], clicks: Sequence[Click | Sequence],
               mode: str = "StdInfer", client: str = ANONYMOUS,
               size: tuple[int, int] | None = None) -> Iterator[Replayed]:
        """The stateless rule: a session in exactly the state of a fresh `Session(mode)` on the image, fed
        `clicks` one by one in the order given.

            with store.replay(digest, lambda: decode(blob), [(x, y, True), ...], "CFR-4") as r:
                mask = r.session.mask        # read everything you need inside the block

        key: the image's identity (e.g. the SHA-256 of its bytes); the mode is added to it, since CFR changes
          the result of the first click. image: called only when no cached session can be used, returns the
          H x W x 3 uint8 RGB image; when it also has `header()` (an `ImageSource`, e.g.
          `codec.EncodedImage`), the memory is reserved from the header before the decode. clicks: Click or
          (x, y, positive), in the order they are to be applied, each run under `mode`; or (x, y, positive,
          click_mode) for a click that ran under another mode (a session whose mode changed between clicks;
          `mode` is then the mode it is left in). client: who the new session is accounted to.
          size: (width, height) of the image the clicks were placed on, when the protocol says (Label Studio's
          coordinates are percentages of the image it showed): a session on an image of another size is refused
          (InputError 400) before any click is applied, since those pixels would name other points.
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
        cfr, adaptive = parse_mode(mode)
        mode = format_mode(cfr, adaptive)
        wanted = [as_step(c, mode) for c in clicks]
        key = f"{key}|{mode}"
        entry, created = self._checkout(key, image, mode, wanted, client)
        try:
            if size is not None and entry.size != tuple(size):
                w, h = entry.size
                raise http_error(InputError, 400, f"the clicks were placed on a {size[0]}x{size[1]} image, but the "
                                                  f"image is {w}x{h}")
            kept, forwards = advance(entry.session, wanted, mode)
            yield Replayed(entry, kept, forwards, created)
        finally:
            entry.lock.release()
            self.account(entry)

    def _checkout(self, key: str, image, mode: str, wanted: list[Step], client: str) -> tuple[Entry, bool]:
        """An entry of `key` with its lock held: the idle one with the longest common prefix, else a new one
        (fewer than max_per_key cached or being opened), else wait for the one with the longest common prefix."""
        while True:
            with self._lock:
                pool = [self._entries[sid] for sid in self._keys.get(key, ()) if sid in self._entries]
                pool.sort(key=lambda e: common_prefix(steps_of(e.session, mode), wanted), reverse=True)
                for entry in pool:
                    if entry.lock.acquire(blocking=False):
                        self._use(entry)
                        return entry, False
                full = len(pool) + self._opening[key] >= self.limits.max_per_key
                if not full:
                    self._opening[key] += 1  # counted until it is in the pool, so racing requests see it
            if not full:
                return self._open(key, image, mode, client), True
            if pool:
                break
            time.sleep(0.01)  # every session of this key is still being opened: look again shortly
        entry = pool[0]
        entry.lock.acquire()
        with self._lock:
            if entry.id in self._entries:
                self._use(entry)
        return entry, False

    def _open(self, key: str, image, mode: str, client: str) -> Entry:
        """A new locked session for `key` (its slot in `_opening` taken by the caller), memory reserved from the
        image header before the decode when the source has one."""
        reservation = None
        try:
            if hasattr(image, "header"):
                header = image.header()
                reservation = self.reserve(header.width, header.height, client)
            rgb = image()
            return self.create(rgb, mode, key=key, locked=True, client=client, reservation=reservation)
        finally:
            if reservation is not None:
                reservation.release()  # a no-op once `create` has turned it into the session's account
            with self._lock:
                self._opening[key] -= 1
                if self._opening[key] <= 0:
                    del self._opening[key]

    def forget(self, prefix: str) -> int:
        """Drop every session filed under an adapter key that starts with `prefix`, in every mode and whether in
        use or not (e.g. a Label Studio task's sessions once its annotation is saved); returns how many. It only
        costs time: `replay` gives the same answers without them."""
        if not prefix:
            raise InputError("forget() needs a key prefix; an empty one would drop every adapter's sessions")
        with self._lock:
            doomed = [self._entries[sid] for key, ids in self._keys.items() if key.startswith(prefix)
                      for sid in ids if sid in self._entries]
            for entry in doomed:
                self._drop(entry)
        if doomed:
            release_memory()
        return len(doomed)

    def delete(self, sid: str) -> None:
        with self._lock:
            entry = self._entries.get(sid)
            if entry is None:
                raise SessionNotFoundError(f"no session {sid[:8]}...: it never existed or has expired")
            self._drop(entry)
        release_memory()

    def sweep(self, release: bool = True) -> int:
        """Drop sessions idle for longer than the timeout (never one in the middle of a click); returns how many.
        release=False leaves handing the pages back (`memory.release_memory`) to the caller."""
        deadline = self.clock() - self.limits.idle_timeout_s
        with self._lock:
            stale = [e for e in self._entries.values() if e.last_used < deadline and not e.busy]
            for entry in stale:
                self._drop(entry)
            self.evicted["idle"] += len(stale)
        if stale and release:
            release_memory()
        return len(stale)

    def stats(self) -> dict:
        with self._lock:
            clients = {e.client for e in self._entries.values()} | set(self._reserved)
            return {"sessions": len(self._entries), "memory_mb": round(self._total() / MB, 2),
                    "reserved_mb": round(sum(self._reserved.values()) / MB, 2), "clients": len(clients),
                    "evicted": dict(self.evicted), "limits": {
                        "idle_timeout_s": self.limits.idle_timeout_s, "max_sessions": self.limits.max_sessions,
                        "max_memory_mb": self.limits.max_memory_mb,
                        "client_max_sessions": self.limits.client_max_sessions}}

    def __len__(self) -> int:
        return len(self._entries)

    # ---- internals (store lock held) ---------------------------------------------------------------
    def _use(self, entry: Entry) -> None:
        entry.last_used = self.clock()
        self._entries.move_to_end(entry.id)

    def _total(self) -> int:
        return sum(e.nbytes for e in self._entries.values()) + sum(self._reserved.values())

    def _drop(self, entry: Entry) -> None:
        self._entries.pop(entry.id, None)
        ids = self._keys.get(entry.key) if entry.key is not None else None
        if ids is not None and entry.id in ids:
            ids.remove(entry.id)
            if not ids:
                del self._keys[entry.key]

    def _make_room(self, client: str, need: int, new: int, keep: str | None = None, strict: bool = True) -> int:
        """Evict idle sessions until `need` more bytes and `new` more sessions fit every cap; returns how many
        went. strict: raise when they cannot fit (a reservation); else leave the caps exceeded (a session that
        grew with a click: its answer is already computed)."""
        lim = self.limits
        cap = int(lim.max_memory_mb * MB)
        usage: Counter[str] = Counter(self._reserved)
        count: Counter[str] = Counter()
        for e in self._entries.values():
            usage[e.client] += e.nbytes
            count[e.client] += 1
        total = sum(usage.values())
        evicted = 0

        def evict(e: Entry, why: str) -> None:
            nonlocal total, evicted
            self._drop(e)
            usage[e.client] -= e.nbytes
            count[e.client] -= 1
            total -= e.nbytes
            self.evicted[why] += 1
            evicted += 1

        # 1. the client's own session limit: its own least recently used idle sessions make way
        for e in list(self._entries.values()):
            if count[client] + new <= lim.client_max_sessions:
                break
            if e.client == client and e.id != keep and not e.busy:
                evict(e, "count")
        if count[client] + new > lim.client_max_sessions and strict:
            raise http_error(StateError, 429, (
                f"this client holds {count[client]} sessions, all in use; the limit is "
                f"{lim.client_max_sessions} per client: close some (DELETE /sessions/ID) or wait"))
        # 2. the server's caps, by the fairness rule
        holders = {c for c, b in usage.items() if b > 0} | {client}
        share_bytes = cap / len(holders)
        share_count = lim.max_sessions / len(holders)
        for e in list(self._entries.values()):
            over_count = len(self._entries) + new > lim.max_sessions
            over_memory = total + need > cap
            if not (over_count or over_memory):
                break
            if e.id == keep or e.busy:
                continue
            if e.client != client:
                within = (usage[client] + need <= share_bytes if over_memory else True) and (
                    count[client] + new <= share_count if over_count else True)
                if not within:
                    continue
            evict(e, "count" if over_count else "memory")
        over_memory, over_count = total + need > cap, len(self._entries) + new > lim.max_sessions
        if strict and (over_memory or over_count):
            beyond_share = (over_memory and usage[client] + need > share_bytes) or (
                over_count and count[client] + new > share_count)
            if beyond_share:
                held = f"{usage[client] / MB:.0f} MB in {count[client]} sessions"
                raise http_error(StateError, 429, (
                    f"this client holds {held} (in use or being opened) and its share of the server is "
                    f"{share_bytes / MB:.0f} MB and {share_count:.0f} sessions while {len(holders)} clients use it; "
                    "close sessions (DELETE /sessions/ID) or retry when they are done"))
            what = f"{total / MB:.0f} MB of {cap / MB:.0f} MB" if over_memory else (
                f"{len(self._entries)} of {lim.max_sessions} sessions")
            raise http_error(BusyError, 503, (
                f"the server is full ({what} held by sessions in use or by other clients within their "
                f"share); this request needs {need / MB:.0f} MB more: retry later"))
        return evicted
