"""The PET lesion table: the CSV of ``dinomed lesions`` / ``dinomed segment --stats`` as a Slicer table node,
and the jump from a row to its lesion.

The CSV's columns are those of ``dinomed.petct.write_lesion_table``: ``label, name, lesion`` (1, 2, … by
decreasing MTV, or ``total`` for a label's sum), ``voxels, mtv_ml, suv_max, suv_peak, suv_mean, tlg``,
the centroid in LPS millimetres ``centroid_x_mm/y_mm/z_mm`` and as a voxel index ``centroid_i/j/k``.
The table holds exactly the CSV's columns and values (numbers as doubles, integers as integers, text as
text); known columns get a readable title and unit (SUVmax, MTV in ml, …). The lesion centroid is read
from the CSV's LPS millimetres and turned into RAS for Slicer.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import slicer
import vtk

# column -> (title shown in Slicer, unit); unknown columns keep their name and no unit
COLUMN_TITLES = {
    "label": ("Label value", ""),
    "name": ("Label", ""),
    "lesion": ("Lesion", ""),
    "lesion_id": ("Lesion", ""),
    "voxels": ("Voxels", ""),
    "mtv_ml": ("MTV", "ml"),
    "suv_max": ("SUVmax", "g/ml"),
    "suv_peak": ("SUVpeak", "g/ml"),
    "suv_mean": ("SUVmean", "g/ml"),
    "tlg": ("TLG", "g"),
    "centroid_x_mm": ("Centroid x (LPS)", "mm"),
    "centroid_y_mm": ("Centroid y (LPS)", "mm"),
    "centroid_z_mm": ("Centroid z (LPS)", "mm"),
}
# accepted spellings of the centroid columns (x, y, z in LPS millimetres, SimpleITK's physical space)
CENTROID_COLUMNS = (
    ("centroid_x_mm", "centroid_y_mm", "centroid_z_mm"),  # dinomed.petct.write_lesion_table
    ("centroid_lps_x", "centroid_lps_y", "centroid_lps_z"),
    ("centroid_x_lps", "centroid_y_lps", "centroid_z_lps"),
    ("centroid_x", "centroid_y", "centroid_z"),
)


class LesionTableError(ValueError):
    """A lesion CSV that cannot be shown; the message names the file."""


def _column_kind(values: list[str]) -> str:
    kind = "int"
    for value in values:
        if value == "":
            kind = "float" if kind == "int" else kind
            continue
        try:
            int(value)
            continue
        except ValueError:
            pass
        try:
            float(value)
            kind = "float"
        except ValueError:
            return "str"
    return kind


def read_lesion_csv(path: str | os.PathLike) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a lesion CSV, as text."""
    path = Path(path)
    if not path.is_file():
        raise LesionTableError(f"the lesion table {path} does not exist")
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            raise LesionTableError(f"the lesion table {path} is empty (expected a CSV header)") from None
        rows = [row for row in reader if row]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise LesionTableError(f"{path} row {i + 2}: {len(row)} values for {len(header)} columns")
    return header, rows


def lesion_table_node(scene, path: str | os.PathLike, name: str = "Lesions", node=None):
    """A ``vtkMRMLTableNode`` with the CSV's values (a new node, or ``node`` refilled)."""
    header, rows = read_lesion_csv(path)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    table = node.GetTable()
    was_modifying = node.StartModify()
    node.RemoveAllColumns()
    for c, column in enumerate(header):
        values = [row[c] for row in rows]
        kind = _column_kind(values)
        if kind == "int":
            array = vtk.vtkLongLongArray()
            for v in values:
                array.InsertNextValue(int(v))
        elif kind == "float":
            array = vtk.vtkDoubleArray()
            for v in values:
                array.InsertNextValue(float(v) if v != "" else float("nan"))
        else:
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue(v)
        array.SetName(column)
        table.AddColumn(array)
        title, unit = COLUMN_TITLES.get(column, (column, ""))
        node.SetColumnTitle(column, title)
        node.SetColumnLongName(column, title)
        if unit:
            node.SetColumnUnitLabel(column, unit)
    node.SetUseColumnTitleAsColumnHeader(True)
    node.SetLocked(True)  # results, not for editing in the table view
    node.SetAttribute("DINOSeg.LesionTable", str(path))
    table.Modified()
    node.EndModify(was_modifying)
    return node


def table_values(node) -> dict[str, list]:
    """The table's columns as Python lists (for checks and for other code)."""
    table = node.GetTable()
    out = {}
    for c in range(table.GetNumberOfColumns()):
        column = table.GetColumn(c)
        out[column.GetName()] = [column.GetValue(r) for r in range(table.GetNumberOfRows())]
    return out


def lesion_centroid_ras(node, row: int) -> np.ndarray:
    """The RAS millimetres of the lesion in ``row`` (its centroid, read from the LPS columns)."""
    table = node.GetTable()
    if not 0 <= row < table.GetNumberOfRows():
        raise LesionTableError(f"row {row} is outside the lesion table {node.GetName()!r} ({table.GetNumberOfRows()} rows)")
    for names in CENTROID_COLUMNS:
        columns = [table.GetColumnByName(n) for n in names]
        if all(c is not None for c in columns):
            x, y, z = (float(c.GetValue(row)) for c in columns)
            return np.array([-x, -y, z])
    raise LesionTableError(f"the lesion table {node.GetName()!r} has no centroid columns "
                           f"(expected one of {', '.join('/'.join(n) for n in CENTROID_COLUMNS)})")


def jump_slices_to(scene, ras) -> None:
    """Centre every slice view of the scene on a RAS point (what clicking a lesion row does)."""
    slicer.vtkMRMLSliceNode.JumpAllSlices(scene, float(ras[0]), float(ras[1]), float(ras[2]),
                                          slicer.vtkMRMLSliceNode.CenteredJumpSlice)
