"""Check a Slicer module's Qt Designer .ui file, and the module .py that uses it, against Slicer's real widget
headers, without a Slicer application.

- The ctk*/qMRML*/qSlicer* classes are read from the headers in ../shared/slicer-reference/headers: their
  Q_PROPERTYs, signals and slots (Qt-normalised signatures, with the overloads moc makes for default
  arguments), and their base classes (custom ones from their own headers, Qt ones from PySide6).
- Each becomes a placeholder PySide6 widget class (its Qt base class plus the header's Q_PROPERTYs as Qt
  properties, and the header's signals/slots as ``SIGNALS``/``SLOTS``), registered with ``QUiLoader``, which
  loads the .ui offscreen.
- ``problems(ui, module_py)`` lists, in plain words: properties a widget class does not have, <connection>s
  whose sender lacks the signal or receiver the slot, ``self.ui.X`` names the .ui lacks, ``X.connect("sig()")``
  signals the widget class lacks, parameters of the @parameterNodeWrapper class without a widget and
  SlicerParameterNames that name no parameter, and anything QUiLoader could not load.
"""
from __future__ import annotations

import ast
import os
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HEADERS = Path(__file__).resolve().parents[2] / "shared" / "slicer-reference" / "headers"
CUSTOM_PREFIXES = ("ctk", "qMRML", "qSlicer")
# the dynamic properties that Slicer reads (parameterNodeWrapper's SlicerParameterName and its packs)
DYNAMIC_PROPERTIES = {"SlicerParameterName", "SlicerPackParameterName"}


# -- signatures -----------------------------------------------------------------------------------------

def _normalize_type(param: str) -> str | None:
    """One C++ parameter as QMetaObject::normalizedSignature writes it: no name, no default, no const& on
    value types (``const QString& path = QString()`` -> ``QString``; ``vtkMRMLNode* node`` -> ``vtkMRMLNode*``)."""
    param = param.split("=")[0].strip()
    if not param or param == "void":
        return None
    param = re.sub(r"\bconst\b", "", param).replace("&", " ")
    param = re.sub(r"\s*\*\s*", "* ", param).strip()
    tokens = param.split()
    builtin_words = {"unsigned", "signed", "long", "short", "int", "char", "double", "float", "bool"}
    if len(tokens) > 1 and not tokens[-1].endswith("*") and not (tokens[-1] in builtin_words):
        tokens = tokens[:-1]  # the parameter's name
    return " ".join(tokens).replace(" *", "*").replace("* *", "**").replace("* ", "*").strip()


def _split_params(text: str) -> list[str]:
    params, depth, current = [], 0, ""
    for ch in text:
        depth += ch in "<("
        depth -= ch in ">)"
        if ch == "," and depth == 0:
            params.append(current)
            current = ""
        else:
            current += ch
    if current.strip():
        params.append(current)
    return params


def normalize_signature(signature: str) -> str:
    """``name(type, …)`` in Qt's normalised form; accepts C++ declarations and PythonQt strings alike."""
    match = re.match(r"^[^(]*?(\w+)\s*\((.*)\)[^)]*$", signature.strip(), re.S)  # any return type dropped
    if not match:
        return signature.strip()
    types = [t for t in (_normalize_type(p) for p in _split_params(match.group(2))) if t]
    return f"{match.group(1)}({','.join(types)})"


def _declaration_signatures(name: str, params: str) -> set[str]:
    """All signatures moc generates for a declaration: one per number of defaulted trailing arguments."""
    parts = _split_params(params)
    required = len([p for p in parts if "=" not in p])
    out = set()
    for count in range(required, len(parts) + 1):
        out.add(normalize_signature(f"{name}({','.join(parts[:count])})"))
    return out


# -- headers --------------------------------------------------------------------------------------------

@dataclass
class HeaderClass:
    name: str
    bases: list[str]
    properties: dict[str, str] = field(default_factory=dict)  # name -> C++ type
    signals: set[str] = field(default_factory=set)
    slots: set[str] = field(default_factory=set)
    invokables: set[str] = field(default_factory=set)  # Q_INVOKABLE method names (callable from Python)


def _strip_comments(text: str) -> str:
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r"//[^\n]*", "", text)


def find_header(class_name: str, headers: Path = HEADERS) -> Path | None:
    for sub in ("CTK", "Slicer"):
        path = headers / sub / f"{class_name}.h"
        if path.is_file():
            return path
    return None


