"""Intensity normalisation shared by pretraining, finetuning, inference and feature maps.

One definition, so that a model sees at inference exactly what it saw in training. The specs are the
``preprocessing.channels`` entries of ``model.json`` (docs/CONTRACTS.md):

- CT, ``{"modality": "CT", "clip": [-1000, 1000], "scale": "minmax_to_unit"}``: Hounsfield units clipped to the
  window, mapped linearly to [-1, 1];
- PET, ``{"modality": "PET", "clip": [0, 20], "scale": "log1p"}``: SUV clipped, ``log1p`` (compresses the
  range of hot lesions and the bladder while keeping contrast near the liver background), mapped to [-1, 1].
"""
from __future__ import annotations

import numpy as np

from .errors import DinomedError, InputImageError

CT_DEFAULT = {"modality": "CT", "clip": [-1000.0, 1000.0], "scale": "minmax_to_unit"}
PET_DEFAULT = {"modality": "PET", "clip": [0.0, 20.0], "scale": "log1p"}
DEFAULTS = {"CT": CT_DEFAULT, "PET": PET_DEFAULT}
# A PET whose values are far beyond any SUV is in activity units (Bq/ml): the user must convert it first.
MAX_PLAUSIBLE_SUV = 1000.0


def default_spec(modality: str) -> dict:
    try:
        return dict(DEFAULTS[modality.upper()])
    except KeyError:
        raise DinomedError(f"unknown modality {modality!r}; expected CT or PET") from None


def normalize_channel(array: np.ndarray, spec: dict) -> np.ndarray:
    """Map one modality's intensities (HU or SUV) to the model's input range [-1, 1], as float32."""
    lo, hi = (float(v) for v in spec["clip"])
    x = np.clip(np.asarray(array, dtype=np.float32), lo, hi)
    scale = spec.get("scale", "minmax_to_unit")
    if scale == "minmax_to_unit":
        return (x - lo) / (hi - lo) * 2.0 - 1.0
    if scale == "log1p":
        if lo < 0:
            raise DinomedError(f"log1p scaling needs a non-negative clip range, found {spec['clip']}")
        return np.log1p(x - lo) / np.log1p(hi - lo) * 2.0 - 1.0
    raise DinomedError(f"unknown intensity scale {scale!r}; expected minmax_to_unit or log1p")


def check_pet_is_suv(array: np.ndarray, name: str) -> None:
    """Refuse a PET that is obviously not in SUV (e.g. Bq/ml), saying how to convert it."""
    finite = np.asarray(array)[np.isfinite(array)]
    peak = float(finite.max()) if finite.size else 0.0
    if peak > MAX_PLAUSIBLE_SUV:
        raise InputImageError(
            f"{name}: PET maximum is {peak:.4g}, expected SUV (typically below 100); the image looks like activity "
            "concentration (Bq/ml). Convert the PET DICOM series to SUV first: dinomed suv PET_DICOM_DIR --out pet_suv.nii.gz"
        )


def normalize_channels(arrays: list[np.ndarray], specs: list[dict]) -> np.ndarray:
    """Stack normalised channels (C, …) in the order of ``specs`` (``model.json`` inputs order)."""
    if len(arrays) != len(specs):
        raise DinomedError(f"expected {len(specs)} input channel(s) ({[s['modality'] for s in specs]}), found {len(arrays)}")
    return np.stack([normalize_channel(a, s) for a, s in zip(arrays, specs)]).astype(np.float32)
