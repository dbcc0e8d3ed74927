"""One replica of the cluster service: `cfr-serve`'s own app over a store whose sessions are copies of records.

`ReplicaCore.handle` runs each forwarded request through `create_app` unchanged and wraps it in a small
transaction against the record store:

- before: a read (GET) checks the local copy's version against the record and rebuilds the copy by replay when
  it is stale or absent; a write (POST/PUT) uses the local copy as it is (optimistic) and is checked at commit;
- after: if the request changed the session (clicks or mode), the new state is committed with compare-and-set
  on the version the copy was built from. Only then does the answer leave the replica. A click on a current
  copy is the exception that makes the common case fast: the state it will produce is known from its body
  (`Session.check_click` says whether it will be taken), so its commit is sent when the forward starts and
  runs beside it, off the click's critical path; the answer still waits for both. If the click is then not
  taken after all (its forward failed, the app refused it for a reason the check cannot see), a second commit
  puts the record back before the answer leaves (`_undo_commit`); a replica that dies in between leaves a record its
  heir corrects the same way when redoing the request. When another replica
  committed first (Serve's routing moved the session, or two routers disagreed for a moment), the copy is
  brought to the record by the store's replay (from their common prefix) and the request runs again; when the
  record is gone (expired, evicted, deleted) the answer is 404, as on one machine.
- a request retried by the gateway after its replica died carries the same operation id: if that replica had
  already committed it, this one rebuilds the state before it and redoes it (same answer, nothing applied
  twice).

Requests of one session are serialised on a replica (one asyncio lock per session id), as `cfr-serve`
serialises the clicks of a session. Plain Python: tests run two ReplicaCores on one in-process record book.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import secrets
import time
import weakref
from dataclasses import dataclass

from ...engine import Engine
from ...errors import CfrError, InputError, SessionNotFoundError, StateError
from ...session import Click
from ..app import ClickIn, ServeConfig, create_app, error_response
from ..codec import EncodedImage, http_error
from ..memory import click_bytes
from ..store import (
    ANONYMOUS,
    Entry,
    ImageSource,
    Reservation,
    SessionStore,
    StoreLimits,
    advance,
    release_memory,
)
from .asgi import HttpRequest, HttpResponse, call_asgi, session_id_of
from .batching import Submit, batching
from .record import RecordedClick, SessionState
from .records import MISSING, OK, Refused
from .routing import make_session_id

log = logging.getLogger("cfr_runtime.serve.cluster")


@dataclass
class _Request:
    """What the store needs to know about the request being served (a context variable: FastAPI runs the
    endpoints in worker threads, which inherit it)."""

    op_id: str
    upload: bytes | None = None  # the body of POST /sessions: the record keeps the uploaded bytes
    created: Entry | None = None
    record_deleted: bool | None = None  # DELETE: whether the record existed
    cluster_stats: dict | None = None
    redo_of: int | None = None  # the record version this request already produced before its replica died
    redo_state: SessionState | None = None  # ... and the state it produced
    app_ms: float = 0.0  # time in cfr-serve's app
    record_ms: float = 0.0  # time the answer waited on the record store (not a commit overlapped with the app)
    early_commit_ms: float = 0.0  # the round trip of a click's commit sent while its forward ran


_REQUEST: contextvars.ContextVar[_Request | None] = contextvars.ContextVar("cfr_cluster_request", default=None)


class ClusterStore(SessionStore):
    """`SessionStore` whose sessions are local copies of records: ids carry this replica's tag, each copy
    knows the record version it was built from, and `stats()` reports the whole cluster. Everything else
    (reservations before decoding, the fairness rule, expiry, adapter caches for CVAT and Label Studio) is the
    store's own, applied to this replica's copies."""

    def __init__(self, engine: Engine, limits: StoreLimits, tag: str, **kwargs):
        super().__init__(engine, limits, **kwargs)
        self.tag = tag
        self.versions: dict[str, int] = {}

    def new_id(self) -> str:
        return make_session_id(self.tag, secrets.token_urlsafe(24))

    def create(self, rgb, mode: str = "StdInfer", key: str | None = None, locked: bool = False,
               client: str = ANONYMOUS, reservation: Reservation | None = None, sid: str | None = None) -> Entry:
        entry = super().create(rgb, mode, key=key, locked=locked, client=client, reservation=reservation, sid=sid)
        request = _REQUEST.get()
        # a session made by POST /sessions gets a record; adapter caches (a key) and rebuilt copies (a sid) not
        if request is not None and key is None and sid is None:
            request.created = entry
        return entry

    def rebuild(self, sid: str, image: ImageSource, state: SessionState, client: str,
                version: int) -> tuple[Entry, int]:
        """The local copy of record `sid` at `version`, by the store's replay primitive (`advance`): a stale copy
        is brought forward from its common prefix with the record (one click behind costs one click), otherwise
        a new session is opened under `sid`, memory reserved from the image header before the decode and
        accounted to the record's client. Returns the copy and the forwards it took. Runs in a worker thread;
        the replica serialises requests per sid."""
        entry = self.peek(sid)
        if entry is None:
            header = image.header()
            with self.reserve(header.width, header.height, client) as reservation:
                entry = self.create(image(), state.mode, locked=True, client=client, reservation=reservation,
                                    sid=sid)
        else:
            entry.lock.acquire()
        try:
            _, forwards = advance(entry.session, state.steps, state.mode)
        except BaseException:
            entry.lock.release()
            self.discard(sid)  # a copy in an unknown state is never kept
            raise
        with self._lock:
            if self._entries.get(sid) is entry:
                self.versions[sid] = version
        entry.lock.release()
        self.account(entry)
        return entry, forwards

    def peek(self, sid: str) -> Entry | None:
        with self._lock:
            return self._entries.get(sid)

    def discard(self, sid: str) -> None:
        """Drop the local copy (the record, if any, stays)."""
        with self._lock:
            entry = self._entries.get(sid)
            if entry is not None:
                self._drop(entry)
        if entry is not None:
            release_memory()

    def recorded_ids(self) -> list[str]:
        with self._lock:
            return [e.id for e in self._entries.values() if e.key is None]

    def delete(self, sid: str) -> None:
        request = _REQUEST.get()
        if request is None or request.record_deleted is None:
            return super().delete(sid)
        existed = self.peek(sid) is not None
        self.discard(sid)
        if not (existed or request.record_deleted):
            raise SessionNotFoundError(f"no session {sid[:8]}...: it never existed or has expired")

    def stats(self) -> dict:
        local = super().stats()
        request = _REQUEST.get()
        if request is None or request.cluster_stats is None:
            return local
        return {**request.cluster_stats, "replica": {
            "tag": self.tag, "sessions": local["sessions"], "memory_mb": local["memory_mb"],
            "reserved_mb": local["reserved_mb"], "clients": local["clients"], "evicted": local["evicted"]}}

    def _drop(self, entry: Entry) -> None:
        super()._drop(entry)
        self.versions.pop(entry.id, None)


@dataclass
class _Early:
    """A click's commit sent while its forward runs: the state it commits and the call in flight."""

    state: SessionState
    commit: asyncio.Future


