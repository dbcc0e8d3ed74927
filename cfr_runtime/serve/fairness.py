"""Who is asking, and whose turn it is: the client identity and the fair queue for heavy work.

Heavy work (a decode, a click's forwards, a CVAT answer) runs in a few worker slots, about one per core:
more only oversubscribes the CPU, and ONNX Runtime's arena grows to the peak number of concurrent runs.
Requests wait for a slot on the event loop (holding no thread), in one queue per client, and slots are
granted round-robin across the clients that are waiting: a client with 40 clicks queued and a client with
one each get every other slot, so the second waits for at most about one piece of the first one's work per
slot instead of all 40 (issue 16, case 3: 34.3 s for one click behind 44 CFR-32 first clicks). A client may
have at most `max_pending` requests in the queue or running; more are refused at once with 429.

The unit of fairness is a request, not a forward: a CFR-32 first click (33 forwards) holds its slot for all of
them, so a light client can wait behind one such click per slot. Splitting a click's forwards across turns
would need the Session to yield between forwards; a request is what the protocol exposes.

Client identity (`ServeConfig.client_identity`):
- "address" (default): the peer's IP address. It cannot be forged over TCP, but every user behind one NAT or
  reverse proxy is one client (they share one quota and one turn), and CVAT's lambda manager calls from its
  own server, so all CVAT users of one CVAT are one client.
- "header": the value of `ServeConfig.client_header` (X-Client-Id), else the address. It tells users apart
  behind a proxy, but anyone can send any value, so one user can mint many identities and multiply their
  quota: use it only behind a proxy that authenticates users and sets the header itself (overwriting what
  the client sent).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter, OrderedDict, deque
from collections.abc import AsyncIterator, Iterator

from ..errors import StateError
from .codec import http_error

IDENTITIES = ("address", "header")


def client_of(request, identity: str = "address", header: str = "x-client-id") -> str:
    """The client a request is accounted to (see the module doc for the trade-offs)."""
    address = request.client.host if request.client else "unknown"
    if identity == "header":
        value = request.headers.get(header, "").strip()
        if value:
            return "id:" + value[:128]
    return address


class FairScheduler:
    """`capacity` slots granted round-robin across clients; lives on the event loop (not thread-safe)."""

    def __init__(self, capacity: int, max_pending: int = 32, max_wait_s: float = 120.0):
        if capacity < 1 or max_pending < 1:
            raise ValueError("capacity and max_pending must be >= 1")
        self.capacity, self.max_pending, self.max_wait_s = capacity, max_pending, max_wait_s
        self._running = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future]] = OrderedDict()  # round-robin order
        self._pending: Counter[str] = Counter()  # per client: admitted, waiting or running
        self.granted: Counter[str] = Counter()  # per client: slots granted so far (tests, stats)

    @contextlib.contextmanager
    def admitted(self, client: str) -> Iterator[None]:
        """Count a request against its client's `max_pending` for as long as it lasts; 429 beyond."""
        if self._pending[client] >= self.max_pending:
            raise http_error(StateError, 429, (
                f"this client already has {self._pending[client]} requests in progress; the limit is "
                f"{self.max_pending}: wait for their answers"))
        self._pending[client] += 1
        try:
            yield
        finally:
            self._pending[client] -= 1
            if not self._pending[client]:
                del self._pending[client]

    @contextlib.asynccontextmanager
    async def slot(self, client: str) -> AsyncIterator[None]:
        """Wait for this client's turn and a free slot; hold it for the block."""
        if self._running < self.capacity and not self._waiting:
            self._running += 1
        else:
            fut = asyncio.get_running_loop().create_future()
            self._waiting.setdefault(client, deque()).append(fut)
            try:
                await asyncio.wait_for(asyncio.shield(fut), self.max_wait_s)
            except BaseException as exc:
                if fut.done() and not fut.cancelled():  # granted just as we gave up: pass the slot on
                    self._release()
                else:
                    fut.cancel()
                    self._forget(client, fut)
                if isinstance(exc, asyncio.TimeoutError):
                    raise http_error(StateError, 503, (
                        f"no worker slot came free within {self.max_wait_s:.0f} s; the server is overloaded, "
                        "retry later")) from None
                raise
        self.granted[client] += 1
        try:
            yield
        finally:
            self._release()

    def stats(self) -> dict:
        return {"capacity": self.capacity, "running": self._running,
                "waiting": sum(len(q) for q in self._waiting.values()), "clients_waiting": len(self._waiting)}

    def _forget(self, client: str, fut: asyncio.Future) -> None:
        queue = self._waiting.get(client)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(fut)
            if not queue:
                del self._waiting[client]

    def _release(self) -> None:
        self._running -= 1
        while self._running < self.capacity and self._waiting:
            client, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            if queue:
                self._waiting.move_to_end(client)  # the next turn goes to the next client
            else:
                del self._waiting[client]
            if fut.cancelled():
                continue
            fut.set_result(None)
            self._running += 1
