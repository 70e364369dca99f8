"""Seeded synthetic PET/CT phantoms (CT in HU, PET in SUV on its own grid, organ and lesion labels) and
writers for one case (NIfTI, optionally DICOM series with SUV tags) and for an nnU-Net dataset."""
from __future__ import annotations

from .labels import LABEL_VALUES, LESION_LABEL, ORGAN_LABELS, dataset_labels, label_entries
from .phantom import F18_HALF_LIFE_S, Lesion, Phantom, make_phantom
from .writers import pet_bqml_scale, write_nnunet_dataset, write_phantom_case, write_phantom_dicom

__all__ = [
    "F18_HALF_LIFE_S",
    "LABEL_VALUES",
    "LESION_LABEL",
    "ORGAN_LABELS",
    "Lesion",
    "Phantom",
    "dataset_labels",
    "label_entries",
    "make_phantom",
    "pet_bqml_scale",
    "write_nnunet_dataset",
    "write_phantom_case",
    "write_phantom_dicom",
]
