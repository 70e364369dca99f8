"""The previous runner's interface, kept for callers that have not moved to :class:`~DINOSegLib.jobs.Job`.

``DinomedProcess`` is a thin adapter over :class:`~DINOSegLib.jobs.Job` (there is one runner); DINOPretrain
uses it until it drives a ``Job`` directly. New code uses ``Job``: it has the stop/cancel split, the final
state and the ``on_finish`` callback.
"""
from __future__ import annotations

from typing import Callable, Sequence

from .events import Progress
from .jobs import Job, JobError, JobState, default_python

EventCallback = Callable[[dict], None]
DinomedProcessError = JobError

__all__ = ["DinomedProcess", "DinomedProcessError", "default_python"]


class DinomedProcess:
    """``start(args)``, ``poll()`` from a timer, ``wait()``/``check()``, ``cancel()``: the old names over a Job."""

    def __init__(self, python: str | None = None, on_event: EventCallback | None = None,
                 on_log: Callable[[str], None] | None = None, log_lines: int = 500):
        self.python = python or default_python()
        self.on_event = on_event
        self.on_log = on_log
        self.log_lines = log_lines
        self.job: Job | None = None

    def command(self, args: Sequence[str]) -> list[str]:
        return Job(args, python=self.python).command

    def start(self, args: Sequence[str], env: dict | None = None, cwd: str | None = None,
              raw_command: Sequence[str] | None = None) -> None:
        if self.running:
            raise JobError("a dinomed process is already running; cancel it or wait for it first")
        self.job = Job(args, python=self.python, env=env, cwd=cwd, command=raw_command, log_lines=self.log_lines,
                       on_event=lambda event: self.on_event(event) if self.on_event else None,
                       on_log=lambda line: self.on_log(line) if self.on_log else None)
        self.job.start()

    @property
    def pid(self) -> int | None:
        return self.job.pid if self.job else None

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    @property
    def returncode(self) -> int | None:
        if self.job is None or self.job._popen is None:
            return None
        return self.job._popen.poll()

    @property
    def events(self) -> list[dict]:
        return self.job.events if self.job else []

    @property
    def log(self):
        return self.job.log if self.job else []

    @property
    def progress(self) -> Progress:
        if self.job is None:
            return Progress()
        done, total, message = self.job.progress
        return Progress(done or 0, total or 0, message)

    @property
    def error_message(self) -> str | None:
        return self.job.error if self.job else None

    @property
    def done(self) -> bool:
        return bool(self.job and self.job.events_of("done"))

    @property
    def cancelled(self) -> bool:
        return bool(self.job and self.job.state is JobState.CANCELLED)

    def events_of(self, kind: str) -> list[dict]:
        return self.job.events_of(kind) if self.job else []

    def artifacts(self) -> dict[str, str]:
        return dict(self.job.artifacts) if self.job else {}

    def poll(self) -> list[dict]:
        return self.job.tick() if self.job else []

    def wait(self, timeout: float | None = None, poll_interval: float = 0.05) -> int:
        if self.job is None:
            raise JobError("no dinomed process was started")
        self.job.wait(timeout=timeout, interval=poll_interval)
        return self.job.returncode

    def check(self) -> None:
        if self.job is None:
            raise JobError("no dinomed process was started")
        if self.cancelled:
            raise JobError("cancelled")
        if not self.job.finished:
            raise JobError("dinomed is still running")
        code = self.job.returncode
        if code != 0 or self.job.events_of("error"):
            raise JobError(f"dinomed failed (exit status {code}): {self.job.error or 'no message'}")

    def cancel(self, grace: float = 3.0) -> None:
        """End the whole process tree now (``grace`` is ignored: the Job kills at once)."""
        if self.job is not None:
            self.job.cancel()
