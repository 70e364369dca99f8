"""Slicer-side tests run headless against a real MRML scene from the slicer-core wheel."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# the module Libs are plain packages inside the module folders
for module_dir in ("DINOSeg", "DINOPretrain"):
    path = str(ROOT / module_dir)
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture
def scene():
    """A fresh, real MRML scene (vtkMRMLScene from slicer-core)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)
