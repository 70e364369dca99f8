"""PET/CT: SUV from PET DICOM (QIBA), resampling onto a reference grid, PET lesion statistics."""
from __future__ import annotations

from .resample import physical_bounding_box, resample_to_reference, same_grid

__all__ = ["physical_bounding_box", "resample_to_reference", "same_grid"]
