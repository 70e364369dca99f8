"""DINOSegLogic end to end against real ``dinomed`` children: phantom -> PET/CT in the scene (DICOM PET to
SUV by ``dinomed suv``), lesion table from ``dinomed lesions``, and ``dinomed segment`` with a tiny model."""
from __future__ import annotations

import csv
import json
import time

import numpy as np
import pytest
import SimpleITK as sitk
import slicer

from DINOSegLib import DINOSegLogic, InputRemovedError, Job, JobState, lesions, volumes
from DINOSegLib import segmentation as seglib
from DINOSegLib.models import read_model_info
from dinoseg_testdata import MODEL_JSON


@pytest.fixture(scope="module")
def phantom(tmp_path_factory):
    """A small oblique PET/CT phantom (NIfTI and DICOM) made by a real `dinomed phantom` child."""
    import sys

    out = tmp_path_factory.mktemp("phantom")
    job = Job(["phantom", "--out", str(out), "--seed", "1", "--shape", "32,48,48", "--oblique", "--dicom"],
              python=sys.executable).start()
    assert job.wait(timeout=120) is JobState.SUCCEEDED
    progress = [(e["done"], e["total"]) for e in job.events_of("progress")]
    assert progress == [(0, 1), (1, 1)]
    artifacts = job.artifacts
    assert {"ct", "pet", "labels", "ct_dicom", "pet_dicom"} <= set(artifacts)
    return out


@pytest.fixture
def logic(scene, dinomed_python):
    return DINOSegLogic(scene, python=dinomed_python)


def test_oblique_phantom_ct_and_labels_land_where_simpleitk_puts_them(scene, logic, phantom):
    ct_image = sitk.ReadImage(str(phantom / "ct.nii.gz"))
    assert not np.allclose(ct_image.GetDirection(), np.eye(3).reshape(-1))  # oblique
    ct = logic.load_ct(phantom / "ct.nii.gz")
    labels = volumes.read_volume(scene, phantom / "labels.nii.gz", labelmap=True)
    size = ct_image.GetSize()
    for index in [(0, 0, 0), (size[0] - 1, size[1] - 1, size[2] - 1), (7, 30, 11)]:
        lps = np.array(ct_image.TransformIndexToPhysicalPoint(index))
        for node in (ct, labels):
            ras = (volumes.ijk_to_ras(node) @ np.array([*index, 1.0]))[:3]
            np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-3)


def test_load_pet_ct_from_dicom_converts_pet_to_suv(scene, logic, phantom):
    ct, pet = logic.load_pet_ct(phantom / "ct_dicom", phantom / "pet_dicom")
    reference_ct = sitk.ReadImage(str(phantom / "ct.nii.gz"))
    reference_pet = sitk.ReadImage(str(phantom / "pet.nii.gz"))
    np.testing.assert_allclose(volumes.lps_geometry(ct)[0], reference_ct.GetOrigin(), atol=1e-2)
    np.testing.assert_array_equal(volumes.array_from_volume(ct), sitk.GetArrayFromImage(reference_ct))
    np.testing.assert_allclose(volumes.lps_geometry(pet)[0], reference_pet.GetOrigin(), atol=1e-2)
    suv = volumes.array_from_volume(pet)
    expected = sitk.GetArrayFromImage(reference_pet)
    # the DICOM stores Bq/ml as scaled integers: SUV back within the storage precision
    np.testing.assert_allclose(suv, expected, atol=2e-3 * expected.max())
    assert pet.GetVoxelValueUnits().GetCodeValue() == "{SUVbw}g/ml"
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == ct.GetID()
    assert composite.GetForegroundVolumeID() == pet.GetID()
    assert composite.GetForegroundOpacity() == 0.5
    assert pet.GetDisplayNode().GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"


