"""Live training curves as MRML table and plot nodes: the curves that fit the run.

Finetuning: the training loss and learning rate (``phase: train`` metric events) and the held-out Dice, mean and
per class (``phase: val``). Pretraining: the total and per-term losses (DINO local/global, iBOT, KoLeo, Gram), the
per-sample entropy of the teacher's DINO and iBOT targets (log K while the targets are still uniform: the "dead
start" the panel warns about) and the learning rate. Each group of rows is its own table (a row holds the values
of one step), and each chart a plot chart node whose series appear when their column first does.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Iterable

import vtk

# chart title -> (table group, column patterns)
CHARTS = {
    "finetune": {
        "Loss": ("train", ("loss",)),
        "Dice (held-out)": ("val", ("dice", "dice_*")),
        "Learning rate": ("train", ("lr",)),
    },
    "pretrain": {
        "Losses": ("train", ("loss", "dino_local_loss", "dino_global_loss", "ibot_loss", "koleo_loss", "gram_loss")),
        "Target entropy (DINO / iBOT)": ("train", ("dino_target_entropy", "ibot_target_entropy")),
        "Learning rate": ("train", ("lr",)),
    },
}
SKIPPED_KEYS = {"event", "time", "phase"}


def _group(kind: str, record: dict) -> str:
    return "val" if kind == "finetune" and record.get("phase") == "val" else "train"


class MetricsTable:
    """A ``vtkMRMLTableNode`` that grows by one row per metric record (missing values are NaN); a column is added
    when a record first has that key."""

    def __init__(self, scene, name: str):
        self.scene = scene
        self.node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        self.columns: list[str] = []
        self._add_column("step")

    def _add_column(self, name: str) -> None:
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        table = self.node.GetTable()
        array.SetNumberOfTuples(table.GetNumberOfRows())
        array.Fill(math.nan)
        table.AddColumn(array)
        self.columns.append(name)

    def add(self, record: dict) -> list[str]:
        """Append one record as a row; returns the columns it added."""
        values = {k: v for k, v in record.items() if k not in SKIPPED_KEYS
                  and isinstance(v, (int, float)) and not isinstance(v, bool)}
        new = [k for k in values if k not in self.columns]
        for key in new:
            self._add_column(key)
        table = self.node.GetTable()
        row = table.InsertNextBlankRow(math.nan)
        for key, value in values.items():
            table.GetColumnByName(key).SetValue(row, float(value))
        table.Modified()
        self.node.Modified()
        return new

    def column(self, name: str) -> list[float]:
        array = self.node.GetTable().GetColumnByName(name)
        return [array.GetValue(i) for i in range(array.GetNumberOfTuples())] if array is not None else []

    @property
    def rows(self) -> int:
        return self.node.GetTable().GetNumberOfRows()


@dataclass
class Chart:
    title: str
    group: str
    patterns: tuple
    node: object

    def wants(self, column: str) -> bool:
        return any(fnmatch.fnmatchcase(column, p) for p in self.patterns)

    def series_names(self) -> list[str]:
        return [self.node.GetNthPlotSeriesNode(i).GetYColumnName() for i in range(self.node.GetNumberOfPlotSeriesNodes())]


class RunCurves:
    """The tables and charts of one run (or one pretraining stage) in a scene."""

    def __init__(self, scene, kind: str, name: str):
        if kind not in CHARTS:
            raise ValueError(f"kind must be one of {', '.join(CHARTS)}, not {kind!r}")
        self.scene, self.kind, self.name = scene, kind, name
        self.tables: dict[str, MetricsTable] = {}
        self.charts: dict[str, Chart] = {}
        for title, (group, patterns) in CHARTS[kind].items():
            node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name}: {title}")
            node.SetTitle(f"{name}: {title}")
            node.SetXAxisTitle("step")
            node.SetYAxisTitle(title)
            self.charts[title] = Chart(title, group, patterns, node)

    def table(self, group: str) -> MetricsTable:
        if group not in self.tables:
            self.tables[group] = MetricsTable(self.scene, f"{self.name} {group} metrics")
            for column in self.tables[group].columns:
                self._series_for(group, column)
        return self.tables[group]

    def _series_for(self, group: str, column: str) -> None:
        for chart in self.charts.values():
            if chart.group != group or not chart.wants(column) or column in chart.series_names():
                continue
            series = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{self.name} {column}")
            series.SetAndObserveTableNodeID(self.tables[group].node.GetID())
            series.SetXColumnName("step")
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleNone if group == "train" else series.MarkerStyleCircle)
            chart.node.AddAndObservePlotSeriesNodeID(series.GetID())

    def add(self, record: dict) -> None:
        """One ``metric`` event (or a record of metrics.jsonl / history.json)."""
        if "step" not in record:
            return
        group = _group(self.kind, record)
        table = self.table(group)
        for column in table.add(record):
            self._series_for(group, column)

    def extend(self, records: Iterable[dict]) -> None:
        for record in records:
            self.add(record)

    def column(self, group: str, name: str) -> list[float]:
        return self.tables[group].column(name) if group in self.tables else []

    def remove(self) -> None:
        """Take this run's nodes out of the scene (when the panel shows another run)."""
        for chart in self.charts.values():
            for i in reversed(range(chart.node.GetNumberOfPlotSeriesNodes())):
                series = chart.node.GetNthPlotSeriesNode(i)
                if series is not None and series.GetScene() is self.scene:
                    self.scene.RemoveNode(series)
            if chart.node.GetScene() is self.scene:
                self.scene.RemoveNode(chart.node)
        for table in self.tables.values():
            if table.node.GetScene() is self.scene:
                self.scene.RemoveNode(table.node)
        self.tables.clear()
        self.charts.clear()
