"""A real Label Studio for tests and benchmarks: installed in its own virtualenv, started on 127.0.0.1.

Label Studio 1.23 pins about 160 packages (Django, its own numpy/opencv ranges), so it never goes into the
project's environment: it lives in a virtualenv of its own, cached between runs at
$CFR_LABEL_STUDIO_HOME (default ~/.cache/cfr-icl/label-studio-1.23), together with a migrated, empty data
directory (`template/`, with one user and a legacy API token) that every server copies: a fresh database
costs a minute of migrations, a copy about fifteen seconds of start-up. A file lock serialises installs, so
`.ci/run` can prepare it in the background (`python3 -m tests.ls_util prepare`) while other tests run.

Each server gets a temporary data directory with SQLite, listens on 127.0.0.1 only, with analytics off,
and is stopped (its whole process group) on exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

LS_VERSION = "1.23.2"
HOME = Path(os.environ.get("CFR_LABEL_STUDIO_HOME", Path.home() / ".cache" / "cfr-icl" / "label-studio-1.23"))
USER, PASSWORD = "cfr-test@example.com", "cfr-test-password"
TOKEN = "cfr0test0token0000000000000000000000001"  # the legacy token of USER in every test server
INSTALL_TIMEOUT_S = 1500
START_TIMEOUT_S = 240
# ML_BLOCK_LOCAL_IP / SSRF_PROTECTION_ENABLED: Label Studio 1.23 refuses ML backends (and the webhook it
# creates for them) on loopback and private addresses unless both are off
SERVER_ENV = {"LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true", "ML_BLOCK_LOCAL_IP": "false",
              "SSRF_PROTECTION_ENABLED": "false", "COLLECT_ANALYTICS": "false", "SENTRY_DSN": "",
              "FRONTEND_SENTRY_DSN": "", "DJANGO_DB": "sqlite", "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"}


def _exe(name: str) -> Path:
    return HOME / "bin" / name


def _installed_version() -> str | None:
    if not _exe("label-studio").exists():
        return None
    code = "import importlib.metadata as m; print(m.version('label-studio'))"
    out = subprocess.run([str(_exe("python")), "-c", code], capture_output=True, text=True, timeout=120)
    return out.stdout.strip() if out.returncode == 0 else None


def _env(data_dir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))}
    env.update(SERVER_ENV, LABEL_STUDIO_BASE_DATA_DIR=str(data_dir), HOME=str(data_dir))
    return env


@contextlib.contextmanager
def _locked():
    HOME.parent.mkdir(parents=True, exist_ok=True)
    with open(HOME.parent / (HOME.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure() -> tuple[Path | None, str]:
    """(the label-studio executable, "") when installed and migrated, else (None, why not). Installs on a miss."""
    with _locked():
        if _installed_version() != LS_VERSION:
            shutil.rmtree(HOME, ignore_errors=True)
            steps = [[sys.executable, "-m", "venv", str(HOME)],
                     [str(_exe("python")), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                      f"label-studio=={LS_VERSION}"]]
            for cmd in steps:
                try:
                    out = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    return None, f"installing Label Studio {LS_VERSION} took over {INSTALL_TIMEOUT_S} s"
                if out.returncode != 0:
                    tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                    shutil.rmtree(HOME, ignore_errors=True)
                    return None, f"could not install Label Studio {LS_VERSION} ({' | '.join(tail)})"
        template = HOME / "template"
        if not (template / "label_studio.sqlite3").exists():
            tmp = Path(tempfile.mkdtemp(prefix="template-", dir=HOME))
            cmd = [str(_exe("label-studio")), "init", "--data-dir", str(tmp), "--username", USER, "--password",
                   PASSWORD, "--user-token", TOKEN, "--enable-legacy-api-token"]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S, env=_env(tmp),
                                 cwd=tmp)
            if out.returncode != 0 or not (tmp / "label_studio.sqlite3").exists():
                shutil.rmtree(tmp, ignore_errors=True)
                tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
                return None, f"label-studio init failed ({' | '.join(tail)})"
            shutil.rmtree(template, ignore_errors=True)
            tmp.rename(template)
    return _exe("label-studio"), ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabelStudio:
    """A running Label Studio on 127.0.0.1 with a copy of the template data directory; `with` stops it."""

    def __init__(self, exe: Path, port: int | None = None):
        self.exe = exe
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dir = Path(tempfile.mkdtemp(prefix="cfr-ls-"))
        self.proc: subprocess.Popen | None = None
        self.log = self.dir / "label-studio.log"

    def __enter__(self) -> LabelStudio:
        data = self.dir / "data"
        shutil.copytree(HOME / "template", data)
        cmd = [str(self.exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port),
               "--data-dir", str(data), "--username", USER, "--password", PASSWORD, "--user-token", TOKEN,
               "--enable-legacy-api-token", "--log-level", "WARNING"]
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=_env(data), cwd=self.dir, start_new_session=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"Label Studio exited with {self.proc.returncode}: {self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                tail = self.tail()
                self.__exit__()
                raise RuntimeError(f"Label Studio did not answer /health within {START_TIMEOUT_S} s: {tail}")
            time.sleep(0.5)

    def tail(self, n: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(15)
        shutil.rmtree(self.dir, ignore_errors=True)

    # ---- the REST API, as the labeling page and the SDK call it (Authorization: Token ...) ---------------
    def api(self, method: str, path: str, body: dict | None = None, files: dict | None = None,
            expect: int | tuple = (200, 201)) -> dict | list:
        import httpx

        headers = {"Authorization": f"Token {TOKEN}"}
        r = httpx.request(method, self.url + path, headers=headers, json=body, files=files, timeout=120)
        expect = (expect,) if isinstance(expect, int) else expect
        if r.status_code not in expect:
            raise AssertionError(f"{method} {path} -> {r.status_code}: {r.text[:500]}")
        return r.json() if r.content else {}


class CfrServe:
    """`cfr-serve MODEL` as a subprocess on 127.0.0.1, told where Label Studio is (LABEL_STUDIO_URL, the token)."""

    def __init__(self, model: str, ls_url: str, timeout_s: float = 120):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, LABEL_STUDIO_URL=ls_url, LABEL_STUDIO_API_KEY=TOKEN)
        root = Path(__file__).resolve().parents[1]
        self.proc = subprocess.Popen([sys.executable, "-m", "cfr_runtime.serve", model, "--port", str(self.port)],
                                     cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(self.url + "/labelstudio/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"cfr-serve did not start: {self.proc.stderr.read()[-2000:]}")
            time.sleep(0.2)

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=10) as r:
            return json.loads(r.read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)

    def __enter__(self) -> CfrServe:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # python3 -m tests.ls_util prepare
    if sys.argv[1:] != ["prepare"]:
        sys.exit("usage: python3 -m tests.ls_util prepare")
    t0 = time.monotonic()
    exe, why = ensure()
    print(json.dumps({"label_studio": str(exe) if exe else None, "reason": why,
                      "seconds": round(time.monotonic() - t0, 1)}))
    sys.exit(0 if exe else 1)
