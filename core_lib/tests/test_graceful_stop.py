"""Graceful stop of ``dinomed finetune`` and ``dinomed pretrain`` (SIGTERM/SIGINT → checkpoint at the next step,
exit status 3, resume equal to an uninterrupted run), ``dinomed check-data`` and ``dinomed recipes``."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from dinomed.cli import main
from dinomed.errors import EXIT_STOPPED
from dinomed.events import parse_event
from dinomed.synthetic import make_phantom
from dinomed.synthetic.writers import write_nnunet_dataset

TINY_PRETRAIN = ["train.epoch_length=3", "optim.epochs=2", "checkpointing.period=6", "train.batch_size_per_gpu=4",
                 "train.log_every=1", "student.drop_path_rate=0.1"]
QUICK_FINETUNE = ["data.patch_size=[32,32]", "train.max_steps=6", "train.val_every=3", "train.log_every=1",
                  "optim.warmup_steps=2"]


class SignalAtStep(io.StringIO):
    """stdout for ``main``: sends ``sig`` to this process when the metric event of ``step`` is written, as a GUI's
    Stop or a scheduler would while the run trains."""

    def __init__(self, step: int, sig: int = signal.SIGTERM):
        super().__init__()
        self.step, self.sig, self.sent = step, sig, False

    def write(self, text: str) -> int:
        n = super().write(text)
        event = parse_event(text)
        if not self.sent and event and event["event"] == "metric" and event.get("step") == self.step:
            self.sent = True
            os.kill(os.getpid(), self.sig)
        return n

    def events(self) -> list[dict]:
        return [parse_event(line) for line in self.getvalue().splitlines()]


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("ct")
    for seed in range(3):
        sitk.WriteImage(make_phantom(seed, shape=(12, 64, 64)).ct, str(folder / f"ct_{seed}.nii.gz"))
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("petct") / "Dataset001_phantoms"
    write_nnunet_dataset(root, seeds=(1, 3, 4, 8), shape=(32, 64, 64))
    return root


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_pretrain_stops_on_signal_and_resumes_exactly(ct_folder, tmp_path, monkeypatch, sig):
    args = ["pretrain", "tiny_test", *TINY_PRETRAIN, "--data", str(ct_folder), "--events"]
    assert main(args + ["--out", str(tmp_path / "whole")]) == 0
    stream = SignalAtStep(2, sig)
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(args + ["--out", str(tmp_path / "cut")]) == EXIT_STOPPED
    done = stream.events()[-1]
    assert done["event"] == "done" and done["stopped"] is True and done["step"] == 2
    assert [m["step"] for m in metrics(tmp_path / "cut")] == [1, 2]
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["iteration"] == 2
    status = json.loads((tmp_path / "cut" / "status.json").read_text())
    assert status["step"] == 2 and status["total"] == 6 and not status["finished"] and status["kind"] == "pretrain"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone once the run ends
    assert not [p for p in (tmp_path / "cut").iterdir() if p.name.startswith(".")]  # nothing half-written

    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert main(args + ["--out", str(tmp_path / "cut"), "--resume"]) == 0
    reference, resumed = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(reference, resumed):
        for key in ("loss", "dino_local_loss", "ibot_loss", "koleo_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-7), (a["step"], key)
    assert json.loads((tmp_path / "cut" / "status.json").read_text())["finished"] is True


def test_finetune_stops_on_sigterm_and_resumes_exactly(dataset, tmp_path, monkeypatch):
    from dinomed.finetune.trainer import STATE_DIR, STATUS_FILE

    args = ["finetune", "tiny_meddinov3", *QUICK_FINETUNE, "--data", str(dataset), "--events"]
    stream = SignalAtStep(4)
    monkeypatch.setattr(sys, "stdout", stream)
    assert main(args + ["--out", str(tmp_path / "part")]) == EXIT_STOPPED
    done = stream.events()[-1]
    assert done["event"] == "done" and done["stopped"] is True and done["step"] == 4
    state = torch.load(tmp_path / "part" / STATE_DIR / "state.pt", weights_only=True)
    assert state["step"] == 4
    status = json.loads((tmp_path / "part" / STATE_DIR / STATUS_FILE).read_text())
    assert status["step"] == 4 and status["total"] == 6 and status["finished"] is False
    assert status["data"] == str(dataset.resolve()) and Path(status["config"]).is_file()

    full = io.StringIO()
    monkeypatch.setattr(sys, "stdout", full)
    assert main(args + ["--out", str(tmp_path / "full")]) == 0
    resumed = io.StringIO()
    monkeypatch.setattr(sys, "stdout", resumed)
    # the resolved config the run wrote is enough to resume it (what a front-end does in a new session)
    assert main(["finetune", status["config"], "--data", status["data"], "--out", str(tmp_path / "part"),
                 "--resume", "--events"]) == 0

    def losses(buffer):
        return {e["step"]: e["loss"] for e in map(parse_event, buffer.getvalue().splitlines())
                if e["event"] == "metric" and e.get("phase") == "train"}

    after = losses(resumed)
    assert sorted(after) == [5, 6] and all(after[s] == losses(full)[s] for s in after)


@pytest.mark.slow  # two torchrun ranks on gloo
def test_two_ranks_stop_together(ct_folder, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "dinomed", "pretrain", "tiny_test", "train.epoch_length=50", "optim.epochs=1",
           "train.batch_size_per_gpu=2", "train.log_every=1", "checkpointing.period=1000", "--data", str(ct_folder),
           "--out", str(out), "--events", "--nproc-per-node", "2"]
    child = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    events = []
    for line in child.stdout:  # rank 0's events come through torchrun's stdout
        event = parse_event(line)
        if event:
            events.append(event)
        if event and event["event"] == "metric" and event["step"] == 2:
            child.send_signal(signal.SIGTERM)  # to torchrun's agent, which forwards it to both ranks
            break
    events += [e for e in map(parse_event, child.stdout) if e]
    child.wait(timeout=120)
    stderr = child.stderr.read()
    done = [e for e in events if e["event"] == "done"]
    assert len(done) == 1 and done[0]["stopped"] is True, stderr[-3000:]
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["iteration"] == done[0]["step"] < 50
    assert isinstance(state["rng"], list) and len(state["rng"]) == 2  # both ranks took part in the last save
    assert json.loads((out / "status.json").read_text())["step"] == state["iteration"]


def test_check_data_finetune_and_pretrain(dataset, ct_folder, tmp_path, capsys, set_first_label_voxel):
    assert main(["check-data", "finetune", "tiny_meddinov3", "--data", str(dataset), "--events"]) == 0
    done = [parse_event(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["event"] == "done" and done["cases"] == 4 and done["modality"] == ["CT", "PET"]
    assert done["train_cases"] + done["heldout_cases"] == 4 and done["labels"] == ["lesion", "liver", "kidney"]
    assert all(a <= b for a, b in zip(done["spacing_min"], done["spacing_max"]))

    assert main(["check-data", "pretrain", "tiny_test", "--data", str(ct_folder), "--events"]) == 0
    done = [parse_event(line) for line in capsys.readouterr().out.splitlines()][-1]
    assert done["volumes"] == 3 and done["modality"] == "CT" and len(done["spacing_min"]) == 3

    # the same errors as dinomed finetune: a label value dataset.json does not name
    import shutil

    import numpy as np

    bad = tmp_path / "bad"
    shutil.copytree(dataset, bad)
    label_path = sorted((bad / "labelsTr").iterdir())[0]
    array = set_first_label_voxel(label_path, 77)
    assert main(["check-data", "finetune", "tiny_meddinov3", "--data", str(bad)]) == 2
    check_err = capsys.readouterr().err.strip()
    assert check_err.startswith("dinomed check-data: error: case ") and "77 (not in dataset.json labels)" in check_err
    assert main(["finetune", "tiny_meddinov3", "--data", str(bad), "--out", str(tmp_path / "m")]) == 2
    assert capsys.readouterr().err.strip().split("error: ")[1] == check_err.split("error: ")[1]
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))), array)  # input not modified


def test_recipes_list_every_bundled_config_with_a_description(capsys):
    from dinomed.finetune import load_config as finetune_config
    from dinomed.pretrain import load_config as pretrain_config
    from dinomed.pretrain import list_stage_configs
    from dinomed.recipes import CONFIGS, list_recipes

    recipes = list_recipes()
    names = {(r.kind, r.name) for r in recipes}
    assert names == {("finetune", p.stem) for p in (CONFIGS / "finetune").glob("*.yaml")} | {
        ("pretrain", name) for name in list_stage_configs()}
    assert {("pretrain", "ct_vits_stage1"), ("pretrain", "pet_vitl_stage3")} <= names
    for r in recipes:
        assert r.description and "\n" not in r.description, r.name
        if r.kind == "finetune":
            assert finetune_config(r.name)["description"] == r.description
        else:
            extra = ["gram.ckpt=/x"] if r.stage > 1 else []
            assert pretrain_config(r.name, extra)["description"] == r.description
    tiny = [r for r in recipes if r.family == "tiny_test"]
    assert [(r.name, r.stage) for r in tiny] == [("tiny_test", 1), ("tiny_test_stage2", 2), ("tiny_test_stage3", 3)]
    assert main(["recipes", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {(r["kind"], r["name"]) for r in listed} == names
    assert main(["recipes", "--kind", "pretrain"]) == 0
    assert "ct_vits_stage2" in capsys.readouterr().out