def parse_header(class_name: str, headers: Path = HEADERS) -> HeaderClass:
    """The class ``class_name`` declared in its header ``<class_name>.h``."""
    path = find_header(class_name, headers)
    if path is None:
        raise FileNotFoundError(f"no header {class_name}.h in {headers}/CTK or {headers}/Slicer")
    text = _strip_comments(path.read_text(encoding="utf-8", errors="replace"))
    match = re.search(rf"\bclass\s+(?:\w+_EXPORT\s+)?{class_name}\s*:\s*([^{{;]+)\{{", text)
    if not match:
        raise ValueError(f"{path}: no declaration of class {class_name} with base classes")
    bases = [re.sub(r"\b(public|protected|private|virtual)\b", "", b).strip() for b in match.group(1).split(",")]
    body_start = match.end()
    depth, i = 1, body_start
    while depth and i < len(text):
        depth += text[i] == "{"
        depth -= text[i] == "}"
        i += 1
    body = text[body_start:i - 1]
    cls = HeaderClass(class_name, [b for b in bases if b])
    for prop in re.finditer(r"Q_PROPERTY\(\s*(.+?)\s+(\w+)\s+(?:READ|MEMBER)\b", body):
        cls.properties[prop.group(2)] = prop.group(1).strip()
    cls.invokables = set(re.findall(r"Q_INVOKABLE\s+[^;(]*?(\w+)\s*\(", body))
    section = None
    statement = ""
    for line in body.splitlines():
        stripped = line.strip()
        label = re.match(r"^(public|protected|private)?\s*(Q_SLOTS|slots|Q_SIGNALS|signals)?\s*:(?!:)\s*(.*)$", stripped)
        if label and (label.group(1) or label.group(2)):
            kind = label.group(2) or ""
            section = "signals" if "SIGNAL" in kind.upper() else "slots" if kind else None
            statement = ""
            stripped = label.group(3)
        if section is None or not stripped or stripped.startswith("#"):
            continue
        statement += " " + stripped
        if ";" not in statement and "{" not in statement:
            continue
        declaration = re.match(r"^\s*(?:virtual\s+|static\s+|Q_INVOKABLE\s+)*[\w:<>,\s\*&]+?[\s\*&](\w+)\s*\((.*)\)"
                               r"\s*(?:const)?\s*(?:override|final)?\s*(?:=\s*0)?\s*[;{]", statement, re.S)
        if declaration:
            target = cls.signals if section == "signals" else cls.slots
            target |= _declaration_signatures(declaration.group(1), declaration.group(2))
        statement = ""
    return cls


# -- placeholders ---------------------------------------------------------------------------------------

def _qt_class(name: str):
    from PySide6 import QtCore, QtWidgets

    return getattr(QtWidgets, name, None) or getattr(QtCore, name, None)


