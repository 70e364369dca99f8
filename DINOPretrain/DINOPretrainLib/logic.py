"""Pretraining and finetuning runs watched from Slicer.

The run is a ``dinomed pretrain|finetune CONFIG [key=value …] --data DIR --out DIR --events`` child started
by DINOSeg's :class:`~DINOSegLib.process.DinomedProcess` (same runner, same cancel-the-whole-tree stop).
Each ``metric`` event (``step``, ``epoch``, ``loss``, ``dice``, …) becomes a row of a table node, and a plot
chart shows loss and Dice against the step. Stop ends the process tree; Resume relaunches the same
command with ``--resume`` (the run folder holds the last checkpoint, written atomically by dinomed).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Callable, Sequence

import vtk

from DINOSegLib.models import BUNDLED_MODELS_DIR, add_model_folder
from DINOSegLib.process import DinomedProcess

MODES = ("pretrain", "finetune")
# columns always present (in this order); other numeric metric keys get their own column when first seen
METRIC_TABLE_COLUMNS = ("step", "epoch", "loss", "dice")


class TrainingRunError(RuntimeError):
    """A run that cannot be started, resumed or registered; the message says why."""


class MetricsTable:
    """A ``vtkMRMLTableNode`` that grows by one row per ``metric`` event (missing values are NaN), and a
    plot chart of its loss and Dice columns against the step."""

    def __init__(self, scene, name: str = "Training metrics"):
        self.scene = scene
        self.node = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        self.columns: list[str] = []
        for column in METRIC_TABLE_COLUMNS:
            self._add_column(column)
        self.chart = None

    def _add_column(self, name: str) -> None:
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        table = self.node.GetTable()
        array.SetNumberOfTuples(table.GetNumberOfRows())
        array.Fill(math.nan)
        table.AddColumn(array)
        self.columns.append(name)

    def add(self, event: dict) -> None:
        """Append one ``metric`` event as a row."""
        values = {k: v for k, v in event.items()
                  if k not in ("event", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for key in values:
            if key not in self.columns:
                self._add_column(key)
        table = self.node.GetTable()
        row = table.InsertNextBlankRow(math.nan)
        for key, value in values.items():
            table.GetColumnByName(key).SetValue(row, float(value))
        for key in self.columns:  # explicit None (a NaN on the wire) stays NaN
            if key in event and event[key] is None:
                table.GetColumnByName(key).SetValue(row, math.nan)
        table.Modified()
        self.node.Modified()

    def column(self, name: str) -> list[float]:
        array = self.node.GetTable().GetColumnByName(name)
        return [array.GetValue(i) for i in range(array.GetNumberOfTuples())] if array is not None else []

    def make_chart(self, series: Sequence[str] = ("loss", "dice")):
        """A plot chart node (loss and Dice against the step) for Slicer's plot view."""
        if self.chart is None:
            self.chart = self.scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{self.node.GetName()} chart")
            self.chart.SetXAxisTitle("step")
            for name in series:
                plot = self.scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
                plot.SetAndObserveTableNodeID(self.node.GetID())
                plot.SetXColumnName("step")
                plot.SetYColumnName(name)
                plot.SetPlotType(plot.PlotTypeScatter)
                self.chart.AddAndObservePlotSeriesNodeID(plot.GetID())
        return self.chart


class TrainingRunLogic:
    """Start, watch, stop and resume one pretraining or finetuning run."""

    def __init__(self, scene, process_factory: Callable[[], DinomedProcess] | None = None):
        self.scene = scene
        self.process_factory = process_factory or DinomedProcess
        self.process: DinomedProcess | None = None
        self.metrics: MetricsTable | None = None
        self.last: dict | None = None  # the arguments of the last start, for resume

    @staticmethod
    def command(mode: str, config: str | os.PathLike, data_dir: str | os.PathLike, out_dir: str | os.PathLike,
                overrides: Sequence[str] = (), resume: bool = False) -> list[str]:
        """The ``dinomed`` arguments of a run (issues 7 and 8)."""
        if mode not in MODES:
            raise TrainingRunError(f"the job must be one of {', '.join(MODES)}, not {mode!r}")
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise TrainingRunError(f"overrides must be key=value, found {', '.join(map(repr, bad))}")
        args = [mode, str(config), *overrides, "--data", str(data_dir), "--out", str(out_dir)]
        return args + (["--resume"] if resume else [])

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    def start(self, mode, config, data_dir, out_dir, overrides: Sequence[str] = (), resume: bool = False,
              metrics_name: str | None = None) -> DinomedProcess:
        if self.running:
            raise TrainingRunError("a run is already going; stop it first")
        args = self.command(mode, config, data_dir, out_dir, overrides, resume)
        if self.metrics is None or not resume:
            self.metrics = MetricsTable(self.scene, metrics_name or f"{mode} metrics ({Path(out_dir).name})")
        self.process = self.process_factory()
        previous = self.process.on_event

        def on_event(event):
            if event["event"] == "metric":
                self.metrics.add(event)
            if previous:
                previous(event)

        self.process.on_event = on_event
        self.process.start(args)
        self.last = {"mode": mode, "config": config, "data_dir": data_dir, "out_dir": out_dir, "overrides": list(overrides)}
        return self.process

    def poll(self) -> list[dict]:
        return self.process.poll() if self.process is not None else []

    def stop(self) -> None:
        """End the run's whole process tree; the last checkpoint stays in the run folder for Resume."""
        if self.process is not None:
            self.process.cancel()

    def resume(self) -> DinomedProcess:
        """Relaunch the last run with ``--resume``; metric rows continue in the same table."""
        if self.last is None:
            raise TrainingRunError("nothing to resume: no run was started in this session")
        return self.start(resume=True, **self.last)

    @staticmethod
    def register_model(model_dir: str | os.PathLike, models_dir: str | os.PathLike | None = None, link: bool = False) -> Path:
        """"Register this model in DINOSeg": make the finetuned model folder appear in DINOSeg's model list."""
        return add_model_folder(model_dir, models_dir or BUNDLED_MODELS_DIR, link=link)
