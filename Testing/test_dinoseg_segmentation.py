"""Segmentation nodes from label maps: segments, names, colours, terminology, reference geometry, study."""
from __future__ import annotations

import json

import numpy as np
import pytest
import slicer

from DINOSegLib import segmentation as seglib
from DINOSegLib import volumes
from DINOSegLib.models import read_model_info

from dinoseg_testdata import MODEL_JSON


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "tiny-petct"
    folder.mkdir()
    (folder / "model.json").write_text(json.dumps(MODEL_JSON))
    return read_model_info(folder)


@pytest.fixture
def ct_and_labels(scene):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Patient CT")
    volumes.update_volume_from_array(ct, np.zeros((10, 12, 14), np.int16))
    direction = np.array([[0.96, -0.28, 0], [0.28, 0.96, 0], [0, 0, 1]])
    volumes.set_ijk_to_ras(ct, volumes.ijk_to_ras_from_lps((4, -8, 20), (0.8, 0.9, 2.5), direction.reshape(-1)))
    labels = np.zeros((10, 12, 14), np.uint8)
    labels[2:4, 3:6, 4:9] = 1
    labels[5:9, 1:4, 1:5] = 2  # no spleen in this case
    label_node = seglib.add_labelmap_node(scene, labels, ct, "labels")
    return ct, labels, label_node


def test_one_segment_per_label_with_name_colour_terminology(scene, model, ct_and_labels):
    ct, labels, label_node = ct_and_labels
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "Patient CT segmentation")
    segmentation = seg.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 3
    ids = [segmentation.GetNthSegmentID(i) for i in range(3)]
    assert ids == ["lesion", "liver", "spleen"]
    liver = segmentation.GetSegment("liver")
    assert liver.GetName() == "liver"
    np.testing.assert_allclose(liver.GetColor(), np.array([221, 130, 101]) / 255)
    assert liver.GetTerminology() == (
        "Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~"
        "SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^")
    # Slicer's own terminology logic reads the entry back into the same codes
    entry = slicer.vtkSlicerTerminologyEntry()
    assert slicer.vtkSlicerTerminologiesModuleLogic.DeserializeTerminologyEntry(segmentation.GetSegment("lesion").GetTerminology(), entry)
    assert entry.GetCategoryObject().GetCodeValue() == "49755003"
    assert entry.GetTypeObject().GetCodeValue() == "108369006"
    assert entry.GetTypeObject().GetCodingSchemeDesignator() == "SCT"
    assert entry.GetTypeObject().GetCodeMeaning() == "Neoplasm"
    for value, sid in ((1, "lesion"), (2, "liver"), (3, "spleen")):
        np.testing.assert_array_equal(seglib.segment_mask(seg, sid, ct), (labels == value).astype(np.uint8))
        assert segmentation.GetSegment(sid).GetLabelValue() == value


def test_reference_geometry_is_the_ct(scene, model, ct_and_labels):
    ct, _, label_node = ct_and_labels
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "seg")
    assert seg.GetNodeReference(seg.GetReferenceImageGeometryReferenceRole()) is ct
    geometry = seg.GetSegmentation().GetConversionParameter(slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    values = [float(v) for v in geometry.split(";") if v]
    matrix = np.array(values[:16]).reshape(4, 4)
    np.testing.assert_allclose(matrix, volumes.ijk_to_ras(ct), atol=1e-6)
    assert values[16:] == [0, 13, 0, 11, 0, 9]  # the CT's extent


def test_round_trip_to_a_label_map(scene, model, ct_and_labels):
    ct, labels, label_node = ct_and_labels
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "seg")
    np.testing.assert_array_equal(seglib.labelmap_array_from_segmentation(seg, ct), labels)
    np.testing.assert_array_equal(seglib.labelmap_array_from_segmentation(seg, ct, {"liver": 7}),
                                  np.where(labels == 2, 7, 0))


def test_placed_in_the_ct_study(scene, model, ct_and_labels):
    ct, _, label_node = ct_and_labels
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Anonymous")
    study = sh.CreateStudyItem(patient, "PET/CT study")
    sh.CreateItem(study, ct)
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "seg")
    assert seglib.place_in_study(scene, seg, ct) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


def test_a_ct_outside_any_study_gets_one(scene, model, ct_and_labels):
    ct, _, label_node = ct_and_labels
    seg = seglib.segmentation_from_labelmap(scene, label_node, model, ct, "seg")
    study = seglib.place_in_study(scene, seg, ct)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemLevel(study) == slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    assert sh.GetItemParent(sh.GetItemByDataNode(ct)) == study
    assert sh.GetItemParent(sh.GetItemByDataNode(seg)) == study


def test_label_without_terminology_has_no_entry(model):
    label = model.labels[0]
    label.category = None
    assert seglib.terminology_entry(label) == ""
