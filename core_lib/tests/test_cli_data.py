"""The data commands end to end: dinomed phantom, dinomed suv, dinomed lesions."""
from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys

import numpy as np
import SimpleITK as sitk

from dinomed.cli import main
from dinomed.io import read_image
from dinomed.petct import same_grid


def test_phantom_suv_lesions_pipeline(tmp_path, capsys):
    out = tmp_path / "case"
    assert main(["phantom", "--out", str(out), "--seed", "4", "--shape", "24,48,48", "--dicom", "--lesions", "3"]) == 0
    for name in ("ct.nii.gz", "pet.nii.gz", "labels.nii.gz", "dataset.json", "ct_dicom", "pet_dicom"):
        assert (out / name).exists(), name
    capsys.readouterr()

    assert main(["suv", str(out / "pet_dicom"), "--out", str(tmp_path / "suv.nii.gz")]) == 0
    printed = capsys.readouterr().out
    assert "SUVbw factor" in printed and "PatientWeight" in printed and "RadionuclideTotalDose" in printed
    suv = read_image(tmp_path / "suv.nii.gz")
    pet = read_image(out / "pet.nii.gz")
    truth = sitk.GetArrayFromImage(pet)
    assert np.abs(sitk.GetArrayFromImage(suv) - truth).max() <= 0.01 * truth.max()

    # the PET is on its own grid: the command resamples it onto the labels
    assert not same_grid(pet, read_image(out / "labels.nii.gz"))
    assert main(["lesions", "--pet", str(out / "pet.nii.gz"), "--seg", str(out / "lesions.nii.gz"),
                 "--out", str(tmp_path / "stats.csv"), "--json", str(tmp_path / "stats.json")]) == 0
    with open(tmp_path / "stats.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert rows[-1]["lesion"] == "total" and float(rows[-1]["suv_max"]) > 0
    assert json.loads((tmp_path / "stats.json").read_text())[-1]["lesion"] == "total"


def test_phantom_dataset_with_events(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dinomed", "phantom", "--out", str(tmp_path / "ds"), "--seed", "3", "--cases", "2",
         "--shape", "16,32,32", "--events"], capture_output=True, text=True, check=True)
    events = [json.loads(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "done"
    assert any(e["event"] == "artifact" and e["kind"] == "dataset" for e in events)
    meta = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert sorted(p.name for p in (tmp_path / "ds" / "labelsTr").iterdir()) == ["case_0003.nii.gz", "case_0004.nii.gz"]


def test_suv_real_slice_and_errors(tmp_path, shared_data, capsys):
    src = tmp_path / "pet"
    src.mkdir()
    shutil.copy(shared_data / "real_dicom" / "pet_acrin_flt_breast_029.dcm", src / "slice.dcm")
    assert main(["suv", str(src), "--out", str(tmp_path / "suv.nii.gz"), "--json"]) == 0
    factors = json.loads(capsys.readouterr().out)
    assert factors["units"] == "BQML" and abs(factors["decay_time_s"] - 3976.921) < 1e-3
    # a CT is not a PET: one-line error, exit status 2
    assert main(["suv", str(shared_data / "real_dicom" / "ct_multiframe_cornerstone.dcm"),
                 "--out", str(tmp_path / "x.nii.gz")]) == 2
    assert "error:" in capsys.readouterr().err
    assert main(["lesions", "--pet", str(tmp_path / "missing.nii.gz"), "--seg", str(tmp_path / "suv.nii.gz"),
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_lesions_reads_the_label_table_of_dinomed_segment(tmp_path):
    """A label map with a ``.labels.json`` beside it (as ``dinomed segment`` writes): its lesion labels are
    measured by default, under their names; ``--labels`` still chooses others."""
    import csv
    import json

    import numpy as np
    import SimpleITK as sitk

    from dinomed.cli import main

    labels = np.zeros((12, 20, 20), np.uint8)
    labels[2:6, 3:8, 3:8] = 1  # a lesion
    labels[7:11, 10:18, 10:18] = 2  # an organ
    pet = np.where(labels == 1, 6.0, np.where(labels == 2, 2.0, 0.5)).astype(np.float32)
    seg_img, pet_img = sitk.GetImageFromArray(labels), sitk.GetImageFromArray(pet)
    for img in (seg_img, pet_img):
        img.SetSpacing((2.0, 2.0, 3.0))
    sitk.WriteImage(seg_img, str(tmp_path / "seg.nii.gz"))
    sitk.WriteImage(pet_img, str(tmp_path / "pet.nii.gz"))
    (tmp_path / "seg.labels.json").write_text(json.dumps({"format": "dinomed-labels/1", "labels": [
        {"value": 1, "name": "lesion", "lesion": True}, {"value": 2, "name": "liver"}]}))

    def table(*extra):
        out = tmp_path / "stats.csv"
        assert main(["lesions", "--pet", str(tmp_path / "pet.nii.gz"), "--seg", str(tmp_path / "seg.nii.gz"),
                     "--out", str(out), *extra]) == 0
        with open(out) as fh:
            return list(csv.DictReader(fh))

    rows = table()
    assert {r["label"] for r in rows} == {"1"} and {r["name"] for r in rows} == {"lesion"}
    lesion = next(r for r in rows if r["lesion"] != "total")
    assert float(lesion["suv_max"]) == 6.0 and int(lesion["voxels"]) == 4 * 5 * 5
    rows = table("--labels", "2")
    assert {r["name"] for r in rows} == {"liver"}
