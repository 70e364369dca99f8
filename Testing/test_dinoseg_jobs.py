"""The one job runner (DINOSegLib.jobs.Job) against real ``python -m dinomed`` children and real process trees.

Each test drives the job the way a front-end does: ``tick()`` from a loop standing in for the QTimer."""
from __future__ import annotations

import signal
import textwrap
import time

import psutil
import pytest

from DINOSegLib.jobs import Job, JobError, JobState

# A real dinomed event stream (dinomed.events.EventWriter) from a child that starts two grandchildren, one in
# its own session (as torchrun or a data-loader pool may), then works until it is ended. With IGNORE_TERM it
# also ignores SIGTERM, as a training step that takes longer than the stop grace time would.
TREE_CHILD = textwrap.dedent("""
    import signal, subprocess, sys, time
    from dinomed.events import EventWriter
    if "IGNORE_TERM" in sys.argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sleeper = [sys.executable, "-c", "import time; time.sleep(600)"]
    kids = [subprocess.Popen(sleeper), subprocess.Popen(sleeper, start_new_session=True)]
    events = EventWriter(enabled=True)
    events.log("grandchildren " + " ".join(str(k.pid) for k in kids))
    for i in range(1, 10000):
        events.progress(i, 10000, "slices")
        time.sleep(0.05)
""")