class WidgetModel:
    """What each class used in a .ui offers: the chain of header classes down to a Qt class, and the
    placeholder PySide6 class QUiLoader creates for it."""

    def __init__(self, headers: Path = HEADERS):
        self.headers = headers
        self._parsed: dict[str, HeaderClass] = {}
        self._placeholders: dict[str, type] = {}

    def chain(self, class_name: str) -> tuple[list[HeaderClass], object]:
        """The header classes from ``class_name`` up, and the first Qt base class (PySide6)."""
        chain, qt_base, todo = [], None, [(class_name, True)]
        while todo:
            name, primary = todo.pop(0)
            if name.startswith(CUSTOM_PREFIXES):
                if name not in self._parsed:
                    if not primary and find_header(name, self.headers) is None:
                        continue  # a non-QObject mixin such as qSlicerObject: no properties, signals or slots
                    self._parsed[name] = parse_header(name, self.headers)
                cls = self._parsed[name]
                chain.append(cls)
                todo.extend((b, i == 0) for i, b in enumerate(cls.bases)
                            if b.startswith(CUSTOM_PREFIXES) or _qt_class(b) is not None)
            elif qt_base is None and _qt_class(name) is not None:
                qt_base = _qt_class(name)
        return chain, qt_base

    def placeholder(self, class_name: str) -> type:
        if class_name in self._placeholders:
            return self._placeholders[class_name]
        from PySide6.QtCore import Property

        chain, qt_base = self.chain(class_name)
        if qt_base is None:
            raise ValueError(f"{class_name}: no Qt base class found in its headers")
        python_types = {"bool": bool, "int": int, "double": float, "float": float, "QString": str}
        attributes = {"SIGNALS": set(), "SLOTS": set(), "HEADER_PROPERTIES": {}}
        for header_class in reversed(chain):
            attributes["SIGNALS"] |= header_class.signals
            attributes["SLOTS"] |= header_class.slots
            attributes["HEADER_PROPERTIES"].update(header_class.properties)
        base_meta = qt_base.staticMetaObject
        for name, cpp_type in attributes["HEADER_PROPERTIES"].items():
            if base_meta.indexOfProperty(name) != -1:
                continue

            def getter(self, _name=name):
                return self.__dict__.get(_name)

            def setter(self, value, _name=name):
                self.__dict__[_name] = value

            attributes[name] = Property(python_types.get(cpp_type, object), getter, setter)
        placeholder = type(class_name, (qt_base,), attributes)
        self._placeholders[class_name] = placeholder
        return placeholder

    def has_property(self, class_name: str, name: str) -> bool:
        cls = self.placeholder(class_name) if class_name.startswith(CUSTOM_PREFIXES) else _qt_class(class_name)
        return cls is not None and cls.staticMetaObject.indexOfProperty(name) != -1

    def has_member(self, class_name: str, member: str) -> bool:
        """Whether Python (PythonQt) can reach ``widget.member``: a property, signal, slot or Q_INVOKABLE of the
        header classes, or anything of the Qt base class (PythonQt wraps Qt's own classes whole)."""
        if member in ("connect", "disconnect"):
            return True
        chain, qt_base = self.chain(class_name) if class_name.startswith(CUSTOM_PREFIXES) else ([], _qt_class(class_name))
        for cls in chain:
            names = set(cls.properties) | cls.invokables | {s.split("(")[0] for s in cls.signals | cls.slots}
            if member in names:
                return True
        return qt_base is not None and (hasattr(qt_base, member) or qt_base.staticMetaObject.indexOfProperty(member) != -1)

    def _qt_methods(self, qt_class, kinds) -> set[str]:
        from PySide6.QtCore import QMetaMethod

        meta = qt_class.staticMetaObject
        out = set()
        for i in range(meta.methodCount()):
            method = meta.method(i)
            if method.methodType() in kinds:
                out.add(bytes(method.methodSignature()).decode())
        return out

    def signals(self, class_name: str) -> set[str]:
        from PySide6.QtCore import QMetaMethod

        chain, qt_base = self.chain(class_name) if class_name.startswith(CUSTOM_PREFIXES) else ([], _qt_class(class_name))
        out = set().union(*(c.signals for c in chain)) if chain else set()
        return out | (self._qt_methods(qt_base, {QMetaMethod.MethodType.Signal}) if qt_base else set())

    def slots(self, class_name: str) -> set[str]:
        from PySide6.QtCore import QMetaMethod

        chain, qt_base = self.chain(class_name) if class_name.startswith(CUSTOM_PREFIXES) else ([], _qt_class(class_name))
        out = set().union(*(c.slots for c in chain)) if chain else set()
        return out | (self._qt_methods(qt_base, {QMetaMethod.MethodType.Slot}) if qt_base else set())


# -- the checks -----------------------------------------------------------------------------------------

