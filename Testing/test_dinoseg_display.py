"""PET fused over CT in the slice views, with SUV units."""
from __future__ import annotations

import numpy as np

from DINOSegLib import display, volumes


def test_pet_over_ct_then_ct_alone(scene):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    pet = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "PET")
    for node in (ct, pet):
        volumes.update_volume_from_array(node, np.zeros((4, 5, 6), np.float32))
    display.show_pet_ct(scene, ct, pet, opacity=0.3, suv_max=8.0)
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (ct.GetID(), pet.GetID())
    assert abs(composite.GetForegroundOpacity() - 0.3) < 1e-9
    pet_display = pet.GetDisplayNode()
    assert pet_display.GetColorNodeID() == display.PET_COLOR_NODE_ID
    assert (pet_display.GetWindowLevelMin(), pet_display.GetWindowLevelMax()) == (0.0, 8.0)
    assert pet.GetVoxelValueQuantity().GetCodeMeaning() == "Standardized Uptake Value"
    assert pet.GetVoxelValueUnits().GetCodingSchemeDesignator() == "UCUM"
    assert (ct.GetDisplayNode().GetWindow(), ct.GetDisplayNode().GetLevel()) == (400, 40)
    display.show_pet_ct(scene, ct)
    assert composite.GetForegroundVolumeID() is None and composite.GetForegroundOpacity() == 0.0


def test_the_pet_opacity_changes_only_the_pet_layer(scene):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    pet = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "PET")
    overlay = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Cosine similarity")
    for node in (ct, pet, overlay):
        volumes.update_volume_from_array(node, np.zeros((4, 5, 6), np.float32))
    display.show_pet_ct(scene, ct, pet, opacity=0.5)
    second = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # another view, showing a feature overlay
    second.SetBackgroundVolumeID(ct.GetID())
    display.show_overlay(scene, overlay, opacity=0.7)
    display.show_pet_ct(scene, ct, pet, opacity=0.5)  # PET back in every view
    second.SetForegroundVolumeID(overlay.GetID())
    second.SetForegroundOpacity(0.7)
    ct.GetDisplayNode().SetWindowLevel(1500, -600)  # the user set a lung window
    first = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    for value in (0.1, 0.25, 0.9):  # the slider's ticks
        assert display.set_pet_opacity(scene, pet, value) == 1
        assert abs(first.GetForegroundOpacity() - value) < 1e-9 and first.GetForegroundVolumeID() == pet.GetID()
    assert (ct.GetDisplayNode().GetWindow(), ct.GetDisplayNode().GetLevel()) == (1500, -600)
    assert second.GetForegroundVolumeID() == overlay.GetID() and abs(second.GetForegroundOpacity() - 0.7) < 1e-9
    assert display.set_pet_opacity(scene, None, 0.3) == 0


def test_show_segmentation_in_3d(scene):
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "CT")
    array = np.zeros((8, 10, 12), np.float32)
    volumes.update_volume_from_array(ct, array)
    labels = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    array[2:6, 3:7, 4:9] = 1
    volumes.update_volume_from_array(labels, array.astype(np.uint8))
    from DINOSegLib.segmentation import segmentation_from_labelmap
    from DINOSegLib.models import ModelInfo, LabelInfo

    model = ModelInfo(path=None, name="m", inputs=["CT"], labels=[LabelInfo(value=1, name="liver")])
    seg = segmentation_from_labelmap(scene, labels, model, ct, "seg")
    assert not display.segmentation_shown_in_3d(seg)
    display.show_segmentation_3d(seg)
    assert display.segmentation_shown_in_3d(seg)
    surface = seg.GetClosedSurfaceInternalRepresentation(seg.GetSegmentation().GetNthSegmentID(0))
    assert surface.GetNumberOfPoints() > 0
    display.show_segmentation_3d(seg, False)
    assert not display.segmentation_shown_in_3d(seg)
