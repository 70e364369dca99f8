"""The one job runner of the extension: a ``dinomed … --events`` child process, watched without Qt.

Slicer never runs a model in its own process: the GUI would freeze and a cancel could not stop a running
torch kernel. A :class:`Job` starts ``python -m dinomed <args> --events`` in its own process group (POSIX: a
new session; Windows: a new process group), reads its JSON-lines events (ARCHITECTURE.md, "Events") on two
small reader threads, and hands them over only in :meth:`Job.tick`, which the front-end calls from its own
timer (``qt.QTimer`` in Slicer, a trame/asyncio loop in the browser, a loop in a script). So every callback
runs on the caller's thread, the only one that may touch MRML; ``tick`` never blocks.

Ending a job, two ways (both leave no process behind):

* :meth:`Job.stop`, "finish what you are doing and exit": SIGTERM to the child (CTRL_BREAK on Windows).
  ``dinomed finetune|pretrain`` save a checkpoint and exit with status 3 (STOPPED); other commands remove
  their temporary files and exit. A second ``stop()``, or no exit within ``stop_grace_s``, kills the tree.
* :meth:`Job.cancel`, "now": the whole tree is killed at once (SIGKILL to the group and to every
  descendant psutil finds, also those that left the group, e.g. torchrun ranks), the job's own temporary
  paths are removed, and the job is CANCELLED. It returns in milliseconds.

Exit status convention of the runner (``dinomed.errors``: EXIT_OK, EXIT_BAD_INPUT, EXIT_STOPPED):
0 succeeded, 2 bad input (the ``error`` event holds the one-line message), 3 stopped on request; killed by
this runner: cancelled.

Usage::

    job = Job(["segment", "--model", model, "--ct", ct, "--out", seg], on_finish=show_result).start()
    # front-end timer, every 100 ms:
    job.tick()          # -> new events; job.progress, job.fraction, job.state, job.error
"""
from __future__ import annotations

import enum
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .events import parse_event

EXIT_BAD_INPUT = 2
EXIT_STOPPED = 3  # dinomed finetune|pretrain after SIGTERM/SIGINT: checkpoint saved, exited on request
# after the child exited, how long tick() keeps waiting for a grandchild that still holds its stdout open
_READER_GRACE_S = 2.0
# events kept in Job.events (a long training run writes a metric per step); the oldest are dropped beyond it
MAX_EVENTS = 20000


class JobState(str, enum.Enum):
    RUNNING = "running"
    STOPPING = "stopping"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    STOPPED = "stopped"
    CANCELLED = "cancelled"


class JobError(RuntimeError):
    """A job that cannot start, or did not succeed (the message is the child's one-line error)."""


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


