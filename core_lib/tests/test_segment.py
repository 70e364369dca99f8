"""``dinomed segment`` end to end: a real tiny MedDINOv3 model folder, real synthetic PET/CT phantoms written to
disk, the real CLI; geometry of the output, the label table, the lesion statistics, events, bad input."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from dinomed.cli import main
from dinomed.errors import DinomedError
from dinomed.events import parse_event
from dinomed.inference.segment import (label_sidecar_path, min_component_voxels, remove_small_components,
                                       resolve_device)
from dinomed.models import build_model, model_json_template, save_model_folder
from dinomed.petct import resample_to_reference
from dinomed.synthetic import label_entries, make_phantom

TINY = {"name": "meddinov3", "backbone": "vit_tiny", "decoder_channels": [16, 16, 8, 8], "num_classes": 10}


def _model_folder(folder: Path, in_chans: int = 2, favour: int | None = None, **json_overrides) -> Path:
    """A tiny MedDINOv3 model folder. ``favour`` makes the classifier predict that label everywhere (zero
    weights, one positive bias), so that the output is known without training."""
    model = build_model({**TINY, "in_chans": in_chans})
    if favour is not None:
        with torch.no_grad():
            model.decoder.classifier.weight.zero_()
            model.decoder.classifier.bias.fill_(-5.0)
            model.decoder.classifier.bias[favour] = 5.0
    kwargs = {"labels": label_entries(), "inference": {"batch_size": 4, "min_component_ml": {"lesion": 0.05}}}
    kwargs.update(json_overrides)
    model_json = model_json_template(model, name="tiny-test", **kwargs)
    return save_model_folder(model, model_json, folder)


@pytest.fixture(scope="module")
def case(tmp_path_factory) -> dict:
    """An oblique phantom with an anisotropic CT (2.5 x 2.0 x 4.0 mm) and a PET on its own oblique grid."""
    root = tmp_path_factory.mktemp("case")
    phantom = make_phantom(7, shape=(12, 40, 36), oblique=True, spacing=(2.5, 2.0, 4.0), n_lesions=2)
    sitk.WriteImage(phantom.ct, str(root / "ct.nrrd"))
    sitk.WriteImage(phantom.pet, str(root / "pet.nii.gz"))
    return {"root": root, "ct": root / "ct.nrrd", "pet": root / "pet.nii.gz", "phantom": phantom}


@pytest.fixture(scope="module")
def lesion_model(tmp_path_factory) -> Path:
    return _model_folder(tmp_path_factory.mktemp("model") / "lesion_everywhere", favour=1)


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_segment_lands_on_ct_grid_with_labels_stats_and_events(case, lesion_model, tmp_path, capsys):
    out, stats = tmp_path / "out" / "seg.nii.gz", tmp_path / "out" / "lesions.csv"
    rc, stdout, stderr = _run(["segment", "--model", str(lesion_model), "--ct", str(case["ct"]), "--pet",
                               str(case["pet"]), "--out", str(out), "--stats", str(stats), "--device", "cpu",
                               "--events"], capsys)
    assert rc == 0, stderr
    ct = sitk.ReadImage(str(case["ct"]))
    seg = sitk.ReadImage(str(out))
    assert ct.GetDirection() != pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))  # the test really is oblique
    assert seg.GetSize() == ct.GetSize()
    assert seg.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    assert seg.GetSpacing() == pytest.approx(ct.GetSpacing(), abs=1e-6)
    assert seg.GetDirection() == pytest.approx(ct.GetDirection(), abs=1e-6)
    assert seg.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(seg)
    assert (labels == 1).all()  # the classifier favours label 1 everywhere

    table = json.loads(label_sidecar_path(out).read_text())
    assert label_sidecar_path(out) == tmp_path / "out" / "seg.labels.json"
    assert table["format"] == "dinomed-labels/1"
    lesion = next(lab for lab in table["labels"] if lab["value"] == 1)
    assert lesion["name"] == "lesion" and lesion["lesion"] is True and lesion["voxels"] == labels.size
    assert lesion["volume_ml"] == pytest.approx(labels.size * np.prod(ct.GetSpacing()) / 1000, rel=1e-3)

    # the whole CT grid is one lesion: its SUVmax is the PET's maximum on the CT grid, its MTV the grid's volume
    rows = list(csv.DictReader(stats.open()))
    assert [r["lesion"] for r in rows] == ["1", "total"]
    pet_on_ct = sitk.GetArrayFromImage(resample_to_reference(sitk.Cast(case["phantom"].pet, sitk.sitkFloat32), ct))
    assert float(rows[0]["suv_max"]) == pytest.approx(float(pet_on_ct.max()), rel=1e-4)
    assert float(rows[0]["suv_mean"]) == pytest.approx(float(pet_on_ct.mean()), rel=1e-3)
    assert float(rows[0]["mtv_ml"]) == pytest.approx(labels.size * np.prod(ct.GetSpacing()) / 1000, rel=1e-4)

    events = [parse_event(line) for line in stdout.splitlines()]
    assert all(e is not None for e in events), stdout
    kinds = [e["event"] for e in events]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"] == ct.GetSize()[2]
    assert len(progress) >= 3  # 12 slices in batches of 4: one event per batch
    assert progress[0]["done"] == 0  # and one before the first, so a bar's clock starts with the work
    artifacts = {e["kind"]: e["path"] for e in events if e["event"] == "artifact"}
    assert artifacts == {"segmentation": str(out), "labels": str(label_sidecar_path(out)), "lesion_table": str(stats)}
    assert kinds[-1] == "done" and events[-1]["lesions"] == 1


def test_segment_ct_only_model_with_target_spacing_returns_to_ct_grid(case, tmp_path, capsys):
    model = _model_folder(tmp_path / "ct_only", in_chans=1, favour=2,
                          preprocessing={"target_spacing": [3.0, 3.0, 3.0],
                                         "channels": [{"modality": "CT", "clip": [-1000, 1000], "scale": "minmax_to_unit"}]})
    out = tmp_path / "seg.nrrd"
    rc, _, stderr = _run(["segment", "--model", str(model), "--ct", str(case["ct"]), "--out", str(out)], capsys)
    assert rc == 0, stderr
    ct, seg = sitk.ReadImage(str(case["ct"])), sitk.ReadImage(str(out))
    assert seg.GetSize() == ct.GetSize()
    assert seg.GetOrigin() == pytest.approx(ct.GetOrigin(), abs=1e-4)
    assert seg.GetDirection() == pytest.approx(ct.GetDirection(), abs=1e-6)
    assert (sitk.GetArrayFromImage(seg) == 2).all()
    assert "segmented in" in stderr  # human progress on stderr


def test_random_tiny_model_runs_on_a_pet_dicom_folder(tmp_path, capsys):
    """A PET DICOM series (Bq/ml with SUV tags) is converted to SUV before it is resampled onto the CT."""
    from dinomed.synthetic.writers import write_phantom_dicom

    phantom = make_phantom(3, shape=(10, 32, 32), n_lesions=1)
    ct_dir, pet_dir = write_phantom_dicom(phantom, tmp_path / "dicom")
    model = _model_folder(tmp_path / "random")
    out, stats = tmp_path / "seg.nii.gz", tmp_path / "lesions.json"
    rc, _, stderr = _run(["segment", "--model", str(model), "--ct", str(ct_dir), "--pet", str(pet_dir), "--out",
                          str(out), "--stats", str(stats)], capsys)
    assert rc == 0, stderr
    seg = sitk.ReadImage(str(out))
    assert seg.GetSize() == phantom.ct.GetSize()
    assert seg.GetOrigin() == pytest.approx(phantom.ct.GetOrigin(), abs=1e-3)
    assert sitk.GetArrayFromImage(seg).max() <= 9
    rows = json.loads(stats.read_text())
    assert isinstance(rows, list)
    for row in rows:  # SUV, not Bq/ml: a phantom's SUVs stay below 100
        assert row["suv_max"] < 100


def test_remove_small_components_uses_millilitres_per_label():
    array = np.zeros((10, 20, 20), np.uint8)
    array[1:3, 1:3, 1:3] = 1  # 8 voxels = 8 * 8 mm^3 = 0.064 ml
    array[5:9, 5:10, 5:10] = 1  # 100 voxels = 0.8 ml
    array[0, 15:17, 15:17] = 2  # a small organ island, no minimum for label 2
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((2.0, 2.0, 2.0))
    model_json = {"labels": label_entries(), "inference": {"min_component_ml": {"lesion": 0.1}}}
    minimum = min_component_voxels(model_json, image.GetSpacing())
    assert minimum == {1: 13}  # 0.1 ml / 0.008 ml per voxel = 12.5 -> 13 voxels
    shared = sitk.Image(image)  # shares the buffer until one of them is written
    cleaned_image = remove_small_components(image, minimum)
    cleaned = sitk.GetArrayFromImage(cleaned_image)
    assert cleaned[1:3, 1:3, 1:3].sum() == 0
    assert (cleaned[5:9, 5:10, 5:10] == 1).all()
    assert (cleaned[0, 15:17, 15:17] == 2).all()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), array)  # the input is left as it was
    assert cleaned_image.GetSpacing() == image.GetSpacing()
    # in place (dinomed segment, on the label map it made): the same voxels, written into that image only
    same = remove_small_components(image, minimum, in_place=True)
    assert same is image
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), cleaned)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(shared), array)
    # a number applies to every label
    assert min_component_voxels({"labels": label_entries(), "inference": {"min_component_ml": 0.016}}, (2, 2, 2))[2] == 2


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    assert resolve_device("auto").type == expected
    with pytest.raises(DinomedError, match="unknown device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(DinomedError, match="no CUDA GPU"):
            resolve_device("cuda")


# ------------------------------------------------------------------------------------------------------
# bad input: one line naming the problem, exit 2, no output file


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def bad_inputs(case, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("bad")
    ct = sitk.ReadImage(str(case["ct"]))
    nan_ct = sitk.Cast(ct, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(nan_ct)
    arr[3, 10, 10] = np.nan
    nan_img = sitk.GetImageFromArray(arr)
    nan_img.CopyInformation(ct)
    pet = sitk.Cast(case["phantom"].pet, sitk.sitkFloat32)
    pet_arr = sitk.GetArrayFromImage(pet)
    pet_arr[2, 5, 5] = np.nan
    nan_pet = sitk.GetImageFromArray(pet_arr)
    nan_pet.CopyInformation(pet)
    far_pet = sitk.Image(case["phantom"].pet)
    far_pet.SetOrigin([o + 5000.0 for o in far_pet.GetOrigin()])
    two_d = sitk.GetImageFromArray(np.zeros((32, 32), np.int16))
    four_d = sitk.JoinSeries([sitk.Cast(ct, sitk.sitkInt16)] * 2)
    no_json = root / "no_json"
    no_json.mkdir()
    no_weights = _model_folder(root / "no_weights")
    (no_weights / "model.safetensors").unlink()
    (root / "a_file").write_text("not a folder")
    return {
        "model": _model_folder(root / "model"),
        "no_json": no_json,
        "no_weights": no_weights,
        "nan": _write(nan_img, root / "nan_ct.nrrd"),  # ITK reads NaN in NIfTI as 0; NRRD keeps it
        "far_pet": _write(far_pet, root / "far_pet.nii.gz"),
        "nan_pet": _write(nan_pet, root / "nan_pet.nii.gz"),  # read_image's check (read_pet_suv no longer repeats it)
        "two_d": _write(two_d, root / "two_d.nii.gz"),
        "four_d": _write(four_d, root / "four_d.nii.gz"),
        "file": root / "a_file",
    }


BAD_CASES = {
    "missing model.json": (dict(model="no_json"), "model.json is missing"),
    "missing weights": (dict(model="no_weights"), "model.safetensors is missing"),
    "model needs PET": (dict(pet=None), "needs a PET"),
    "no overlap": (dict(pet="far_pet"), "do not overlap"),
    "2D image": (dict(ct="two_d"), "found a 2D image"),
    "4D image": (dict(ct="four_d"), "found a 4D image"),
    "NaN voxels": (dict(ct="nan"), "NaN or infinite"),
    "NaN voxels in the PET": (dict(pet="nan_pet"), "nan_pet.nii.gz: 1 of"),
    "unwritable output": (dict(out="under_file"), "is a file, not a folder"),
    "stats without PET": (dict(model="ct_only", pet=None, stats=True), "need a PET"),
}


@pytest.mark.parametrize("name", list(BAD_CASES))
def test_bad_input_is_one_line_exit_2_and_no_output(name, case, bad_inputs, tmp_path, capsys):
    change, expected = BAD_CASES[name]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    if change.get("model") == "ct_only":
        model = _model_folder(tmp_path / "ct_only", in_chans=1)
    else:
        model = bad_inputs[change.get("model", "model")]
    ct = bad_inputs[change["ct"]] if "ct" in change else case["ct"]
    out = bad_inputs["file"] / "seg.nii.gz" if change.get("out") == "under_file" else out_dir / "seg.nii.gz"
    argv = ["segment", "--model", str(model), "--ct", str(ct), "--out", str(out)]
    pet = change.get("pet", "default")
    if pet == "default":
        argv += ["--pet", str(case["pet"])]
    elif pet is not None:
        argv += ["--pet", str(bad_inputs[pet])]
    if change.get("stats"):
        argv += ["--stats", str(out_dir / "lesions.csv")]
    rc, stdout, stderr = _run(argv, capsys)
    assert rc == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dinomed segment: error:"), stderr
    assert expected in lines[0]
    assert list(out_dir.iterdir()) == []
    assert not out.exists()


def test_bad_input_with_events_is_an_error_event(case, bad_inputs, tmp_path, capsys):
    rc, stdout, _ = _run(["segment", "--model", str(bad_inputs["model"]), "--ct", str(case["ct"]), "--out",
                          str(tmp_path / "seg.nii.gz"), "--events"], capsys)
    assert rc == 2
    events = [parse_event(line) for line in stdout.splitlines()]
    assert events[-1]["event"] == "error" and "needs a PET" in events[-1]["message"]
