"""DINOSegLib's copy of the event parser agrees with dinomed's on real dinomed output."""
from __future__ import annotations

import io

from dinomed import events as dinomed_events

from DINOSegLib import events


def test_parser_copy_agrees_with_dinomed():
    stream = io.StringIO()
    writer = dinomed_events.EventWriter(enabled=True, stream=stream)
    writer.progress(3, 10, "slices")
    writer.metric(step=5, epoch=1, loss=float("nan"), dice=0.5)
    writer.artifact("segmentation", "/x/seg.nrrd")
    writer.error("bad input")
    writer.done()
    lines = stream.getvalue().splitlines() + ["not json", "{\"event\": \"other\"}", "{broken", "[1, 2]", ""]
    for line in lines:
        assert events.parse_event(line) == dinomed_events.parse_event(line)
    assert events.EVENT_KINDS == dinomed_events.EVENT_KINDS
    assert events.parse_event(lines[1])["loss"] is None


def test_progress_fraction():
    assert events.Progress(3, 12).percent == 25
    assert events.Progress(0, 0).fraction == 0.0
    assert events.Progress(15, 10).fraction == 1.0
