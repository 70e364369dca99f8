"""How PET/CT is shown: PET in SUV with a PET colour map, fused over the CT in every slice view."""
from __future__ import annotations

import slicer

PET_COLOR_NODE_ID = "vtkMRMLPETProceduralColorNodePET-Heat"
CT_COLOR_NODE_ID = "vtkMRMLColorTableNodeGrey"


def set_suv_units(pet_node) -> None:
    """Mark the PET's voxels as body-weight SUV (DICOM quantity/unit codes), shown by Slicer's data probe."""
    quantity = slicer.vtkCodedEntry()
    quantity.SetValueSchemeMeaning("126400", "DCM", "Standardized Uptake Value")
    units = slicer.vtkCodedEntry()
    units.SetValueSchemeMeaning("{SUVbw}g/ml", "UCUM", "Standardized Uptake Value body weight")
    pet_node.SetVoxelValueQuantity(quantity)
    pet_node.SetVoxelValueUnits(units)


def show_pet_ct(scene, ct_node, pet_node=None, opacity: float = 0.5, suv_max: float = 10.0) -> None:
    """CT as background (soft-tissue window), PET as foreground with the PET colour map from SUV 0 to
    ``suv_max`` at ``opacity``, in every slice view of the scene."""
    ct_node.CreateDefaultDisplayNodes()
    ct_display = ct_node.GetDisplayNode()
    if scene.GetNodeByID(CT_COLOR_NODE_ID) is not None:
        ct_display.SetAndObserveColorNodeID(CT_COLOR_NODE_ID)
    ct_display.AutoWindowLevelOff()
    ct_display.SetWindowLevel(400, 40)
    if pet_node is not None:
        pet_node.CreateDefaultDisplayNodes()
        set_suv_units(pet_node)
        display = pet_node.GetDisplayNode()
        if scene.GetNodeByID(PET_COLOR_NODE_ID) is not None:
            display.SetAndObserveColorNodeID(PET_COLOR_NODE_ID)
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, suv_max)
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetBackgroundVolumeID(ct_node.GetID())
        composite.SetForegroundVolumeID(pet_node.GetID() if pet_node is not None else None)
        composite.SetForegroundOpacity(opacity if pet_node is not None else 0.0)


def show_overlay(scene, overlay_node, opacity: float = 0.5) -> None:
    """Put a feature overlay (PCA or cosine map) in the foreground of every slice view."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(overlay_node.GetID())
        composite.SetForegroundOpacity(opacity)


def set_pet_opacity(scene, pet_node, opacity: float) -> int:
    """The PET opacity slider: change the foreground opacity of the slice views that show this PET, and
    nothing else (the CT's window/level, a feature overlay in another view, the layers stay as they are).
    Returns how many views changed."""
    if pet_node is None:
        return 0
    changed = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if composite.GetForegroundVolumeID() == pet_node.GetID():
            composite.SetForegroundOpacity(float(opacity))
            changed += 1
    return changed


def show_segmentation_3d(segmentation_node, visible: bool = True) -> None:
    """"Show 3D" of a segmentation (as TotalSegmentator and MONAIAuto3DSeg offer): build the closed surface
    and show it in the 3D views; ``visible=False`` hides it again (the surface is kept)."""
    if visible:
        from .segmentation import ensure_segmentation_converters

        ensure_segmentation_converters()
        segmentation_node.CreateClosedSurfaceRepresentation()
    segmentation_node.CreateDefaultDisplayNodes()
    segmentation_node.GetDisplayNode().SetVisibility3D(bool(visible))


def segmentation_shown_in_3d(segmentation_node) -> bool:
    display = segmentation_node.GetDisplayNode() if segmentation_node is not None else None
    return bool(display is not None and display.GetVisibility3D()
                and segmentation_node.GetSegmentation().ContainsRepresentation("Closed surface"))