def test_lesion_table_holds_the_values_of_dinomed_lesions(scene, logic, phantom, tmp_path, dinomed_python):
    # what the command line gives for the phantom's lesion label
    direct = tmp_path / "direct.csv"
    job = Job(["lesions", "--pet", str(phantom / "pet.nii.gz"), "--seg", str(phantom / "labels.nii.gz"),
               "--labels", "1", "--out", str(direct)], python=dinomed_python).start()
    job.wait(timeout=120)
    job.check()
    with open(direct, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) >= 2  # at least one lesion and the total

    table = lesions.lesion_table_node(scene, direct)
    values = lesions.table_values(table)
    assert list(values) == list(rows[0])
    for column, cells in values.items():
        for cell, row in zip(cells, rows):
            text = row[column]
            assert (cell == text) if isinstance(cell, str) else (cell == float(text)), (column, cell, text)

    # the same statistics recomputed from a segmentation node in the scene (the "corrected segmentation" path)
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text(json.dumps(MODEL_JSON))
    model = read_model_info(tmp_path / "model")
    ct = logic.load_ct(phantom / "ct.nii.gz")
    pet = logic.load_pet(phantom / "pet.nii.gz")
    label_node = volumes.read_volume(scene, phantom / "labels.nii.gz", labelmap=True)
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "seg")
    recomputed = lesions.table_values(logic.recompute_lesion_table(seg, pet, ct, model))
    assert list(recomputed) == list(values)
    for column in values:
        if isinstance(values[column][0], str):
            assert recomputed[column] == values[column]
        else:
            np.testing.assert_allclose(recomputed[column], values[column], rtol=1e-5, err_msg=column)

    # a row jumps the slice views to its lesion: the centroid in RAS is the CSV's LPS point flipped
    ras = lesions.lesion_centroid_ras(table, 0)
    np.testing.assert_allclose(ras, [-float(rows[0]["centroid_x_mm"]), -float(rows[0]["centroid_y_mm"]),
                                     float(rows[0]["centroid_z_mm"])])


def test_segment_command_is_what_dinomed_segment_parses(logic, monkeypatch):
    """The Lib's command line is accepted by dinomed's real parser and means what the Lib was asked for (the
    compiled model stays off unless the user's environment sets DINOMED_COMPILE, which the child inherits)."""
    from dinomed.cli import build_parser

    monkeypatch.delenv("DINOMED_COMPILE", raising=False)
    args = logic.segment_command("model", "ct.nrrd", "seg.nrrd", "pet.nrrd", "lesions.csv", "cpu")
    parsed = build_parser().parse_args(args)
    assert (parsed.model, parsed.ct, parsed.out, parsed.pet, parsed.stats, parsed.device) == (
        "model", "ct.nrrd", "seg.nrrd", "pet.nrrd", "lesions.csv", "cpu")
    assert parsed.compile is False


