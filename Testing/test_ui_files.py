"""Smoke test of both modules' .ui files with PySide6's QUiLoader (offscreen), the ctk/qMRML/qSlicer widgets
replaced by placeholders built from Slicer's and CTK's real headers (../shared/slicer-reference/headers).

Fails on: a property the widget class does not have, a <connection> whose signal or slot the class lacks, a
``self.ui.X`` the .ui lacks, a ``self.ui.X.connect("signal(args)")`` the class lacks, a parameter without a
widget or a SlicerParameterName that names no parameter. A self-test shows that each kind of fault is caught.
"""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("PySide6.QtUiTools", reason="PySide6 (the test extra) is needed for the .ui smoke test")

import xml.etree.ElementTree as ET  # noqa: E402

from PySide6.QtWidgets import QWidget  # noqa: E402

import ui_checker  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("DINOSeg", "DINOPretrain")
needs_headers = pytest.mark.skipif(
    not (ui_checker.HEADERS / "Slicer" / "qMRMLNodeComboBox.h").is_file(),
    reason=f"the CTK/Slicer widget headers are read from {ui_checker.HEADERS}, which is absent (../shared not mounted)")


@pytest.fixture(scope="module")
def model():
    return ui_checker.WidgetModel()


@needs_headers
@pytest.mark.parametrize("module", MODULES)
def test_ui_loads_and_matches_the_module(module, model):
    ui = ROOT / module / "Resources" / "UI" / f"{module}.ui"
    source = (ROOT / module / f"{module}.py").read_text()
    assert ui_checker.problems(ui.read_text(), source, model, ui_name=ui.name) == []
    classes = {w.get("class") for w in ET.parse(ui).getroot().iter("widget")}
    widget, messages = ui_checker.load_ui(ui.read_text(), model, classes)
    assert widget is not None and widget.metaObject().className() == "qMRMLWidget"
    assert [m for m in messages if not m.startswith("QObject::connect")] == []
    # every widget of the file was created, custom ones as their placeholders
    for name, class_name in ((w.get("name"), w.get("class")) for w in ET.parse(ui).getroot().iter("widget")):
        child = widget if name == module else widget.findChild(QWidget, name)
        assert child is not None and child.metaObject().className() == class_name, name


# -- the checker itself ---------------------------------------------------------------------------------

GOOD_UI = """<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0">
 <class>Mini</class>
 <widget class="qMRMLWidget" name="Mini">
  <layout class="QVBoxLayout" name="layout">
   <item>
    <widget class="ctkCollapsibleButton" name="section">
     <property name="text"><string>Inputs</string></property>
     <property name="collapsed"><bool>true</bool></property>
     <layout class="QFormLayout">
      <item row="0" column="0">
       <widget class="qMRMLNodeComboBox" name="volumeSelector">
        <property name="nodeTypes"><stringlist><string>vtkMRMLScalarVolumeNode</string></stringlist></property>
        <property name="noneEnabled"><bool>true</bool></property>
        <property name="SlicerParameterName" stdset="0"><string>volume</string></property>
       </widget>
      </item>
      <item row="1" column="0">
       <widget class="ctkDirectoryButton" name="folderButton">
        <property name="SlicerParameterName" stdset="0"><string>folder</string></property>
       </widget>
      </item>
      <item row="2" column="0">
       <widget class="QPushButton" name="applyButton"><property name="text"><string>Apply</string></property></widget>
      </item>
     </layout>
    </widget>
   </item>
  </layout>
 </widget>
 <customwidgets>
  <customwidget><class>qMRMLWidget</class><extends>QWidget</extends><header>qMRMLWidget.h</header></customwidget>
  <customwidget><class>ctkCollapsibleButton</class><extends>QWidget</extends><header>ctkCollapsibleButton.h</header></customwidget>
  <customwidget><class>qMRMLNodeComboBox</class><extends>QWidget</extends><header>qMRMLNodeComboBox.h</header></customwidget>
  <customwidget><class>ctkDirectoryButton</class><extends>QWidget</extends><header>ctkDirectoryButton.h</header></customwidget>
 </customwidgets>
 <connections>
  <connection>
   <sender>Mini</sender><signal>mrmlSceneChanged(vtkMRMLScene*)</signal>
   <receiver>volumeSelector</receiver><slot>setMRMLScene(vtkMRMLScene*)</slot>
  </connection>
 </connections>
</ui>
"""

GOOD_PY = '''
@parameterNodeWrapper
class MiniParameterNode:
    volume: vtkMRMLScalarVolumeNode
    folder: pathlib.Path

class MiniWidget:
    def setup(self):
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.folderButton.connect("directoryChanged(QString)", self.onFolder)
        self.ui.volumeSelector.connect('currentNodeChanged(vtkMRMLNode*)', self.onVolume)
        self.ui.section.collapsed = False
        self.ui.volumeSelector.currentNode().GetName()
        self.ui.volumeSelector.setMRMLScene(None)
        self.ui.applyButton.enabled = True
        self.ui.applyButton.setText("Run")
'''


@pytest.fixture(scope="module")
def good(model):
    return lambda ui=GOOD_UI, py=GOOD_PY: ui_checker.problems(ui, py, model)


@needs_headers
def test_checker_accepts_a_consistent_pair(good):
    assert good() == []


