"""``dinomed demo``: the sample case segmented with a model folder into a label map, lesion tables and an overview PNG."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch

from dinomed.cli import main
from dinomed.commands.demo import DEMO_MODEL_DIR, SAMPLE_DIR
from dinomed.models import build_model, model_json_template, save_model_folder
from dinomed.synthetic import label_entries, make_phantom
from dinomed.synthetic.writers import write_phantom_case

OUTPUTS = ("segmentation.nii.gz", "segmentation.labels.json", "lesions.csv", "lesions.json", "overview.png")


def _check_outputs(out: Path, sample: Path) -> None:
    for name in OUTPUTS:
        assert (out / name).is_file(), name
    ct, seg = sitk.ReadImage(str(sample / "ct.nii.gz")), sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert seg.GetSize() == ct.GetSize()
    assert seg.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    assert seg.GetSpacing() == pytest.approx(ct.GetSpacing())
    assert (out / "overview.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "lesions.csv").open()))
    assert len(rows) == len(json.loads((out / "lesions.json").read_text()))


def test_demo_runs_on_a_sample_folder_with_a_given_model(tmp_path, capsys):
    sample = tmp_path / "sample"
    write_phantom_case(make_phantom(11, shape=(16, 48, 48), n_lesions=2), sample)
    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 10,
                         "decoder_channels": [16, 16, 8, 8]})
    with torch.no_grad():  # predict "lesion" everywhere: one lesion, Dice against the truth is known to be > 0
        model.decoder.classifier.weight.zero_()
        model.decoder.classifier.bias.fill_(-5.0)
        model.decoder.classifier.bias[1] = 5.0
    folder = save_model_folder(model, model_json_template(model, name="tiny", labels=label_entries()), tmp_path / "m")
    out = tmp_path / "demo"
    rc = main(["demo", "--model", str(folder), "--sample", str(sample), "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    _check_outputs(out, sample)
    assert "lesions found: 1" in printed
    assert "true lesions detected: 2 of 2" in printed
    assert "Dice vs ground truth: lesion 0." in printed
    assert "only synthetic phantoms" in printed


def test_demo_without_model_says_how_to_make_it(tmp_path, capsys):
    rc = main(["demo", "--model", str(tmp_path / "absent"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "demo model folder is missing" in err and "dinomed finetune" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_bundled_demo(tmp_path, capsys):
    assert (DEMO_MODEL_DIR / "model.json").is_file(), f"the bundled demo model is missing ({DEMO_MODEL_DIR})"
    out = tmp_path / "demo_output"
    rc = main(["demo", "--out", str(out), "--device", "cpu"])
    printed = capsys.readouterr().out
    assert rc == 0
    _check_outputs(out, SAMPLE_DIR)
    assert "lesions found:" in printed and "Dice vs ground truth:" in printed
