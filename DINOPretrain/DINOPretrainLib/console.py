"""The training console behind the DINOPretrain panel, free of Qt: check the data, launch finetuning or the three
DINOv3 pretraining stages and the backbone export, watch the curves, stop gracefully, continue a run found on disk
(in a later session), evaluate and register a finetuned model.

Every step is a ``dinomed … --events`` child run by DINOSeg's :class:`~DINOSegLib.jobs.Job` (the one runner of
the extension). The front-end calls :meth:`TrainingConsole.tick` from its timer; the console starts the next step
of its plan when one succeeds. Stop is graceful: ``dinomed finetune|pretrain`` save a checkpoint at the next step
and exit (status 3); a second Stop, or no exit within ``stop_grace_s``, kills the process tree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from DINOSegLib.jobs import Job, JobState

from .curves import RunCurves
from .options import CONFIG_FILE, OptionsError, Recipe, TrainingOptions, family_stages, path_or_none, require_folder
from .runs import (BACKBONE_FILE, EVALUATION_DIR, PIPELINE_FILE, RunFolder, RunFolderError, StageRun, folder_is_free,
                   open_run_folder, read_stage, write_json_atomic)

STOP_GRACE_S = 60.0  # a graceful stop gets this long (one training step and a checkpoint) before the tree is killed
EVALUATION_COLUMNS = ("label", "dice", "hd95", "precision", "recall")


class ConsoleError(RuntimeError):
    """An action the console cannot take now; the message says why and what to do."""


@dataclass
class Step:
    """One child process of a plan."""

    kind: str  # check | finetune | pretrain | export | evaluate
    title: str
    args: list[str]
    folder: Path | None = None  # the run folder whose curves this step draws
    curves_name: str = ""
    prepare: Callable[[], None] | None = None  # called just before the child starts (e.g. write pipeline.json)


@dataclass
class DataReport:
    """The data check's result: the summary (``done`` event of ``dinomed check-data``) and its lines for people."""

    summary: dict = field(default_factory=dict)
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)


def list_recipes(python: str | None = None, env: dict | None = None, timeout: float = 120.0) -> list[Recipe]:
    """Every bundled recipe with its one-line description (``dinomed recipes --events``, a child: no torch here)."""
    job = Job(["recipes"], title="dinomed recipes", python=python, env=env).start()
    job.wait(timeout=timeout)
    if job.state is not JobState.SUCCEEDED:
        raise ConsoleError(f"cannot list the bundled recipes: {job.error or job.state.value}")
    done = job.events_of("done")
    return [Recipe.from_dict(r) for r in (done[-1].get("recipes") or [])] if done else []


