"""The child process that does the heavy work: ``python -m dinomed <command> … --events``.

Slicer never runs a model in its own process: the GUI would freeze and a cancel could not stop a running
torch kernel. Instead this runner starts ``dinomed`` as a child in its own process group (POSIX: a new
session; Windows: a new process group), reads its JSON-lines events from stdout on a background thread,
keeps its human-readable stderr as a log, and on cancel ends the whole process tree (data-loader workers,
torchrun ranks and all).

Qt-free on purpose: the widget polls :meth:`DinomedProcess.poll` from a ``qt.QTimer`` (the GUI thread
stays the only one that touches MRML), and tests drive it directly.
"""
from __future__ import annotations

import collections
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Callable, Iterable, Sequence

from .events import Progress, parse_event

EventCallback = Callable[[dict], None]


def default_python() -> str:
    """The interpreter that runs ``dinomed``: Slicer's own Python inside Slicer (``PythonSlicer``), this
    interpreter elsewhere. Slicer's ``sys.executable`` is the Slicer launcher, not a Python, hence the look-up."""
    exe = sys.executable
    name = os.path.basename(exe).lower()
    if name.startswith("slicer"):
        folder = os.path.dirname(exe)
        for candidate in ("PythonSlicer.exe", "PythonSlicer", os.path.join("bin", "PythonSlicer.exe"),
                          os.path.join("bin", "PythonSlicer")):
            path = os.path.join(folder, candidate)
            if os.path.isfile(path):
                return path
    return exe


class DinomedProcessError(RuntimeError):
    """The child could not be started, or it ended with an error (its ``error`` event or its exit status)."""


