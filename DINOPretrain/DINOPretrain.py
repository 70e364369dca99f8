"""DINOPretrain: a training console for DINOv3 pretraining (stages 1-3 and the backbone export) and supervised
finetuning, from Slicer.

Thin on purpose: the .ui is bound to a parameter node, and every action goes to the Qt-free
``DINOPretrainLib.TrainingConsole`` (tested headless with real ``dinomed`` children): the data check, the run's
plan of child processes over DINOSeg's job runner, live curves as table and plot nodes, graceful stop, resume
of a run found on disk, evaluation and registration in DINOSeg.
"""
import os
from typing import Annotated

import ctk
import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest

from DINOPretrainLib import (CONFIG_FILE, ConsoleError, OptionsError, RunFolderError, TrainingConsole,
                             TrainingOptions, family_stages, list_recipes, parse_overrides, path_or_none)
from DINOPretrainLib.console import STOP_GRACE_S
from DINOSegLib import dependencies, docs, models
from DINOSegLib.module_widget import ParameterNodeWidget


class DINOPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DINOPretrain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["DINOSeg"]  # shares DINOSegLib (job runner, model folders)
        self.parent.contributors = ["DINOSeg maintainers (DINOSeg project)"]
        self.parent.helpText = _("""
Pretrain a DINOv3 encoder on a folder of unlabeled CT or PET volumes (stage 1 self-distillation, stage 2 Gram
anchoring, stage 3 high-resolution adaptation, then export of the backbone), or finetune a segmentation model on
a labeled dataset. The data is checked first; curves follow the run; Stop saves a checkpoint and Resume continues
it, also in a later session (choose the run folder under "Continue a run"). A finished finetuning run can be
evaluated on its held-out cases and registered in DINOSeg.
See the <a href="{url}">documentation</a> (section "In 3D Slicer", DINOPretrain).
""").format(url=docs.readme_url())
        self.parent.acknowledgementText = _("Built on DINOv3 (Meta AI) and the dinomed core library.")


@parameterNodeWrapper
class DINOPretrainParameterNode:
    """The run's options (folders and the recipe live in the widgets, remembered in the user's settings)."""

    mode: Annotated[str, Choice(["finetune", "pretrain"])] = "finetune"
    length: Annotated[int, WithinRange(0, 10_000_000)] = 0
    batchSize: Annotated[int, WithinRange(0, 100_000)] = 0
    learningRate: Annotated[float, WithinRange(0.0, 1.0)] = 0.0
    imageSize: Annotated[int, WithinRange(0, 4096)] = 0
    overrides: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    gpuCount: Annotated[int, WithinRange(1, 64)] = 1
    lastStage: Annotated[int, WithinRange(1, 3)] = 3
    exportBackbone: bool = True


DINOSEG_MODELS_DIRECTORY_SETTING = "DINOSeg/ModelsDirectory"  # DINOSeg.py's MODELS_DIRECTORY_SETTING
PARAMETERS = ("mode", "length", "batchSize", "learningRate", "imageSize", "overrides", "device", "gpuCount",
              "lastStage", "exportBackbone")


