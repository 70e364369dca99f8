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


# -- Slicer conventions and the in-Slicer test -----------------------------------------------------------------

REFERENCE = ROOT.parent / "shared" / "slicer-reference"


def module_class_init(module: str) -> ast.FunctionDef:
    tree = ast.parse((ROOT / module / f"{module}.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == module)
    return next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "__init__")


def assigned(init: ast.FunctionDef, attribute: str) -> ast.expr:
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Attribute) and t.attr == attribute for t in node.targets):
            return node.value
    raise AssertionError(f"self.parent.{attribute} is not set")


def called_name(node: ast.expr) -> str | None:
    """The function a call expression calls (``_("…").format(…)`` counts as ``_``)."""
    while isinstance(node, ast.Call):
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "format" and isinstance(func.value, ast.Call):
            node = func.value
            continue
        return getattr(func, "id", None) or getattr(func, "attr", None)
    return None


@pytest.mark.parametrize("module", MODULES)
def test_module_metadata_follows_the_scripted_module_template(module):
    """As Utilities/Templates/Modules/Scripted/TemplateKey.py: _() on title, help and acknowledgement,
    translate("qSlicerAbstractCoreModule", …) on categories, contributors "Name (Organization)", and a link
    to the documentation in the help text."""
    init = module_class_init(module)
    for attribute in ("title", "helpText", "acknowledgementText"):
        assert called_name(assigned(init, attribute)) == "_", f"{module}: {attribute} is not marked with _()"
    categories = assigned(init, "categories")
    assert all(called_name(c) == "translate" and c.args[0].value == "qSlicerAbstractCoreModule" for c in categories.elts)
    contributors = [c.value for c in assigned(init, "contributors").elts]
    assert contributors and all(re.fullmatch(r"[^()]+ \([^()]+\)", c) for c in contributors), contributors
    help_text = ast.unparse(assigned(init, "helpText"))
    assert '<a href="{url}">documentation</a>' in help_text and "readme_url()" in help_text


def test_readme_link_points_at_an_existing_readme():
    from DINOSegLib import docs

    url = docs.readme_url()
    assert url.startswith("file://") and (ROOT / "README.md").as_uri() == url
    cmake = (ROOT / "CMakeLists.txt").read_text()
    assert re.search(r"install\(FILES \$\{CMAKE_CURRENT_SOURCE_DIR\}/README.md\s+DESTINATION "
                     r"\$\{Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR\}/Resources", cmake)


@pytest.mark.skipif(not (REFERENCE / "Modules" / "Scripted" / "SampleData" / "SampleData.py").is_file(),
                    reason=f"Slicer's SampleData.py is read from {REFERENCE}, which is absent")
def test_sample_data_registration_uses_sampledata_as_it_is():
    """Every keyword DINOSeg passes exists in Slicer's real registerCustomSampleDataSource, the deprecated
    loadFileType is not used, and the sample's own loader tags the PET as SUV."""
    reference = ast.parse((REFERENCE / "Modules" / "Scripted" / "SampleData" / "SampleData.py").read_text())
    register = next(n for n in ast.walk(reference)
                    if isinstance(n, ast.FunctionDef) and n.name == "registerCustomSampleDataSource")
    accepted = {a.arg for a in register.args.args}
    tree = ast.parse((ROOT / "DINOSeg" / "DINOSeg.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and called_name(n) == "registerCustomSampleDataSource")
    keywords = {k.arg for k in call.keywords}
    assert keywords <= accepted, keywords - accepted
    assert "loadFileTypes" in keywords and "loadFileType" not in keywords
    downloader = next(k.value.id for k in call.keywords if k.arg == "customDownloader")
    function = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == downloader)
    calls = {called_name(n) for n in ast.walk(function) if isinstance(n, ast.Call)}
    assert "downloadFromSource" in calls and calls & {"show_pet_ct", "set_suv_units"}
    # display.show_pet_ct tags the PET (tested against a real scene in test_dinoseg_display.py)
    display = ast.parse((ROOT / "DINOSeg" / "DINOSegLib" / "display.py").read_text())
    show = next(n for n in display.body if isinstance(n, ast.FunctionDef) and n.name == "show_pet_ct")
    assert "set_suv_units" in {called_name(n) for n in ast.walk(show) if isinstance(n, ast.Call)}


def cmake_value(name: str) -> str:
    text = (ROOT / "CMakeLists.txt").read_text()
    return re.search(rf'set\({name}\s+"([^"]*)"', text).group(1)


def test_extension_urls_name_files_that_exist_and_no_invented_address():
    text = (ROOT / "CMakeLists.txt").read_text()
    assert "github.com/dinoseg" not in text  # the old placeholder address
    assert cmake_value("EXTENSION_HOMEPAGE") in ("file://${CMAKE_CURRENT_SOURCE_DIR}/README.md",
                                                 "${DINOSEG_REPOSITORY_URL}#in-3d-slicer--510")
    urls = cmake_value("EXTENSION_ICONURL").split() + cmake_value("EXTENSION_SCREENSHOTURLS").split()
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith("${_dinoseg_files}/"), url
        assert (ROOT / url[len("${_dinoseg_files}/"):]).is_file(), url
    assert re.fullmatch(r"[^()]+ \([^()]+\)", cmake_value("EXTENSION_CONTRIBUTORS"))


def test_in_slicer_segmentation_test_is_off_by_default():
    """ctest runs every test_* method of DINOSegTest on the build machines (slicer.testing.runUnitTest): the
    one that needs torch and dinomed returns at once unless DINOSEG_TEST_SEGMENTATION (or runTest's
    segmentation=True) turns it on; CMake's DINOSeg_TEST_SEGMENTATION option is OFF."""
    tree = ast.parse((ROOT / "DINOSeg" / "DINOSeg.py").read_text())
    test_class = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "DINOSegTest")
    methods = {n.name: n for n in test_class.body if isinstance(n, ast.FunctionDef)}
    heavy = [m for name, m in methods.items() if name.startswith("test_") and {
        called_name(n) for n in ast.walk(m) if isinstance(n, ast.Call)} & {"segment", "ensure_in_slicer", "start_segmentation"}]
    assert heavy, "no test of DINOSegTest runs a segmentation?"
    for method in heavy:
        gate = method.body[0]
        assert isinstance(gate, ast.If) and "_segmentationEnabled" in ast.unparse(gate.test), method.name
        assert isinstance(gate.body[-1], ast.Return), method.name
    assert "DINOSEG_TEST_SEGMENTATION" in ast.unparse(methods["_segmentationEnabled"])
    cmake = (ROOT / "DINOSeg" / "CMakeLists.txt").read_text()
    assert re.search(r"option\(DINOSeg_TEST_SEGMENTATION .*\bOFF\)", cmake)
