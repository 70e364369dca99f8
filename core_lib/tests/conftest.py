"""Shared fixtures: one torch thread (the CI machine has 2 cores), seeded RNGs, the real data folder."""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover - torch is a hard dependency
    torch = None

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    if torch is not None:
        torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """The read-only folder of small real public files (../shared/data next to the checkout)."""
    path = Path(os.environ.get("DINOSEG_SHARED_DATA", SHARED_DATA))
    if not path.is_dir():
        pytest.skip(f"real data folder not found at {path}")
    return path


@pytest.fixture
def set_first_label_voxel():
    """``set(path, value)``: write ``value`` into voxel (0, 0, 0) of the label map file ``path``, on its own grid
    (e.g. a label value that dataset.json does not name); returns the label array as written."""
    import SimpleITK as sitk

    def set_voxel(path: Path, value: int) -> np.ndarray:
        label = sitk.ReadImage(str(path))
        array = sitk.GetArrayFromImage(label)
        array[0, 0, 0] = value
        changed = sitk.GetImageFromArray(array)
        changed.CopyInformation(label)
        sitk.WriteImage(changed, str(path))
        return array

    return set_voxel
