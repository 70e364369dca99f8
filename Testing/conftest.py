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
    """A fresh, real MRML scene (vtkMRMLScene from slicer-core), with the default colour tables and one
    slice view's nodes, as Slicer's application sets them up (colour logic, a Red slice view)."""
    import slicer

    scene = slicer.vtkMRMLScene()
    colors = slicer.vtkMRMLColorLogic()
    colors.SetMRMLScene(scene)  # adds the default colour nodes (Labels, Grey, PET-Heat, …)
    slice_node = slicer.vtkMRMLSliceNode()
    slice_node.SetLayoutName("Red")
    scene.AddNode(slice_node)  # default orientation: axial
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    composite.SetLayoutName("Red")
    yield scene
    colors.SetMRMLScene(None)
    scene.Clear(1)


@pytest.fixture
def refuses_missing_and_unreadable(tmp_path):
    """``check(read, error, bad_name, bad_text)``: ``read`` of a missing file and of a file ``bad_name`` holding
    ``bad_text`` each raise ``error`` naming the file; returns the bad file's path."""

    def check(read, error, bad_name: str, bad_text: str):
        with pytest.raises(error, match="does not exist"):
            read(tmp_path / f"missing{Path(bad_name).suffix}")
        bad = tmp_path / bad_name
        bad.write_text(bad_text)
        with pytest.raises(error, match=bad_name):
            read(bad)
        return bad

    return check


@pytest.fixture
def dinomed_python() -> str:
    """The interpreter that runs ``python -m dinomed`` in these tests: the project's venv."""
    return sys.executable


def pytest_configure(config):
    # the same marker as core_lib's pyproject (that config is not read when only Testing/ is collected)
    config.addinivalue_line("markers", "slow: takes more than a few seconds; deselect with -m 'not slow'")
