"""DINOSeg: PET/CT and CT segmentation with DINOv3 foundation models in 3D Slicer.

Thin on purpose: the Module (metadata, sample data), the Widget (the .ui bound to a parameter node, and
the calls into the logic) and the Test. Everything that computes or touches MRML data lives in
``DINOSegLib`` (Qt-free, tested headless); the models run in a ``dinomed`` child process.
"""
import logging
import os
import pathlib
from typing import Annotated, Optional

import ctk
import qt
import slicer
from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (Choice, GuiConnector, WithinRange, parameterNodeGuiConnector,
                                         parameterNodeWrapper, unannotatedType)
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleTest

from DINOSegLib import DINOSegLogic, InputRemovedError, JobState, read_model_info
from DINOSegLib import dependencies, display, docs, features, lesions, models, training_set
from DINOSegLib.models import BUNDLED_MODELS_DIR, SAMPLE_DATA_DIR
from DINOSegLib.module_widget import ParameterNodeWidget

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


def loadDicomSeriesThroughDatabase(folder) -> Optional[vtkMRMLScalarVolumeNode]:
    """A DICOM CT series the way Slicer's DICOM module loads it: the folder is indexed into Slicer's DICOM
    database (files linked in place, not copied) and its series loaded by the DICOM plugins, so the volume
    keeps its study/series identity in the subject hierarchy and a segmentation of it can be exported as
    DICOM SEG. Only the real application has a DICOM database; the Lib (DINOSegLogic.load_ct) calls this."""
    from DICOMLib import DICOMUtils

    folder = pathlib.Path(folder)
    files = [str(f) for f in sorted(folder.iterdir()) if f.is_file()]
    DICOMUtils.importDicom(str(folder))
    seriesUIDs = sorted({slicer.dicomDatabase.fileValue(f, "0020,000E") for f in files} - {""})
    if not seriesUIDs:
        return None
    loaded = [slicer.mrmlScene.GetNodeByID(nodeID) for nodeID in DICOMUtils.loadSeriesByUID(seriesUIDs)]
    volumes = [node for node in loaded if node is not None and node.IsA("vtkMRMLScalarVolumeNode")]
    return volumes[0] if volumes else None


@parameterNodeGuiConnector
class ctkPathLineEditToStrConnector(GuiConnector):
    """A ctkPathLineEdit bound to a ``str`` parameter. Slicer's own connector binds it to ``pathlib.Path``,
    which turns an empty path into ``Path(".")`` and shows "."; a ``str`` stays ""."""

    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) is str

    @staticmethod
    def create(widget, datatype):
        if ctkPathLineEditToStrConnector.canRepresent(widget, datatype):
            return ctkPathLineEditToStrConnector(widget)
        return None

    def __init__(self, widget):
        super().__init__()
        self._widget = widget

    def _connect(self):
        self._widget.currentPathChanged.connect(self.changed)

    def _disconnect(self):
        self._widget.currentPathChanged.disconnect(self.changed)

    def widget(self):
        return self._widget

    def read(self):
        return str(self._widget.currentPath)

    def write(self, value) -> None:
        self._widget.currentPath = str(value)


@parameterNodeWrapper
class DINOSegParameterNode:
    """The module's state, bound to the .ui widgets through their ``SlicerParameterName`` property.
    Optional paths are ``str`` (empty when unset); the models folder always has a value."""

    ctVolume: vtkMRMLScalarVolumeNode
    petVolume: vtkMRMLScalarVolumeNode
    petOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    modelsDirectory: pathlib.Path
    device: Annotated[str, Choice(["auto", "cpu", "cuda", "mps"])] = "auto"
    featureLayer: Annotated[int, WithinRange(-1, 47)] = -1
    backbonePath: str = ""
    segmentation: vtkMRMLSegmentationNode
    datasetDirectory: str = ""
    caseId: str = ""


def slicerSettingsDirectory() -> pathlib.Path:
    """The folder of Slicer's user settings file: the user's models live below it (DINOSegLib.models)."""
    return pathlib.Path(slicer.app.slicerUserSettingsFilePath).parent


