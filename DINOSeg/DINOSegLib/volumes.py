"""Volumes between the MRML scene and files that ``dinomed`` reads and writes, with their geometry.

Slicer keeps a volume's geometry as an IJK-to-RAS matrix; ITK/SimpleITK files (and so ``dinomed``) use LPS
(x and y negated). Files are written and read with Slicer's own storage nodes (ITK inside), which do the
RAS<->LPS flip; the explicit helpers below (``lps_geometry``, ``ijk_to_ras_from_lps``) are for arrays that
come without a file, e.g. feature maps, and for checking. numpy arrays are (z, y, x), as Slicer and
SimpleITK give them (docs/CONTRACTS.md).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import slicer
import vtk

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


class VolumeIOError(RuntimeError):
    """A volume that cannot be written or read, with the file named."""


def ijk_to_ras(node) -> np.ndarray:
    """The node's 4x4 IJK-to-RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def lps_geometry(node) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """(origin, spacing, direction) of a volume node in SimpleITK's LPS convention (direction row-major 3x3)."""
    matrix = ijk_to_ras(node)[:3]
    spacing = np.array(node.GetSpacing(), dtype=float)
    direction_ras = matrix[:, :3] / spacing
    origin = LPS_TO_RAS @ matrix[:, 3]
    direction = LPS_TO_RAS @ direction_ras
    return tuple(origin.tolist()), tuple(spacing.tolist()), tuple(direction.reshape(-1).tolist())


def ijk_to_ras_from_lps(origin, spacing, direction) -> np.ndarray:
    """The 4x4 IJK-to-RAS matrix of a grid given in SimpleITK's LPS terms."""
    direction = np.asarray(direction, dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = LPS_TO_RAS @ direction @ np.diag(np.asarray(spacing, dtype=float))
    matrix[:3, 3] = LPS_TO_RAS @ np.asarray(origin, dtype=float)
    return matrix


def set_ijk_to_ras(node, matrix: np.ndarray) -> None:
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(vtk_matrix)


def copy_geometry(source, target) -> None:
    """Give ``target`` the grid of ``source`` (same IJK-to-RAS) and the same parent transform."""
    matrix = vtk.vtkMatrix4x4()
    source.GetIJKToRASMatrix(matrix)
    target.SetIJKToRASMatrix(matrix)
    target.SetAndObserveTransformNodeID(source.GetTransformNodeID())


def ras_to_ijk(node, ras) -> np.ndarray:
    """Continuous voxel index (i, j, k) = (x, y, z) of a RAS point in the node's grid (no parent transform)."""
    inverse = np.linalg.inv(ijk_to_ras(node))
    return (inverse @ np.array([*ras, 1.0]))[:3]


def array_from_volume(node) -> np.ndarray:
    """A copy of the voxels as numpy, (z, y, x) or (z, y, x, components)."""
    image = node.GetImageData()
    if image is None:
        raise VolumeIOError(f"the volume {node.GetName()!r} has no image data")
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    comps = image.GetNumberOfScalarComponents()
    flat = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    shape = (dims[2], dims[1], dims[0]) + ((comps,) if comps > 1 else ())
    return flat.reshape(shape).copy()


def update_volume_from_array(node, array: np.ndarray) -> None:
    """Replace the node's voxels by ``array`` ((z, y, x) or (z, y, x, components)), keeping its geometry."""
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(array))


def add_volume_from_array(scene, array: np.ndarray, reference, name: str,
                          node_class: str = "vtkMRMLScalarVolumeNode"):
    """A new volume node holding ``array`` on the grid of ``reference`` (a volume node).

    ``array`` must have the reference's (z, y, x) size; a vector volume has a trailing component axis."""
    ref_shape = tuple(reversed(reference.GetImageData().GetDimensions()))
    if tuple(array.shape[:3]) != ref_shape:
        raise VolumeIOError(f"{name}: the array has size {tuple(array.shape[:3])} (z, y, x) but the reference "
                            f"volume {reference.GetName()!r} has {ref_shape}")
    node = scene.AddNewNodeByClass(node_class, name)
    update_volume_from_array(node, array)
    copy_geometry(reference, node)
    node.CreateDefaultDisplayNodes()
    return node


