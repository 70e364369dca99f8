""""Add this case": CT, PET and the segmentation into an nnU-Net raw dataset folder."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DINOSegLib import segmentation as seglib
from DINOSegLib import training_set, volumes
from DINOSegLib.models import read_model_info
from dinoseg_testdata import MODEL_JSON
from dinoseg_testdata import oblique_image


@pytest.fixture
def case(scene, tmp_path):
    ct_image, _ = oblique_image(shape_zyx=(9, 11, 13))
    pet_array = np.random.default_rng(3).random((5, 6, 7)).astype(np.float32) * 8
    pet_image = sitk.GetImageFromArray(pet_array)
    pet_image.SetSpacing((2.5, 2.5, 5.0))
    pet_image.SetOrigin((3.0, -38.0, 35.0))
    sitk.WriteImage(ct_image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(pet_image, str(tmp_path / "pet.nrrd"))
    ct = volumes.read_volume(scene, tmp_path / "ct.nrrd", name="CT")
    pet = volumes.read_volume(scene, tmp_path / "pet.nrrd", name="PET")
    labels = np.zeros((9, 11, 13), np.uint8)
    labels[2:5, 3:6, 4:9] = 2
    labels[6:8, 1:3, 1:3] = 1
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.json").write_text(json.dumps(MODEL_JSON))
    label_node = seglib.add_labelmap_node(scene, labels, ct, "labels")
    seg = seglib.segmentation_from_labelmap(scene, label_node, read_model_info(tmp_path / "model"), ct, "seg")
    return ct_image, pet_image, ct, pet, seg, labels


def test_add_case_writes_the_nnunet_layout(scene, tmp_path, case):
    ct_image, pet_image, ct, pet, seg, labels = case
    dataset = tmp_path / "Dataset001_Mine"
    written = training_set.add_case(dataset, "case_0000", ct, seg, pet)
    assert written["ct"] == dataset / "imagesTr" / "case_0000_0000.nii.gz"
    assert written["pet"] == dataset / "imagesTr" / "case_0000_0001.nii.gz"
    meta = json.loads((dataset / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "CT", "1": "PET"}
    assert meta["labels"] == {"background": 0, "lesion": 1, "liver": 2, "spleen": 3}
    assert meta["numTraining"] == 1 and meta["file_ending"] == ".nii.gz"
    for key in ("ct", "pet", "labels"):
        image = sitk.ReadImage(str(written[key]))
        np.testing.assert_allclose(image.GetOrigin(), ct_image.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing(), ct_image.GetSpacing(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), ct_image.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written["labels"]))), labels)
    pet_on_ct = sitk.GetArrayFromImage(sitk.ReadImage(str(written["pet"])))
    reference = sitk.GetArrayFromImage(sitk.Resample(pet_image, ct_image, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    inside = (reference > 0) & (pet_on_ct > 0)
    np.testing.assert_allclose(pet_on_ct[inside], reference[inside], rtol=1e-4, atol=1e-4)
    # no temporary nodes left in the scene
    assert scene.GetFirstNodeByName("__dinoseg_labels__") is None
    assert scene.GetFirstNodeByName("__dinoseg_pet_on_ct__") is None

    assert training_set.next_case_id(dataset) == "case_0001"
    training_set.add_case(dataset, "case_0001", ct, seg, pet)
    assert json.loads((dataset / "dataset.json").read_text())["numTraining"] == 2
    with pytest.raises(training_set.TrainingSetError, match="already exists"):
        training_set.add_case(dataset, "case_0001", ct, seg, pet)


def test_case_must_fit_the_dataset(scene, tmp_path, case):
    _, _, ct, pet, seg, _ = case
    dataset = tmp_path / "ds"
    training_set.add_case(dataset, "a", ct, seg, pet)
    with pytest.raises(training_set.TrainingSetError, match="channels"):
        training_set.add_case(dataset, "b", ct, seg)  # CT only in a PET/CT dataset
    seg.GetSegmentation().GetSegment("liver").SetName("hepar")
    with pytest.raises(training_set.TrainingSetError, match="'hepar'"):
        training_set.add_case(dataset, "c", ct, seg, pet)
    with pytest.raises(training_set.TrainingSetError, match="case id"):
        training_set.add_case(dataset, "../evil", ct, seg, pet)


def test_add_this_case_enables_with_ct_segmentation_and_a_chosen_folder(scene, tmp_path):
    import pathlib

    assert training_set.configured_path(pathlib.Path()) is None  # the parameter node's empty path prints "."
    assert training_set.configured_path("") is None and training_set.configured_path(None) is None
    assert training_set.configured_path(tmp_path) == tmp_path
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    seg = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    assert not training_set.can_add_case(ct, seg, tmp_path)  # a CT without voxels
    volumes.update_volume_from_array(ct, np.zeros((2, 3, 4), np.float32))
    assert not training_set.can_add_case(ct, seg, pathlib.Path())
    assert not training_set.can_add_case(ct, None, tmp_path)
    assert not training_set.can_add_case(None, seg, tmp_path)
    assert training_set.can_add_case(ct, seg, str(tmp_path / "new-dataset"))
    with pytest.raises(training_set.TrainingSetError, match="choose a dataset folder"):
        training_set.add_case(pathlib.Path(), "case1", ct, seg)
