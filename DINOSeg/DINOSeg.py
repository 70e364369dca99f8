"""DINOSeg: PET/CT and CT segmentation with DINOv3 foundation models in 3D Slicer.

Thin on purpose: the Module (metadata, sample data), the Widget (the .ui bound to a parameter node, and
the calls into the logic) and the Test. Everything that computes or touches MRML data lives in
``DINOSegLib`` (Qt-free, tested headless); the models run in a ``dinomed`` child process.
"""
import logging
import os
import pathlib
from typing import Annotated, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DINOSegLib import DINOSegLogic, InputRemovedError, JobState, add_model_folder, read_model_info
from DINOSegLib import dependencies, display, docs, features, lesions, training_set
from DINOSegLib.models import BUNDLED_MODELS_DIR, SAMPLE_DATA_DIR

MODELS_DIRECTORY_SETTING = "DINOSeg/ModelsDirectory"


class DINOSeg(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DINOSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["DINOSeg maintainers (DINOSeg project)"]
        self.parent.helpText = _("""
Segment tumours, lymph nodes and organs on PET/CT or CT with DINOv3 foundation models, read the PET lesion
statistics (SUVmax, SUVpeak, SUVmean, MTV, TLG), and look at what the model sees (PCA and cosine-similarity
maps of its features). The bundled demo model knows only synthetic phantoms.
See the <a href="{url}">documentation</a> (section "In 3D Slicer").
""").format(url=docs.readme_url())
        self.parent.acknowledgementText = _("""
Built on DINOv3 (Meta AI), MedDINOv3, DINO-Med3D and Dual-DINOv3 PET/CT, with MONAI, SimpleITK and timm.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """The bundled synthetic PET/CT case (Resources/SampleData) in the Sample Data module."""
    import SampleData

    folder = pathlib.Path(SAMPLE_DATA_DIR)
    files = ["ct.nii.gz", "pet.nii.gz"]
    if not all((folder / f).is_file() for f in files):
        return
    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.11
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("DINOSeg", title=_("DINOSeg"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(
        category="DINOSeg",
        sampleName="DINOSegSyntheticPETCT",
        thumbnailFileName=os.path.join(os.path.dirname(__file__), "Resources", "Icons", "DINOSeg.png"),
        uris=[(folder / f).as_uri() for f in files],
        fileNames=["DINOSeg-synthetic-ct.nii.gz", "DINOSeg-synthetic-pet.nii.gz"],
        nodeNames=["Synthetic CT", "Synthetic PET (SUV)"],
        loadFileTypes=["VolumeFile", "VolumeFile"],
        checksums=[None, None],
        customDownloader=loadSyntheticPetCt,
    )


def loadSyntheticPetCt(source):
    """The Sample Data button of the synthetic case: load both volumes, tag the PET's voxels as SUV (DICOM
    quantity "Standardized Uptake Value", UCUM unit {SUVbw}g/ml) and show it fused over the CT."""
    import SampleData

    nodes = SampleData.SampleDataLogic().downloadFromSource(source)
    if len(nodes) == 2:
        ct, pet = nodes
        display.show_pet_ct(slicer.mrmlScene, ct, pet)  # calls display.set_suv_units(pet)
    return nodes


@parameterNodeWrapper
class DINOSegParameterNode:
    """The module's state, bound to the .ui widgets through their ``SlicerParameterName`` property."""

    ctVolume: vtkMRMLScalarVolumeNode
    petVolume: vtkMRMLScalarVolumeNode
    petOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    modelsDirectory: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    featureLayer: Annotated[int, WithinRange(-1, 47)] = -1
    backbonePath: pathlib.Path
    segmentation: vtkMRMLSegmentationNode
    datasetDirectory: pathlib.Path
    caseId: str = ""


class DINOSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task = None  # the running Lib task (SegmentationJob, FeaturesJob, SuvJob); its .job is a Job
        self._stage = ""
        self._onJobSuccess = None
        self._featureGrid = None
        self._follower = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._onTimer)

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DINOSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DINOSegModuleLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadPetCtButton.connect("clicked(bool)", self.onLoadPetCt)
        self.ui.petOpacitySlider.connect("valueChanged(double)", self.onPetOpacityChanged)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.modelsDirectoryButton.connect("directoryChanged(QString)", self.refreshModels)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionRowClicked)
        self.ui.pcaButton.connect("clicked(bool)", self.onPcaMap)
        self.ui.similarityButton.connect("clicked(bool)", self.onSimilarity)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        self._timer.stop()
        self.removeObservers()
        if self._follower:
            self._follower.stop()
        if self._task is not None:
            self._task.job.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        # the job's inputs are about to go: end it (its on_finish sees CANCELLED and touches no node)
        if self._task is not None:
            self._task.job.cancel()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first
        if not str(self._parameterNode.modelsDirectory) or str(self._parameterNode.modelsDirectory) == ".":
            saved = qt.QSettings().value(MODELS_DIRECTORY_SETTING)
            self._parameterNode.modelsDirectory = pathlib.Path(saved or BUNDLED_MODELS_DIR)

    def setParameterNode(self, inputParameterNode: Optional[DINOSegParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
            self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._task is not None
        self.ui.applyButton.enabled = running or bool(p.ctVolume and self.ui.modelSelector.currentData)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.pcaButton.enabled = not running and bool(p.ctVolume)
        self.ui.similarityButton.enabled = not running and bool(p.ctVolume)
        self.ui.addCaseButton.enabled = bool(p.ctVolume and p.segmentation and str(p.datasetDirectory) not in ("", "."))

    # -- inputs ---------------------------------------------------------------------------------------
    def onLoadPetCt(self) -> None:
        ct_path = qt.QFileDialog.getOpenFileName(None, "CT: a volume file, or any file of a DICOM series")
        if not ct_path:
            return
        pet_path = qt.QFileDialog.getExistingDirectory(None, "PET DICOM folder (cancel for a PET volume file or no PET)")
        if not pet_path:
            pet_path = qt.QFileDialog.getOpenFileName(None, "PET volume file in SUV (cancel for CT only)") or None
        with slicer.util.tryWithErrorDisplay("Could not load the PET/CT.", waitCursor=True):
            if not self._ensureDependencies():
                return
            ct, pet = self.logic.lib.load_pet_ct(ct_path, pet_path)
            self._parameterNode.ctVolume = ct
            self._parameterNode.petVolume = pet

    def onPetOpacityChanged(self, value: float) -> None:
        p = self._parameterNode
        if p and p.ctVolume:
            display.show_pet_ct(slicer.mrmlScene, p.ctVolume, p.petVolume, opacity=value)

    # -- models ---------------------------------------------------------------------------------------
    def refreshModels(self, *args) -> None:
        directory = str(self._parameterNode.modelsDirectory) if self._parameterNode else str(BUNDLED_MODELS_DIR)
        qt.QSettings().setValue(MODELS_DIRECTORY_SETTING, directory)
        self.logic.lib.models_dirs = [pathlib.Path(directory), pathlib.Path(BUNDLED_MODELS_DIR)]
        self.ui.modelSelector.clear()
        for folder in self.logic.lib.available_models():
            try:
                info = read_model_info(folder)
            except ValueError as exc:
                logging.warning(str(exc))
                continue
            inputs = "+".join(info.inputs)
            self.ui.modelSelector.addItem(f"{info.name} ({inputs})", str(folder))
        self._updateButtons()

    def onAddModelFolder(self) -> None:
        source = qt.QFileDialog.getExistingDirectory(None, "A model folder (model.json + model.safetensors)")
        if not source:
            return
        with slicer.util.tryWithErrorDisplay("Could not add the model folder.", waitCursor=True):
            add_model_folder(source, self._parameterNode.modelsDirectory)
            self.refreshModels()

    # -- segmentation ---------------------------------------------------------------------------------
    def onApplyOrCancel(self) -> None:
        if self._task is not None:
            self._task.job.cancel()  # kills the tree at once; _onJobFinished reports "cancelled"
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the segmentation.", waitCursor=True):
            if not self._ensureDependencies():
                return
            self.ui.logTextEdit.clear()
            ct, pet, model, device = p.ctVolume, p.petVolume, self.ui.modelSelector.currentData, p.device
            self._startJob("Segmenting", lambda **callbacks: self.logic.lib.start_segmentation(
                ct, model, pet=pet, device=device, **callbacks), self._onSegmentationFinished)

    def _onSegmentationFinished(self, task) -> None:
        result = self.logic.lib.finish_segmentation(task)
        self._parameterNode.segmentation = result.segmentation
        result.segmentation.CreateClosedSurfaceRepresentation()
        if result.lesion_table is not None:
            self.ui.lesionTableView.setMRMLTableNode(result.lesion_table)
            self.ui.lesionTableView.show()
        self._log(f"Done: {result.segmentation.GetName()}")

    def onLesionRowClicked(self, index) -> None:
        table = self.ui.lesionTableView.mrmlTableNode()
        if table is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not jump to the lesion."):
            ras = lesions.lesion_centroid_ras(table, index.row())
            lesions.jump_slices_to(slicer.mrmlScene, ras)

    # -- features -------------------------------------------------------------------------------------
    def _featureSource(self) -> dict:
        backbone = str(self._parameterNode.backbonePath)
        if backbone not in ("", ".") and os.path.isfile(backbone):
            return {"backbone": backbone}
        if self.ui.modelSelector.currentData:
            return {"model_dir": self.ui.modelSelector.currentData}
        raise ValueError("choose a model above, or a backbone checkpoint file")

    def onPcaMap(self) -> None:
        self._runFeatures(pca=True, then=None)

    def onSimilarity(self) -> None:
        if self._featureGrid is None:
            self._runFeatures(pca=False, then=self._startSimilarity)
        else:
            self._startSimilarity()

    def _runFeatures(self, pca: bool, then) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not compute the features.", waitCursor=True):
            if not self._ensureDependencies():
                return
            ct, layer, source = p.ctVolume, p.featureLayer, self._featureSource()

            def finished(task):
                pca_node, self._featureGrid = self.logic.lib.finish_features(task)
                if pca_node is not None:
                    display.show_overlay(slicer.mrmlScene, pca_node)
                if then:
                    then()

            self._startJob("Computing features", lambda **callbacks: self.logic.lib.start_features(
                ct, layer=layer, pca=pca, **source, **callbacks), finished)

    def _startSimilarity(self) -> None:
        p = self._parameterNode
        point = self.ui.similarityPointPlaceWidget.currentNode()
        if point is None:
            point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
            point.SetMaximumNumberOfControlPoints(1)
            self.ui.similarityPointPlaceWidget.setCurrentNode(point)
        if self._follower:
            self._follower.stop()
        self._follower = features.CosineMapFollower(slicer.mrmlScene, p.ctVolume, self._featureGrid)
        self._follower.follow(point)
        self.ui.similarityPointPlaceWidget.setPlaceModeEnabled(True)
        if self._follower.volume is not None:
            display.show_overlay(slicer.mrmlScene, self._follower.volume)

    # -- training set ---------------------------------------------------------------------------------
    def onAddCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not add the case.", waitCursor=True):
            case_id = p.caseId or training_set.next_case_id(p.datasetDirectory)
            written = training_set.add_case(p.datasetDirectory, case_id, p.ctVolume, p.segmentation, p.petVolume)
            self.ui.trainingStatusLabel.text = f"Added {case_id}: {', '.join(path.name for path in written.values())}"
            p.caseId = ""

    # -- child process --------------------------------------------------------------------------------
    def _ensureDependencies(self) -> bool:
        """One confirmation, then torch and the bundled core library; False (no error) when declined."""
        return dependencies.ensure_in_slicer()

    def onInstallDependencies(self) -> None:
        """The Advanced section's button: reinstall the bundled core library (and torch when missing)."""
        with slicer.util.tryWithErrorDisplay("Could not install the dependencies."):
            if dependencies.ensure_in_slicer(force=True):
                slicer.util.infoDisplay("DINOSeg's Python packages are installed and up to date.")

    def _startJob(self, stage: str, start, onSuccess) -> None:
        """``start(on_event=…, on_finish=…)`` starts a Lib task (its ``.job`` is a DINOSegLib Job); the
        timer only forwards to ``job.tick()``; ``onSuccess(task)`` imports the result."""
        self._stage = stage
        self._onJobSuccess = onSuccess
        self.ui.progressBar.value = 0
        self.ui.progressBar.format = f"{stage}…"
        self._task = start(on_event=self._onJobEvent, on_finish=self._onJobFinished)
        self._timer.start()
        self._updateButtons()

    def _onTimer(self) -> None:
        if self._task is not None:
            self._task.job.tick()  # events and the end of the job arrive through the callbacks

    def _onJobEvent(self, event: dict) -> None:
        kind = event["event"]
        if kind == "progress" and self._task is not None:
            percent = self._task.job.percent
            message = event.get("message") or ""
            self.ui.progressBar.value = percent or 0
            self.ui.progressBar.format = f"{self._stage} {message} %p%".replace("  ", " ")
        elif kind in ("log", "error"):
            self._log(event.get("message", ""))

    def _onJobFinished(self, task) -> None:
        self._timer.stop()
        onSuccess, stage = self._onJobSuccess, self._stage
        self._task = None
        self._onJobSuccess = None
        job = task.job
        try:
            if job.state is JobState.SUCCEEDED:
                self.ui.progressBar.format = f"{stage}: importing the result…"
                onSuccess(task)
                self.ui.progressBar.value = 100
                self.ui.progressBar.format = f"{stage}: done"
            elif job.state is JobState.FAILED:
                self.ui.progressBar.format = f"{stage}: failed"
                self._log(job.error or "failed")
                slicer.util.errorDisplay(f"{stage} failed: {job.error}")
            else:
                self.ui.progressBar.format = f"{stage}: {job.state.value}"
                self._log(f"{stage}: {job.state.value}.")
        except InputRemovedError as exc:  # the scene was closed or the input deleted meanwhile: drop quietly
            self._log(str(exc))
        except Exception as exc:  # the result could not be imported: one line, not a traceback
            self._log(str(exc))
            slicer.util.errorDisplay(f"{stage}: {exc}")
        finally:
            self._updateButtons()

    def _log(self, message: str) -> None:
        self.ui.logTextEdit.appendPlainText(message)
        logging.info(message)


class DINOSegModuleLogic(ScriptedLoadableModuleLogic):
    """Slicer's logic object (parameter node) around the Qt-free ``DINOSegLib.DINOSegLogic``."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self.lib = DINOSegLogic(slicer.mrmlScene)

    def getParameterNode(self):
        return DINOSegParameterNode(super().getParameterNode())


class DINOSegTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest on a build machine).

    By default only what needs no torch and no dinomed: the module's logic, the bundled model list and sample
    case. The real segmentation (installs torch and dinomed on first use, runs the demo model) is OFF by
    default, as in TotalSegmentator, MONAIAuto3DSeg and SlicerNNUNet: the extension build machines have neither.
    Turn it on with the environment variable DINOSEG_TEST_SEGMENTATION=1 (then Reload and Test), or from the
    Python console with ``slicer.selfTests["DINOSeg"](segmentation=True)`` (README, "In 3D Slicer")."""

    segmentation = None  # None: DINOSEG_TEST_SEGMENTATION decides

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self, segmentation=None):
        self.segmentation = segmentation
        self.setUp()
        self.test_bundled_models_and_sample_case()
        self.setUp()
        self.test_segment_sample_case()

    def _segmentationEnabled(self) -> bool:
        if self.segmentation is not None:
            return bool(self.segmentation)
        return os.environ.get("DINOSEG_TEST_SEGMENTATION", "") not in ("", "0")

    def test_bundled_models_and_sample_case(self):
        lib = DINOSegLogic(slicer.mrmlScene)
        for folder in lib.available_models():
            info = read_model_info(folder)
            self.assertTrue(info.labels, folder)
        self.delayDisplay("Bundled models listed")

    def test_segment_sample_case(self):
        # ctest (slicer.testing.runUnitTest) calls every test_* method, so the switch is checked here
        if not self._segmentationEnabled():
            logging.warning("DINOSegTest: the real segmentation is off (DINOSEG_TEST_SEGMENTATION=1 turns it on)")
            return
        self.assertTrue(dependencies.ensure_in_slicer(), "the dependencies were not installed")
        lib = DINOSegLogic(slicer.mrmlScene)
        models = lib.available_models()
        if not models or not (pathlib.Path(SAMPLE_DATA_DIR) / "ct.nii.gz").is_file():
            self.delayDisplay("No bundled model or sample case: nothing to test")
            return
        ct, pet = lib.load_pet_ct(pathlib.Path(SAMPLE_DATA_DIR) / "ct.nii.gz", pathlib.Path(SAMPLE_DATA_DIR) / "pet.nii.gz")
        info = read_model_info(models[0])
        result = lib.segment(ct, models[0], pet=pet if info.needs_pet or pet else None, device="auto", timeout=1800)
        segmentation = result.segmentation.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(info.labels))
        self.assertEqual(result.segmentation.GetNodeReference(result.segmentation.GetReferenceImageGeometryReferenceRole()), ct)
        self.delayDisplay("Test passed")
