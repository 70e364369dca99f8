"""Stage timings of a segmentation run: where the seconds of ``dinomed segment`` go.

The pipeline marks its stages (read, PET→CT resample, normalise, model, argmax, post-process, lesion statistics,
write) with :func:`stage`; nothing is recorded unless a caller opened :func:`profiling` around the run, so the
markers cost two clock reads per stage otherwise. ``dinomed segment --profile`` and ``benchmarks/inference.py``
read the same markers, so the benchmark times the real code path, not a copy of it.

Times are exclusive: a stage opened inside another (argmax inside model) is taken out of the outer one, so the
stages add up to the time they cover; what no stage covers is reported as ``other`` by
:meth:`StageProfile.as_dict`.
"""
from __future__ import annotations

import contextlib
import functools
import time
from contextvars import ContextVar
from typing import Callable, Iterator

_ACTIVE: ContextVar["StageProfile | None"] = ContextVar("dinomed_stage_profile", default=None)


class StageProfile:
    """Seconds per stage (exclusive of nested stages), in the order the stages first ran, and the wall time."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, seconds spent in nested stages]
        self.started = time.perf_counter()
        self.stopped: float | None = None

    @property
    def wall(self) -> float:
        return (self.stopped or time.perf_counter()) - self.started

    def _enter(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def _exit(self) -> None:
        name, start, nested = self._stack.pop()
        spent = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + spent - nested
        self.calls[name] = self.calls.get(name, 0) + 1
        if self._stack:
            self._stack[-1][2] += spent

    def as_dict(self) -> dict:
        """``{"wall_s": …, "stages": {name: seconds, …, "other": seconds}}`` (rounded to the millisecond)."""
        stages = {k: round(v, 4) for k, v in self.seconds.items()}
        stages["other"] = round(max(0.0, self.wall - sum(self.seconds.values())), 4)
        return {"wall_s": round(self.wall, 4), "stages": stages}

    def summary(self) -> str:
        """One line per stage: seconds and share of the wall time."""
        d = self.as_dict()
        wall = max(d["wall_s"], 1e-9)
        width = max(len(k) for k in d["stages"])
        lines = [f"{k:<{width}}  {v:8.3f} s  {100 * v / wall:5.1f}%" for k, v in d["stages"].items()]
        return "\n".join(lines + [f"{'wall':<{width}}  {wall:8.3f} s"])


@contextlib.contextmanager
def profiling() -> Iterator[StageProfile]:
    """Record the stages of the code run inside (this thread/context); yields the :class:`StageProfile`."""
    profile = StageProfile()
    token = _ACTIVE.set(profile)
    try:
        yield profile
    finally:
        profile.stopped = time.perf_counter()
        _ACTIVE.reset(token)


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark the code inside as stage ``name`` of the active profile (a no-op when none is active)."""
    profile = _ACTIVE.get()
    if profile is None:
        yield
        return
    profile._enter(name)
    try:
        yield
    finally:
        profile._exit()


def timed_stage(name: str) -> Callable:
    """Decorator: every call of the function is stage ``name``."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with stage(name):
                return fn(*args, **kwargs)

        return inner

    return wrap