def write_volume(node, path: str | os.PathLike) -> Path:
    """Write a volume node (scalar, label map or vector) to NRRD/NIfTI/MHA with its geometry, in LPS as ITK
    expects. The file is written beside its target and renamed, so a failure leaves no partial file."""
    path = Path(path)
    if node is None or node.GetImageData() is None:
        raise VolumeIOError(f"cannot write {path}: the volume node is empty")
    if node.GetParentTransformNode() is not None and not node.GetParentTransformNode().IsTransformToWorldLinear():
        raise VolumeIOError(f"cannot write {node.GetName()!r}: it is under a non-linear transform; harden it first")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{''.join(path.suffixes)}")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(tmp))
    storage.SetUseCompression(1 if str(path).endswith(".gz") else 0)
    if not storage.WriteData(node) or not tmp.exists():
        tmp.unlink(missing_ok=True)
        raise VolumeIOError(f"could not write the volume {node.GetName()!r} to {path}")
    os.replace(tmp, path)
    return path


def read_volume(scene, path: str | os.PathLike, name: str | None = None, labelmap: bool = False,
                add_to_scene: bool = True):
    """Read a volume file (anything ITK reads; a DICOM series from one of its files) into a new node.

    ``labelmap`` makes a ``vtkMRMLLabelMapVolumeNode``. With ``add_to_scene=False`` the node stays out of
    the scene (a temporary, e.g. a label map that becomes a segmentation)."""
    path = Path(path)
    if not path.exists():
        raise VolumeIOError(f"the volume file {path} does not exist")
    node_class = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
    name = name or path.name.split(".")[0]
    if add_to_scene:
        node = scene.AddNewNodeByClass(node_class, name)
    else:
        node = getattr(slicer, node_class)()
        node.SetName(name)
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    storage.SetFileName(str(path))
    storage.SetSingleFile(0 if path.suffix.lower() in ("", ".dcm") else 1)
    if labelmap:
        storage.SetCenterImage(0)
    if not storage.ReadData(node) or node.GetImageData() is None:
        if add_to_scene:
            scene.RemoveNode(node)
        raise VolumeIOError(f"could not read a volume from {path} (expected a 3D image file)")
    if add_to_scene:
        node.CreateDefaultDisplayNodes()
    return node


def _ijk_to_world(node) -> np.ndarray:
    matrix = ijk_to_ras(node)
    transform = node.GetParentTransformNode()
    if transform is not None:
        if not transform.IsTransformToWorldLinear():
            raise VolumeIOError(f"{node.GetName()!r} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        transform.GetMatrixTransformToWorld(to_world)
        matrix = np.array([[to_world.GetElement(r, c) for c in range(4)] for r in range(4)]) @ matrix
    return matrix


def resample_to_grid(source, reference, interpolation: str = "linear", background: float = 0.0) -> np.ndarray:
    """The source volume's voxels resampled onto the reference's grid, in physical (world) space, as a
    (z, y, x) float32 array (e.g. a PET onto the CT grid for a training case). ``interpolation`` is
    ``linear`` or ``nearest``; outside the source, ``background``."""
    reslice_axes = np.linalg.inv(_ijk_to_world(source)) @ _ijk_to_world(reference)
    axes = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            axes.SetElement(r, c, float(reslice_axes[r, c]))
    dims = reference.GetImageData().GetDimensions()
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(source.GetImageData())
    reslice.SetResliceAxes(axes)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputExtent(0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)
    reslice.SetOutputScalarType(vtk.VTK_FLOAT)
    reslice.SetBackgroundLevel(background)
    if interpolation == "nearest":
        reslice.SetInterpolationModeToNearestNeighbor()
    else:
        reslice.SetInterpolationModeToLinear()
    reslice.Update()
    from vtk.util import numpy_support

    out = numpy_support.vtk_to_numpy(reslice.GetOutput().GetPointData().GetScalars())
    return out.reshape(dims[2], dims[1], dims[0]).astype(np.float32, copy=True)