@needs_headers
@pytest.mark.parametrize("ui_change, py_change, expected", [
    (('name="collapsed"', 'name="colapsed"'), None, "section (ctkCollapsibleButton) has no property 'colapsed'"),
    (('name="noneEnabled"', 'name="noneEnable"'), None, "volumeSelector (qMRMLNodeComboBox) has no property 'noneEnable'"),
    (('<property name="text"><string>Apply', '<property name="txt"><string>Apply'), None,
     "applyButton (QPushButton) has no property 'txt'"),
    (("<slot>setMRMLScene(vtkMRMLScene*)", "<slot>setMRMLScene(vtkMRMLNode*)"), None,
     "volumeSelector (qMRMLNodeComboBox) has no slot setMRMLScene(vtkMRMLNode*)"),
    (("<signal>mrmlSceneChanged(vtkMRMLScene*)", "<signal>sceneChanged(vtkMRMLScene*)"), None,
     "Mini (qMRMLWidget) has no signal sceneChanged(vtkMRMLScene*)"),
    (('stdset="0"><string>folder', 'stdset="0"><string>fodler'), None, "parameter 'folder' has no widget"),
    (('stdset="0"><string>folder', 'stdset="0"><string>fodler'), None, "SlicerParameterName 'fodler' of ['folderButton'] names no parameter"),
    (('name="SlicerParameterName" stdset="0"><string>folder', 'name="SlicerParamName" stdset="0"><string>folder'), None,
     "sets the dynamic property 'SlicerParamName'"),
    (None, ("self.ui.section.collapsed", "self.ui.sectionButton.collapsed"), "self.ui.sectionButton is not a widget"),
    (None, ('"directoryChanged(QString)"', '"directoryChanged(int)"'), "folderButton (ctkDirectoryButton) has no signal directoryChanged(int)"),
    (None, ('"clicked(bool)"', '"clicked(int)"'), "applyButton (QPushButton) has no signal clicked(int)"),
    (None, ("    folder: pathlib.Path\n", "    folder: pathlib.Path\n    caseId: str\n"), "parameter 'caseId' has no widget"),
    (None, ("    folder: pathlib.Path\n", "    folder: str\n"), "parameter 'folder' (str) is bound to folderButton (ctkDirectoryButton)"),
    (('class="qMRMLNodeComboBox" name="volumeSelector"', 'class="QComboBox" name="volumeSelector"'), None,
     "parameter 'volume' (node) is bound to volumeSelector (QComboBox)"),
    (None, ("self.ui.section.collapsed", "self.ui.section.colapsed"), "self.ui.section.colapsed: ctkCollapsibleButton has no"),
    (None, ("self.ui.section.collapsed", "self.ui.volumeSelector.currentNodeIdentifier"), "self.ui.volumeSelector.currentNodeIdentifier"),
    (("</ui>", ""), None, "QUiLoader"),
])
def test_checker_catches_each_kind_of_fault(good, ui_change, py_change, expected):
    ui, py = GOOD_UI, GOOD_PY
    if ui_change:
        assert ui_change[0] in ui
        ui = ui.replace(ui_change[0], ui_change[1], 1)
    if py_change:
        assert py_change[0] in py
        py = py.replace(py_change[0], py_change[1], 1)
    if expected == "QUiLoader":  # a broken file: the XML parser already refuses it
        with pytest.raises(Exception):
            good(ui, py)
        return
    found = good(ui, py)
    assert any(expected in problem for problem in found), found


def test_signatures_are_normalised_as_qt_does():
    assert ui_checker.normalize_signature("void directoryChanged(const QString& path)") == "directoryChanged(QString)"
    assert ui_checker.normalize_signature("currentNodeChanged(vtkMRMLNode * node)") == "currentNodeChanged(vtkMRMLNode*)"
    assert ui_checker.normalize_signature("valueChanged(double)") == "valueChanged(double)"
    assert ui_checker._declaration_signatures("setValue", "double value, bool emit = true") == {
        "setValue(double)", "setValue(double,bool)"}
    assert ui_checker.normalize_signature("f(unsigned int)") == "f(unsigned int)"


@needs_headers
def test_headers_give_the_classes_their_real_interface(model):
    combo = ui_checker.parse_header("qMRMLNodeComboBox")
    assert "nodeTypes" in combo.properties and "currentNodeChanged(vtkMRMLNode*)" in combo.signals
    assert "setMRMLScene(vtkMRMLScene*)" in combo.slots
    # inherited through qSlicerWidget, and Qt's own signals from PySide6
    assert "mrmlSceneChanged(vtkMRMLScene*)" in model.signals("qSlicerMarkupsPlaceWidget")
    assert "clicked(QModelIndex)" in model.signals("qMRMLTableView")
    assert model.has_property("ctkCollapsibleButton", "checked") and model.has_property("ctkCollapsibleButton", "collapsed")


@needs_headers
def test_a_module_connector_extends_what_a_type_binds_to(good):
    """A module's own @parameterNodeGuiConnector (DINOSeg binds a str to a ctkDirectoryButton-like path widget)
    makes that binding legal; without it the same binding is a fault."""
    py = GOOD_PY.replace("    folder: pathlib.Path\n", "    folder: str\n")
    assert any("parameter 'folder' (str) is bound to folderButton" in p for p in good(GOOD_UI, py))
    connector = '''
@parameterNodeGuiConnector
class DirectoryButtonToStr(GuiConnector):
    @staticmethod
    def canRepresent(widget, datatype) -> bool:
        return type(widget) == ctk.ctkDirectoryButton and unannotatedType(datatype) is str
'''
    assert good(GOOD_UI, connector + py) == []