class DINOSegWidget(ParameterNodeWidget):
    def __init__(self, parent=None) -> None:
        ParameterNodeWidget.__init__(self, parent)
        self._task = None  # the running Lib task (SegmentationJob, FeaturesJob, SuvJob); its .job is a Job
        self._stage = ""
        self._onJobSuccess = None
        self._featureGrids = features.FeatureGridCache()
        self._follower = None
        self._removeModelsListener = None
        self._modelsWatcher = None
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._onTimer)
        # completes the cosine map in short steps after a point is placed or dropped (the GUI stays live)
        self._refineTimer = qt.QTimer()
        self._refineTimer.setInterval(30)
        self._refineTimer.timeout.connect(self._onRefineTimer)

    # -- setup ----------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.loadModuleUi("UI/DINOSeg.ui", DINOSegModuleLogic())
        # a folder chooser (set here, not in the .ui: the .ui smoke test's placeholders cannot read flag sets)
        self.ui.datasetPathLineEdit.filters = (ctk.ctkPathLineEdit.Dirs | ctk.ctkPathLineEdit.Drives
                                               | ctk.ctkPathLineEdit.Readable)

        self.ui.loadPetCtButton.connect("clicked(bool)", self.onLoadPetCt)
        self.ui.petOpacitySlider.connect("valueChanged(double)", self.onPetOpacityChanged)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyOrCancel)
        self.ui.show3DButton.connect("toggled(bool)", self.onShow3D)
        self.ui.lesionTableView.connect("clicked(QModelIndex)", self.onLesionRowClicked)
        self.ui.pcaButton.connect("clicked(bool)", self.onPcaMap)
        self.ui.similarityButton.connect("clicked(bool)", self.onSimilarity)
        self.ui.addCaseButton.connect("clicked(bool)", self.onAddCase)
        self.ui.installDependenciesButton.connect("clicked(bool)", self.onInstallDependencies)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self._updateButtons)

        # every model list refreshes when a model is registered (DINOPretrain calls models.register_model)
        # or when the models folder changes on disk
        self._removeModelsListener = models.add_models_listener(lambda path: self.refreshModels())
        self._modelsWatcher = qt.QFileSystemWatcher()
        self._modelsWatcher.directoryChanged.connect(lambda path: self.refreshModels())

        self.initializeParameterNode()
        # The folder comes from the signal's argument: PythonQt calls slots in connection order, and
        # connectGui (run again on every enter and scene close) connects the parameter node after this
        # slot, so reading the parameter node here would give the previous folder.
        self.ui.modelsDirectoryButton.connect("directoryChanged(QString)", self.onModelsDirectoryChanged)
        self.refreshModels()

    def cleanup(self) -> None:
        self._timer.stop()
        self._refineTimer.stop()
        self.removeObservers()
        if self._follower:
            self._follower.stop()
            self._follower = None
        if self._task is not None:
            self._task.job.cancel()
        if self._removeModelsListener:
            self._removeModelsListener()
            self._removeModelsListener = None

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshModels()

    def onSceneStartClose(self, caller, event) -> None:
        # the job's inputs are about to go: end it (its on_finish sees CANCELLED and touches no node)
        if self._task is not None:
            self._task.job.cancel()
        self._refineTimer.stop()
        if self._follower:
            self._follower.stop()
            self._follower = None
        self._featureGrids.clear()
        self.setParameterNode(None)

    def initializeParameterNode(self) -> None:
        ParameterNodeWidget.initializeParameterNode(self)
        if not self._parameterNode.ctVolume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first:
                self._parameterNode.ctVolume = first
        if str(self._parameterNode.modelsDirectory) in ("", "."):
            saved = qt.QSettings().value(MODELS_DIRECTORY_SETTING)
            self._parameterNode.modelsDirectory = models.resolve_models_dir(saved, slicerSettingsDirectory())

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        p = self._parameterNode
        if p is None:
            return
        running = self._task is not None
        self.ui.applyButton.enabled = running or bool(p.ctVolume and self.ui.modelSelector.currentData)
        self.ui.applyButton.text = "Cancel" if running else "Apply"
        self.ui.loadPetCtButton.enabled = not running
        self.ui.pcaButton.enabled = not running and bool(p.ctVolume)
        self.ui.similarityButton.enabled = not running and bool(p.ctVolume)
        self.ui.addCaseButton.enabled = training_set.can_add_case(p.ctVolume, p.segmentation, p.datasetDirectory)
        self.ui.show3DButton.enabled = p.segmentation is not None
        wasBlocked = self.ui.show3DButton.blockSignals(True)
        self.ui.show3DButton.checked = display.segmentation_shown_in_3d(p.segmentation)
        self.ui.show3DButton.blockSignals(wasBlocked)

    def _setStatus(self, text: str) -> None:
        self.ui.statusLabel.text = text

    # -- inputs ---------------------------------------------------------------------------------------
    def onLoadPetCt(self) -> None:
        ctPath = qt.QFileDialog.getOpenFileName(None, "CT: a volume file, or any file of a DICOM series")
        if not ctPath:
            return
        petPath = qt.QFileDialog.getExistingDirectory(None, "PET DICOM folder (cancel for a PET volume file or no PET)")
        if not petPath:
            petPath = qt.QFileDialog.getOpenFileName(None, "PET volume file in SUV (cancel for CT only)") or None
        lib = self.logic.lib
        with slicer.util.tryWithErrorDisplay("Could not load the PET/CT.", waitCursor=True):
            self._setStatus("Loading the CT…")
            ct = lib.load_ct(ctPath, dicom_loader=loadDicomSeriesThroughDatabase)
            self._parameterNode.ctVolume = ct
            if petPath and lib.needs_dinomed_to_load(ctPath, petPath):
                # a DICOM PET is converted to SUV by `dinomed suv`, in the background (progress, Cancel)
                if not self._ensureDependencies():
                    self._setStatus("The PET was not loaded: DINOSeg's dependencies are not installed.")
                    return
                display.show_pet_ct(slicer.mrmlScene, ct, None)
                self._startJob("Converting the PET to SUV",
                               lambda **callbacks: lib.start_pet_suv(petPath, **callbacks), self._onPetSuvFinished)
                return
            pet = lib.load_pet(petPath) if petPath else None  # a PET volume already in SUV: no dinomed needed
            self._parameterNode.petVolume = pet
            display.show_pet_ct(slicer.mrmlScene, ct, pet, opacity=self._parameterNode.petOpacity)
            self._setStatus("Loaded.")

    def _onPetSuvFinished(self, task) -> None:
        pet = self.logic.lib.finish_pet_suv(task)
        p = self._parameterNode
        p.petVolume = pet
        if p.ctVolume is not None:
            display.show_pet_ct(slicer.mrmlScene, p.ctVolume, pet, opacity=p.petOpacity)

    def onPetOpacityChanged(self, value: float) -> None:
        p = self._parameterNode
        if p is not None:
            display.set_pet_opacity(slicer.mrmlScene, p.petVolume, value)  # the PET layer only

    # -- models ---------------------------------------------------------------------------------------
    def onModelsDirectoryChanged(self, directory: str) -> None:
        self.refreshModels(directory)

    def refreshModels(self, directory: Optional[str] = None) -> None:
        if directory is None:
            directory = str(self._parameterNode.modelsDirectory) if self._parameterNode else ""
        folder = models.resolve_models_dir(directory, slicerSettingsDirectory())
        if folder == models.user_models_dir(slicerSettingsDirectory()):
            folder.mkdir(parents=True, exist_ok=True)  # the per-user folder exists from first use
        qt.QSettings().setValue(MODELS_DIRECTORY_SETTING, str(folder))
        watched = list(self._modelsWatcher.directories())
        if watched:
            self._modelsWatcher.removePaths(watched)
        if folder.is_dir():
            self._modelsWatcher.addPath(str(folder))
        self.logic.lib.models_dirs = [folder, pathlib.Path(BUNDLED_MODELS_DIR)]
        current = self.ui.modelSelector.currentData
        wasBlocked = self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for modelFolder in self.logic.lib.available_models():
            try:
                info = read_model_info(modelFolder)
            except ValueError as exc:
                logging.warning(str(exc))
                continue
            self.ui.modelSelector.addItem(f"{info.name} ({'+'.join(info.inputs)})", str(modelFolder))
        index = self.ui.modelSelector.findData(current) if current else -1
        self.ui.modelSelector.setCurrentIndex(max(index, 0))
        self.ui.modelSelector.blockSignals(wasBlocked)
        self._updateButtons()

    def onAddModelFolder(self) -> None:
        source = qt.QFileDialog.getExistingDirectory(None, "A model folder (model.json + model.safetensors)")
        if not source:
            return
        with slicer.util.tryWithErrorDisplay("Could not add the model folder.", waitCursor=True):
            models.register_model(source, self._parameterNode.modelsDirectory)  # refreshes every model list

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
        if self.ui.show3DButton.checked:
            display.show_segmentation_3d(result.segmentation)
        if result.lesion_table is not None:
            self.ui.lesionTableView.setMRMLTableNode(result.lesion_table)
            self.ui.lesionTableView.show()
        self._log(f"Done: {result.segmentation.GetName()}")

    def onShow3D(self, checked: bool) -> None:
        p = self._parameterNode
        if p is not None and p.segmentation is not None:
            with slicer.util.tryWithErrorDisplay("Could not show the segmentation in 3D.", waitCursor=True):
                display.show_segmentation_3d(p.segmentation, checked)

    def onLesionRowClicked(self, index) -> None:
        table = self.ui.lesionTableView.mrmlTableNode()
        if table is None:
            return
        with slicer.util.tryWithErrorDisplay("Could not jump to the lesion."):
            ras = lesions.lesion_centroid_ras(table, index.row())
            lesions.jump_slices_to(slicer.mrmlScene, ras)

    # -- features -------------------------------------------------------------------------------------
    def _featureSource(self) -> dict:
        backbone = training_set.configured_path(self._parameterNode.backbonePath)
        if backbone is not None:
            if not backbone.is_file():
                raise ValueError(f"the backbone checkpoint {backbone} does not exist")
            return {"backbone": str(backbone)}
        if self.ui.modelSelector.currentData:
            return {"model_dir": self.ui.modelSelector.currentData}
        raise ValueError("choose a model above, or a backbone checkpoint file")

    def onPcaMap(self) -> None:
        self._runFeatures(pca=True, then=None)

    def onSimilarity(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not start the similarity map.", waitCursor=True):
            # the grid is kept for one CT (voxels, geometry), one model or backbone and one block
            grid = self._featureGrids.get(p.ctVolume, self._featureSource(), p.featureLayer)
            if grid is None:
                self._runFeatures(pca=False, then=self._startSimilarity)
            else:
                self._startSimilarity(grid)

    def _runFeatures(self, pca: bool, then) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not compute the features.", waitCursor=True):
            if not self._ensureDependencies():
                return
            ct, layer, source = p.ctVolume, p.featureLayer, self._featureSource()

            def finished(task):
                pcaNode, grid = self.logic.lib.finish_features(task)
                self._featureGrids.put(task.image, source, layer, grid)
                if pcaNode is not None:
                    display.show_overlay(slicer.mrmlScene, pcaNode)
                if then:
                    then(grid)

            self._startJob("Computing features", lambda **callbacks: self.logic.lib.start_features(
                ct, layer=layer, pca=pca, **source, **callbacks), finished)

    def _startSimilarity(self, grid) -> None:
        p = self._parameterNode
        point = self.ui.similarityPointPlaceWidget.currentNode()
        if point is None:
            point = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Similarity point")
            point.SetMaximumNumberOfControlPoints(1)
            self.ui.similarityPointPlaceWidget.setCurrentNode(point)
        if self._follower:
            self._follower.stop()
        # the follower shows its map in the slice views as soon as the first point is placed; the planes
        # in view come at once, the rest of the map in steps of the refine timer
        self._follower = features.CosineMapFollower(slicer.mrmlScene, p.ctVolume, grid, progressive=True)
        self._follower.follow(point)
        self._refineTimer.start()
        self.ui.similarityPointPlaceWidget.setPlaceModeEnabled(True)
        self._setStatus("Place or drag the point: the map follows it.")

    def _onRefineTimer(self) -> None:
        if self._follower is not None and self._follower.pending:
            self._follower.refine(budget_s=0.04)

    # -- training set ---------------------------------------------------------------------------------
    def onAddCase(self) -> None:
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay("Could not add the case.", waitCursor=True):
            caseId = p.caseId or training_set.next_case_id(p.datasetDirectory)
            written = training_set.add_case(p.datasetDirectory, caseId, p.ctVolume, p.segmentation, p.petVolume)
            self.ui.trainingStatusLabel.text = f"Added {caseId}: {', '.join(path.name for path in written.values())}"
            p.caseId = ""

    # -- jobs -----------------------------------------------------------------------------------------
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
        self.ui.progressBar.maximum = 0  # busy until the first progress event gives a total
        self.ui.progressBar.value = 0
        self._setStatus(f"{stage}…")
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
            if percent is not None:
                self.ui.progressBar.maximum = 100
                self.ui.progressBar.value = percent
                message = event.get("message") or ""
                self._setStatus(f"{self._stage} {percent}%" + (f" ({message})" if message else ""))
        elif kind in ("log", "error"):
            self._log(event.get("message", ""))

    def _onJobFinished(self, task) -> None:
        self._timer.stop()
        onSuccess, stage = self._onJobSuccess, self._stage
        self._task = None
        self._onJobSuccess = None
        job = task.job
        self.ui.progressBar.maximum = 100
        try:
            if job.state is JobState.SUCCEEDED:
                self._setStatus(f"{stage}: importing the result…")
                slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)  # show the line before the import
                onSuccess(task)
                self.ui.progressBar.value = 100
                self._setStatus(f"{stage}: done ({job.elapsed_s:.0f} s).")
            elif job.state is JobState.FAILED:
                self.ui.progressBar.value = 0
                self._setStatus(f"{stage} failed: {job.error}")
                self._log(job.error or "failed")
                slicer.util.errorDisplay(f"{stage} failed: {job.error}")
            else:
                self.ui.progressBar.value = 0
                self._setStatus(f"{stage}: {job.state.value}.")
        except InputRemovedError as exc:  # the scene was closed or the input deleted meanwhile: drop quietly
            self._setStatus(str(exc))
        except Exception as exc:  # the result could not be imported: one line, not a traceback
            self._setStatus(f"{stage}: {exc}")
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