class Job:
    """One ``dinomed … --events`` child process. Qt-free: the front-end's timer calls :meth:`tick`.

    ``args`` are the ``dinomed`` arguments (``--events`` is appended when missing); ``command`` replaces the
    whole ``python -m dinomed …`` command line (e.g. ``torchrun … -m dinomed …``, or a test's own child).
    ``on_event`` sees every parsed event in order; ``on_finish`` is called once with the job when it ended
    (from :meth:`tick`, or from :meth:`cancel`). ``temp_paths`` are the job's own temporary files or
    folders: :meth:`cancel` removes them (and nothing else).
    """

    def __init__(self, args: Sequence[str], *, title: str = "", python: str | None = None,
                 env: dict | None = None, cwd: str | os.PathLike | None = None,
                 on_event: Callable[[dict], None] | None = None,
                 on_finish: Callable[["Job"], None] | None = None,
                 stop_grace_s: float = 30.0, command: Sequence[str] | None = None,
                 on_log: Callable[[str], None] | None = None, temp_paths: Iterable[str | os.PathLike] = (),
                 log_lines: int = 500):
        self.args = [str(a) for a in args]
        self.title = title or (self.args[0] if self.args else "dinomed")
        self.python = python or default_python()
        self.env = env
        self.cwd = cwd
        self.on_event = on_event
        self.on_finish = on_finish
        self.on_log = on_log
        self.stop_grace_s = float(stop_grace_s)
        self.temp_paths = [Path(p) for p in temp_paths]
        self._command = list(command) if command is not None else None

        self.state = JobState.RUNNING
        self.finished = False
        self.progress: tuple[int | None, int | None, str] = (None, None, "")
        self.returncode: int | None = None
        self.error: str | None = None
        self.artifacts: dict[str, str] = {}
        self.events: list[dict] = []  # every event in order, the latest MAX_EVENTS at most
        self.log: list[str] = []  # stdout/stderr lines that were not events, the latest log_lines
        self._log_lines = max(1, int(log_lines))
        self.started_at: float | None = None
        self.ended_at: float | None = None

        self._popen: subprocess.Popen | None = None
        self._queue: queue.Queue = queue.Queue()
        self._readers: list[threading.Thread] = []
        self._stop_deadline: float | None = None
        self._stop_requested = False
        self._killed = False
        self._exited_at: float | None = None
        self._finish_called = False

    # -- starting -------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        """The full command line of the child."""
        if self._command is not None:
            return [str(c) for c in self._command]
        args = list(self.args)
        if "--events" not in args:
            args.append("--events")
        return [self.python, "-m", "dinomed", *args]

    def start(self) -> "Job":
        """Start the child and return at once; :class:`JobError` when it cannot start."""
        if self._popen is not None:
            raise JobError(f"{self.title}: this job was already started; make a new Job to run it again")
        cmd = self.command
        child_env = dict(os.environ if self.env is None else self.env)
        child_env.setdefault("PYTHONUNBUFFERED", "1")  # events must arrive as they happen, not at exit
        kwargs: dict = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own process group: the tree can be signalled as one
        try:
            self._popen = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                           stderr=subprocess.PIPE, env=child_env, cwd=self.cwd, text=True,
                                           encoding="utf-8", errors="replace", bufsize=1, **kwargs)
        except OSError as exc:
            self._finalize(JobState.FAILED, f"cannot start {cmd[0]!r}: {exc.strerror or exc}", fire=False)
            raise JobError(self.error) from None
        self.started_at = time.monotonic()
        self._readers = [threading.Thread(target=self._read, args=(self._popen.stdout, "stdout"), daemon=True),
                         threading.Thread(target=self._read, args=(self._popen.stderr, "stderr"), daemon=True)]
        for reader in self._readers:
            reader.start()
        return self

    def _read(self, stream, channel: str) -> None:
        try:
            for line in stream:
                self._queue.put((channel, line.rstrip("\r\n")))
        except (OSError, ValueError):  # the pipe was closed under us (cancel)
            pass

    # -- watching -------------------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    @property
    def running(self) -> bool:
        """True until the job is finished (the child exited and its output was read, or it was cancelled)."""
        return self._popen is not None and not self.finished

    @property
    def fraction(self) -> float | None:
        done, total, _ = self.progress
        if done is None or not total:
            return None
        return max(0.0, min(1.0, done / total))

    @property
    def percent(self) -> int | None:
        fraction = self.fraction
        return None if fraction is None else int(round(100 * fraction))

    @property
    def elapsed_s(self) -> float:
        if self.started_at is None:
            return 0.0
        return (self.ended_at or time.monotonic()) - self.started_at

    def events_of(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["event"] == kind]

    def tick(self) -> list[dict]:
        """Handle what the child wrote since the last call and return its new events; when the child has
        exited (and its output is read), set the final state and call ``on_finish``. Never blocks."""
        new = self._drain()
        if self.finished or self._popen is None:
            return new
        now = time.monotonic()
        code = self._popen.poll()
        if code is None:
            if self._stop_deadline is not None and now >= self._stop_deadline:
                self._kill_tree()
            return new
        if self._exited_at is None:
            self._exited_at = now
        readers_done = not any(r.is_alive() for r in self._readers)
        if not readers_done and now - self._exited_at < _READER_GRACE_S:
            return new  # the last lines are still on their way
        new += self._drain()
        self._finalize(self._final_state(code), None)
        return new

    def _drain(self) -> list[dict]:
        new: list[dict] = []
        while True:
            try:
                channel, line = self._queue.get_nowait()
            except queue.Empty:
                return new
            event = parse_event(line) if channel == "stdout" else None
            if event is None:
                if line.strip():
                    self._add_log(line)
                continue
            self._handle(event)
            new.append(event)

    def _add_log(self, line: str) -> None:
        self.log.append(line)
        if len(self.log) > self._log_lines:
            del self.log[: len(self.log) - self._log_lines]
        if self.on_log:
            self.on_log(line)

    def _handle(self, event: dict) -> None:
        self.events.append(event)
        if len(self.events) > MAX_EVENTS:
            del self.events[: len(self.events) - MAX_EVENTS // 2]  # amortised: trim by half at a time
        kind = event["event"]
        if kind == "progress":
            total = event.get("total")
            self.progress = (int(event.get("done", 0)), int(total) if total is not None else None,
                             str(event.get("message", "")))
        elif kind == "error":
            self.error = _one_line(str(event.get("message", "unknown error")))
        elif kind == "artifact":
            self.artifacts[str(event.get("kind"))] = str(event.get("path"))
        elif kind == "log" and self.on_log:
            self.on_log(str(event.get("message", "")))
        if self.on_event:
            self.on_event(event)

    def _final_state(self, code: int) -> JobState:
        if self._killed:
            return JobState.CANCELLED
        if code == 0:
            return JobState.SUCCEEDED
        if code == EXIT_STOPPED or self._stop_requested:
            return JobState.STOPPED
        return JobState.FAILED

    def _finalize(self, state: JobState, error: str | None, fire: bool = True) -> None:
        self.state = state
        self.finished = True
        self.ended_at = time.monotonic()
        if self._popen is not None:
            self.returncode = self._popen.poll()
        if error:
            self.error = error
        elif state is JobState.FAILED and not self.error:
            tail = [line for line in self.log if line.strip()]
            self.error = _one_line(tail[-1]) if tail else f"{self.title} exited with status {self.returncode}"
        if fire and self.on_finish is not None and not self._finish_called:
            self._finish_called = True
            self.on_finish(self)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> JobState:
        """Tick until the job is finished (tests and scripts); on timeout the job is cancelled and
        :class:`JobError` raised."""
        if self._popen is None:
            raise JobError(f"{self.title}: the job was not started")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            self.tick()
            if self.finished:
                break
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise JobError(f"{self.title} did not finish within {timeout:g} s and was cancelled")
            time.sleep(interval)
        return self.state

    def check(self) -> None:
        """Raise :class:`JobError` (with the child's one-line error) unless the job succeeded."""
        if not self.finished:
            raise JobError(f"{self.title} is still running")
        if self.state is not JobState.SUCCEEDED:
            if self.state is JobState.FAILED:
                raise JobError(self.error or f"{self.title} failed (exit status {self.returncode})")
            raise JobError(f"{self.title} {self.state.value}")

    # -- stopping -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """First call: ask the child to finish and exit (SIGTERM; CTRL_BREAK on Windows); it is killed with
        its tree when it has not exited within ``stop_grace_s`` (checked by :meth:`tick`). Second call:
        kill the tree now."""
        if self._popen is None or self.finished:
            return
        if self._stop_requested:
            self._kill_tree()
            return
        self._stop_requested = True
        self.state = JobState.STOPPING
        self._stop_deadline = time.monotonic() + self.stop_grace_s
        try:
            if os.name == "nt":
                os.kill(self._popen.pid, signal.CTRL_BREAK_EVENT)
            else:
                os.kill(self._popen.pid, signal.SIGTERM)
        except (ProcessLookupError, PermissionError, OSError):
            pass

    def dump_stacks(self) -> bool:
        """Ask the running child to print its threads' Python stacks; they arrive in :attr:`log` (through
        ``on_log``) and the child goes on working. ``dinomed`` answers SIGUSR1 so (faulthandler, see
        ``dinomed.cli``); for a job that looks stuck. Returns whether the signal was sent: only to a running
        ``python -m dinomed`` child (not a ``command=`` one such as torchrun, whose agent SIGUSR1 would end) that
        has sent an event (so its handler is in place), never on Windows."""
        if (self._popen is None or self.finished or not hasattr(signal, "SIGUSR1") or self._command is not None
                or not self.events):
            return False
        try:
            os.kill(self._popen.pid, signal.SIGUSR1)
        except (ProcessLookupError, PermissionError, OSError):
            return False
        return True

    def cancel(self) -> None:
        """Kill the whole tree now, remove the job's temporary paths, and finish the job as CANCELLED
        (``on_finish`` is called). Returns at once; a finished job is left as it is."""
        if self.finished:
            return
        if self._popen is None:
            self._finalize(JobState.CANCELLED, None)
            return
        self._kill_tree(reap=True)
        self._drain()
        for path in self.temp_paths:
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        self._finalize(JobState.CANCELLED, None)

    def _kill_tree(self, reap: bool = False) -> None:
        """SIGKILL the child, its process group and every descendant (also those in their own session)."""
        self._killed = True
        self._stop_deadline = None
        popen = self._popen
        descendants = _descendant_pids(popen.pid)
        if os.name == "nt":
            # taskkill /T walks the tree by parent pid, which a Windows process group cannot do
            subprocess.run(["taskkill", "/PID", str(popen.pid), "/T", "/F"], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=False)
        else:
            try:
                os.killpg(popen.pid, signal.SIGKILL)  # the child leads its own session: pgid == pid
            except (ProcessLookupError, PermissionError):
                pass
            for pid in descendants:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        if reap:
            try:
                popen.wait(timeout=2)  # SIGKILL is immediate; this only collects the exit status
            except subprocess.TimeoutExpired:  # pragma: no cover - a process stuck in the kernel
                pass
        # the reader threads end by themselves: with the tree gone, the pipes reach end-of-file


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    return lines[-1] if lines else ""


def _descendant_pids(pid: int) -> set[int]:
    """Every process below ``pid`` (psutil, which Slicer ships; without it the process group only)."""
    try:
        import psutil
    except ImportError:
        return set()
    try:
        return {child.pid for child in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()
