"""DINOPretrain: launch and watch DINOv3 pretraining and supervised finetuning from Slicer.

A thin skeleton (its full GUI is a later issue): the .ui bound to a parameter node, Start/Stop/Resume on a
``dinomed pretrain|finetune … --events`` child (through DINOSeg's process runner), live loss/Dice curves in
a table and plot, and "Register this model in DINOSeg". The logic is ``DINOPretrainLib`` (Qt-free).
"""
import logging
import pathlib
from typing import Annotated, Optional

import qt
import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DINOPretrainLib import TrainingRunLogic
from DINOSegLib import dependencies, docs
from DINOSegLib.models import BUNDLED_MODELS_DIR


class DINOPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DINOPretrain")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["DINOSeg"]  # shares DINOSegLib (process runner, model folders)
        self.parent.contributors = ["DINOSeg maintainers (DINOSeg project)"]
        self.parent.helpText = _("""
Pretrain a DINOv3 encoder on folders of unlabeled CT or PET (self-distillation, Gram anchoring,
high-resolution adaptation), or finetune a segmentation model on a labeled dataset; watch the loss and Dice,
stop and resume, and register the finetuned model in DINOSeg.
See the <a href="{url}">documentation</a> (section "In 3D Slicer").
""").format(url=docs.readme_url())
        self.parent.acknowledgementText = _("Built on DINOv3 (Meta AI) and the dinomed core library.")


@parameterNodeWrapper
class DINOPretrainParameterNode:
    mode: Annotated[str, Choice(["pretrain", "finetune"])] = "finetune"
    configPath: pathlib.Path
    dataDirectory: pathlib.Path
    outputDirectory: pathlib.Path
    overrides: str = ""
    modelsDirectory: pathlib.Path


class DINOPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._timer = qt.QTimer()
        self._timer.setInterval(200)
        self._timer.timeout.connect(self._poll)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DINOPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DINOPretrainModuleLogic()
        self.ui.startButton.connect("clicked(bool)", self.onStart)
        self.ui.stopButton.connect("clicked(bool)", self.onStop)
        self.ui.resumeButton.connect("clicked(bool)", self.onResume)
        self.ui.registerModelButton.connect("clicked(bool)", self.onRegisterModel)
        self.setParameterNode(self.logic.getParameterNode())

    def cleanup(self) -> None:
        self.removeObservers()
        self.logic.run.stop()

    def setParameterNode(self, inputParameterNode: Optional[DINOPretrainParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            if str(self._parameterNode.modelsDirectory) in ("", "."):
                self._parameterNode.modelsDirectory = pathlib.Path(BUNDLED_MODELS_DIR)
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)

    def _launch(self, resume: bool) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the run.", waitCursor=True):
            if not dependencies.ensure_in_slicer():
                return
            if resume:
                self.logic.run.resume()
            else:
                self.logic.run.start(p.mode, p.configPath, p.dataDirectory, p.outputDirectory, p.overrides.split())
            chart = self.logic.run.metrics.make_chart()
            slicer.modules.plots.logic().ShowChartInLayout(chart)
            self._timer.start()
            self._setRunning(True)

    def onStart(self) -> None:
        self._launch(resume=False)

    def onResume(self) -> None:
        self._launch(resume=True)

    def onStop(self) -> None:
        self.logic.run.stop()
        self._poll()

    def onRegisterModel(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not register the model.", waitCursor=True):
            target = self.logic.run.register_model(p.outputDirectory, p.modelsDirectory)
            slicer.util.infoDisplay(f"The model is now listed in DINOSeg: {target}")

    def _poll(self) -> None:
        run = self.logic.run
        for event in run.poll():
            if event["event"] == "progress":
                self.ui.progressBar.value = run.process.progress.percent
            elif event["event"] in ("log", "error"):
                self.ui.logTextEdit.appendPlainText(str(event.get("message", "")))
        if not run.running:
            self._timer.stop()
            self._setRunning(False)
            try:
                run.process.check()
                self.ui.logTextEdit.appendPlainText("Finished.")
            except RuntimeError as exc:
                self.ui.logTextEdit.appendPlainText(str(exc))
                logging.warning(str(exc))

    def _setRunning(self, running: bool) -> None:
        self.ui.startButton.enabled = not running
        self.ui.resumeButton.enabled = not running
        self.ui.stopButton.enabled = running


class DINOPretrainModuleLogic(ScriptedLoadableModuleLogic):
    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.run = TrainingRunLogic(slicer.mrmlScene)

    def getParameterNode(self):
        return DINOPretrainParameterNode(super().getParameterNode())


class DINOPretrainTest(ScriptedLoadableModuleTest):
    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_command()

    def test_command(self):
        args = TrainingRunLogic.command("finetune", "cfg.yaml", "data", "out", ["optim.lr=1e-4"], resume=True)
        self.assertEqual(args, ["finetune", "cfg.yaml", "optim.lr=1e-4", "--data", "data", "--out", "out", "--resume"])
        self.delayDisplay("Test passed")
