"""The record store: every live session's record of truth, versioned, in one place for the whole cluster.

`RecordBook` is the logic (plain Python, one event loop or one thread at a time): compare-and-set commits on a
version number, a per-session "last operation" so a request retried after its replica died is not applied
twice, and the service's limits applied cluster-wide: idle expiry, the cap on the number of sessions and the
cap on their memory (upload bytes plus what each session's replica reports it holds), and the per-client
limits, by the fairness rule of cfr-serve's store (`store` module doc): a client's own least recently used
sessions make way for it, another client's only while the requesting client stays within its fair share; a new
session that cannot be made room for is refused (429: the client is beyond its share, 413: it could never fit).
What the book cannot see is a request in flight on a replica, so it
may evict a session in the middle of its request (that request then answers 404, like an expired session);
each replica's own store, with the same limits, keeps never evicting a session in use and reserves memory
before decoding. On a cluster the book lives in one detached Ray actor (`cluster.deploy`); tests also drive it
in process through `LocalRecords`.

Why one actor and not Redis: the actor is pinned to the head node, the failure domain Ray Serve's own
controller already has (without GCS fault tolerance a head loss ends the Serve application anyway), so it adds
no new way to fail, no service to install, secure and monitor, and no client library; losing any worker node,
where the replicas and their engines run, loses no record. A deployment that makes the head fault tolerant
(GCS on Redis) should move the book to Redis as well: the interface below is what a Redis client would
implement (a hash per record, WATCH/MULTI for the compare-and-set).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from ..store import ANONYMOUS, MB, StoreLimits
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
    client: str = ANONYMOUS  # who it is accounted to (cfr-serve's client identity of the request that made it)

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
    client: str = ANONYMOUS


@dataclass(frozen=True)
class Refused:
    """A create the cluster-wide caps could not make room for: the HTTP status and the message to answer."""

    status: int
    message: str


class RecordBook:
    """Versioned records with cluster-wide expiry and LRU caps. `clock` is injectable for tests."""

    def __init__(self, limits: StoreLimits | None = None, clock: Callable[[], float] = time.monotonic):
        self.limits = limits or StoreLimits()
        self.clock = clock
        self._records: OrderedDict[str, _Record] = OrderedDict()
        self.evicted = {"idle": 0, "count": 0, "memory": 0}

    # ---- the operations a replica calls ---------------------------------------------------------------
    def create(self, sid: str, data: bytes, state: SessionState, op_id: str, nbytes: int,
               client: str = ANONYMOUS) -> int | Refused:
        """Record a new session (version 0) for `client`, evicting by the fairness rule to make room, or
        `Refused` (nothing recorded). A retried create of the same sid returns the existing version."""
        if sid in self._records:
            return self._touch(sid).version
        self._records[sid] = _Record(bytes(data), state, 0, op_id, state, self.clock(), int(nbytes), client)
        refused = self._enforce(keep=sid, client=client, strict=True)
        if refused is not None:
            del self._records[sid]
        return refused or 0

    def head(self, sid: str) -> tuple[int, str] | None:
        """(version, last operation id) of a live record, or None; counts as use (expiry)."""
        rec = self._touch(sid)
        return None if rec is None else (rec.version, rec.last_op)

    def fetch(self, sid: str) -> Fetched | None:
        rec = self._touch(sid)
        return None if rec is None else Fetched(rec.data, rec.state, rec.version, rec.last_op, rec.prev, rec.client)

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
        self._enforce(keep=sid, client=rec.client)
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
        return {"sessions": len(self._records), "memory_mb": round(self._total() / MB, 2),
                "records_mb": round(sum(len(r.data) for r in self._records.values()) / MB, 2),
                "clients": len({r.client for r in self._records.values()}),
                "evicted": dict(self.evicted), "limits": {
                    "idle_timeout_s": self.limits.idle_timeout_s, "max_sessions": self.limits.max_sessions,
                    "max_memory_mb": self.limits.max_memory_mb,
                    "client_max_sessions": self.limits.client_max_sessions}}

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

    def _enforce(self, keep: str, client: str, strict: bool = False) -> Refused | None:
        """Evict least recently used records (never `keep`, which belongs to `client`) until every cap holds, by
        the fairness rule (module doc). strict (a new session): `Refused` when the caps still do not hold (the
        caller removes `keep`); otherwise they are left exceeded (a session that grew: its answer is computed)."""
        lim = self.limits
        cap = lim.max_memory_mb * MB
        usage: Counter[str] = Counter()
        count: Counter[str] = Counter()
        for rec in self._records.values():
            usage[rec.client] += rec.nbytes
            count[rec.client] += 1
        total = sum(usage.values())

        def evict(sid: str, why: str) -> None:
            nonlocal total
            rec = self._records.pop(sid)
            usage[rec.client] -= rec.nbytes
            count[rec.client] -= 1
            total -= rec.nbytes
            self.evicted[why] += 1

        # 1. the client's own session limit: its own least recently used sessions make way
        for sid, rec in list(self._records.items()):
            if count[client] <= lim.client_max_sessions:
                break
            if rec.client == client and sid != keep:
                evict(sid, "count")
        # 2. the cluster's caps: anyone's least recently used, another client's only while `client` is within
        # its share of them (the cap divided by the clients holding sessions)
        holders = {c for c, n in count.items() if n > 0} | {client}
        share_bytes, share_count = cap / len(holders), lim.max_sessions / len(holders)
        for sid, rec in list(self._records.items()):
            over_count, over_memory = len(self._records) > lim.max_sessions, total > cap
            if not (over_count or over_memory):
                break
            if sid == keep:
                continue
            if rec.client != client and not ((not over_memory or usage[client] <= share_bytes)
                                              and (not over_count or count[client] <= share_count)):
                continue
            evict(sid, "count" if over_count else "memory")
        over_count, over_memory = len(self._records) > lim.max_sessions, total > cap
        if not (strict and (over_count or over_memory)):
            return None
        # the book sees no request in flight, so every other client's session can go while `client` is within
        # its share: what is left over is this client's own excess
        need = self._records[keep].nbytes
        if need > cap:
            return Refused(413, f"this session needs {need / MB:.0f} MB (upload and what its replica holds); the "
                                f"cluster's limit is {cap / MB:.0f} MB (max_memory_mb)")
        return Refused(429, f"this client holds {count[client] - 1} other sessions ({usage[client] / MB:.0f} MB with "
                            f"this one) and its share of the cluster is {share_bytes / MB:.0f} MB and "
                            f"{share_count:.1f} sessions while {len(holders)} clients use it; close sessions "
                            "(DELETE /sessions/ID) or retry when they are done")


class LocalRecords:
    """The asynchronous interface a replica uses (`ActorRecords` on a cluster), over an in-process book."""

    def __init__(self, book: RecordBook):
        self.book = book

    async def create(self, sid, data, state, op_id, nbytes, client=ANONYMOUS):
        return self.book.create(sid, data, state, op_id, nbytes, client)

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