class TrainingConsole:
    """One run at a time: its plan of child processes, its curves in the scene, its state and messages."""

    def __init__(self, scene, python: str | None = None, env: dict | None = None,
                 stop_grace_s: float = STOP_GRACE_S, on_change: Callable[["TrainingConsole"], None] | None = None):
        self.scene = scene
        self.python = python
        self.env = env
        self.stop_grace_s = stop_grace_s
        self.on_change = on_change
        self.state = "idle"  # idle | running | stopping | finished | stopped | failed | cancelled
        self.job: Job | None = None
        self.step: Step | None = None
        self.plan: list[Step] = []
        self.run: RunFolder | None = None
        self.curves: RunCurves | None = None
        self.data_report: DataReport | None = None
        self.evaluation: dict | None = None
        self.evaluation_table = None
        self.warning: str | None = None
        self.error: str | None = None
        self.messages: list[str] = []
        self._read_messages = 0
        self.jobs: list[Job] = []  # every job of this console, for tests and the log

    # -- state ----------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.job is not None and not self.job.finished

    @property
    def can_resume(self) -> bool:
        return not self.running and self.run is not None and self.run.resumable

    @property
    def can_evaluate(self) -> bool:
        return not self.running and self.run is not None and self.run.finished and self.run.model_folder is not None

    can_register = can_evaluate

    @property
    def progress(self) -> tuple[int | None, int | None, str]:
        return self.job.progress if self.job is not None else (None, None, "")

    def _say(self, message: str) -> None:
        self.messages.append(message)

    def new_messages(self) -> list[str]:
        """Messages since the last call (the panel's log)."""
        out = self.messages[self._read_messages:]
        self._read_messages = len(self.messages)
        return out

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self)

    # -- building plans -------------------------------------------------------------------------------
    def plan_finetune(self, config: str, data_dir, out_dir, options: TrainingOptions,
                      recipe: Recipe | None = None) -> list[Step]:
        overrides = options.overrides(recipe, "finetune")
        data, out = str(data_dir), str(out_dir)
        return [
            Step("check", "checking the dataset", ["check-data", "finetune", config, *overrides, "--data", data]),
            Step("finetune", f"finetuning {Path(config).stem}",
                 ["finetune", config, *overrides, "--data", data, "--out", out, *options.launch_args()],
                 folder=Path(out), curves_name=Path(out).name),
        ]

    def plan_pretrain(self, stages: Sequence[Recipe], data_dir, out_dir, options: TrainingOptions,
                      last_stage: int = 3, export: bool = True) -> list[Step]:
        """Stage 1 → 2 → 3 of one family (stopping after ``last_stage``), each started from the previous stage's
        run folder (``student.init_from``; stage 2's and 3's Gram teacher ``gram.ckpt`` too), then the export."""
        stages = [s for s in stages if s.stage <= last_stage]
        if not stages or stages[0].stage != 1:
            raise OptionsError("the pretraining recipe has no stage 1 config")
        out, data = Path(out_dir), str(data_dir)
        steps = [Step("check", "checking the volumes", ["check-data", "pretrain", stages[0].name,
                                                        *options.overrides(stages[0], "pretrain"), "--data", data])]
        previous: Path | None = None
        for recipe in stages:
            folder = out / f"stage{recipe.stage}"
            chain = [f"student.init_from={previous}", f"gram.ckpt={previous}"] if previous is not None else []
            steps.append(Step("pretrain", f"pretraining stage {recipe.stage} ({recipe.name})",
                              ["pretrain", recipe.name, *options.overrides(recipe, "pretrain"), *chain,
                               "--data", data, "--out", str(folder), *options.launch_args()],
                              folder=folder, curves_name=f"{out.name} stage {recipe.stage}"))
            previous = folder
        if export:
            steps.append(Step("export", "exporting the backbone",
                              ["export-backbone", str(previous), "--out", str(out / BACKBONE_FILE)]))
        return steps

    # -- starting -------------------------------------------------------------------------------------
    def start(self, mode: str, recipe: Recipe | str, data_dir, out_dir, options: TrainingOptions | None = None,
              recipes: Sequence[Recipe] = (), last_stage: int = 3, export: bool = True) -> None:
        """A new run: ``recipe`` is a bundled :class:`Recipe` (pretraining: its whole family of stages) or the path
        of a config file of one's own (one run into ``out_dir``)."""
        if self.running:
            raise ConsoleError("a run is going; stop it first")
        options = options or TrainingOptions()
        data = require_folder(data_dir, "data folder")
        out = require_folder(out_dir, "output folder", must_exist=False)
        if not folder_is_free(out):
            raise ConsoleError(f"the output folder {out} is not empty; choose it under 'Continue a run' to resume "
                               "what it holds, or choose a new folder")
        if isinstance(recipe, str):
            recipe_obj, config_name = None, _config_file(recipe)
        else:
            recipe_obj, config_name = recipe, recipe.name
        if mode == "finetune":
            plan = self.plan_finetune(config_name, data, out, options, recipe_obj)
        elif mode == "pretrain" and recipe_obj is not None:
            stages = family_stages(recipes, recipe_obj.family) if recipes else [recipe_obj]
            plan = self.plan_pretrain(stages, data, out, options, last_stage, export)
            pipeline = {
                "format": "dinopretrain-pipeline/1", "family": recipe_obj.family, "data": str(data),
                "stages": [s.name for s in stages if s.stage <= last_stage], "last_stage": min(last_stage, len(stages)),
                "overrides": {s.name: options.overrides(s, "pretrain") for s in stages if s.stage <= last_stage},
                "launch": options.launch_args(), "export": export}
            # written once the data check passed, so that a refused dataset leaves the output folder empty
            plan[1].prepare = lambda: write_json_atomic(out / PIPELINE_FILE, pipeline)
        elif mode == "pretrain":
            overrides = options.overrides(None, "pretrain")
            plan = [Step("check", "checking the volumes", ["check-data", "pretrain", config_name, *overrides, "--data", str(data)]),
                    Step("pretrain", f"pretraining ({Path(config_name).stem})",
                         ["pretrain", config_name, *overrides, "--data", str(data), "--out", str(out), *options.launch_args()],
                         folder=out, curves_name=out.name)]
        else:
            raise OptionsError(f"mode must be finetune or pretrain, not {mode!r}")
        self._begin(plan, out)

    def check_data(self, mode: str, recipe: Recipe | str, data_dir, options: TrainingOptions | None = None) -> None:
        """Only the data check (the first step of a launch), e.g. when the data folder is chosen."""
        if self.running:
            raise ConsoleError("a run is going; stop it first")
        options = options or TrainingOptions()
        data = require_folder(data_dir, "data folder")
        name = recipe.name if isinstance(recipe, Recipe) else _config_file(recipe)
        rec = recipe if isinstance(recipe, Recipe) else None
        self._begin([Step("check", "checking the data", ["check-data", mode, name, *options.overrides(rec, mode),
                                                          "--data", str(data)])], None)

    def _begin(self, plan: list[Step], out: Path | None) -> None:
        self.plan = list(plan)
        self.error = None
        self.warning = None
        self.evaluation = None
        if out is not None:
            self.run = None
        self._out = out
        self._next()

    def _next(self) -> None:
        if not self.plan:
            self.job = None if self.job is None or self.job.finished else self.job
            self.state = "finished"
            self._say("finished")
            self._refresh_run()
            self._changed()
            return
        self.step = self.plan.pop(0)
        step = self.step
        if step.kind == "check":
            self.data_report = DataReport()
        if step.folder is not None:
            self._show_curves(step)
        self._say(f"{step.title}…")
        self.state = "running"
        self.job = Job(step.args, title=step.title, python=self.python, env=self.env, on_event=self._on_event,
                       stop_grace_s=self.stop_grace_s)
        self.jobs.append(self.job)
        try:
            if step.prepare is not None:
                step.prepare()
            self.job.start()
        except Exception as exc:  # the interpreter cannot be started
            self.state, self.error = "failed", str(exc)
            self._say(f"error: {exc}")
            self.plan = []
        self._changed()

    def _show_curves(self, step: Step) -> None:
        """The curves of the step's run folder: what is on disk already (a resumed run), then live events."""
        if self.curves is not None:
            self.curves.remove()
        self.curves = RunCurves(self.scene, step.kind, step.curves_name or step.folder.name)
        stage = read_stage(step.kind, step.folder)
        if stage.started:
            self.curves.extend(stage.records())

    # -- watching -------------------------------------------------------------------------------------
    def _on_event(self, event: dict) -> None:
        kind = event["event"]
        step = self.step
        if kind == "metric" and step is not None and step.folder is not None:
            if self.curves is None:  # the scene was closed meanwhile: draw again in the new scene
                self._show_curves(step)
            else:
                self.curves.add(event)
        elif kind == "log":
            message = str(event.get("message", ""))
            self._say(message)
            if message.startswith("warning:"):
                self.warning = message
            if step is not None and step.kind == "check" and self.data_report is not None:
                self.data_report.lines.append(message)
        elif kind == "error":
            self.error = str(event.get("message", ""))
            self._say(f"error: {self.error}")
        elif kind == "done" and step is not None and step.kind == "check" and self.data_report is not None:
            self.data_report.summary = {k: v for k, v in event.items() if k not in ("event", "time")}

    def tick(self) -> list[dict]:
        """Handle the child's new output; when a step ended, start the next one or settle the final state."""
        if self.job is None or self.job.finished:
            return []
        events = self.job.tick()
        if self.job.finished:
            self._step_ended(self.job)
        return events

    def _step_ended(self, job: Job) -> None:
        state = job.state
        if state is JobState.SUCCEEDED:
            if self.step is not None and self.step.kind == "evaluate":
                self._load_evaluation()
            self._next()
            return
        self.plan = []
        if state is JobState.STOPPED:
            self.state = "stopped"
            self._say(f"{job.title}: stopped" + (" (checkpoint saved; Resume continues it)"
                                                  if self.step and self.step.kind in ("finetune", "pretrain") else ""))
        elif state is JobState.CANCELLED:
            self.state = "cancelled"
            self._say(f"{job.title}: killed")
        else:
            self.state = "failed"
            self.error = job.error or self.error or f"{job.title} failed (exit status {job.returncode})"
            self._say(f"error: {self.error}")
        self._refresh_run()
        self._changed()

    def _refresh_run(self) -> None:
        folder = getattr(self, "_out", None) or (self.run.folder if self.run else None)
        if folder is None:
            return
        try:
            self.run = open_run_folder(folder)
        except RunFolderError:
            self.run = None

    def wait(self, timeout: float = 600.0, interval: float = 0.1, until: Callable[[], bool] | None = None) -> str:
        """Tick until the plan is done (or ``until()`` holds): for tests and scripts."""
        import time

        deadline = time.monotonic() + timeout
        while self.running or (self.plan and self.state == "running"):
            self.tick()
            if until is not None and until():
                return self.state
            if time.monotonic() > deadline:
                self.cancel()
                raise ConsoleError(f"the run did not finish within {timeout:g} s and was killed")
            time.sleep(interval)
        return self.state

    # -- stopping -------------------------------------------------------------------------------------
    def stop(self) -> None:
        """First call: ask the step to stop (training saves a checkpoint at its next step and exits). Second call,
        or no exit within ``stop_grace_s``: kill the process tree."""
        if not self.running:
            return
        self.plan = []
        if self.state == "stopping":
            self._say("stopping now (killing the process tree)")
        else:
            self.state = "stopping"
            self._say(f"stopping: the run saves a checkpoint at its next step and exits (killed after "
                      f"{self.stop_grace_s:g} s, or at a second Stop)")
        self.job.stop()
        self._changed()

    def cancel(self) -> None:
        if self.running:
            self.plan = []
            self.job.cancel()
            self._step_ended(self.job)

    def scene_closed(self) -> None:
        """The scene's nodes are gone: forget them (a running job goes on; its curves come back from disk)."""
        self.curves = None
        self.evaluation_table = None

    # -- runs on disk ---------------------------------------------------------------------------------
    def open_run(self, folder) -> RunFolder:
        """Show a run folder chosen in the panel (in this or a later session): its state and its curves."""
        if self.running:
            raise ConsoleError("a run is going; stop it first")
        run = open_run_folder(require_folder(folder, "run folder"))
        self.run, self._out = run, run.folder
        self.state, self.error, self.warning = "idle", None, None
        shown = [s for s in run.stages if s.started]
        stage = shown[-1] if shown else run.stages[0]
        name = run.folder.name if run.kind != "pipeline" else f"{run.folder.name} stage {run.stages.index(stage) + 1}"
        self._show_curves(Step(stage.kind, "", [], folder=stage.folder, curves_name=name))
        self.evaluation = run.evaluation()
        if self.evaluation:
            self._evaluation_table()
        self._say(run.describe())
        self._changed()
        return run

    def resume(self, options: TrainingOptions | None = None) -> None:
        """Continue the open run from its last checkpoint (``--resume``) and, for a three-stage pretraining, go on
        with the stages after it and the export. Only the device and GPU count of ``options`` apply: the rest of
        the configuration is the run's own (``dinomed finetune --resume`` refuses a different one)."""
        if self.running:
            raise ConsoleError("a run is going; stop it first")
        run = self.run
        if run is None or not run.resumable:
            raise ConsoleError("nothing to resume: choose a run folder whose run was stopped before its end")
        options = options or TrainingOptions()
        session = [f"train.device={options.device}"] if options.device and options.device != "auto" else []
        launch = options.launch_args()
        plan: list[Step] = []
        if run.kind in ("finetune", "pretrain"):
            stage = run.stages[0]
            plan.append(self._resume_step(stage, session, launch, run.folder.name))
        else:
            pipeline = run.pipeline or {}
            previous: Path | None = None
            for index, (stage, name) in enumerate(zip(run.stages, pipeline.get("stages", []))):
                label = f"{run.folder.name} stage {index + 1}"
                if stage.finished:
                    pass
                elif stage.started:
                    plan.append(self._resume_step(stage, session, launch, label))
                else:
                    chain = [f"student.init_from={previous}", f"gram.ckpt={previous}"] if previous is not None else []
                    overrides = list(pipeline.get("overrides", {}).get(name, [])) + chain
                    plan.append(Step("pretrain", f"pretraining stage {index + 1} ({name})",
                                     ["pretrain", name, *overrides, "--data", str(pipeline["data"]), "--out",
                                      str(stage.folder), *launch], folder=stage.folder, curves_name=label))
                previous = stage.folder
            if pipeline.get("export", True) and not (run.folder / BACKBONE_FILE).is_file() and previous is not None:
                plan.append(Step("export", "exporting the backbone",
                                 ["export-backbone", str(previous), "--out", str(run.folder / BACKBONE_FILE)]))
        self._begin(plan, run.folder)

    @staticmethod
    def _resume_step(stage: StageRun, session: list[str], launch: list[str], label: str) -> Step:
        status = stage.status or {}
        config, data = status.get("config"), status.get("data")
        if not config or not Path(config).is_file():
            raise ConsoleError(f"{stage.status_path}: the run's resolved config {config} is missing; cannot resume")
        if not data or not Path(data).is_dir():
            raise ConsoleError(f"the run's data folder {data} is gone; it is needed to resume the run")
        return Step(stage.kind, f"resuming {stage.kind} from step {stage.step}",
                    [stage.kind, config, *session, "--data", data, "--out", str(stage.folder), "--resume", *launch],
                    folder=stage.folder, curves_name=label)

    # -- after the run ---------------------------------------------------------------------------------
    def evaluate(self, data_dir=None, cases: str = "heldout", device: str = "auto") -> None:
        """``dinomed evaluate`` of the finished model on the held-out cases (per-class Dice / HD95 table)."""
        if not self.can_evaluate:
            raise ConsoleError("Evaluate needs a finished finetuning run (a model folder); choose one first")
        data = path_or_none(data_dir) or path_or_none(self.run.data)
        if data is None:
            raise ConsoleError("choose the labeled dataset to evaluate on")
        folder = self.run.model_folder
        self._begin([Step("evaluate", "evaluating on the held-out cases",
                          ["evaluate", "--model", str(folder), "--data", str(data), "--out",
                           str(folder / EVALUATION_DIR / "metrics.csv"), "--cases", cases, "--device", device])],
                    self.run.folder)

    def _load_evaluation(self) -> None:
        self._refresh_run()
        self.evaluation = self.run.evaluation() if self.run else None
        if self.evaluation:
            self._evaluation_table()
            mean = self.evaluation.get("mean", {})
            self._say(f"held-out cases: mean Dice {_fmt(mean.get('dice'))}, mean HD95 {_fmt(mean.get('hd95'))} mm")

    def _evaluation_table(self):
        """A table node: one row per label and the mean (Dice, HD95 in mm, precision, recall)."""
        if self.evaluation_table is not None and self.evaluation_table.GetScene() is self.scene:
            self.scene.RemoveNode(self.evaluation_table)
        node = self.scene.AddNewNodeByClass("vtkMRMLTableNode", f"{self.run.folder.name} evaluation")
        rows = [(label, values) for label, values in (self.evaluation.get("per_class") or {}).items()]
        rows.append(("mean", self.evaluation.get("mean") or {}))
        for column in EVALUATION_COLUMNS:
            node.AddColumn().SetName(column)
        for label, values in rows:
            row = node.AddEmptyRow()
            node.SetCellText(row, 0, str(label))
            for col, key in enumerate(EVALUATION_COLUMNS[1:], start=1):
                node.SetCellText(row, col, _fmt(values.get(key)))
        self.evaluation_table = node
        return node

    def register(self, models_dir=None, settings_dir=None) -> Path:
        """"Register this model in DINOSeg": copy the finished model folder into DINOSeg's models folder
        (``models_dir``; default the user's per-user folder below ``settings_dir``, Slicer's settings folder) with
        DINOSeg's :func:`~DINOSegLib.models.register_model`, which refreshes every open model list; returns the
        registered folder."""
        from DINOSegLib.models import register_model

        if not self.can_register:
            raise ConsoleError("Register needs a finished finetuning run (a model folder); choose one first")
        target = register_model(self.run.model_folder, models_dir, settings_dir=settings_dir)
        self._say(f"registered in DINOSeg: {target}")
        return target


def _config_file(value) -> str:
    config = path_or_none(value)
    if config is None or str(value) == CONFIG_FILE:
        raise OptionsError("choose a bundled recipe, or a config file of your own")
    if not config.is_file():
        raise OptionsError(f"config file {config}: no such file")
    return str(config.resolve())


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)
