"""Image-level labels of a phantom, for the classification task of ``dinomed classify`` (tests, demo, benchmark).

What a phantom contains, as binary labels a radiologist would read off the scan:

- ``lesion``: at least one lesion was painted inside the field of view;
- ``liver_lesion``: at least one of them is a liver lesion;
- ``contrast``: the CT is in the portal-venous contrast phase (brighter liver, spleen, kidneys and vessels);
- ``lung_in_view``, ``liver_in_view``: the organ fills at least 1% of the CT's voxels (body-part recognition:
  a short field of view, e.g. 16 slices, holds the chest, the abdomen or the pelvis depending on the seed).

``lesion_free(seed, fraction)`` decides, from the seed alone and without touching the phantom's own random
stream, whether a case of a dataset is drawn without lesions, so that the ``lesion`` label is not almost
always 1 (a phantom has 1-8 lesions by default).
"""
from __future__ import annotations

import numpy as np

from .phantom import Phantom

CLASSIFICATION_LABELS = ("lesion", "liver_lesion", "contrast", "lung_in_view", "liver_in_view")
IN_VIEW_FRACTION = 0.01


def classification_labels(phantom: Phantom) -> dict[str, int]:
    """The binary labels of ``phantom`` (see the module docstring)."""
    import SimpleITK as sitk

    from .labels import LABEL_VALUES

    kinds = [lesion.kind for lesion in phantom.lesion_list]
    organs = sitk.GetArrayViewFromImage(phantom.organs)
    return {
        "lesion": int(len(kinds) > 0),
        "liver_lesion": int("liver" in kinds),
        "contrast": int(bool(phantom.patient.get("contrast_ct"))),
        "lung_in_view": int(float((organs == LABEL_VALUES["lung"]).mean()) >= IN_VIEW_FRACTION),
        "liver_in_view": int(float((organs == LABEL_VALUES["liver"]).mean()) >= IN_VIEW_FRACTION),
    }


def lesion_free(seed: int, fraction: float) -> bool:
    """Whether the case of ``seed`` is drawn lesion-free when a ``fraction`` of a dataset should be."""
    if fraction <= 0:
        return False
    return bool(np.random.default_rng([int(seed), 0xC1A55]).random() < fraction)