class DINOPretrainWidget(ParameterNodeWidget):
    def __init__(self, parent=None) -> None:
        ParameterNodeWidget.__init__(self, parent)
        self._savedParameters = None
        self._recipes = None
        self._shownChart = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._tick)

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.loadModuleUi("UI/DINOPretrain.ui", DINOPretrainModuleLogic())

        self.ui.modeSelector.connect("currentIndexChanged(int)", self.onModeChanged)
        self.ui.recipeComboBox.connect("currentIndexChanged(int)", self.onRecipeChanged)
        self.ui.checkDataButton.connect("clicked(bool)", self.onCheckData)
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.curveComboBox.connect("currentIndexChanged(int)", self.onCurveChosen)
        self.ui.runPathLineEdit.connect("currentPathChanged(QString)", self.onRunFolderChosen)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.evaluateButton.connect("clicked(bool)", self.onEvaluate)
        self.ui.registerModelButton.connect("clicked(bool)", self.onRegisterModel)
        # folders only for the folder fields, files for the others (set here: the .ui smoke test reads no flag sets)
        folders = (ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.Executable
                   | ctk.ctkPathLineEdit.NoDot | ctk.ctkPathLineEdit.NoDotDot | ctk.ctkPathLineEdit.Readable)
        for pathLineEdit in (self.ui.dataPathLineEdit, self.ui.outputPathLineEdit, self.ui.runPathLineEdit):
            pathLineEdit.filters = folders
        files = (ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Drives | ctk.ctkPathLineEdit.NoDot
                 | ctk.ctkPathLineEdit.NoDotDot | ctk.ctkPathLineEdit.Readable)
        for pathLineEdit in (self.ui.configPathLineEdit, self.ui.backbonePathLineEdit):
            pathLineEdit.filters = files
        self.ui.stopButton.toolTip = (f"saves a checkpoint at the next step and exits; press again, or wait "
                                      f"{STOP_GRACE_S:g} s, to kill the run")
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()
        self._timer.stop()
        console = self.logic.console if self.logic else None
        if console is not None and console.running:  # Slicer closes: ask the run to save, then end it
            console.stop()
            try:
                console.wait(timeout=10)
            except ConsoleError:
                pass

    def enter(self) -> None:
        self.initializeParameterNode()
        if self._recipes is None:
            self._loadRecipes()

    def onSceneStartClose(self, caller, event) -> None:
        # Close Scene removes the parameter node and the curves: keep the options, let a running job go on
        if self._parameterNode:
            self._savedParameters = {name: getattr(self._parameterNode, name) for name in PARAMETERS}
        self.setParameterNode(None)
        self.logic.console.scene_closed()
        self._shownChart = None

    def initializeParameterNode(self) -> None:
        ParameterNodeWidget.initializeParameterNode(self)
        if self._savedParameters:
            for name, value in self._savedParameters.items():
                setattr(self._parameterNode, name, value)
            self._savedParameters = None
        self._updateState()

    # -- recipes ---------------------------------------------------------------------------------------
    def _loadRecipes(self) -> None:
        try:
            with slicer.util.WaitCursor():
                self._recipes = list_recipes()
        except Exception as exc:  # dinomed not installed yet: the first Start installs it
            self._recipes = []
            self.ui.recipeDescriptionLabel.text = f"The bundled recipes could not be listed ({exc})."
        self.onModeChanged()

    def onModeChanged(self, *args) -> None:
        mode = self.ui.modeSelector.currentText
        self.ui.lengthLabel.text = "Epochs per stage:" if mode == "pretrain" else "Steps:"
        for widget in (self.ui.lastStageLabel, self.ui.lastStageSpinBox, self.ui.exportLabel, self.ui.exportCheckBox):
            widget.visible = mode == "pretrain"
        combo = self.ui.recipeComboBox
        combo.blockSignals(True)
        combo.clear()
        for index, recipe in enumerate(self._recipes or []):
            if recipe.kind != mode or (mode == "pretrain" and recipe.stage != 1):
                continue  # pretraining: one entry per family, its stages run in order
            stages = family_stages(self._recipes, recipe.family) if mode == "pretrain" else [recipe]
            label = recipe.family if mode == "pretrain" else recipe.name
            combo.addItem(f"{label} ({len(stages)} stages)" if len(stages) > 1 else label, index)
        combo.addItem(CONFIG_FILE, -1)
        combo.blockSignals(False)
        self.onRecipeChanged()

    def _recipe(self):
        index = self.ui.recipeComboBox.currentData
        return self._recipes[index] if index is not None and index >= 0 else None

    def onRecipeChanged(self, *args) -> None:
        recipe = self._recipe()
        own_file = recipe is None
        self.ui.configLabel.visible = self.ui.configPathLineEdit.visible = own_file
        if own_file:
            self.ui.recipeDescriptionLabel.text = "A YAML config of your own (keys as in the bundled recipes)."
        elif recipe.kind == "pretrain":
            stages = family_stages(self._recipes, recipe.family)
            self.ui.recipeDescriptionLabel.text = "\n".join(f"{s.stage}. {s.description}" for s in stages)
        else:
            self.ui.recipeDescriptionLabel.text = recipe.description

    # -- options ---------------------------------------------------------------------------------------
    def _options(self) -> TrainingOptions:
        p = self._parameterNode
        return TrainingOptions(length=p.length, batch_size=p.batchSize, learning_rate=p.learningRate,
                               image_size=p.imageSize, extra=p.overrides, device=p.device, gpus=p.gpuCount,
                               backbone_checkpoint=str(path_or_none(self.ui.backbonePathLineEdit.currentPath) or ""))

    def _recipeOrFile(self):
        return self._recipe() or self.ui.configPathLineEdit.currentPath

    def _ready(self) -> bool:
        if not dependencies.ensure_in_slicer():
            return False
        if not self._recipes:
            self._loadRecipes()
        return True

    # -- actions ---------------------------------------------------------------------------------------
    def onCheckData(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not check the data.", waitCursor=True):
            if not self._ready():
                return
            self.ui.dataReportLabel.text = "checking…"
            self.logic.console.check_data(self._parameterNode.mode, self._recipeOrFile(),
                                          self.ui.dataPathLineEdit.currentPath, self._options())
            self._started()

    def onStart(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not start the run.", waitCursor=True):
            if not self._ready():
                return
            p = self._parameterNode
            parse_overrides(p.overrides)  # a quoting error is reported before anything starts
            self.ui.logTextEdit.clear()
            self.ui.dataReportLabel.text = "checking…"
            self.logic.console.start(p.mode, self._recipeOrFile(), self.ui.dataPathLineEdit.currentPath,
                                     self.ui.outputPathLineEdit.currentPath, self._options(),
                                     recipes=self._recipes, last_stage=p.lastStage, export=p.exportBackbone)
            self._started()

    def onStop(self) -> None:
        self.logic.console.stop()
        self._updateState()

    def onRunFolderChosen(self, path: str) -> None:
        console = self.logic.console
        folder = path_or_none(path)
        if console.running or folder is None or not os.path.isdir(folder):
            return
        try:
            run = console.open_run(folder)
        except RunFolderError:
            self.ui.runStatusLabel.text = "No run in this folder."
            self._updateState()
            return
        self.ui.runStatusLabel.text = run.describe()
        self._refreshCurves()
        self._updateState()

    def onResume(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not resume the run.", waitCursor=True):
            if not self._ready():
                return
            self.logic.console.resume(self._options())
            self._started()

    def onEvaluate(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not evaluate the model.", waitCursor=True):
            if not self._ready():
                return
            self.logic.console.evaluate(self.ui.dataPathLineEdit.currentPath or None, device=self._parameterNode.device)
            self._started()

    def onRegisterModel(self) -> None:
        with slicer.util.tryWithErrorDisplay("Could not register the model.", waitCursor=True):
            # the folder DINOSeg's model list shows: the one chosen there last, else the per-user folder
            shown = models.resolve_models_dir(qt.QSettings().value(DINOSEG_MODELS_DIRECTORY_SETTING),
                                              models.slicer_settings_dir())
            target = self.logic.console.register(shown)
            slicer.util.infoDisplay(f"The model is now listed in DINOSeg: {target}")

    # -- watching --------------------------------------------------------------------------------------
    def _started(self) -> None:
        self._timer.start()
        self._refreshCurves()
        self._updateState()

    def _tick(self) -> None:
        console = self.logic.console
        console.tick()
        for message in console.new_messages():
            self.ui.logTextEdit.appendPlainText(message)
        done, total, _ = console.progress
        if console.running:
            self.ui.progressBar.maximum = total or 0  # 0: a busy indicator until the first progress event
            self.ui.progressBar.value = done or 0
        else:
            self.ui.progressBar.maximum = 1
            self.ui.progressBar.value = 1 if console.state == "finished" else 0
        self._refreshCurves()
        self._updateState()
        if not console.running:
            self._timer.stop()

    def _refreshCurves(self) -> None:
        curves = self.logic.console.curves
        combo = self.ui.curveComboBox
        titles = list(curves.charts) if curves is not None else []
        if [combo.itemText(i) for i in range(combo.count)] != titles:
            combo.blockSignals(True)
            combo.clear()
            for title in titles:
                combo.addItem(title)
            combo.blockSignals(False)
            self._shownChart = None
        if curves is not None and self._shownChart is None and titles:
            self.onCurveChosen()

    def onCurveChosen(self, *args) -> None:
        curves = self.logic.console.curves
        title = self.ui.curveComboBox.currentText
        if curves is None or title not in curves.charts:
            return
        self._shownChart = curves.charts[title].node
        slicer.modules.plots.logic().ShowChartInLayout(self._shownChart)

    def _updateState(self, *args) -> None:
        console = self.logic.console if self.logic else None
        if console is None:
            return
        running = console.running
        self.ui.startButton.enabled = not running
        self.ui.checkDataButton.enabled = not running
        self.ui.stopButton.enabled = running
        self.ui.stopButton.text = "Kill now" if console.state == "stopping" else "Stop"
        self.ui.resumeButton.enabled = console.can_resume
        self.ui.evaluateButton.enabled = console.can_evaluate
        self.ui.registerModelButton.enabled = console.can_register
        step = console.step.title if console.step is not None and running else ""
        self.ui.statusLabel.text = f"{console.state}{': ' + step if step else ''}" + (
            f"\n{console.error}" if console.error else "")
        self.ui.warningLabel.text = console.warning or ""
        self.ui.warningLabel.visible = bool(console.warning)
        if console.data_report is not None and console.data_report.lines:
            self.ui.dataReportLabel.text = console.data_report.text
        elif console.error and console.step is not None and console.step.kind == "check":
            self.ui.dataReportLabel.text = console.error
        if console.run is not None:
            self.ui.runStatusLabel.text = console.run.describe()
        if self.ui.evaluationTableView.mrmlTableNode() is not console.evaluation_table:
            self.ui.evaluationTableView.setMRMLTableNode(console.evaluation_table)


class DINOPretrainModuleLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.console = TrainingConsole(slicer.mrmlScene)

    def getParameterNode(self):
        return DINOPretrainParameterNode(super().getParameterNode())


class DINOPretrainTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_options()

    def test_options(self):
        options = TrainingOptions(length=10, extra='"schedules.teacher_temp={start: 0.02, peak: 0.02}"')
        self.assertEqual(options.overrides(None, "pretrain"),
                         ["optim.epochs=10", "schedules.teacher_temp={start: 0.02, peak: 0.02}"])
        with self.assertRaises(OptionsError):
            parse_overrides('"unclosed')
        self.delayDisplay("Test passed")
