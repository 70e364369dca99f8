"""The ``dinomed … --events`` protocol as seen from Slicer: one JSON object per line on the child's stdout.

A copy of ``dinomed.events.parse_event`` (core_lib/src/dinomed/events.py) rather than an import: this Lib runs
inside Slicer's Python, where ``dinomed`` is installed only on first use (DINOSegLib.dependencies) and may
be missing or of another version when the module loads. The protocol is a few lines and frozen in
docs/CONTRACTS.md; Testing/test_dinoseg_events.py checks that both parsers agree on real ``dinomed`` output.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

EVENT_KINDS = ("progress", "metric", "artifact", "log", "error", "done")


# a deliberate copy of core_lib/src/dinomed/events.py:parse_event (see the top of this file)
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


@dataclass
class Progress:
    """The last ``progress`` event of a run: ``done`` of ``total`` units of ``message`` (e.g. slices)."""

    done: int = 0
    total: int = 0
    message: str = ""

    @property
    def fraction(self) -> float:
        """Completed share in [0, 1]; 0 while the total is unknown."""
        if self.total <= 0:
            return 0.0
        return max(0.0, min(1.0, self.done / self.total))

    @property
    def percent(self) -> int:
        return int(round(100 * self.fraction))
