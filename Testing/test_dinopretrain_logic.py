"""DINOPretrain's run logic: a real tiny `dinomed pretrain` child, its metrics as a table, stop, resume,
and registering a model folder in DINOSeg."""
from __future__ import annotations

import functools
import json
import math
import shutil
import time

import psutil
import pytest

from DINOPretrainLib import MetricsTable, TrainingRunLogic
from DINOPretrainLib.logic import TrainingRunError
from DINOSegLib import DinomedProcess
from dinoseg_testdata import MODEL_JSON


def test_command_line():
    args = TrainingRunLogic.command("finetune", "tiny.yaml", "/data", "/out", ["optim.epochs=2"], resume=True)
    assert args == ["finetune", "tiny.yaml", "optim.epochs=2", "--data", "/data", "--out", "/out", "--resume"]
    with pytest.raises(TrainingRunError, match="pretrain, finetune"):
        TrainingRunLogic.command("train", "c", "d", "o")
    with pytest.raises(TrainingRunError, match="key=value"):
        TrainingRunLogic.command("pretrain", "c", "d", "o", ["epochs"])


def test_metrics_table_grows_with_new_columns(scene):
    table = MetricsTable(scene)
    table.add({"event": "metric", "step": 1, "epoch": 0, "loss": 2.5, "time": 1.0})
    table.add({"event": "metric", "step": 2, "epoch": 0, "loss": None, "dice": 0.4, "lr": 1e-3, "tag": "x"})
    assert table.columns == ["step", "epoch", "loss", "dice", "lr"]
    assert table.column("step") == [1.0, 2.0]
    assert table.column("loss")[0] == 2.5 and math.isnan(table.column("loss")[1])
    assert math.isnan(table.column("dice")[0]) and table.column("dice")[1] == 0.4
    assert math.isnan(table.column("lr")[0])
    chart = table.make_chart()
    assert chart.GetNumberOfPlotSeriesNodes() == 2


@pytest.mark.slow  # two short torch trainings in child processes
def test_pretrain_run_streams_metrics_stops_and_resumes(scene, tmp_path, dinomed_python):
    data = tmp_path / "data"
    data.mkdir()
    phantom = DinomedProcess(python=dinomed_python)
    phantom.start(["phantom", "--out", str(tmp_path / "ph"), "--seed", "3", "--shape", "32,48,48"])
    phantom.wait(timeout=120)
    phantom.check()
    shutil.copyfile(tmp_path / "ph" / "ct.nii.gz", data / "ct.nii.gz")

    run = TrainingRunLogic(scene, process_factory=functools.partial(DinomedProcess, python=dinomed_python))
    overrides = ["optim.epochs=6", "train.epoch_length=4", "train.log_every=1", "checkpointing.period=2"]
    process = run.start("pretrain", "tiny_test", data, tmp_path / "run", overrides)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait for a checkpoint beyond step 2, then stop mid-run
        run.poll()
        if any(int(e.get("step", 0)) >= 4 for e in process.events_of("artifact") if e["kind"] == "checkpoint"):
            break
        assert process.running, list(process.log)
        time.sleep(0.1)
    tree = [psutil.Process(process.pid)] + psutil.Process(process.pid).children(recursive=True)
    run.stop()
    assert psutil.wait_procs(tree, timeout=5)[1] == []
    steps_before = run.metrics.column("step")
    assert steps_before and max(steps_before) < 24
    assert not math.isnan(run.metrics.column("loss")[0])

    process = run.resume()
    assert process.wait(timeout=300) == 0
    process.check()
    assert any("resumed" in e.get("message", "") for e in process.events_of("log"))
    steps = run.metrics.column("step")
    assert steps[: len(steps_before)] == steps_before  # the same table continues
    assert max(steps) == 24
    assert (tmp_path / "run" / "teacher_checkpoint.pth").is_file()


def test_register_model_in_dinoseg(tmp_path):
    model = tmp_path / "finetuned"
    model.mkdir()
    (model / "model.json").write_text(json.dumps(MODEL_JSON))
    (model / "model.safetensors").write_bytes(b"\0" * 8)
    target = TrainingRunLogic.register_model(model, tmp_path / "models")
    assert target == tmp_path / "models" / "finetuned"
    from DINOSegLib import list_model_folders

    assert list_model_folders(tmp_path / "models") == [target.resolve()]
    with pytest.raises(TrainingRunError):
        TrainingRunLogic(None).resume()
