"""Ray Serve's high-throughput mode (docs/ray.md): the environment that turns it on, and what it cannot run.

Plain Python without Ray, imported by the command line (`options`) and by `deploy.serve_on_ray`, so both refuse
`--ingress direct` behind HAProxy with the same message before anything starts.
"""

from __future__ import annotations

import os

# Ray Serve's documented pair for its high-throughput mode (the measured configuration of docs/ray.md)
FAST_SERVE_ENV = {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}


def haproxy_ingress(environ: dict[str, str] | None = None) -> bool:
    """Whether Ray Serve will put HAProxy in front (read as Ray reads it: the variable set to "1")."""
    return (environ if environ is not None else os.environ).get("RAY_SERVE_ENABLE_HA_PROXY", "0") == "1"


def ingress_problem(ingress: str, environ: dict[str, str] | None = None) -> str | None:
    """What Ray would refuse later, deep in `serve.run`, as a message that says what to do (None: fine)."""
    if ingress == "direct" and haproxy_ingress(environ):
        return ("--ingress direct cannot run behind Ray Serve's HAProxy ingress (RAY_SERVE_ENABLE_HA_PROXY=1): "
                "HAProxy balances the ingress deployment's replicas itself, bypassing the session router; use "
                "--ingress gateway (the default; the router runs behind the gateway), or unset "
                "RAY_SERVE_ENABLE_HA_PROXY")
    return None
