"""The JSON-lines event protocol between a long ``dinomed`` command and whoever launched it.

With ``--events`` a command writes one JSON object per line on stdout, e.g.
``{"event":"progress","done":12,"total":300,"message":"slices"}``; without it, events are not printed and
human-readable progress goes to stderr (a tqdm bar). The Slicer modules parse these lines; nothing else
crosses the process boundary (ARCHITECTURE.md, "Events").
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, TextIO

from tqdm.auto import tqdm

EVENT_KINDS = ("progress", "metric", "artifact", "log", "error", "done")


def _clean(value: Any) -> Any:
    """Make a value JSON-safe: numpy/torch scalars to Python, NaN/inf to None (JSON has neither)."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


class EventWriter:
    """Writes events as JSON lines (``enabled``) and shows progress on stderr otherwise.

    One writer per command. ``progress`` drives a tqdm bar on stderr when events are off, so a person at a
    terminal sees a bar and a launching process sees parseable lines, never both mixed on stdout.
    """

    def __init__(self, enabled: bool = False, stream: TextIO | None = None, quiet: bool = False):
        self.enabled = enabled
        self.stream = stream if stream is not None else sys.stdout
        self.quiet = quiet
        self._bars: dict[str, tqdm] = {}

    def emit(self, event: str, **fields: Any) -> None:
        if event not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {event!r}; expected one of {EVENT_KINDS}")
        if not self.enabled:
            return
        record = {"event": event, **_clean(fields), "time": round(time.time(), 3)}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def progress(self, done: int, total: int, message: str = "") -> None:
        self.emit("progress", done=int(done), total=int(total), message=message)
        if self.enabled or self.quiet:
            return
        bar = self._bars.get(message)
        if bar is None:
            bar = self._bars[message] = tqdm(total=total, desc=message or None, file=sys.stderr, leave=False)
        bar.total = total
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
            self._bars.pop(message, None)

    def metric(self, **values: Any) -> None:
        self.emit("metric", **values)
        if not self.enabled and not self.quiet:
            shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            print(shown, file=sys.stderr)

    def artifact(self, kind: str, path: str, **extra: Any) -> None:
        self.emit("artifact", kind=kind, path=str(path), **extra)
        if not self.enabled and not self.quiet:
            print(f"wrote {kind}: {path}", file=sys.stderr)

    def log(self, message: str) -> None:
        self.emit("log", message=message)
        if not self.enabled and not self.quiet:
            print(message, file=sys.stderr)

    def warning(self, message: str) -> None:
        """A legal but suspicious input (wrong units, wrong modality, unused PET, …): a ``log`` event with
        ``level: warning`` (older readers show it as a log line) and, always, a ``WARNING:`` line on stderr."""
        self.emit("log", message=f"WARNING: {message}", level="warning")
        if not self.quiet:
            print(f"WARNING: {message}", file=sys.stderr)

    def error(self, message: str) -> None:
        self.emit("error", message=message)

    def done(self, **extra: Any) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()
        self.emit("done", **extra)


# DINOSeg/DINOSegLib/events.py holds a deliberate copy of parse_event (Slicer's Python may not have dinomed when
# the module loads); change both together (Testing/test_dinoseg_events.py checks that they agree).
def parse_event(line: str) -> dict | None:
    """Parse one line of a child's stdout; None for a line that is not an event (e.g. a stray print)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and record.get("event") in EVENT_KINDS else None
