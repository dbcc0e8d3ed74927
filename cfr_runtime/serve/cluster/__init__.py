"""`cfr-serve` past one machine, on Ray Serve: the same app and page, sessions routed to the replica that holds
them, each session's record (upload, clicks, mode) outside the replicas so a lost replica loses nothing.

Modules: `record` (the record of truth and its replay), `records` (the versioned record store), `routing`
(which replica owns a session), `asgi` (requests as data), `replica` and `gateway` (the request handling), all
without Ray; `router` (Serve's request-router plug-in) and `deploy` (deployments, actor, entry points) use Ray,
imported only when called. Needs the `ray` extra: pip install 'cfr-icl[ray]'. See docs/ray.md.
"""

from __future__ import annotations

from .deploy import APP_NAME, ClusterOptions, app_builder, build_app, config_from, serve_on_ray, shutdown

__all__ = ["APP_NAME", "ClusterOptions", "app_builder", "build_app", "config_from", "serve_on_ray", "shutdown"]
