"""cfr-serve's command line (issue 16 item 9): a bad port, an unknown log level, a port in use and a checkpoint
given for a model each end in one line `cfr-serve: error: ...` with exit status 2, before any URL is printed as
if the server ran; a good command line serves and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from cfr_runtime.serve.cli import main as serve_main
from tests.conftest import ROOT

pytest.importorskip("uvicorn", reason="uvicorn is not installed (pip install -e '.[serve]')")


def _refused(args: list[str], *needles: str):
    result = CliRunner().invoke(serve_main, args)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("cfr-serve: error: ") and "Traceback" not in result.output, result.output
    assert "http://" not in result.output, "the URL was printed as if the server ran"
    for needle in needles:
        assert needle in result.output, result.output
    return result


def test_port_99999_is_refused():
    _refused(["--port", "99999"], "--port", "1<=x<=65535")


def test_log_level_verbose_is_refused():
    _refused(["--log-level", "verbose"], "--log-level", "'verbose'", "debug")


def test_port_in_use_is_one_clear_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        _refused(["--port", str(port)], f"127.0.0.1:{port} is already in use", "--port")


def test_checkpoint_given_as_model_says_export_first():
    result = _refused(["trainer/assets/default.pth"], "cfr-export")
    assert "Protobuf" not in result.output


def test_unresolvable_host_is_refused():
    _refused(["--host", "no-such-host.invalid"], "--host", "127.0.0.1")


def test_serves_and_stops_on_sigterm():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "cfr_runtime.serve", "--port", str(port)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        import httpx

        deadline, ok = time.monotonic() + 90, False
        while time.monotonic() < deadline and proc.poll() is None and not ok:
            try:
                ok = httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).json()["status"] == "ok"
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ok, proc.stderr.read() if proc.poll() is not None else "no answer from /health"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM, as the shell expects)
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err[-2000:]
    assert f"cfr-serve: http://127.0.0.1:{port}/" in err


# ---- issue 16's limits on the command line (serve2) ------------------------------------------------------
@pytest.mark.parametrize("args, needles", [
    (["--allowed-host", "annot.example.org/labels"], ["--allowed-host", "not a host name"]),
    (["--allowed-host", "evil.example@127.0.0.1"], ["--allowed-host", "not a host name"]),
    (["--client-identity", "token"], ["--client-identity", "'token'", "address"]),
    (["--client-identity", "header", "--client-header", "X Client"], ["--client-header", "not an HTTP header"]),
    (["--client-header", "X-User"], ["--client-header x-user is used only with --client-identity header"]),
    (["--client-max-inflight", "0"], ["--client-max-inflight", "must be positive"]),
    (["--queue-timeout", "nan"], ["--queue-timeout", "must be positive"]),
    (["--client-max-sessions", "-3"], ["--client-max-sessions", "must be positive"]),
    (["--max-side", "wide"], ["--max-side", "'wide'"]),
])
def test_bad_limit_is_one_line_error(args, needles):
    result = _refused(args, *needles)
    assert len(result.output.strip().splitlines()) == 1, result.output


class _Stop(Exception):
    """Raised by the stand-in create_app: the command line was parsed and the config built; serve nothing."""


def _config_of(args: list[str], monkeypatch):
    """The ServeConfig `cfr-serve ARGS` hands to create_app (nothing is served)."""
    import cfr_runtime.serve.app as app_module

    seen = []

    def fake_create_app(engine, config):
        seen.append(config)
        raise _Stop

    monkeypatch.setattr(app_module, "create_app", fake_create_app)
    result = CliRunner().invoke(serve_main, args)
    assert isinstance(result.exception, _Stop), result.output
    assert "http://" not in result.output
    return seen[0]


def test_good_limits_reach_the_config(monkeypatch):
    from fastapi.testclient import TestClient

    from cfr_runtime import Engine, default_model
    from cfr_runtime.serve import create_app

    config = _config_of(["--host", "192.168.7.7", "--allowed-host", "Annot.Example.org:8443",
                         "--allowed-host", "10.1.2.3", "--client-identity", "header", "--client-header", "X-User",
                         "--client-max-inflight", "5", "--queue-timeout", "7.5", "--client-max-sessions", "3",
                         "--max-side", "4000"], monkeypatch)
    assert config.allowed_hosts == ("localhost", "127.0.0.1", "::1", "annot.example.org:8443", "10.1.2.3",
                                    "192.168.7.7")
    assert (config.client_identity, config.client_header) == ("header", "x-user")
    assert (config.client_max_inflight, config.queue_timeout_s) == (5, 7.5)
    assert (config.store.client_max_sessions, config.upload.max_side) == (3, 4000)
    monkeypatch.undo()
    app = create_app(Engine(default_model()), config)
    for name, status in (("annot.example.org", 200), ("192.168.7.7:8000", 200), ("other.example", 400)):
        with TestClient(app, base_url=f"http://{name}") as client:
            assert client.get("/health").status_code == status, name
    # a wildcard --host is not a name to allow
    assert _config_of(["--host", "0.0.0.0"], monkeypatch).allowed_hosts == ("localhost", "127.0.0.1", "::1")
    assert _config_of(["--allowed-host", "*"], monkeypatch).allowed_hosts[-1] == "*"


def test_limit_defaults_are_the_config_defaults(monkeypatch):
    """The CLI shows the defaults of ServeConfig, StoreLimits and UploadLimits, not a second copy that drifts."""
    from cfr_runtime.serve import ServeConfig
    from cfr_runtime.serve.cli import IDENTITIES
    from cfr_runtime.serve.fairness import IDENTITIES as SERVED_IDENTITIES

    default = ServeConfig()
    built = _config_of([], monkeypatch)
    assert built.allowed_hosts == default.allowed_hosts
    assert (built.client_identity, built.client_header) == (default.client_identity, default.client_header)
    assert (built.client_max_inflight, built.queue_timeout_s) == (default.client_max_inflight, default.queue_timeout_s)
    assert built.store.client_max_sessions == default.store.client_max_sessions
    assert built.upload.max_side == default.upload.max_side
    assert (built.store.max_sessions, built.store.max_memory_mb, built.store.idle_timeout_s) == (
        default.store.max_sessions, default.store.max_memory_mb, default.store.idle_timeout_s)
    assert (built.upload.max_pixels, built.upload.max_bytes, built.max_concurrent) == (
        default.upload.max_pixels, default.upload.max_bytes, default.max_concurrent)
    assert IDENTITIES == SERVED_IDENTITIES


def test_help_describes_every_limit():
    out = CliRunner().invoke(serve_main, ["--help"]).output
    for name in ("--allowed-host", "--client-identity", "--client-header", "--client-max-inflight", "--queue-timeout",
                 "--client-max-sessions", "--max-side"):
        assert name in out, name
    params = {p.name: p for p in serve_main.params}
    assert all(params[n].help for n in ("allowed_hosts", "client_identity", "client_header", "client_max_inflight",
                                         "queue_timeout", "client_max_sessions", "max_side"))
