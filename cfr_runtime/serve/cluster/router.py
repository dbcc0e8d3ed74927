"""Ray Serve request router of the session deployment: a session's requests go to the replica that owns it.

Why a request router and not Serve's model multiplexing keyed on the session id: multiplexing learns where an
id lives from each replica's periodic report to the controller, then broadcast to every router, so a session's
first requests, and any request that waits past the matching timeout (1 s by default) behind a busy replica,
land on a replica chosen by load; each such move costs a replay of the session's clicks. It also unloads ids
with its own count-only LRU, beside the service's memory cap. Here the owner follows from the session id and the
live replica set alone (`routing.owner_order`): deterministic from the first request, the same on every router,
with no report to wait for. Serve keeps doing the rest: queue-length probes (the owner is ranked first, the
others follow in rendezvous order, so a full owner sheds to its heir), backoff and replica health.

Needs Ray (`pip install 'cfr-icl[ray]'`); imported only by `cluster.deploy`.
"""

from __future__ import annotations

import pickle
import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .asgi import session_id_of
from .routing import owner_order


def routing_key(pending_request: PendingRequest | None) -> str:
    """The session id of a request to the session deployment, "" for requests any replica may answer.

    Through the gateway it is the first argument (`http(key, op_id, request)`). With the sessions deployment as
    the HTTP ingress (`ingress="direct"`), Serve's proxy hands over its HTTP request object, whose ASGI scope
    has the path: that attribute is Serve's internal, so where a Ray version lacks it the key is "" and the
    session's requests go by load, each then rebuilt from its record (correct, only slower: routing is an
    optimisation here, never what keeps the masks right)."""
    if pending_request is None or not pending_request.args:
        return ""
    first = pending_request.args[0]
    if isinstance(first, str):
        return first
    if isinstance(first, bytes):  # Serve's proxy pickles its request object (trusted: it comes from the proxy)
        try:
            first = pickle.loads(first)
        except Exception:  # noqa: BLE001 - another Ray version's format: route by load
            return ""
    scope = getattr(first, "asgi_scope", None)
    if isinstance(scope, dict) and isinstance(scope.get("path"), str):
        return session_id_of(scope["path"]) or ""
    return ""


class SessionRouter(RequestRouter):
    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None:
            pending_request.routing_context.should_backoff = True  # back off between rounds, never spin
        if not candidate_replicas:
            return []
        key = routing_key(pending_request)
        if not key:  # any replica: the less loaded of two at random, as Serve's default router does
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        return [[by_id[rid]] for rid in owner_order(key, list(by_id))]
