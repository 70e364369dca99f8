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
