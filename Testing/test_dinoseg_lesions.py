"""The lesion table node and the jump from a row to its lesion."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from DINOSegLib import lesions

COLUMNS = ["lesion_id", "label", "voxels", "mtv_ml", "suv_max", "suv_peak", "suv_mean", "tlg",
           "centroid_x_mm", "centroid_y_mm", "centroid_z_mm"]  # as dinomed.petct.write_lesion_table writes them
ROWS = [
    [1, "lesion", 120, 2.4576, 12.873, 9.1142, 6.03125, 14.822, -35.5, 12.25, 101.0],
    [2, "lesion", 7, 0.14336, 4.5, 3.75, 3.0, 0.43008, 20.0, -4.0, 55.5],
]


def write_csv(path, columns=COLUMNS, rows=ROWS):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


def test_table_holds_exactly_the_csv_values(scene, tmp_path):
    path = write_csv(tmp_path / "lesions.csv")
    node = lesions.lesion_table_node(scene, path, name="CT lesions")
    values = lesions.table_values(node)
    assert list(values) == COLUMNS
    for c, column in enumerate(COLUMNS):
        assert values[column] == [row[c] for row in ROWS]
    table = node.GetTable()
    assert table.GetColumnByName("voxels").IsA("vtkLongLongArray")
    assert table.GetColumnByName("suv_max").IsA("vtkDoubleArray")
    assert table.GetColumnByName("label").IsA("vtkStringArray")
    assert node.GetColumnTitle("suv_max") == "SUVmax"
    assert node.GetColumnUnitLabel("mtv_ml") == "ml"


def test_refill_replaces_the_columns(scene, tmp_path):
    node = lesions.lesion_table_node(scene, write_csv(tmp_path / "a.csv"))
    lesions.lesion_table_node(scene, write_csv(tmp_path / "b.csv", rows=ROWS[:1]), node=node)
    assert node.GetTable().GetNumberOfRows() == 1
    assert node.GetTable().GetNumberOfColumns() == len(COLUMNS)


def test_row_centroid_is_ras_and_slices_jump_there(scene, tmp_path):
    node = lesions.lesion_table_node(scene, write_csv(tmp_path / "lesions.csv"))
    ras = lesions.lesion_centroid_ras(node, 0)
    np.testing.assert_allclose(ras, [35.5, -12.25, 101.0])  # LPS (-35.5, 12.25, 101) in RAS
    lesions.jump_slices_to(scene, ras)
    slice_node = scene.GetFirstNodeByClass("vtkMRMLSliceNode")
    matrix = slice_node.GetSliceToRAS()
    np.testing.assert_allclose([matrix.GetElement(i, 3) for i in range(3)], ras, atol=1e-6)
    with pytest.raises(lesions.LesionTableError, match="outside"):
        lesions.lesion_centroid_ras(node, 5)


def test_bad_csv_names_the_file(scene, tmp_path, refuses_missing_and_unreadable):
    refuses_missing_and_unreadable(lambda path: lesions.lesion_table_node(scene, path), lesions.LesionTableError,
                                   "empty.csv", "")
    node = lesions.lesion_table_node(scene, write_csv(tmp_path / "nocentroid.csv", COLUMNS[:8], [r[:8] for r in ROWS]))
    with pytest.raises(lesions.LesionTableError, match="centroid"):
        lesions.lesion_centroid_ras(node, 0)
