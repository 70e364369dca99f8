"""Test data shared by the Slicer-side tests: a model.json like the contract's, an oblique SimpleITK image."""
from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk

MODEL_JSON = {
    "format": "dinomed-model/1",
    "name": "tiny-petct",
    "architecture": {"name": "meddinov3", "backbone": "vit_tiny", "in_chans": 2, "num_classes": 3},
    "inputs": [{"modality": "CT"}, {"modality": "PET"}],
    "labels": [
        {"value": 1, "name": "lesion", "color": [230, 30, 30], "lesion": True,
         "terminology": {"category": ["SCT", "49755003", "Morphologically Altered Structure"],
                         "type": ["SCT", "108369006", "Neoplasm"]}},
        {"value": 2, "name": "liver", "color": [221, 130, 101],
         "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
        {"value": 3, "name": "spleen", "color": [157, 108, 162],
         "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "78961009", "Spleen"]}},
    ],
}


def oblique_image(shape_zyx=(9, 11, 13), spacing=(0.7, 0.9, 2.5), origin=(12.5, -30.0, 41.0), dtype=np.int16, seed=0):
    """An oblique (rotated about two axes), anisotropic SimpleITK image with random voxels."""
    rng = np.random.default_rng(seed)
    array = rng.integers(-1000, 1000, shape_zyx).astype(dtype)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    a, b = 0.35, -0.2
    rz = np.array([[math.cos(a), -math.sin(a), 0], [math.sin(a), math.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, math.cos(b), -math.sin(b)], [0, math.sin(b), math.cos(b)]])
    image.SetDirection(tuple((rz @ rx).reshape(-1)))
    return image, array
