"""The child-process runner: real ``python -m dinomed`` children, real process trees, real signals."""
from __future__ import annotations

import textwrap
import time

import psutil
import pytest

from DINOSegLib.process import DinomedProcess, DinomedProcessError

# A real dinomed event stream (dinomed.events.EventWriter) from a child that also starts two grandchildren,
# one of them in its own session (as torchrun or a data-loader pool may), then works until stopped.
TREE_CHILD = textwrap.dedent("""
    import subprocess, sys, time
    from dinomed.events import EventWriter
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    events = EventWriter(enabled=True)
    events.log("grandchildren " + " ".join(str(k.pid) for k in kids))
    for i in range(1, 10000):
        events.progress(i, 10000, "slices")
        time.sleep(0.05)
""")


def wait_for(predicate, process, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        process.poll()
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout} s; log: {list(process.log)}")


def test_dinomed_version_runs_as_a_child(dinomed_python):
    process = DinomedProcess(python=dinomed_python)
    assert process.command(["segment", "--ct", "x"])[-1] == "--events"
    process.start(["--version"], raw_command=[dinomed_python, "-m", "dinomed", "--version"])
    assert process.wait(timeout=60) == 0
    process.check()
    assert any(line.startswith("dinomed ") for line in process.log)
    assert process.events == []


def test_progress_and_artifacts_from_real_events(dinomed_python):
    script = ("from dinomed.events import EventWriter\n"
              "w = EventWriter(enabled=True)\n"
              "print('a stray print that is not an event', flush=True)\n"
              "[w.progress(i, 4, 'slices') for i in range(1, 5)]\n"
              "w.metric(step=1, loss=0.5)\nw.artifact('segmentation', '/tmp/seg.nrrd')\nw.done()\n")
    seen = []
    process = DinomedProcess(python=dinomed_python, on_event=seen.append)
    process.start([], raw_command=[dinomed_python, "-c", script])
    assert process.wait(timeout=60) == 0
    process.check()
    assert [e["event"] for e in seen] == ["progress"] * 4 + ["metric", "artifact", "done"]
    assert (process.progress.done, process.progress.total, process.progress.message) == (4, 4, "slices")
    assert process.progress.percent == 100
    assert process.done
    assert process.artifacts() == {"segmentation": "/tmp/seg.nrrd"}
    assert "a stray print that is not an event" in process.log


def test_a_failing_dinomed_command_raises_with_its_message(dinomed_python, tmp_path):
    process = DinomedProcess(python=dinomed_python)
    process.start(["no-such-command"])
    assert process.wait(timeout=60) != 0
    with pytest.raises(DinomedProcessError, match="invalid choice"):
        process.check()


def test_cancel_ends_the_whole_process_tree(dinomed_python):
    process = DinomedProcess(python=dinomed_python)
    process.start([], raw_command=[dinomed_python, "-c", TREE_CHILD])
    wait_for(lambda: process.progress.done >= 3, process)
    assert 0 < process.progress.fraction < 1
    grandchildren = [int(p) for e in process.events_of("log") for p in e["message"].split()[1:]]
    tree = [psutil.Process(process.pid)] + [psutil.Process(pid) for pid in grandchildren]
    assert len(tree) == 3 and all(p.is_running() for p in tree)
    started = time.monotonic()
    process.cancel(grace=2.0)
    assert time.monotonic() - started < 15
    assert not process.running
    assert process.cancelled
    gone, alive = psutil.wait_procs(tree, timeout=5)
    assert alive == []
    with pytest.raises(DinomedProcessError, match="cancelled"):
        process.check()


def test_wait_with_timeout_cancels(dinomed_python):
    process = DinomedProcess(python=dinomed_python)
    process.start([], raw_command=[dinomed_python, "-c", "import time; time.sleep(600)"])
    pid = process.pid
    with pytest.raises(DinomedProcessError, match="did not finish"):
        process.wait(timeout=1.0)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


def test_a_missing_python_is_a_clear_error(tmp_path):
    process = DinomedProcess(python=str(tmp_path / "no-python"))
    with pytest.raises(DinomedProcessError, match="cannot start"):
        process.start(["--version"])
