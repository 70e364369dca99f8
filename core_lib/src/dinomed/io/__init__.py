"""Reading and writing 3D medical volumes with their geometry (origin, spacing, direction).

Everything goes through SimpleITK: NIfTI (``.nii``, ``.nii.gz``), NRRD (``.nrrd``, ``.nhdr``), MetaImage
(``.mha``, ``.mhd``), a DICOM series in a folder (GDCM series IDs; ``series_uid`` picks one when the folder
holds several) and a single DICOM file (also a multi-frame one). Geometry is SimpleITK's: LPS, x-y-z order.

A file is validated at the border (:func:`check_volume`): it must be a scalar 3D volume with at least one
voxel and not all NaN, otherwise an :class:`~dinomed.errors.InputImageError` names the file, what was
expected and what was found.
"""
from __future__ import annotations

from .dicom import list_dicom_series, write_dicom_series
from .volumes import (
    IMAGE_SUFFIXES,
    array_to_image,
    check_volume,
    image_suffix,
    image_to_array,
    read_image,
    write_image,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "array_to_image",
    "check_volume",
    "image_suffix",
    "image_to_array",
    "list_dicom_series",
    "read_image",
    "write_dicom_series",
    "write_image",
]