def application():
    """The one offscreen QApplication of this process."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtWidgets import QApplication

    return QApplication.instance() or QApplication([])


def load_ui(ui_text: str, model: WidgetModel, classes: set[str]):
    """Load the .ui text with QUiLoader, the custom classes replaced by placeholders. Returns (widget, messages)."""
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice, qInstallMessageHandler
    from PySide6.QtUiTools import QUiLoader

    application()
    loader = QUiLoader()
    for name in sorted(classes):
        if name.startswith(CUSTOM_PREFIXES):
            loader.registerCustomWidget(model.placeholder(name))
    messages = []
    previous = qInstallMessageHandler(lambda mode, context, message: messages.append(message))
    try:
        buffer = QBuffer()
        buffer.setData(QByteArray(ui_text.encode()))
        buffer.open(QIODevice.OpenModeFlag.ReadOnly)
        widget = loader.load(buffer)
    finally:
        qInstallMessageHandler(previous)
    if widget is None:
        messages.append(f"QUiLoader could not load the .ui: {loader.errorString()}")
    return widget, messages


# Which widget class parameterNodeWrapper can bind to which parameter type: the canRepresent() of each
# connector in Slicer's Base/Python/slicer/parameterNodeWrapper/guiConnectors.py (exact classes: type(widget) ==).
COMBO_BOXES = {"QComboBox", "ctkComboBox"}  # int/float/str/bool with a Choice(...) annotation, or an Enum
CONNECTOR_WIDGETS = {
    "bool": {"QCheckBox", "ctkCheckBox", "QPushButton", "ctkCheckablePushButton"},
    "int": {"QSlider", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider",
            "ctkDoubleSpinBox", "qMRMLSpinBox"},
    "float": {"QDoubleSpinBox", "ctkSliderWidget", "qMRMLSliderWidget", "ctkDoubleSlider", "ctkDoubleSpinBox",
              "qMRMLSpinBox"},
    "str": {"QLineEdit", "QLabel", "QTextEdit"},
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "node": {"qMRMLNodeComboBox"},
    "FloatRange": {"ctkRangeWidget", "ctkDoubleRangeSlider", "qMRMLRangeWidget"},
    "QColor": {"ctkColorPickerButton"},
}
PATH_TYPES = {"Path", "PosixPath", "WindowsPath", "PurePath", "PurePosixPath", "PureWindowsPath"}


def _annotation_kind(annotation: ast.expr) -> tuple[str | None, bool]:
    """(the parameter's unannotated type as CONNECTOR_WIDGETS names it, whether it carries a Choice(...))."""
    choice = False
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", getattr(annotation.value, "attr", "")) == "Annotated":
        elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
        annotation = elements[0]
        choice = any(isinstance(e, ast.Call) and getattr(e.func, "id", getattr(e.func, "attr", "")) == "Choice"
                     for e in elements[1:])
    names = [getattr(n, "id", None) or getattr(n, "attr", None) for n in ast.walk(annotation)
             if isinstance(n, (ast.Name, ast.Attribute))]
    names = [n for n in names if n not in ("Optional", "Union", "pathlib", "slicer", "qt", "None")]
    if names and all(n.startswith("vtkMRML") for n in names):
        return "node", choice
    if len(names) == 1:
        return ("Path" if names[0] in PATH_TYPES else names[0]), choice
    return None, choice


def parameter_types(module_source: str) -> dict[str, tuple[str | None, bool]]:
    """parameter -> (its type kind, has Choice) for the module's @parameterNodeWrapper class(es)."""
    out = {}
    for node in ast.parse(module_source).body:
        if isinstance(node, ast.ClassDef) and any(
                (getattr(d, "id", None) or getattr(d, "attr", None)) == "parameterNodeWrapper" for d in node.decorator_list):
            for statement in node.body:
                if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                    out[statement.target.id] = _annotation_kind(statement.annotation)
    return out


def module_connectors(module_source: str) -> dict[str, set[str]]:
    """Type kind -> widget classes that the module's own ``@parameterNodeGuiConnector`` classes bind, read from
    their ``canRepresent`` (``type(widget) == ctk.ctkPathLineEdit and unannotatedType(datatype) is str``)."""
    out: dict[str, set[str]] = {}
    for node in ast.parse(module_source).body:
        if isinstance(node, ast.ClassDef) and any(
                (getattr(d, "id", None) or getattr(d, "attr", None)) == "parameterNodeGuiConnector" for d in node.decorator_list):
            for statement in node.body:
                if isinstance(statement, ast.FunctionDef) and statement.name == "canRepresent":
                    text = ast.unparse(statement)
                    kinds = re.findall(r"unannotatedType\(\w+\) is (\w+)", text)
                    classes = re.findall(r"type\(\w+\) == (?:\w+\.)?(\w+)", text)
                    for kind in kinds:
                        out.setdefault("Path" if kind in PATH_TYPES else kind, set()).update(classes)
    return out


def parameter_fields(module_source: str) -> set[str]:
    """The parameters of the module's @parameterNodeWrapper class(es)."""
    fields = set()
    for node in ast.parse(module_source).body:
        if isinstance(node, ast.ClassDef) and any(
                (getattr(d, "id", None) or getattr(d, "attr", None)) == "parameterNodeWrapper" for d in node.decorator_list):
            fields |= {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
    return fields


def problems(ui_text: str, module_source: str, model: WidgetModel | None = None, ui_name: str = "the .ui") -> list[str]:
    """Everything that would fail in Slicer, in plain words (empty when the pair is consistent)."""
    model = model or WidgetModel()
    root = ET.fromstring(ui_text)
    found = []
    widgets = {w.get("name"): w.get("class") for w in root.iter("widget")}
    try:
        widget, messages = load_ui(ui_text, model, set(widgets.values()))
    except (FileNotFoundError, ValueError) as exc:
        return [f"{ui_name}: {exc}"]
    # QUiLoader cannot connect the placeholders' header signals (they are not real Qt signals); the
    # <connection>s are checked against the headers below instead
    found += [f"{ui_name}: QUiLoader: {m}" for m in messages if not m.startswith("QObject::connect")]

    # properties set in the .ui
    for element in root.iter("widget"):
        name, class_name = element.get("name"), element.get("class")
        for prop in element.findall("property"):
            prop_name = prop.get("name")
            if prop.get("stdset") == "0":
                if prop_name not in DYNAMIC_PROPERTIES:
                    found.append(f"{ui_name}: {name} ({class_name}) sets the dynamic property {prop_name!r}; "
                                 f"Slicer reads only {sorted(DYNAMIC_PROPERTIES)}")
            elif not model.has_property(class_name, prop_name):
                found.append(f"{ui_name}: {name} ({class_name}) has no property {prop_name!r}")
    for element in root.iter("layout"):
        from PySide6 import QtWidgets

        layout_class = getattr(QtWidgets, element.get("class"), None)
        for prop in element.findall("property"):
            if layout_class is None or (layout_class.staticMetaObject.indexOfProperty(prop.get("name")) == -1
                                        and not prop.get("name").startswith(("left", "top", "right", "bottom"))):
                found.append(f"{ui_name}: layout {element.get('name')} ({element.get('class')}) has no property "
                             f"{prop.get('name')!r}")

    # <connection>s
    for connection in root.iter("connection"):
        sender, receiver = connection.findtext("sender"), connection.findtext("receiver")
        signal, slot = normalize_signature(connection.findtext("signal")), normalize_signature(connection.findtext("slot"))
        for role, who in (("sender", sender), ("receiver", receiver)):
            if who not in widgets:
                found.append(f"{ui_name}: connection {role} {who!r} is not a widget of the .ui")
        if sender in widgets and signal not in model.signals(widgets[sender]):
            found.append(f"{ui_name}: connection: {sender} ({widgets[sender]}) has no signal {signal}")
        if receiver in widgets and slot not in model.slots(widgets[receiver]) | model.signals(widgets[receiver]):
            found.append(f"{ui_name}: connection: {receiver} ({widgets[receiver]}) has no slot {slot}")

    # the module's Python
    for used in sorted(set(re.findall(r"self\.ui\.(\w+)", module_source))):
        if used not in widgets:
            found.append(f"module: self.ui.{used} is not a widget of {ui_name}")
    for used, signal in re.findall(r"self\.ui\.(\w+)\.connect\(\s*['\"]([^'\"]+)['\"]", module_source):
        if used in widgets and normalize_signature(signal) not in model.signals(widgets[used]):
            found.append(f"module: self.ui.{used} ({widgets[used]}) has no signal {normalize_signature(signal)}")

    for used, member in sorted(set(re.findall(r"self\.ui\.(\w+)\.(\w+)", module_source))):
        if used in widgets and not model.has_member(widgets[used], member):
            found.append(f"module: self.ui.{used}.{member}: {widgets[used]} has no property, signal, slot or "
                         f"Q_INVOKABLE {member!r} that Python could reach")

    # parameterNodeWrapper bindings
    bound: dict[str, list[str]] = {}
    for element in root.iter("widget"):
        for prop in element.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound.setdefault(prop.findtext("string"), []).append(element.get("name"))
    fields = parameter_fields(module_source)
    for parameter in sorted(fields - set(bound)):
        found.append(f"module: parameter {parameter!r} has no widget (no SlicerParameterName {parameter!r} in {ui_name})")
    for parameter in sorted(set(bound) - fields):
        found.append(f"{ui_name}: SlicerParameterName {parameter!r} of {bound[parameter]} names no parameter")
    classes_by_name = widgets
    own_connectors = module_connectors(module_source)
    for parameter, (kind, choice) in sorted(parameter_types(module_source).items()):
        for name in bound.get(parameter, []):
            widget_class = classes_by_name.get(name)
            allowed = CONNECTOR_WIDGETS.get(kind)
            if allowed is not None:
                allowed = allowed | own_connectors.get(kind, set())
            if allowed is None:
                continue  # an enum or a type this table does not know: not checked
            if widget_class in COMBO_BOXES and kind in ("int", "float", "str", "bool"):
                if not choice:
                    found.append(f"module: parameter {parameter!r} is bound to the combo box {name} but has no "
                                 "Choice(...) annotation (parameterNodeWrapper requires one)")
            elif widget_class not in allowed:
                found.append(f"{ui_name}: parameter {parameter!r} ({kind}) is bound to {name} ({widget_class}); "
                             f"parameterNodeWrapper binds a {kind} only to {sorted(allowed | (COMBO_BOXES if kind in ('int', 'float', 'str', 'bool') else set()))}")
    for parameter, names in sorted(bound.items()):
        if len(names) > 1:
            found.append(f"{ui_name}: parameter {parameter!r} is bound to several widgets {names}")
    if widget is not None:
        widget.deleteLater()
    return found
