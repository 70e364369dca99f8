"""The DINOSeg web app started for real and driven in headless Chromium (Playwright, Debian's chromium).

What the tests need, and what happens when something is missing: the web environment (scripts/web_env.sh:
trame-slicer, Playwright), Debian's ``chromium`` and ``libosmesa6`` (off-screen rendering), and the main
environment's Python for the ``dinomed`` children (``DINOSEG_DINOMED_PYTHON``; the Makefile passes it).
By hand the tests then skip naming what is missing; with ``DINOSEG_WEB_TESTS_REQUIRED=1`` (``make test``, CI)
they fail instead, so that CI never passes by skipping.
"""
from __future__ import annotations

import ctypes.util
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

WEB_DIR = Path(__file__).resolve().parents[1]
REPO_ROOT = WEB_DIR.parent
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")


def _missing() -> list[str]:
    missing = []
    for module, what in (("trame_slicer", "trame-slicer"), ("playwright", "playwright"), ("psutil", "psutil")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"the Python package {what} (run the tests with the web venv: bash scripts/web_env.sh --test)")
    if not chromium_path():
        missing.append("Debian's chromium (apt-get install chromium, or set DINOSEG_CHROMIUM)")
    if ctypes.util.find_library("OSMesa") is None:
        missing.append("Debian's libosmesa6 (apt-get install libosmesa6)")
    python = os.environ.get("DINOSEG_DINOMED_PYTHON")
    if not python or not os.path.isfile(python):
        missing.append("DINOSEG_DINOMED_PYTHON: the main venv's Python that runs dinomed (bash scripts/env.sh)"
                       + (f"; {python} does not exist" if python else ""))
    return missing


def chromium_path() -> str | None:
    return os.environ.get("DINOSEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def require_setup():
    missing = _missing()
    if missing:
        message = "web tests need: " + "; ".join(missing)
        if os.environ.get("DINOSEG_WEB_TESTS_REQUIRED") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class WebServer:
    """``python -m dinoseg_web`` as a child of the test, on a free port of 127.0.0.1."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.tmp = tmp
        self.output_dir = tmp / "output"
        self.log_path = tmp / "server.log"
        env = dict(os.environ, RCA_ENCODER="png", VTK_DEFAULT_OPENGL_WINDOW="vtkOSOpenGLRenderWindow",
                   PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        command = [sys.executable, "-m", "dinoseg_web", "--port", str(self.port),
                   "--dinomed-python", os.environ["DINOSEG_DINOMED_PYTHON"], "--data-dir", str(tmp),
                   "--models-dir", str(tmp / "models"), "--output-dir", str(self.output_dir)]
        self._log = open(self.log_path, "w")
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(command, cwd=WEB_DIR, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL)

    def wait_ready(self, timeout: float = 120.0) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the web server exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url, timeout=2) as response:
                    if response.status == 200:
                        return time.monotonic() - self.started_at
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the web server did not answer within {timeout:g} s:\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        self._log.flush()
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def dinomed_children(self) -> list:
        import psutil

        try:
            children = psutil.Process(self.process.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        alive = []
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    alive.append(child)
            except psutil.NoSuchProcess:
                pass
        return alive

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        self._log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_setup()
    srv = WebServer(tmp_path_factory.mktemp("dinoseg-web"))
    try:
        srv.ready_s = srv.wait_ready()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def browser_page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=chromium_path(), headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 900})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(60_000)
        try:
            yield page
        finally:
            context.close()


@pytest.fixture(scope="module")
def timings():
    """Measured times of this run, printed at the end and written where DINOSEG_WEB_TIMINGS points."""
    values: dict[str, float] = {}
    yield values
    print("\nDINOSeg web timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    out = os.environ.get("DINOSEG_WEB_TIMINGS")
    if out:
        import json

        Path(out).write_text(json.dumps(values, indent=2) + "\n")
