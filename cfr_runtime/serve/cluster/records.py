"""The record store: every live session's record of truth, versioned, in one place for the whole cluster.

`RecordBook` is the logic (plain Python, one event loop or one thread at a time): compare-and-set commits on a
version number, a per-session "last operation" so a request retried after its replica died is not applied
twice, and the service's limits applied cluster-wide: idle expiry, the cap on the number of sessions and the
cap on their memory (upload bytes plus what each session's replica reports it holds), evicting the least
recently used. On a cluster it lives in one detached Ray actor (`cluster.deploy`); tests also drive it in
process through `LocalRecords`.

Why one actor and not Redis: the actor is pinned to the head node, the failure domain Ray Serve's own
controller already has (without GCS fault tolerance a head loss ends the Serve application anyway), so it adds
no new way to fail, no service to install, secure and monitor, and no client library; losing any worker node,
where the replicas and their engines run, loses no record. A deployment that makes the head fault tolerant
(GCS on Redis) should move the book to Redis as well: the interface below is what a Redis client would
implement (a hash per record, WATCH/MULTI for the compare-and-set).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..store import StoreLimits
from .record import SessionState

OK, CONFLICT, MISSING = "ok", "conflict", "missing"


@dataclass
class _Record:
    data: bytes
    state: SessionState
    version: int
    last_op: str
    prev: SessionState  # the state before `last_op`: a retried `last_op` is replayed from here
    last_used: float
    replica_bytes: int  # what the session holds on its replica (decoded image, maps, undo history)

    @property
    def nbytes(self) -> int:
        return len(self.data) + self.replica_bytes


@dataclass(frozen=True)
class Fetched:
    """A record as a replica rebuilds from it."""

    data: bytes
    state: SessionState
    version: int
    last_op: str
    prev: SessionState


class RecordBook:
    """Versioned records with cluster-wide expiry and LRU caps. `clock` is injectable for tests."""

    def __init__(self, limits: StoreLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or StoreLimits()
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self.evicted = {"idle": 0, "count": 0, "memory": 0}

    # ---- the operations a replica calls ---------------------------------------------------------------
    def create(self, sid: str, data: bytes, state: SessionState, op_id: str, nbytes: int) -> int:
        """Record a new session (version 0); a retried create of the same sid returns the existing version."""
        if sid in self._records:
            return self._touch(sid).version
        self._records[sid] = _Record(bytes(data), state, 0, op_id, state, self.clock(), int(nbytes))
        self._enforce(keep=sid)
        return 0

    def head(self, sid: str) -> tuple[int, str] | None:
        """(version, last operation id) of a live record, or None; counts as use (expiry)."""
        rec = self._touch(sid)
        return None if rec is None else (rec.version, rec.last_op)

    def fetch(self, sid: str) -> Fetched | None:
        rec = self._touch(sid)
        return None if rec is None else Fetched(rec.data, rec.state, rec.version, rec.last_op, rec.prev)

    def commit(self, sid: str, expected: int, state: SessionState, op_id: str, nbytes: int) -> tuple[str, int]:
        """Set the state if the record is still at version `expected`: ("ok", new version), ("conflict",
        current version) when another replica committed first, ("missing", -1) when it expired or was deleted."""
        rec = self._touch(sid)
        if rec is None:
            return MISSING, -1
        if rec.version != expected:
            return CONFLICT, rec.version
        rec.prev, rec.state, rec.last_op = rec.state, state, op_id
        rec.version += 1
        rec.replica_bytes = int(nbytes)
        self._enforce(keep=sid)
        return OK, rec.version

    def delete(self, sid: str) -> bool:
        return self._records.pop(sid, None) is not None

    def live(self, sids: list[str]) -> dict[str, int]:
        """The versions of those of `sids` that still have a record (replicas drop copies of the others);
        does not count as use."""
        return {sid: self._records[sid].version for sid in sids if sid in self._records}

    def sweep(self) -> int:
        """Drop records idle for longer than the timeout; returns how many."""
        deadline = self.clock() - self.limits.idle_timeout_s
        stale = [sid for sid, rec in self._records.items() if rec.last_used < deadline]
        for sid in stale:
            del self._records[sid]
        self.evicted["idle"] += len(stale)
        return len(stale)

    def stats(self) -> dict:
        return {"sessions": len(self._records), "memory_mb": round(self._total() / 2**20, 2),
                "records_mb": round(sum(len(r.data) for r in self._records.values()) / 2**20, 2),
                "evicted": dict(self.evicted), "limits": {
                    "idle_timeout_s": self.limits.idle_timeout_s, "max_sessions": self.limits.max_sessions,
                    "max_memory_mb": self.limits.max_memory_mb}}

    def __len__(self) -> int:
        return len(self._records)

    # ---- internals -----------------------------------------------------------------------------------
    def _touch(self, sid: str) -> _Record | None:
        rec = self._records.get(sid)
        if rec is not None:
            rec.last_used = self.clock()
            self._records.move_to_end(sid)
        return rec

    def _total(self) -> int:
        return sum(r.nbytes for r in self._records.values())

    def _enforce(self, keep: str) -> None:
        """Evict least recently used records (never `keep`) until both caps hold."""
        cap = self.limits.max_memory_mb * 2**20
        for sid in list(self._records):
            over_count = len(self._records) > self.limits.max_sessions
            if not (over_count or self._total() > cap):
                break
            if sid == keep:
                continue
            del self._records[sid]
            self.evicted["count" if over_count else "memory"] += 1


class LocalRecords:
    """The asynchronous interface a replica uses (`ActorRecords` on a cluster), over an in-process book."""

    def __init__(self, book: RecordBook):
        self.book = book

    async def create(self, sid, data, state, op_id, nbytes):
        return self.book.create(sid, data, state, op_id, nbytes)

    async def head(self, sid):
        return self.book.head(sid)

    async def fetch(self, sid):
        return self.book.fetch(sid)

    async def commit(self, sid, expected, state, op_id, nbytes):
        return self.book.commit(sid, expected, state, op_id, nbytes)

    async def delete(self, sid):
        return self.book.delete(sid)

    async def live(self, sids):
        return self.book.live(sids)

    async def stats(self):
        return self.book.stats()