class _Timed:
    """The record store client, adding the time of each call to the current request's `record_ms`
    (`inner` is the client itself: the early commit of a click is timed apart, as it runs beside the app)."""

    def __init__(self, records):
        self.inner = records

    def __getattr__(self, name: str):
        method = getattr(self.inner, name)

        async def timed(*args):
            start = time.perf_counter()
            try:
                return await method(*args)
            finally:
                request = _REQUEST.get()
                if request is not None:
                    request.record_ms += (time.perf_counter() - start) * 1000

        return timed


def _retrieve(task: asyncio.Future) -> None:
    """Take the outcome of a transaction whose caller went away (else asyncio logs it as never retrieved)."""
    if not task.cancelled():
        task.exception()


def _as_http(response) -> HttpResponse:
    return HttpResponse(response.status_code, list(response.raw_headers), bytes(response.body))


def not_found(sid: str) -> HttpResponse:
    return _as_http(error_response(SessionNotFoundError(
        f"no session {sid[:8]}...: it never existed or has expired; upload the image again (POST /sessions)")))


class ReplicaCore:
    """The request handling of one replica (see the module docstring). `records` is `LocalRecords` or
    `ActorRecords`; `tag` is the replica's id, written into the ids of the sessions it creates."""

    WRITE_ATTEMPTS = 3

    def __init__(self, engine: Engine, config: ServeConfig, records, tag: str, store: ClusterStore | None = None,
                 submit: Submit | None = None, early_commit: bool = True):
        self.engine, self.config, self.records, self.tag = engine, config, _Timed(records), tag
        self.early_commit = early_commit  # False: a click commits after its forward (to measure the difference)
        # sessions (live and replayed) run on the batching engine when `submit` is given; the app sees the Engine
        self.store = store or ClusterStore(batching(engine, submit), config.store, tag)
        self.app = create_app(engine, config, self.store)
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        self._replay_slots: asyncio.Semaphore | None = None
        self._lifespan = None
        self._creating: set[str] = set()
        self._answers: dict[str, tuple[str, HttpResponse]] = {}  # per session: the last committed write's answer
        self.counters = {"rebuilds": 0, "replayed_forwards": 0, "conflicts": 0, "redone": 0, "early_commits": 0,
                         "rolled_back": 0}

    # ---- lifecycle ------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Enter the app's lifespan (its sweeper expires idle local copies), on the serving event loop."""
        if self._lifespan is None:
            self._replay_slots = asyncio.Semaphore(self.config.max_concurrent)
            self._lifespan = self.app.router.lifespan_context(self.app)
            await self._lifespan.__aenter__()

    async def stop(self) -> None:
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
            self._lifespan = None

    async def sync(self) -> int:
        """Drop local copies whose record is gone (expired or evicted anywhere in the cluster, or deleted
        through another replica), so the cluster-wide caps free memory here too; returns how many."""
        mine = [sid for sid in self.store.recorded_ids() if sid not in self._creating]
        if not mine:
            return 0
        live = await self.records.live(mine)
        gone = [sid for sid in mine if sid not in live]
        for sid in gone:
            self.store.discard(sid)
        for sid in [sid for sid in self._answers if self.store.peek(sid) is None]:
            del self._answers[sid]
        return len(gone)

    # ---- requests -------------------------------------------------------------------------------------
    async def handle(self, op_id: str, req: HttpRequest) -> HttpResponse:
        """One request. The answer carries the milliseconds spent in this replica (`x-cfr-replica-ms`), in the
        app (`x-cfr-app-ms`, which includes the app's own `server_ms`), waiting on the record store
        (`x-cfr-record-ms`) and, for a click committed beside its forward, that commit's round trip
        (`x-cfr-early-commit-ms`, hidden behind the app), so the cost of the cluster is visible per request."""
        start = time.perf_counter()
        if self._lifespan is None:
            await self.start()
        request = _Request(op_id)
        token = _REQUEST.set(request)
        try:
            # shielded: a caller that goes away (Serve cancels the call when its client disconnects) must not stop
            # the transaction half way, as the app's forward runs on in its worker thread and the session takes
            # the click; the copy, the record and the commit are finished together, as when an answer is lost
            transaction = asyncio.ensure_future(self._handle(request, req))
            transaction.add_done_callback(_retrieve)
            response = await asyncio.shield(transaction)
        finally:
            _REQUEST.reset(token)
        timings = [(b"x-cfr-replica-ms", (time.perf_counter() - start) * 1000), (b"x-cfr-app-ms", request.app_ms),
                   (b"x-cfr-record-ms", request.record_ms), (b"x-cfr-early-commit-ms", request.early_commit_ms)]
        return HttpResponse(response.status, [*response.headers, *((k, b"%.3f" % v) for k, v in timings)],
                            response.body)

    async def _call_app(self, req: HttpRequest) -> HttpResponse:
        start = time.perf_counter()
        try:
            return await call_asgi(self.app, req)
        finally:
            request = _REQUEST.get()
            if request is not None:
                request.app_ms += (time.perf_counter() - start) * 1000

    async def _handle(self, request: _Request, req: HttpRequest) -> HttpResponse:
        sid = session_id_of(req.path)
        if sid is not None:
            lock = self._locks.get(sid)
            if lock is None:
                lock = self._locks[sid] = asyncio.Lock()
            async with lock:
                return await self._session_request(sid, request, req)
        if req.path == "/health":
            request.cluster_stats = await self.records.stats()
        if req.method == "POST" and req.path == "/sessions":
            request.upload = req.body
            return await self._create(request, req)
        return await self._call_app(req)

    async def _create(self, request: _Request, req: HttpRequest) -> HttpResponse:
        response = await self._call_app(req)
        entry = request.created
        if entry is None or response.status != 201:
            return response
        self._creating.add(entry.id)
        try:
            recorded = await self.records.create(entry.id, request.upload, SessionState.of(entry.session),
                                                 request.op_id, entry.nbytes, entry.client)
        except BaseException:
            self.store.discard(entry.id)
            raise
        finally:
            self._creating.discard(entry.id)
        if isinstance(recorded, Refused):  # the cluster-wide caps (records.RecordBook._enforce)
            self.store.discard(entry.id)
            error = http_error(InputError if recorded.status == 413 else StateError, recorded.status,
                               recorded.message)
            return _as_http(error_response(error))
        self.store.versions[entry.id] = recorded
        return response

    async def _session_request(self, sid: str, request: _Request, req: HttpRequest) -> HttpResponse:
        try:
            return await self._session_request_unchecked(sid, request, req)
        except CfrError as exc:  # e.g. no memory here to rebuild the session (429/503), as cfr-serve answers it
            return _as_http(error_response(exc))

    async def _session_request_unchecked(self, sid: str, request: _Request, req: HttpRequest) -> HttpResponse:
        if req.method == "DELETE":
            request.record_deleted = await self.records.delete(sid)
            return await self._call_app(req)
        writes = req.method not in ("GET", "HEAD")
        done = self._answers.get(sid)
        if writes and done is not None and done[0] == request.op_id:  # delivered twice: answer, do not redo
            return done[1]
        entry = self.store.peek(sid)
        if entry is None:
            entry = await self._rebuild(sid, request)
        elif not writes:
            head = await self.records.head(sid)
            if head is None:
                self.store.discard(sid)
                entry = None
            elif head[0] != self.store.versions.get(sid):
                entry = await self._rebuild(sid, request)
        for attempt in range(self.WRITE_ATTEMPTS):
            if entry is None:
                return not_found(sid)
            version = self.store.versions.get(sid)  # what this copy was built from (the LRU may drop it below)
            before = SessionState.of(entry.session)
            early = self._commit_early(sid, entry, before, version, request, req) if attempt == 0 else None
            try:
                response = await self._call_app(req)
            except BaseException:
                if early is not None:  # the app crashed: the record must not keep the click
                    await self._take_back(sid, early, before, request, entry)
                raise
            after = SessionState.of(entry.session)
            # the local LRU evicted the copy under our feet: rebuild it and run the request again
            evicted = response.status == 404 and after == before and self.store.peek(sid) is not entry
            if early is not None:
                status, version = await self._await_early(early, request)
                if status == OK and evicted:  # the record has the click: the rebuild sees it is this request's
                    try:  # (last_op) and redoes it, applied once
                        rebuilt = await self._rebuild(sid, request)
                    except BaseException:  # e.g. no memory here (503): the click was not run, nor kept
                        await self._take_back(sid, early, before, request, entry)
                        raise
                    entry = rebuilt
                    continue
                if status == OK:
                    if after != early.state:  # the click was not taken after all
                        version = await self._undo_commit(sid, version, after, request, entry)
                    self._set_version(sid, entry, version)
                    if after != before:
                        self._answers[sid] = (request.op_id, response)
                    return response
            else:
                if evicted:
                    entry = await self._rebuild(sid, request)
                    continue
                if request.redo_of is not None and after == before != request.redo_state \
                        and self._click_state(sid, entry, before, req) == request.redo_state:
                    # this click, committed beside its forward by a replica that died, not taken here (refused, or
                    # its forward failed): the record must not keep what was not done. Only this click: another
                    # request under the same Idempotency-Key must not take back the click it recorded and answered
                    self._set_version(sid, entry, await self._undo_commit(sid, request.redo_of, before, request, entry))
                    return response
                elif after == before:
                    if writes and await self.records.head(sid) is None:  # e.g. a refused click on an expired session
                        self.store.discard(sid)
                        return not_found(sid)
                    return response
                elif request.redo_of is not None:  # committed before its first replica died: already in the record
                    self.counters["redone"] += 1
                    if after != request.redo_state:  # never serve a guess
                        self.store.discard(sid)
                        if request.op_id.startswith("k:"):
                            return _as_http(error_response(http_error(
                                StateError, 409, "this Idempotency-Key was used by an earlier request that differs "
                                                 "from this one; use a new key for each new request")))
                        return _as_http(error_response(http_error(
                            StateError, 500, f"replaying session {sid[:8]}... did not reproduce its record (is the "
                            "engine deterministic, and the same model on every replica?); reload the session")))
                    self._set_version(sid, entry, request.redo_of)
                    self._answers[sid] = (request.op_id, response)  # a further retry of it gets this answer
                    return response
                else:
                    status, version = await self.records.commit(sid, version, after, request.op_id, entry.nbytes)
                    if status == OK:
                        self._set_version(sid, entry, version)
                        self._answers[sid] = (request.op_id, response)
                        return response
            if status == MISSING:
                self.store.discard(sid)
                return not_found(sid)
            # another replica moved the session on: bring this copy to the record (undoing this request's change
            # and adding the clicks it missed), then run the request again
            self.counters["conflicts"] += 1
            entry = await self._rebuild(sid, request)
        return _as_http(error_response(http_error(
            StateError, 503, f"session {sid[:8]}... kept changing on other replicas; retry the request")))

    def _commit_early(self, sid: str, entry: Entry, before: SessionState, version: int | None, request: _Request,
                      req: HttpRequest) -> _Early | None:
        """For a click on a current copy that the session will take: send the commit of the state it produces
        now, to run beside the forward (module doc), with the size the session will have after it. None (the
        commit follows the app, as for other writes) for any other request, a request run again (after a conflict
        or an eviction) or redone for a replica that died, or a click the session refuses (`check_click`); and
        always with `early_commit` off."""
        if not self.early_commit or version is None or request.redo_of is not None:
            return None
        state = self._click_state(sid, entry, before, req)
        if state is None:
            return None  # the app answers it, with its own message; nothing to commit
        self.counters["early_commits"] += 1
        started = time.perf_counter()
        # the size the session will have: the click adds one step to its undo history (what a refused click
        # commits back is measured after the app, as for every other write)
        nbytes = entry.nbytes + click_bytes(entry.session.engine.contract)

        async def commit():
            try:
                return await self.records.inner.commit(sid, version, state, request.op_id, nbytes)
            finally:
                request.early_commit_ms = (time.perf_counter() - started) * 1000

        return _Early(state, asyncio.ensure_future(commit()))

    def _click_state(self, sid: str, entry: Entry, before: SessionState, req: HttpRequest) -> SessionState | None:
        """The state a click request will leave the session at `before` in (`Session.check_click`), or None: not
        a click, or one the session refuses. A body over the app's JSON limit is not parsed (the app refuses it
        unread; parsing a body of up to the upload limit here would hold the event loop for most of a second)."""
        if req.method != "POST" or req.path != f"/sessions/{sid}/clicks" or len(req.body) > self.config.max_json_bytes:
            return None
        try:
            body = ClickIn.model_validate_json(req.body)
            click: Click = entry.session.check_click(body.x, body.y, body.positive)
        except (ValueError, CfrError):  # pydantic's ValidationError is a ValueError
            return None
        return SessionState((*before.clicks, RecordedClick(click.x, click.y, click.positive, before.mode)),
                            before.mode)

    @staticmethod
    async def _await_early(early: _Early, request: _Request) -> tuple[str, int]:
        """The result of a click's early commit; the time the answer waits for it counts in `record_ms`."""
        start = time.perf_counter()
        try:
            return await early.commit
        finally:
            request.record_ms += (time.perf_counter() - start) * 1000

    async def _take_back(self, sid: str, early: _Early, before: SessionState, request: _Request,
                         entry: Entry) -> None:
        """A click committed early that did not run to its answer (the app crashed, or its evicted copy could not
        be rebuilt): put the record back to `before`, and keep the local copy only if it is still the one it
        was, at `before` (a copy in an unknown state is never kept)."""
        status, version = await self._await_early(early, request)
        if status != OK:
            return
        version = await self._undo_commit(sid, version, before, request, entry)
        if self.store.peek(sid) is entry and SessionState.of(entry.session) == before:
            self._set_version(sid, entry, version)
        else:
            self.store.discard(sid)

    async def _undo_commit(self, sid: str, expected: int, state: SessionState, request: _Request,
                           entry: Entry) -> int | None:
        """Commit `state` over a record at version `expected` that holds a change this replica did not make after
        all; returns the new version. Under an id of its own, so that a retry of the request is a new request,
        applied once. When another replica committed on top of the change meanwhile (two replicas writing one
        session at once, which only a routing change allows), the change stays in the record and this copy,
        which is not the record, is dropped (None)."""
        self.counters["rolled_back"] += 1
        status, version = await self.records.commit(sid, expected, state, request.op_id + ":undone", entry.nbytes)
        if status == OK:
            return version
        log.warning("replica %s could not take back a click not taken on session %s... (%s)", self.tag,
                    sid[:12], status)
        self.store.discard(sid)
        return None

    def _set_version(self, sid: str, entry: Entry, version: int | None) -> None:
        # unless the copy was evicted meanwhile (then the next request rebuilds) or dropped (version None)
        if version is not None and self.store.peek(sid) is entry:
            self.store.versions[sid] = version

    async def _rebuild(self, sid: str, request: _Request) -> Entry | None:
        """The local copy of `sid` brought to its record by the store's replay (`ClusterStore.rebuild`); None
        when there is no record."""
        rec = await self.records.fetch(sid)
        if rec is None:
            self.store.discard(sid)
            return None
        state, version = rec.state, rec.version
        if rec.last_op == request.op_id and rec.version > 0:  # this very request was committed already
            state, version, request.redo_of, request.redo_state = rec.prev, rec.version - 1, rec.version, rec.state
        image = EncodedImage(rec.data, self.config.upload)
        async with self._replay_slots:
            entry, forwards = await asyncio.to_thread(self.store.rebuild, sid, image, state, rec.client, version)
        self.counters["rebuilds"] += 1
        self.counters["replayed_forwards"] += forwards
        log.info("replica %s rebuilt session %s... at version %d (%d clicks)", self.tag, sid[:12], version,
                 len(state.clicks))
        return entry
