"""Run folders on disk, read without torch: what a new Slicer session needs to find, show and continue a run.

``dinomed finetune --out MODEL`` writes ``MODEL/training/status.json`` and ``history.json`` at each checkpoint;
``dinomed pretrain --out RUN`` writes ``RUN/status.json`` and appends ``RUN/metrics.jsonl`` each iteration. A
three-stage pretraining started from this module is a folder with ``pipeline.json`` (the family, the data, the
options), ``stage1/``, ``stage2/``, ``stage3/`` and, once exported, ``backbone.pth``.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

PIPELINE_FILE = "pipeline.json"
BACKBONE_FILE = "backbone.pth"
EVALUATION_DIR = "evaluation"


class RunFolderError(ValueError):
    """A folder that holds no run this module can show or continue; the message says what was expected."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(f"{path}: cannot be read ({exc})") from None


def write_json_atomic(path: Path, data) -> None:
    """Write beside the target, then rename: a crash leaves the old file or none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class StageRun:
    """One ``dinomed finetune|pretrain`` output folder and its status at the last checkpoint."""

    kind: str  # finetune | pretrain
    folder: Path
    status: dict | None  # None: not started, or no checkpoint yet

    @property
    def status_path(self) -> Path:
        return self.folder / ("training" if self.kind == "finetune" else "") / "status.json"

    @property
    def started(self) -> bool:
        return self.status is not None

    @property
    def finished(self) -> bool:
        return bool(self.status and self.status.get("finished"))

    @property
    def step(self) -> int:
        return int(self.status.get("step", 0)) if self.status else 0

    @property
    def total(self) -> int | None:
        return int(self.status["total"]) if self.status and self.status.get("total") else None

    def records(self) -> list[dict]:
        """The metric records up to the last checkpoint (what a resume continues from), in step order."""
        if self.kind == "finetune":
            path = self.folder / "training" / "history.json"
            rows = _read_json(path) if path.is_file() else []
            return [r for r in rows if isinstance(r, dict)]
        path = self.folder / "metrics.jsonl"
        if not path.is_file():
            return []
        by_step: dict[int, dict] = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if isinstance(row, dict) and "step" in row:
                by_step[int(row["step"])] = row  # a resumed run writes the steps after its checkpoint again
        last = self.step if self.status else None
        return [by_step[s] for s in sorted(by_step) if last is None or s <= last]


def read_stage(kind: str, folder: Path) -> StageRun:
    run = StageRun(kind, Path(folder), None)
    if run.status_path.is_file():
        run.status = _read_json(run.status_path)
    return run


@dataclass
class RunFolder:
    """A folder chosen in the panel: one finetuning run, one pretraining stage, or a three-stage pipeline."""

    folder: Path
    kind: str  # finetune | pretrain | pipeline
    stages: list[StageRun] = field(default_factory=list)
    pipeline: dict | None = None

    @property
    def started(self) -> bool:
        return any(s.started for s in self.stages)

    @property
    def finished(self) -> bool:
        if self.kind == "pipeline":
            exported = (self.folder / BACKBONE_FILE).is_file() or not (self.pipeline or {}).get("export", True)
            return exported and all(s.finished for s in self.stages)
        return bool(self.stages) and self.stages[-1].finished

    @property
    def resumable(self) -> bool:
        return self.started and not self.finished

    @property
    def data(self) -> str | None:
        if self.pipeline:
            return self.pipeline.get("data")
        for stage in self.stages:
            if stage.status and stage.status.get("data"):
                return stage.status["data"]
        return None

    @property
    def model_folder(self) -> Path | None:
        """A finished finetuning run's model folder (model.json + model.safetensors), for Evaluate and Register."""
        if self.kind == "finetune" and (self.folder / "model.json").is_file() and (self.folder / "model.safetensors").is_file():
            return self.folder
        return None

    def describe(self) -> str:
        if self.kind == "pipeline":
            parts = [f"stage {i + 1}: " + (("done" if s.finished else f"{s.step}/{s.total}") if s.started else "not started")
                     for i, s in enumerate(self.stages)]
            exported = "backbone exported" if (self.folder / BACKBONE_FILE).is_file() else "not exported"
            return f"pretraining {self.pipeline.get('family', '')}: " + "; ".join(parts) + f"; {exported}"
        stage = self.stages[0]
        what = "finetuning" if self.kind == "finetune" else "pretraining"
        if not stage.started:
            return f"{what} run without a checkpoint yet"
        return f"{what} run at step {stage.step} of {stage.total}" + (" (finished)" if stage.finished else "")

    def evaluation(self) -> dict | None:
        path = self.folder / EVALUATION_DIR / "metrics.json"
        return _read_json(path) if path.is_file() else None


def open_run_folder(folder) -> RunFolder:
    """Recognise a run folder; :class:`RunFolderError` for a folder that holds none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise RunFolderError(f"{folder}: no such folder")
    if (folder / PIPELINE_FILE).is_file():
        pipeline = _read_json(folder / PIPELINE_FILE)
        stages = [read_stage("pretrain", folder / f"stage{i}") for i in range(1, int(pipeline.get("last_stage", 3)) + 1)]
        return RunFolder(folder, "pipeline", stages, pipeline)
    if (folder / "training" / "status.json").is_file() or (folder / "training" / "state.pt").is_file():
        return RunFolder(folder, "finetune", [read_stage("finetune", folder)])
    if (folder / "status.json").is_file() or (folder / "checkpoint.pth").is_file():
        return RunFolder(folder, "pretrain", [read_stage("pretrain", folder)])
    raise RunFolderError(
        f"{folder} holds no run: expected training/status.json (finetuning), status.json (a pretraining stage) or "
        f"{PIPELINE_FILE} (three-stage pretraining); choose an empty or new folder to start a run there")


def folder_is_free(folder) -> bool:
    """True for a folder a new run may use: missing, or empty."""
    folder = Path(folder)
    return not folder.exists() or (folder.is_dir() and not any(folder.iterdir()))
