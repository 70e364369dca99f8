"""scripts/train_demo_models.sh, the demo models' whole story (phantoms -> pretrain CT and PET encoders -> finetune
from them and from random encoders -> evaluate -> summary), run end to end for a few steps of each stage
(QUICK=1: tiny phantoms). The full run and its figures: Resources/Models/README.md."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_demo_training_script_runs_every_stage(tmp_path):
    work = tmp_path / "demo"
    env = dict(os.environ, QUICK="1", PYTHON=sys.executable, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "core_lib" / "src"), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(["bash", str(REPO / "scripts" / "train_demo_models.sh"), str(work)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    for modality in ("ct", "pet"):  # both encoders pretrained (stopped by the budget or finished)
        status = json.loads((work / "pretrain" / modality / "status.json").read_text())
        assert status["modality"] == modality.upper() and status["step"] >= 1
        assert (work / "pretrain" / modality / "teacher_checkpoint.pth").is_file()
    pretrained = json.loads((work / "models" / "demo" / "model.json").read_text())
    command = pretrained["provenance"]["command"]
    assert "ct_backbone_checkpoint=" in command and "pet_backbone_checkpoint=" in command
    assert "backbone_checkpoint" not in json.loads((work / "models" / "demo_random_init" / "model.json").read_text())[
        "provenance"]["command"]
    assert "backbone_checkpoint=" in json.loads((work / "models" / "demo_ct_organs" / "model.json").read_text())[
        "provenance"]["command"]
    for model in ("demo", "demo_random_init", "demo_ct_organs"):
        for name in ("heldout", "standard"):
            report = json.loads((work / "models" / model / f"eval_{name}.json").read_text())
            assert report["cases"] and "dice" in report["mean"]
    summary = (work / "summary.md").read_text()
    assert "| demo (PET/CT, pretrained encoders) |" in summary and "| demo_random_init |" in summary
    assert "pretraining done" in (work / "timings.txt").read_text()
    # run again: every stage is found done and skipped (no model, metric or checkpoint rewritten)
    outputs = sorted(p for p in work.rglob("*") if p.is_file() and p.suffix in (".json", ".pth", ".safetensors", ".csv"))
    before = {p: p.stat().st_mtime_ns for p in outputs}
    again = subprocess.run(["bash", str(REPO / "scripts" / "train_demo_models.sh"), str(work)], env=env,
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in outputs} == before
