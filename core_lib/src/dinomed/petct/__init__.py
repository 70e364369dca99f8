"""PET/CT: SUV from PET DICOM (QIBA), resampling onto a reference grid, PET lesion statistics."""
from __future__ import annotations

from .lesions import SUV_PEAK_RADIUS_MM, LesionStats, fov_warnings, lesion_statistics, suv_peak, write_lesion_table
from .resample import field_of_view_mask, physical_bounding_box, resample_to_reference, same_grid
from .suv import SUV_KINDS, SUVFactors, suv_factors, suv_from_dicom

__all__ = [
    "SUV_PEAK_RADIUS_MM",
    "LesionStats",
    "field_of_view_mask",
    "fov_warnings",
    "lesion_statistics",
    "suv_peak",
    "write_lesion_table",
    "SUV_KINDS",
    "SUVFactors",
    "physical_bounding_box",
    "resample_to_reference",
    "same_grid",
    "suv_factors",
    "suv_from_dicom",
]
