"""Segmentation nodes from ``dinomed`` label maps: one segment per model label, with the model folder's name,
colour and SNOMED-CT terminology, the CT as reference geometry, placed in the CT's study so that Slicer's
DICOM SEG export accepts it; and the way back (segmentation -> label map) for the training set.
"""
from __future__ import annotations

import re

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .models import LabelInfo, ModelInfo
from .volumes import array_from_volume, copy_geometry

# Slicer's terminology contexts that hold the DICOM (SNOMED-CT) category/type and region codes
TERMINOLOGY_CONTEXT = "Segmentation category and type - DICOM master list"
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def terminology_entry(label: LabelInfo) -> str:
    """The label's terminology as Slicer's serialized entry (the segment's ``TerminologyEntry`` tag), e.g.
    ``Segmentation category and type - DICOM master list~SCT^123037004^Anatomical Structure~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^``.
    Empty when the model folder gives no terminology for the label."""
    if label.category is None or label.type is None:
        return ""
    (cat_scheme, cat_code, cat_meaning), (type_scheme, type_code, type_meaning) = label.category, label.type
    return slicer.vtkSlicerTerminologiesModuleLogic.SerializeTerminologyEntry(
        TERMINOLOGY_CONTEXT, cat_code, cat_scheme, cat_meaning, type_code, type_scheme, type_meaning,
        "", "", "", ANATOMIC_CONTEXT, "", "", "", "", "", "")


def segment_id(label: LabelInfo) -> str:
    """A stable segment ID per label (readable in scripts: ``seg.GetSegmentation().GetSegment("liver")``)."""
    return re.sub(r"[^A-Za-z0-9_]+", "_", label.name).strip("_") or f"label_{label.value}"


def _oriented_image(array_zyx: np.ndarray, ijk_to_ras: vtk.vtkMatrix4x4) -> "slicer.vtkOrientedImageData":
    image = slicer.vtkOrientedImageData()
    z, y, x = array_zyx.shape
    image.SetDimensions(x, y, z)
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_zyx).reshape(-1), deep=True,
                                         array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(ijk_to_ras)
    return image


def ensure_segmentation_converters() -> None:
    """Register Slicer's standard segmentation representation converters when nobody has.

    Inside Slicer the Segmentations module does this at startup; a bare MRML scene (slicer-core, batch
    scripts) starts with none, and then a segment cannot even hold an empty binary labelmap."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if factory.GetConverterRules():
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule,
                 slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                 slicer.vtkClosedSurfaceToFractionalLabelmapConversionRule,
                 slicer.vtkFractionalLabelmapToClosedSurfaceConversionRule):
        factory.RegisterConverterRule(rule())


def segmentation_from_labelmap(scene, labelmap_node, model: ModelInfo, reference_volume, name: str):
    """A new segmentation node from a label map on the reference's grid.

    One segment per label of ``model`` (also when a label is absent from this case: an empty segment, so
    that the segment list is the model's), in label order; values not listed in the model are ignored."""
    ensure_segmentation_converters()
    values = array_from_volume(labelmap_node)
    matrix = vtk.vtkMatrix4x4()
    labelmap_node.GetIJKToRASMatrix(matrix)
    seg_node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    seg_node.CreateDefaultDisplayNodes()
    seg_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume)
    seg_node.SetAndObserveTransformNodeID(reference_volume.GetTransformNodeID())
    segmentation = seg_node.GetSegmentation()
    was_modifying = seg_node.StartModify()
    for label in model.labels:
        sid = segment_id(label)
        segmentation.AddEmptySegment(sid, label.name, [c / 255.0 for c in label.color])
        segment = segmentation.GetSegment(sid)
        entry = terminology_entry(label)
        if entry:
            segment.SetTerminology(entry)
        segment.SetLabelValue(label.value)
        mask = (values == label.value).astype(np.uint8)
        if mask.any():
            slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                _oriented_image(mask, matrix), seg_node, sid,
                slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
    seg_node.EndModify(was_modifying)
    return seg_node


def segment_mask(seg_node, sid: str, reference_volume) -> np.ndarray:
    """A segment as a (z, y, x) uint8 mask on the reference volume's grid."""
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(sid)
    scene = seg_node.GetScene()
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__dinoseg_temp__")
    try:
        if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(seg_node, ids, labelmap, reference_volume):
            raise RuntimeError(f"could not export segment {sid!r} of {seg_node.GetName()!r}")
        return (array_from_volume(labelmap) > 0).astype(np.uint8)
    finally:
        display = labelmap.GetDisplayNode()
        scene.RemoveNode(labelmap)
        if display is not None:
            scene.RemoveNode(display)


def labelmap_array_from_segmentation(seg_node, reference_volume, label_values: dict[str, int] | None = None) -> np.ndarray:
    """The segmentation as a (z, y, x) label array on the reference grid.

    Each segment gets ``label_values[segment name]`` when given, else its ``LabelValue`` (set by
    :func:`segmentation_from_labelmap`), else its 1-based position. Later segments win where they overlap."""
    segmentation = seg_node.GetSegmentation()
    shape = tuple(reversed(reference_volume.GetImageData().GetDimensions()))
    out = np.zeros(shape, dtype=np.uint8)
    for i in range(segmentation.GetNumberOfSegments()):
        sid = segmentation.GetNthSegmentID(i)
        segment = segmentation.GetSegment(sid)
        if label_values is not None:
            if segment.GetName() not in label_values:
                continue
            value = label_values[segment.GetName()]
        else:
            value = segment.GetLabelValue() or (i + 1)
        out[segment_mask(seg_node, sid, reference_volume) > 0] = value
    return out


def add_labelmap_node(scene, array: np.ndarray, reference_volume, name: str):
    """A label map volume node holding ``array`` on the reference's grid."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))
    copy_geometry(reference_volume, node)
    return node


# -- subject hierarchy --------------------------------------------------------------------------------
def subject_hierarchy_item(scene, node) -> int:
    """The node's subject-hierarchy item, created under the scene when missing (a bare MRML scene has no
    subject-hierarchy plugins that would add it automatically, as Slicer does)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node)
    if not item:
        item = sh.CreateItem(sh.GetSceneItemID(), node)
    return item


def study_item_of(scene, node) -> int:
    """The subject-hierarchy study that holds ``node``; a new patient/study is made when it has none
    (e.g. a CT loaded from NIfTI) and the node is moved into it."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = subject_hierarchy_item(scene, node)
    parent = sh.GetItemParent(item)
    study_level = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy()
    while parent and parent != sh.GetSceneItemID():
        if sh.GetItemLevel(parent) == study_level:
            return parent
        parent = sh.GetItemParent(parent)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), f"Patient ({node.GetName()})")
    study = sh.CreateStudyItem(patient, f"Study ({node.GetName()})")
    sh.SetItemParent(item, study)
    return study


def place_in_study(scene, node, reference_node) -> int:
    """Put ``node`` in the study of ``reference_node`` (creating one when needed); returns the study item."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = study_item_of(scene, reference_node)
    sh.SetItemParent(subject_hierarchy_item(scene, node), study)
    return study