@pytest.mark.slow  # two torch child processes
def test_segment_with_a_tiny_model(scene, logic, phantom, tmp_path):
    from dinomed.models import build_model, model_json_template, save_model_folder

    model = build_model({"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 4})
    meta = model_json_template(model, name="tiny-petct", labels=MODEL_JSON["labels"])
    folder = save_model_folder(model, meta, tmp_path / "tiny-petct")
    ct = logic.load_ct(phantom / "ct.nii.gz")
    pet = logic.load_pet(phantom / "pet.nii.gz")
    seen = []
    task = logic.start_segmentation(ct, folder, pet=pet, device="cpu", on_event=seen.append)
    result = logic.finish_segmentation(task, keep_files=True)
    assert any(e["event"] == "progress" for e in seen)
    seg = result.segmentation
    segmentation = seg.GetSegmentation()
    assert [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())] == ["lesion", "liver", "spleen"]
    assert segmentation.GetSegment("liver").GetTerminology().split("~")[2] == "SCT^10200004^Liver"
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == sh.GetItemParent(sh.GetItemByDataNode(ct))
    # the label map dinomed wrote lies on the CT grid, and the segments hold exactly its voxels
    written = sitk.ReadImage(str(result.files["segmentation"]))
    ct_image = sitk.ReadImage(str(phantom / "ct.nii.gz"))
    np.testing.assert_allclose(written.GetOrigin(), ct_image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), ct_image.GetDirection(), atol=1e-6)
    labels = sitk.GetArrayFromImage(written)
    for value, sid in ((1, "lesion"), (2, "liver"), (3, "spleen")):
        np.testing.assert_array_equal(seglib.segment_mask(seg, sid, ct), (labels == value).astype(np.uint8))
    # with a PET the lesion table comes with the segmentation, straight from the child's CSV
    assert result.lesion_table is not None
    with open(result.files["stats"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert result.lesion_table.GetTable().GetNumberOfRows() == len(rows)
    assert result.lesion_table.GetNodeReference("DINOSeg.Segmentation") is seg


def test_a_nifti_pet_ct_loads_without_dinomed_and_honours_the_opacity(scene, phantom, tmp_path):
    logic = DINOSegLogic(scene, python=str(tmp_path / "no-python"))  # no child process could start
    assert not logic.needs_dinomed_to_load(phantom / "ct.nii.gz", phantom / "pet.nii.gz")
    assert not logic.needs_dinomed_to_load(phantom / "ct_dicom", None)
    assert logic.needs_dinomed_to_load(phantom / "ct.nii.gz", phantom / "pet_dicom")
    ct, pet = logic.load_pet_ct(phantom / "ct.nii.gz", phantom / "pet.nii.gz", opacity=0.3)
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetForegroundVolumeID() == pet.GetID()
    assert abs(composite.GetForegroundOpacity() - 0.3) < 1e-9


def test_a_dicom_ct_goes_through_the_dicom_loader(scene, logic, phantom):
    seen = []

    def dicom_loader(folder):  # what the widget passes: DICOM database import + DICOM plugins
        seen.append(folder)
        return volumes.read_volume(scene, sorted(folder.iterdir())[0])

    first_file = sorted((phantom / "ct_dicom").iterdir())[0]
    for path in (phantom / "ct_dicom", first_file):
        ct = logic.load_ct(path, name="CT", dicom_loader=dicom_loader)
        assert ct.GetName() == "CT" and ct.GetScene() is scene
    assert seen == [phantom / "ct_dicom", phantom / "ct_dicom"]
    logic.load_ct(phantom / "ct.nii.gz", dicom_loader=dicom_loader)
    assert len(seen) == 2  # a NIfTI CT never goes through it


def test_the_dicom_pet_to_suv_conversion_is_a_job_with_cancel(scene, logic, phantom):
    volumes_before = scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    task = logic.start_pet_suv(phantom / "pet_dicom")
    assert task.job.state is JobState.RUNNING and task.work_dir.is_dir()
    task.job.cancel()  # the Cancel button: returns at once, the child and its files are gone
    assert task.job.state is JobState.CANCELLED and not task.work_dir.exists()
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == volumes_before

    finished = []
    task = logic.start_pet_suv(phantom / "pet_dicom", name="PET", on_finish=finished.append)
    deadline = time.monotonic() + 120
    while not finished and time.monotonic() < deadline:  # the widget's timer
        task.job.tick()
        time.sleep(0.05)
    assert finished == [task] and task.job.state is JobState.SUCCEEDED
    pet = logic.finish_pet_suv(task)
    assert pet.GetName() == "PET" and pet.GetVoxelValueUnits().GetCodeValue() == "{SUVbw}g/ml"
    assert not task.work_dir.exists()


@pytest.mark.slow  # a torch child process
def test_the_scene_closed_while_a_job_runs_drops_the_result(scene, logic, tmp_path):
    """The CT is gone when the features arrive: nothing is added, the error says why."""
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    volumes.update_volume_from_array(ct, np.zeros((2, 32, 32), np.float32))
    finished = []
    task = logic.start_features(ct, cache_dir=tmp_path / "cache", on_finish=finished.append,
                                extra_args=["--arch", "vit_tiny", "--random-init", "--device", "cpu"])
    scene.Clear(0)  # File > Close scene while the child runs
    task.job.wait(timeout=300)
    assert finished == [task] and task.job.state is JobState.SUCCEEDED
    with pytest.raises(InputRemovedError, match="removed from the scene"):
        logic.finish_features(task)
    assert scene.GetNumberOfNodesByClass("vtkMRMLVolumeNode") == 0
    assert not task.work_dir.exists()