def tick_until(job, predicate, timeout=60.0):
    """The front-end's timer: tick every 50 ms until ``predicate()``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job.tick()
        if predicate():
            return
        time.sleep(0.05)
    if job.dump_stacks():  # where a dinomed child that is still running is (its stacks arrive in the log)
        for _ in range(40):
            time.sleep(0.05)
            job.tick()
    tail = "\n".join(list(job.log)[-60:])
    raise AssertionError(f"condition not met within {timeout} s; state {job.state}, log:\n{tail}")


def process_tree(job):
    grandchildren = [int(p) for e in job.events_of("log") for p in e["message"].split()[1:]]
    return [psutil.Process(job.pid)] + [psutil.Process(pid) for pid in grandchildren]


def no_process_left(tree):
    gone, alive = psutil.wait_procs(tree, timeout=5)
    return alive == []


def test_progress_events_and_finish_from_a_real_dinomed_command(tmp_path, dinomed_python):
    seen, finished = [], []
    job = Job(["phantom", "--out", str(tmp_path / "data"), "--cases", "3", "--shape", "16,24,24"],
              python=dinomed_python, title="phantoms", on_event=seen.append, on_finish=finished.append)
    assert job.command[-1] == "--events" and job.command[1:3] == ["-m", "dinomed"]
    assert job.start() is job
    fractions = []
    tick_until(job, lambda: fractions.append(job.fraction) or job.finished)
    assert job.state is JobState.SUCCEEDED and job.returncode == 0 and job.error is None
    assert finished == [job]  # once, from tick()
    assert [(e["done"], e["total"]) for e in seen if e["event"] == "progress"] == [(1, 3), (2, 3), (3, 3)]
    assert job.progress == (3, 3, "phantoms") and job.fraction == 1.0
    assert [f for f in fractions if f is not None] == sorted(f for f in fractions if f is not None)  # monotone
    assert job.artifacts["dataset"] == str(tmp_path / "data" / "dataset.json")
    assert seen[-1]["event"] == "done"
    job.tick()
    assert finished == [job]  # never twice
    job.check()


def test_bad_input_fails_with_the_one_line_error(tmp_path, dinomed_python):
    finished = []
    job = Job(["suv", str(tmp_path / "missing"), "--out", str(tmp_path / "suv.nrrd")], python=dinomed_python,
              on_finish=finished.append).start()
    assert job.wait(timeout=60) is JobState.FAILED
    assert job.returncode == 2
    assert job.error == f"{tmp_path / 'missing'}: no such PET DICOM file or folder"
    assert finished == [job]
    assert not (tmp_path / "suv.nrrd").exists()
    with pytest.raises(JobError, match="no such PET DICOM"):
        job.check()


def test_an_unknown_command_fails_with_the_last_stderr_line(dinomed_python):
    job = Job(["no-such-command"], python=dinomed_python).start()
    assert job.wait(timeout=60) is JobState.FAILED
    assert "invalid choice" in job.error and "\n" not in job.error


def test_cancel_kills_the_whole_tree_at_once_and_removes_the_temp_files(tmp_path, dinomed_python):
    work = tmp_path / "work"
    work.mkdir()
    (work / "ct.nrrd").write_bytes(b"input copy")
    keep = tmp_path / "keep.txt"
    keep.write_text("not the job's")
    finished = []
    job = Job([], command=[dinomed_python, "-c", TREE_CHILD], python=dinomed_python, temp_paths=[work],
              on_finish=finished.append).start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 3)
    assert 0 < job.fraction < 1 and job.state is JobState.RUNNING
    tree = process_tree(job)
    assert len(tree) == 3 and all(p.is_running() for p in tree)
    started = time.monotonic()
    job.cancel()
    assert time.monotonic() - started < 3  # cancel never blocks the GUI for long
    assert job.finished and job.state is JobState.CANCELLED and not job.running
    assert finished == [job]
    assert no_process_left(tree)
    assert not work.exists() and keep.read_text() == "not the job's"
    job.cancel()  # a second cancel is harmless
    job.tick()
    assert finished == [job]


def test_cancel_a_real_dinomed_command_leaves_no_process(tmp_path, dinomed_python):
    job = Job(["phantom", "--out", str(tmp_path / "data"), "--cases", "5000", "--shape", "16,24,24"],
              python=dinomed_python).start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 2)
    process = psutil.Process(job.pid)
    job.cancel()
    assert job.state is JobState.CANCELLED
    assert no_process_left([process])


def test_stop_asks_the_child_to_exit(tmp_path, dinomed_python):
    """SIGTERM reaches the real dinomed child; it removes its temporary files and exits on its own with the
    documented status 143 (128 + SIGTERM, dinomed.cli.EXIT_SIGTERM) well before the grace time: STOPPED."""
    job = Job(["phantom", "--out", str(tmp_path / "data"), "--cases", "5000", "--shape", "16,24,24"],
              python=dinomed_python, stop_grace_s=60).start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 2)
    job.stop()
    assert job.state is JobState.STOPPING
    tick_until(job, lambda: job.finished, timeout=55)  # under the grace time, so only its own exit can end it
    assert job.state is JobState.STOPPED
    assert job.returncode == 128 + signal.SIGTERM
    assert job.elapsed_s < 60


def test_dump_stacks_shows_where_the_child_is_and_it_goes_on(tmp_path, dinomed_python):
    """SIGUSR1: the running dinomed child prints its threads' Python stacks (faulthandler) into the job's log
    and keeps working; a job that has not sent an event yet, or is finished, is not signalled."""
    job = Job(["phantom", "--out", str(tmp_path / "data"), "--cases", "5000", "--shape", "16,24,24"],
              python=dinomed_python)
    assert job.dump_stacks() is False  # not started
    job.start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 2)
    assert job.dump_stacks() is True
    tick_until(job, lambda: any("write_nnunet_dataset" in line for line in job.log))
    assert any(line.startswith("Current thread") or line.startswith("Thread 0x") for line in job.log), job.log[:5]
    done_then = job.progress[0]
    tick_until(job, lambda: job.progress[0] >= done_then + 3)  # still working
    assert not job.finished and job.state is JobState.RUNNING
    job.cancel()
    assert job.dump_stacks() is False  # finished


def test_exit_status_3_means_stopped_on_request(dinomed_python):
    # what `dinomed finetune|pretrain` do after SIGTERM: save a checkpoint, say so, exit 3
    script = ("from dinomed.events import EventWriter\nimport sys\n"
              "EventWriter(enabled=True).artifact('checkpoint', '/tmp/last.pt')\nsys.exit(3)\n")
    job = Job([], command=[dinomed_python, "-c", script]).start()
    assert job.wait(timeout=60) is JobState.STOPPED
    assert job.artifacts == {"checkpoint": "/tmp/last.pt"}


def test_stop_kills_the_tree_after_the_grace_time(dinomed_python):
    job = Job([], command=[dinomed_python, "-c", TREE_CHILD, "IGNORE_TERM"], stop_grace_s=1.5).start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 3)
    tree = process_tree(job)
    job.stop()
    stopped_at = time.monotonic()
    time.sleep(0.5)
    job.tick()
    assert job.state is JobState.STOPPING and all(p.is_running() for p in tree)  # SIGTERM ignored
    tick_until(job, lambda: job.finished, timeout=30)
    assert time.monotonic() - stopped_at >= 1.5
    assert job.state is JobState.CANCELLED  # killed by the runner
    assert no_process_left(tree)


def test_a_second_stop_kills_at_once(dinomed_python):
    job = Job([], command=[dinomed_python, "-c", TREE_CHILD, "IGNORE_TERM"], stop_grace_s=600).start()
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 2)
    tree = process_tree(job)
    job.stop()
    job.stop()
    tick_until(job, lambda: job.finished, timeout=10)
    assert job.state is JobState.CANCELLED
    assert no_process_left(tree)


def test_scene_closed_while_a_job_runs(scene, tmp_path, dinomed_python):
    """The front-end's pattern: on the scene's StartCloseEvent the job is cancelled; on_finish sees
    CANCELLED and touches no node (the CT it was started for is gone)."""
    import slicer

    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    results = []

    def on_finish(job):
        if job.state is JobState.SUCCEEDED:  # would build the result against the CT
            results.append(scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{ct.GetName()} segmentation"))
        else:
            results.append(job.state)

    job = Job(["phantom", "--out", str(tmp_path / "data"), "--cases", "5000", "--shape", "16,24,24"],
              python=dinomed_python, on_finish=on_finish, temp_paths=[tmp_path / "data"]).start()
    scene.AddObserver(slicer.vtkMRMLScene.StartCloseEvent, lambda caller, event: job.cancel())
    tick_until(job, lambda: job.progress[0] is not None and job.progress[0] >= 1)
    process = psutil.Process(job.pid)
    scene.Clear(0)
    assert scene.GetNodeByID(ct.GetID()) is None
    assert results == [JobState.CANCELLED]
    assert no_process_left([process])
    job.tick()
    assert results == [JobState.CANCELLED] and scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0


def test_a_missing_python_is_a_clear_error(tmp_path):
    job = Job(["--version"], python=str(tmp_path / "no-python"))
    with pytest.raises(JobError, match="cannot start"):
        job.start()
    assert job.state is JobState.FAILED and job.finished


def test_wait_with_a_timeout_cancels(dinomed_python):
    job = Job([], command=[dinomed_python, "-c", "import time; time.sleep(600)"]).start()
    process = psutil.Process(job.pid)
    with pytest.raises(JobError, match="did not finish within"):
        job.wait(timeout=1.0)
    assert job.state is JobState.CANCELLED
    assert no_process_left([process])


def test_a_job_runs_once(dinomed_python):
    job = Job(["--version"], python=dinomed_python).start()
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    assert any(line.startswith("dinomed ") for line in job.log)
    with pytest.raises(JobError, match="already started"):
        job.start()


def test_the_log_is_bounded_and_keeps_the_latest_lines(dinomed_python):
    script = ("import sys\nfrom dinomed.events import EventWriter\nw = EventWriter(enabled=True)\n"
              "[print(f'line {i}', file=sys.stderr) for i in range(50)]\nw.done()\n")
    job = Job([], command=[dinomed_python, "-c", script], log_lines=5).start()
    assert job.wait(timeout=60) is JobState.SUCCEEDED
    assert job.log == [f"line {i}" for i in range(45, 50)]
    assert job.log[-2:] == ["line 48", "line 49"]  # a list: slices work
