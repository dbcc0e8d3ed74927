"""The one path from a request to heavy work, shared by every route and adapter of the app.

`create_app` builds one `Gate` and puts it on `app.state.gate`; the page's routes, the CVAT adapter and the
Label Studio adapter all go through it, so they share one set of rules instead of each keeping a copy:
- who a request is accounted to (`client`: fairness.client_of, by ServeConfig.client_identity);
- its admission against that client's in-flight limit (`admitted`: 429 beyond it);
- a large body read while its size is held against the store's memory cap (`read_held`), so bodies waiting
  for their turn cannot pile up outside the cap;
- its turn in the fair queue and a worker thread for the work itself (`run`), so nothing heavy (decodes,
  forwards, mask encoding, large JSON) runs on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import InputError
from .codec import http_error, read_body
from .fairness import FairScheduler, client_of
from .store import Reservation, SessionStore

T = TypeVar("T")


class Gate:
    """Client identity, admission, held bodies and fair worker slots for one app (see the module doc)."""

    def __init__(self, store: SessionStore, work: FairScheduler, identity: str = "address",
                 header: str = "x-client-id"):
        self.store, self.work, self.identity, self.header = store, work, identity, header

    def client(self, request: Request) -> str:
        """The client this request is accounted to (fairness.py explains the identities' trade-offs)."""
        return client_of(request, self.identity, self.header)

    def admitted(self, who: str) -> contextlib.AbstractContextManager[None]:
        """Count a request against `who`'s in-flight limit for the block (429 beyond it)."""
        return self.work.admitted(who)

    async def run(self, request: Request, fn: Callable[[], T], lock: asyncio.Lock | None = None,
                  admitted: bool = False) -> T:
        """Run `fn` in a worker once this client's turn comes (fairness.FairScheduler): counted against the
        client's in-flight limit (unless the caller already is, `admitted`), serialised with the session's other
        requests (`lock`) without holding a thread."""
        who = self.client(request)
        with contextlib.nullcontext() if admitted else self.work.admitted(who):
            async with lock if lock is not None else contextlib.nullcontext():
                async with self.work.slot(who):
                    return await run_in_threadpool(fn)

    async def read_held(self, request: Request, limit: int, who: str) -> tuple[bytes, Reservation]:
        """A large body, read while its size (the declared Content-Length, else `limit`) is held against the
        memory cap. Returns (body, reservation); the caller releases the reservation when it lets go of the
        body (`with held:`). 413 beyond `limit`."""
        declared = request.headers.get("content-length", "")
        size = min(int(declared), limit + 1) if declared.isdigit() else limit
        if size > limit:
            raise http_error(InputError, 413, f"request body is {declared} bytes; the limit is {limit}")
        held = await run_in_threadpool(self.store.hold, size, who)
        try:
            return await read_body(request, limit), held
        except BaseException:
            held.release()
            raise

