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
