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


def normalize_channel(array: np.ndarray, spec: dict, out: np.ndarray | None = None) -> np.ndarray:
    """Map one modality's intensities (HU or SUV) to the model's input range [-1, 1], as float32.

    With ``out`` (a float32 array of the same shape) the result is written there in place; ``out`` may be
    ``array`` itself (a float32 volume nobody else reads, such as a resampled copy: then no second volume at all).
    The work goes in slabs along the first axis, so that a whole-body volume needs no whole-volume temporary
    (float32 copies of an 800-slice CT are 0.8 GB each)."""
    lo, hi = (float(v) for v in spec["clip"])
    scale = spec.get("scale", "minmax_to_unit")
    if scale not in ("minmax_to_unit", "log1p"):
        raise DinomedError(f"unknown intensity scale {scale!r}; expected minmax_to_unit or log1p")
    if scale == "log1p" and lo < 0:
        raise DinomedError(f"log1p scaling needs a non-negative clip range, found {spec['clip']}")
    array = np.asarray(array)
    if out is None:
        out = np.empty(array.shape, dtype=np.float32)
    if array.ndim == 0 or array.shape[0] == 0:
        out[...] = _normalize_block(array, lo, hi, scale)
        return out
    same = out is array
    if not same and np.may_share_memory(out, array):
        raise DinomedError("normalize_channel: out overlaps the input without being the input itself")
    step = max(1, (4 << 20) // max(1, int(np.prod(array.shape[1:]))))
    for start in range(0, array.shape[0], step):
        block = out[start:start + step]
        if not same:
            block[...] = array[start:start + step]
        _normalize_block(block, lo, hi, scale, inplace=True)
    return out


def _normalize_block(x: np.ndarray, lo: float, hi: float, scale: str, inplace: bool = False) -> np.ndarray:
    x = x if inplace else np.array(x, dtype=np.float32)
    np.clip(x, lo, hi, out=x)
    x -= lo
    if scale == "log1p":
        np.log1p(x, out=x)
        x *= 2.0 / np.log1p(hi - lo)
    else:
        x *= 2.0 / (hi - lo)
    x -= 1.0
    return x


def check_pet_is_suv(array: np.ndarray, name: str) -> None:
    """Refuse a PET that is obviously not in SUV (e.g. Bq/ml), saying how to convert it."""
    array = np.asarray(array)
    if array.size == 0:
        return
    low, peak = float(np.nanmin(array)), float(np.nanmax(array))
    if low <= -100.0:  # SUV is never negative; air and lung in HU are
        raise InputImageError(
            f"{name}: given as the PET (SUV) but its values span {low:.4g}..{peak:.4g}, which is a CT in Hounsfield "
            "units (SUV is never negative); check that --pet is the PET and --ct the CT"
        )
    if peak > MAX_PLAUSIBLE_SUV:
        raise InputImageError(
            f"{name}: PET maximum is {peak:.4g}, expected SUV (typically below 100); the image looks like activity "
            "concentration (Bq/ml). Convert the PET DICOM series to SUV first: dinomed suv PET_DICOM_DIR --out pet_suv.nii.gz"
        )


def normalize_channels(arrays: list[np.ndarray], specs: list[dict]) -> np.ndarray:
    """Stack normalised channels (C, …) in the order of ``specs`` (``model.json`` inputs order)."""
    if len(arrays) != len(specs):
        raise DinomedError(f"expected {len(specs)} input channel(s) ({[s['modality'] for s in specs]}), found {len(arrays)}")
    shape = np.asarray(arrays[0]).shape if arrays else ()
    out = np.empty((len(arrays),) + tuple(shape), dtype=np.float32)
    for channel, (array, spec) in enumerate(zip(arrays, specs)):
        if np.asarray(array).shape != shape:
            raise DinomedError(f"input channel {channel} ({spec.get('modality', '?')}) has shape {np.asarray(array).shape}, "
                               f"expected {shape} like the first channel")
        normalize_channel(array, spec, out=out[channel])
    return out