class DinomedProcess:
    """One run of ``python -m dinomed …  --events`` as a child process tree.

    Usage (a widget calls ``poll`` from a timer; a script calls ``wait``)::

        proc = DinomedProcess(on_event=print)
        proc.start(["segment", "--model", model_dir, "--ct", ct, "--out", seg])   # adds --events
        while proc.running:
            proc.poll(); time.sleep(0.1)
        proc.check()   # raises DinomedProcessError with the child's error message on failure

    ``progress`` holds the last progress event, ``events`` every event seen, ``log`` the last stderr lines,
    ``error_message`` the child's ``error`` event (or the tail of stderr when it died without one).
    """

    def __init__(self, python: str | None = None, on_event: EventCallback | None = None,
                 on_log: Callable[[str], None] | None = None, log_lines: int = 500):
        self.python = python or default_python()
        self.on_event = on_event
        self.on_log = on_log
        self.events: list[dict] = []
        self.log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self.progress = Progress()
        self.error_message: str | None = None
        self.done = False
        self.cancelled = False
        self._popen: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []

    # -- starting -------------------------------------------------------------------------------------
    def command(self, args: Sequence[str]) -> list[str]:
        """The full command line for ``dinomed`` arguments (``--events`` appended when missing)."""
        args = [str(a) for a in args]
        if "--events" not in args:
            args.append("--events")
        return [self.python, "-m", "dinomed", *args]

    def start(self, args: Sequence[str], env: dict | None = None, cwd: str | None = None,
              raw_command: Sequence[str] | None = None) -> None:
        """Start the child. ``raw_command`` replaces the ``python -m dinomed`` command line (for launching
        a different program with the same event handling, e.g. ``torchrun``)."""
        if self.running:
            raise DinomedProcessError("a dinomed process is already running; cancel it or wait for it first")
        cmd = list(raw_command) if raw_command is not None else self.command(args)
        child_env = dict(os.environ if env is None else env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")  # events must arrive as they happen, not at exit
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: cancel kills the group
        self.events.clear()
        self.log.clear()
        self.progress = Progress()
        self.error_message = None
        self.done = False
        self.cancelled = False
        self._queue = queue.Queue()
        try:
            self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=child_env, cwd=cwd, text=True,
                                           encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        except OSError as exc:
            raise DinomedProcessError(f"cannot start {cmd[0]!r}: {exc.strerror or exc}") from None
        self._threads = [
            threading.Thread(target=self._read, args=(self._popen.stdout, "stdout"), daemon=True),
            threading.Thread(target=self._read, args=(self._popen.stderr, "stderr"), daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, stream, channel: str) -> None:
        for line in stream:
            self._queue.put((channel, line.rstrip("\r\n")))
        stream.close()

    # -- watching -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return self._popen.poll() if self._popen else None

    def poll(self) -> list[dict]:
        """Handle everything the child wrote since the last call; return the new events (GUI-thread safe)."""
        new: list[dict] = []
        while True:
            try:
                channel, line = self._queue.get_nowait()
            except queue.Empty:
                break
            if channel == "stdout":
                event = parse_event(line)
                if event is None:
                    if line.strip():
                        self._add_log(line)
                    continue
                self._handle(event)
                new.append(event)
            else:
                self._add_log(line)
        return new

    def _add_log(self, line: str) -> None:
        self.log.append(line)
        if self.on_log:
            self.on_log(line)

    def _handle(self, event: dict) -> None:
        self.events.append(event)
        kind = event["event"]
        if kind == "progress":
            self.progress = Progress(int(event.get("done", 0)), int(event.get("total", 0)), str(event.get("message", "")))
        elif kind == "error":
            self.error_message = str(event.get("message", "unknown error"))
        elif kind == "done":
            self.done = True
        elif kind == "log" and self.on_log:
            self.on_log(str(event.get("message", "")))
        if self.on_event:
            self.on_event(event)

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def artifacts(self) -> dict[str, str]:
        """``artifact`` events as {kind: path} (the last one of each kind wins)."""
        return {str(e.get("kind")): str(e.get("path")) for e in self.events_of("artifact")}

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05) -> int:
        """Block until the child exits (and its output is read); return its exit status.

        On timeout the tree is cancelled and :class:`DinomedProcessError` raised."""
        if self._popen is None:
            raise DinomedProcessError("no dinomed process was started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._popen.poll() is None:
            self.poll()
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise DinomedProcessError(f"dinomed did not finish within {timeout:g} s and was cancelled")
            time.sleep(poll_interval)
        for thread in self._threads:
            thread.join(timeout=5)
        self.poll()
        return self._popen.returncode

    def check(self) -> None:
        """Raise :class:`DinomedProcessError` unless the child finished successfully."""
        code = self.returncode
        if self.cancelled:
            raise DinomedProcessError("cancelled")
        if code is None:
            raise DinomedProcessError("dinomed is still running")
        if code != 0 or self.error_message:
            message = self.error_message or "\n".join(list(self.log)[-5:]) or "no message"
            raise DinomedProcessError(f"dinomed failed (exit status {code}): {message}")

    # -- stopping -------------------------------------------------------------------------------------
    def cancel(self, grace: float = 3.0) -> None:
        """End the whole process tree: ask politely (SIGTERM / CTRL_BREAK), then kill after ``grace`` s."""
        if self._popen is None:
            return
        self.cancelled = self.running or self.cancelled
        descendants = _descendant_pids(self._popen.pid)
        if os.name == "nt":
            # taskkill /T walks the tree by parent pid, which is what a process group cannot do on Windows
            subprocess.run(["taskkill", "/PID", str(self._popen.pid), "/T", "/F"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
        else:
            _signal_group(self._popen.pid, signal.SIGTERM)
            _signal_pids(descendants, signal.SIGTERM)
            try:
                self._popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(self._popen.pid, signal.SIGKILL)
            # a grandchild that started its own session left the group: kill it by pid
            _signal_pids(_descendant_pids(self._popen.pid) | descendants, signal.SIGKILL)
        try:
            self._popen.wait(timeout=10)
        except subprocess.TimeoutExpired:  # pragma: no cover - a process that survives SIGKILL
            pass
        for thread in self._threads:
            thread.join(timeout=2)
        self.poll()


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own session, so its pgid is its pid
    except (ProcessLookupError, PermissionError):
        pass


def _signal_pids(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _descendant_pids(pid: int) -> set[int]:
    """Every process below ``pid`` (psutil when available: Slicer ships it; else nothing extra)."""
    try:
        import psutil
    except ImportError:
        return set()
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()
