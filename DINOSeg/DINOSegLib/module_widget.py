"""What the DINOSeg and DINOPretrain widgets share of Slicer's scripted-module template
(Utilities/Templates/Modules/Scripted/TemplateKey.py): load the module's .ui, bind the parameter node to it
and let it go when the module is left or the scene closes.

The one file of this Lib that only runs inside Slicer's GUI (``slicer.util.loadUI``); neither the Lib's
``__init__`` nor the web front-end imports it. DINOPretrain imports it from here because it depends on
DINOSeg (as it does for the job runner and the model folders).
"""
from __future__ import annotations

import slicer
import vtk
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin


class ParameterNodeWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """A module widget whose state is a ``parameterNodeWrapper`` node bound to the .ui (``SlicerParameterName``).

    A subclass calls :meth:`loadModuleUi` in ``setup``, implements ``onSceneStartClose`` and may extend
    :meth:`initializeParameterNode` and :meth:`onParameterNodeModified`."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def loadModuleUi(self, uiFile: str, logic) -> None:
        """The template's ``setup``: the .ui (``Resources/<uiFile>``) as ``self.ui``, ``logic`` as ``self.logic``,
        and the scene-close observers."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(uiFile))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """A parameter changed (or the node was bound): nothing by default; e.g. enable the buttons that fit."""
