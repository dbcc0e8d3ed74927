"""Which replica owns a session: the one that created it while it lives, then a rendezvous-hash heir.

A session id made on a cluster is `<replica tag>.<random token>`: the tag is the creating replica's Ray Serve
id, so a session stays on the replica that decoded its image and holds its maps. When that replica is gone,
every router ranks the live replicas by a hash of (session id, replica id) and picks the highest (rendezvous,
or highest-random-weight, hashing): all routers agree without talking to each other, only the dead replica's
sessions move, and they spread evenly over the survivors. Adding a replica moves nothing.

Plain Python, so the policy is tested without Ray; `cluster.router` plugs it into Ray Serve's request router.
"""

from __future__ import annotations

import hashlib

TAG_SEP = "."


def make_session_id(tag: str, token: str) -> str:
    return f"{tag}{TAG_SEP}{token}"


def tag_of(session_id: str) -> str | None:
    tag, sep, _ = session_id.partition(TAG_SEP)
    return tag if sep and tag else None


def _weight(session_id: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{session_id}\0{replica}".encode(), digest_size=8).digest()


def owner_order(session_id: str, replicas: list[str]) -> list[str]:
    """`replicas` (their ids) in the order to try them for `session_id`: its creator first when alive, then by
    rendezvous weight. The same answer on every router that sees the same replicas."""
    ranked = sorted(replicas, key=lambda r: _weight(session_id, r), reverse=True)
    tag = tag_of(session_id)
    if tag in ranked:
        ranked.remove(tag)
        ranked.insert(0, tag)
    return ranked
