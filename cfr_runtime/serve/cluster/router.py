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

import random

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from .routing import owner_order


def routing_key(pending_request: PendingRequest | None) -> str:
    """The session id of a request to the session deployment: its first argument (the gateway calls
    `http(key, op_id, request)`); "" for requests that any replica may answer."""
    if pending_request is None or not pending_request.args:
        return ""
    key = pending_request.args[0]
    return key if isinstance(key, str) else ""


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
