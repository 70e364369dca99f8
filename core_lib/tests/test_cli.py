import json
import subprocess
import sys

from dinomed.cli import main
from dinomed.events import EventWriter, parse_event


def test_help_lists_subcommands(capsys):
    assert main([]) == 1
    out = capsys.readouterr().out
    assert "usage: dinomed" in out


def test_version_runs_as_a_process():
    result = subprocess.run([sys.executable, "-m", "dinomed", "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith("dinomed ")


def test_events_are_json_lines(capsys):
    writer = EventWriter(enabled=True)
    writer.progress(3, 10, "slices")
    writer.metric(step=5, loss=float("nan"), dice=0.5)
    writer.done()
    lines = capsys.readouterr().out.strip().splitlines()
    events = [parse_event(line) for line in lines]
    assert [e["event"] for e in events] == ["progress", "metric", "done"]
    assert events[0]["done"] == 3 and events[0]["total"] == 10
    assert events[1]["loss"] is None  # NaN is not JSON
    assert parse_event("not an event") is None
    assert json.loads(lines[1])["dice"] == 0.5


def test_atomic_write_leaves_no_temp_on_error_and_normal_permissions(tmp_path):
    import os
    import stat

    import pytest

    from dinomed.atomic import atomic_path, atomic_write_text

    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    atomic_write_text(tmp_path / "a.txt", "x")
    mode = stat.S_IMODE(os.stat(tmp_path / "a.txt").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
