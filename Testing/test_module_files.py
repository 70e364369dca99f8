"""Static checks of the Slicer modules: CMake lists every script and resource, every widget the code names
exists in the .ui, every parameter is bound to a widget, and the Libs stay free of Qt, torch and dinomed."""
from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("DINOSeg", "DINOPretrain")


def cmake_list(module: str, variable: str) -> list[str]:
    text = (ROOT / module / "CMakeLists.txt").read_text()
    block = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [line.strip().replace("${MODULE_NAME}", module) for line in block.splitlines() if line.strip()]


def ui_tree(module: str) -> ET.Element:
    return ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui").getroot()


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_every_script_and_resource(module):
    folder = ROOT / module
    scripts = sorted(str(p.relative_to(folder)) for p in folder.glob("*.py")) + sorted(
        str(p.relative_to(folder)) for p in (folder / f"{module}Lib").rglob("*.py") if "__pycache__" not in p.parts)
    resources = sorted(str(p.relative_to(folder)) for p in (folder / "Resources").rglob("*") if p.is_file())
    assert sorted(cmake_list(module, "MODULE_PYTHON_SCRIPTS")) == sorted(scripts)
    assert sorted(cmake_list(module, "MODULE_PYTHON_RESOURCES")) == resources
    assert f"Resources/Icons/{module}.png" in resources and f"Resources/UI/{module}.ui" in resources


def test_extension_cmake_adds_both_modules():
    text = (ROOT / "CMakeLists.txt").read_text()
    for module in MODULES:
        assert f"add_subdirectory({module})" in text
    assert "find_package(Slicer REQUIRED)" in text and "Slicer_EXTENSION_CPACK" in text
    assert (ROOT / "Resources" / "Icons" / "DINOSeg.png").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_code_names_exists_in_the_ui(module):
    names = {w.get("name") for w in ui_tree(module).iter("widget")}
    code = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    assert used, "the widget uses no .ui widgets?"
    assert used <= names, f"not in {module}.ui: {sorted(used - names)}"


def parameter_fields(module: str) -> set[str]:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list):
            return {s.target.id for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError(f"no @parameterNodeWrapper class in {module}.py")


@pytest.mark.parametrize("module", MODULES)
def test_parameters_and_widgets_are_bound_one_to_one(module):
    bound = {}
    for widget in ui_tree(module).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = widget.get("name")
    assert set(bound) == parameter_fields(module)


@pytest.mark.parametrize("module", MODULES)
def test_ui_declares_its_custom_widgets_and_scene_connections(module):
    root = ui_tree(module)
    declared = {c.find("class").text for c in root.iter("customwidget")}
    used = {w.get("class") for w in root.iter("widget")}
    qt_builtin = {c for c in used if c.startswith("Q")}
    assert used - qt_builtin <= declared
    mrml = {w.get("name") for w in root.iter("widget") if w.get("class") in ("qMRMLNodeComboBox", "qMRMLTableView", "qSlicerMarkupsPlaceWidget")}
    connected = {c.find("receiver").text for c in root.iter("connection") if c.find("signal").text == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml == connected


FORBIDDEN = {"torch", "dinomed", "qt", "ctk", "PythonQt", "monai", "timm"}


@pytest.mark.parametrize("module", MODULES)
def test_libs_import_no_qt_torch_or_dinomed(module):
    for path in (ROOT / module / f"{module}Lib").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
