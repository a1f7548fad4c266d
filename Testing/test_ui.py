"""The Slicer module's panel (Resources/UI/DeepRegister.ui) against its Python (DeepRegister/DeepRegister.py).

Runs without Slicer: the .ui is loaded offscreen with PySide6's QUiLoader (Slicer's custom widgets
become the Qt classes they extend) and the module source is read with ``ast``. The panel tests at the
end import DeepRegister.py with stand-ins for the Slicer application's pieces that slicer-core lacks
(qt, slicer.i18n, slicer.parameterNodeWrapper, slicer.ScriptedLoadableModule) and drive the widget's
methods against the real widgets of the loaded .ui.
"""

import ast
import importlib.util
import os
import re
import struct
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before PySide6 is imported
pytest.importorskip("PySide6.QtUiTools")
from PySide6.QtCore import QFile, QObject, Qt, QtMsgType, qInstallMessageHandler  # noqa: E402
from PySide6.QtGui import QImage  # noqa: E402
from PySide6.QtUiTools import QUiLoader  # noqa: E402
from PySide6.QtWidgets import QApplication, QComboBox, QLabel, QWidget  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
UI_FILE = ROOT / "Resources" / "UI" / "DeepRegister.ui"
MODULE_FILE = ROOT / "DeepRegister" / "DeepRegister.py"
ICON_FILE = ROOT / "Resources" / "Icons" / "DeepRegister.png"

# Parameters deliberately not bound through SlicerParameterName: the model list is filled at run
# time (the binding's combo box connector needs fixed choices), the TRE table is shown by the code.
UNBOUND_PARAMETERS = {"model", "treTable"}
# Slicer widget -> parameter kinds its parameterNodeWrapper GUI connector accepts.
CONNECTABLE = {
    "qMRMLNodeComboBox": {"node"},
    "QCheckBox": {"bool"},
    "QSpinBox": {"int"},
    "QSlider": {"int"},
    "QDoubleSpinBox": {"float"},
    "ctkSliderWidget": {"float"},
    "QComboBox": {"enum"},
    "QLineEdit": {"str"},
}
SCENE_WIDGETS = {"qMRMLNodeComboBox", "qMRMLTableView", "qMRMLSubjectHierarchyTreeView",
                 "qMRMLSubjectHierarchyComboBox"}


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def app():
    return QApplication.instance() or QApplication([])


@pytest.fixture(scope="module")
def loaded(app):
    """(panel widget, Qt messages printed while loading it)."""
    messages = []

    def handler(kind, context, text):
        messages.append((kind, text))

    previous = qInstallMessageHandler(handler)
    try:
        loader = QUiLoader()
        file = QFile(str(UI_FILE))
        assert file.open(QFile.ReadOnly), f"cannot open {UI_FILE}"
        widget = loader.load(file)
        file.close()
        assert widget is not None, f"QUiLoader could not load {UI_FILE.name}: {loader.errorString()}"
        assert not loader.errorString(), loader.errorString()
    finally:
        qInstallMessageHandler(previous)
    yield widget, messages
    widget.deleteLater()


@pytest.fixture(scope="module")
def source():
    return MODULE_FILE.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def tree(source):
    return ast.parse(source, filename=str(MODULE_FILE))


@pytest.fixture(scope="module")
def ui_xml():
    return ET.parse(UI_FILE).getroot()


# -- helpers ---------------------------------------------------------------------------------------
def classes(tree):
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def decorator_names(node):
    names = set()
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        names.add(target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", ""))
    return names


def base_names(node):
    return [base.attr if isinstance(base, ast.Attribute) else base.id for base in node.bases]


def parameter_wrapper(tree):
    wrappers = [node for node in classes(tree).values() if "parameterNodeWrapper" in decorator_names(node)]
    assert len(wrappers) == 1, "expected exactly one @parameterNodeWrapper class"
    return wrappers[0]


def node_union(annotation):
    """["vtkMRMLA", "vtkMRMLB"] for Union[vtkMRMLA, vtkMRMLB, None] (what the wrapper needs for a selector
    of several node types), else None."""
    if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Union":
        names = [ast.unparse(element) for element in annotation.slice.elts]
        if names[-1] == "None" and all(name.startswith("vtkMRML") for name in names[:-1]):
            return names[:-1]
    return None


def parameter_kinds(tree):
    """Field name -> "node", "bool", "int", "float", "str" or "enum" from the wrapper's annotations."""
    enums = {name for name, node in classes(tree).items()
             if any(base in ("Enum", "enum.Enum") or base.endswith("Enum") for base in base_names(node))}
    kinds = {}
    for statement in parameter_wrapper(tree).body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        annotation = statement.annotation
        if isinstance(annotation, ast.Subscript) and getattr(annotation.value, "id", "") == "Annotated":
            annotation = annotation.slice.elts[0]
        name = annotation.id if isinstance(annotation, ast.Name) else ast.unparse(annotation)
        if name.startswith("vtkMRML") or node_union(annotation):
            kinds[statement.target.id] = "node"
        elif name in enums:
            kinds[statement.target.id] = "enum"
        else:
            kinds[statement.target.id] = name
    return kinds


def parameter_node_types(tree):
    """Field name -> list of MRML class names for node parameters."""
    node_types = {}
    for statement in parameter_wrapper(tree).body:
        if not isinstance(statement, ast.AnnAssign):
            continue
        if isinstance(statement.annotation, ast.Name) and statement.annotation.id.startswith("vtkMRML"):
            node_types[statement.target.id] = [statement.annotation.id]
        elif node_union(statement.annotation):
            node_types[statement.target.id] = node_union(statement.annotation)
    return node_types


def ui_widgets(ui_xml):
    """objectName -> (class, element) for every widget in the .ui."""
    return {element.get("name"): (element.get("class"), element) for element in ui_xml.iter("widget")}


def ui_property(element, name):
    for prop in element.findall("property"):
        if prop.get("name") == name:
            value = prop[0]
            if value.tag == "stringlist":
                return [item.text for item in value]
            return value.text
    return None


def custom_widgets(ui_xml):
    return {custom.findtext("class"): custom for custom in ui_xml.iter("customwidget")}


# -- the module source -----------------------------------------------------------------------------
def test_module_source_is_valid_python_with_the_module_classes(tree):
    defined = classes(tree)
    expected = {
        "DeepRegister": ["ScriptedLoadableModule"],
        "DeepRegisterWidget": ["ScriptedLoadableModuleWidget", "VTKObservationMixin"],
        # The library's MRML logic on the application's scene: one logic, no forwarding layer.
        "DeepRegisterLogic": ["RegistrationLogic", "ScriptedLoadableModuleLogic"],
        "DeepRegisterTest": ["ScriptedLoadableModuleTest"],
    }
    for name, bases in expected.items():
        assert name in defined, f"DeepRegister.py defines no class {name}"
        assert base_names(defined[name]) == bases, f"{name} should derive from {', '.join(bases)}"
    wrapper = parameter_wrapper(tree)
    assert wrapper.name == "DeepRegisterParameterNode"
    test_methods = [node.name for node in defined["DeepRegisterTest"].body
                    if isinstance(node, ast.FunctionDef) and node.name.startswith("test_")]
    assert test_methods, "DeepRegisterTest has no test_ methods"


def test_the_module_logic_is_the_library_logic(module):
    """Registration, results, TRE and display exist once, in DeepRegisterLib: the module's logic inherits them
    and overrides only the model choice (the installed models are the Slicer module's business)."""
    import slicer
    from DeepRegisterLib.display import ResultDisplay
    from DeepRegisterLib.logic import RegistrationLogic

    library = {name for cls in (RegistrationLogic, ResultDisplay) for name, value in vars(cls).items()
               if callable(value) or isinstance(value, (staticmethod, classmethod))}
    assert {"register", "measureTRE", "treStatistics", "showResults", "setFieldDisplay", "hardenTransform"} <= library
    assert library & set(vars(module.DeepRegisterLogic)) == {"__init__", "resolveModel"}
    logic = module.DeepRegisterLogic()
    assert isinstance(logic, RegistrationLogic) and logic.scene is slicer.mrmlScene
    assert logic.moduleName == "DeepRegister"


def test_parameter_node_has_the_documented_fields(tree):
    kinds = parameter_kinds(tree)
    assert kinds == {
        "fixedVolume": "node", "movingVolume": "node", "fixedMask": "node", "movingMask": "node",
        "detectFieldOfView": "bool", "model": "str", "device": "enum", "iterations": "int", "similarity": "enum",
        "initialPosition": "enum", "outputTransform": "node", "createWarpedVolume": "bool", "warpedVolume": "node",
        "saliencyVolume": "node", "saliencyOpacity": "float", "fieldDisplay": "enum", "fixedLandmarks": "node",
        "movingLandmarks": "node", "treTable": "node",
    }
    node_types = parameter_node_types(tree)
    assert node_types["fixedLandmarks"] == ["vtkMRMLMarkupsFiducialNode"]
    assert node_types["outputTransform"] == ["vtkMRMLTransformNode"]
    for mask in ("fixedMask", "movingMask"):
        assert node_types[mask] == ["vtkMRMLLabelMapVolumeNode", "vtkMRMLSegmentationNode"]


TORCH_FREE_MODULES = ("DeepRegisterLib.logic", "DeepRegisterLib.options", "DeepRegisterLib.resources")


def test_module_loads_without_torch(tree, monkeypatch):
    """PyTorch is imported inside functions only, so Slicer can load the module and show its panel before
    PyTorch is installed: at the top, DeepRegister.py imports only the library's torch-free MRML logic,
    options and resource lookup."""
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            names = [statement.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in ("torch", "safetensors"), f"top-level import of {name} in DeepRegister.py"
            assert name.split(".")[0] != "DeepRegisterLib" or name in TORCH_FREE_MODULES, name
    def library():
        return [name for name in sys.modules if name.split(".")[0] == "DeepRegisterLib"]

    monkeypatch.setitem(sys.modules, "torch", None)  # any import of torch now fails
    for name in library():
        monkeypatch.delitem(sys.modules, name)  # imported again below, without torch
    try:
        loaded = load_module(monkeypatch)
        assert loaded.DeepRegisterLogic().scene is not None
    finally:
        for name in library():  # the copies imported here; monkeypatch puts the earlier ones back
            del sys.modules[name]


def test_widget_loads_the_ui_file_through_resource_path(source):
    assert 'slicer.util.loadUI(self.resourcePath("UI/DeepRegister.ui"))' in source
    assert "slicer.util.childWidgetVariables(uiWidget)" in source
    assert ".connectGui(self.ui)" in source


# -- the panel -------------------------------------------------------------------------------------
def test_ui_loads_without_unexpected_qt_warnings(loaded):
    widget, messages = loaded
    assert isinstance(widget, QWidget)
    assert widget.objectName() == "DeepRegister"
    # Slicer's widgets are replaced by the classes they extend, whose signals lack mrmlSceneChanged;
    # anything else (a misspelt slot, an unknown signal of a Qt widget, bad XML) is a real problem.
    expected = re.compile(r"unable to create a custom widget of the class '(qMRML|ctk)\w+'; defaulting to base class"
                          r"|mrmlSceneChanged\(vtkMRMLScene\*\)|QObject::connect: +\((sender|receiver) name")
    unexpected = [text for kind, text in messages if kind != QtMsgType.QtDebugMsg and not expected.search(text)]
    assert not unexpected, unexpected


def test_every_ui_name_used_in_python_exists(loaded, source):
    widget, _ = loaded
    names = set(re.findall(r"\bself\.ui\.(\w+)", source)) | set(re.findall(r"\bwidget\.ui\.(\w+)", source))
    assert len(names) > 10, "expected the module to use its .ui widgets"
    missing = sorted(name for name in names if widget.findChild(QObject, name) is None)
    assert not missing, f"used as self.ui.<name> in DeepRegister.py but missing from DeepRegister.ui: {missing}"


def test_bound_widgets_name_parameters_of_the_wrapper(loaded, tree, ui_xml):
    widget, _ = loaded
    kinds = parameter_kinds(tree)
    node_types = parameter_node_types(tree)
    bound = {}
    for name, (cls, element) in ui_widgets(ui_xml).items():
        child = widget if name == widget.objectName() else widget.findChild(QObject, name)
        parameter = child.property("SlicerParameterName")
        if parameter is None:
            continue
        assert parameter in kinds, f"{name}: SlicerParameterName '{parameter}' is not a parameter node field"
        assert parameter not in bound, f"'{parameter}' is bound to both {bound[parameter]} and {name}"
        bound[parameter] = name
        assert kinds[parameter] in CONNECTABLE.get(cls, set()), \
            f"{name} ({cls}) cannot be bound to the {kinds[parameter]} parameter '{parameter}'"
        if kinds[parameter] == "node":
            assert ui_property(element, "nodeTypes") == node_types[parameter], \
                f"{name}: nodeTypes should be {node_types[parameter]}"
    assert set(bound) == set(kinds) - UNBOUND_PARAMETERS


def test_ui_classes_are_standard_qt_or_declared_custom_widgets(app, ui_xml):
    loader = QUiLoader()
    standard = set(loader.availableWidgets())
    custom = custom_widgets(ui_xml)
    for name, element in custom.items():
        extends, header = element.findtext("extends"), element.findtext("header")
        assert extends in standard or extends in custom, f"custom widget {name} extends unknown {extends}"
        assert header == f"{name}.h", f"custom widget {name} has header {header}"
    used = {cls for cls, _ in ui_widgets(ui_xml).values()}
    undeclared = sorted(used - standard - set(custom))
    assert not undeclared, f"classes neither standard Qt nor in <customwidgets>: {undeclared}"
    assert not set(custom) - used, f"declared but unused custom widgets: {sorted(set(custom) - used)}"
    layouts = {element.get("class") for element in ui_xml.iter("layout")}
    assert layouts <= set(loader.availableLayouts()), layouts
    assert ui_xml.find("widget").get("class") == "qMRMLWidget"


def test_every_mrml_widget_receives_the_scene(ui_xml):
    top = ui_xml.find("widget").get("name")
    receivers = {connection.findtext("receiver") for connection in ui_xml.iter("connection")
                 if connection.findtext("sender") == top
                 and connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and connection.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"}
    scene_widgets = {name for name, (cls, _) in ui_widgets(ui_xml).items() if cls in SCENE_WIDGETS}
    assert scene_widgets, "expected MRML node selectors in the panel"
    assert receivers == scene_widgets, f"without the scene: {sorted(scene_widgets - receivers)}"


def test_panel_sections_and_controls(loaded):
    widget, _ = loaded
    for name, text in (("inputsCollapsibleButton", "Inputs"), ("registrationCollapsibleButton", "Registration"),
                       ("outputsCollapsibleButton", "Outputs"), ("displayCollapsibleButton", "Display")):
        assert widget.findChild(QObject, name).property("text") == text
    assert widget.findChild(QObject, "registerButton").text() == "Register"
    assert widget.findChild(QObject, "cancelButton").text() == "Cancel"
    assert widget.findChild(QObject, "placeFixedLandmarksButton").text() == "Place fixed landmarks"
    assert widget.findChild(QObject, "placeMovingLandmarksButton").text() == "Place moving landmarks"
    spin = widget.findChild(QObject, "iterationsSpinBox")
    assert (spin.minimum(), spin.maximum(), spin.value()) == (-1, 2000, -1)
    assert spin.specialValueText(), "iterations -1 should read as the default"
    slider = widget.findChild(QObject, "saliencyOpacitySlider")
    assert (slider.property("minimum"), slider.property("maximum"), slider.property("value")) == (0.0, 1.0, 0.5)
    checkbox = widget.findChild(QObject, "detectFieldOfViewCheckBox")
    assert checkbox.text() == "Detect ultrasound field of view" and checkbox.isChecked()  # the wrapper's default
    models = widget.findChild(QComboBox, "modelComboBox")
    assert [models.itemText(i) for i in range(models.count())] == ["Default: best general model",
                                                                    "None (fine-tuning only)"]
    for name in ("fixedMaskSelector", "movingMaskSelector", "similarityComboBox", "initialPositionComboBox"):
        assert widget.findChild(QObject, name).toolTip(), f"{name} has no tooltip"


# -- assets ----------------------------------------------------------------------------------------
def test_icon_is_a_128_pixel_png(app):
    data = ICON_FILE.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    image = QImage(str(ICON_FILE))
    assert not image.isNull() and (image.width(), image.height()) == (128, 128)


# -- the panel's Python against the real widgets -------------------------------------------------------
def _field_kind(annotation):
    """("node" | "enum" | "bool" | "int" | "float" | "str", python type) of a parameter annotation."""
    import enum
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) is typing.Union or (isinstance(annotation, type)
                                                           and annotation.__name__.startswith("vtkMRML")):
        return "node", None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return "enum", annotation
    return annotation.__name__, annotation


def stand_in_parameter_node_wrapper(cls):
    """Like Slicer's @parameterNodeWrapper (v5.8.1, v5.10.0 Base/Python/slicer/parameterNodeWrapper): the
    annotated fields with their defaults (None for nodes). On a vtkMRMLScriptedModuleNode the fields live in
    the node, as in Slicer: a field missing from the node (a new node, or one reset by closing the scene)
    reads as its default, which is written back (wrapper._Parameter.read). Without a node (``cls()``),
    plain attributes."""
    annotations = dict(cls.__annotations__)
    defaults = {name: getattr(cls, name, None) for name in annotations}

    def field(name):
        kind, python_type = _field_kind(annotations[name])

        def write(node, value):
            if kind == "node":
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, str(value.value if kind == "enum" else value))

        def get(self):
            node = object.__getattribute__(self, "_node")
            if node is None:
                return self._values[name]
            if kind == "node":
                return node.GetNodeReference(name)
            if name not in node.GetParameterNames():
                write(node, defaults[name])
            text = node.GetParameter(name)
            if kind == "bool":
                return text == "True"
            return python_type(text)

        def set(self, value):
            node = object.__getattribute__(self, "_node")
            if node is None:
                self._values[name] = value
            else:
                write(node, value)

        return property(get, set)

    def __init__(self, parameterNode=None):
        object.__setattr__(self, "_node", parameterNode)
        object.__setattr__(self, "_values", dict(defaults))

    def __getattr__(self, name):  # AddObserver, GetID, ...: the node's, as the real wrapper forwards them
        node = object.__getattribute__(self, "_node")
        if node is None or name.startswith("_"):
            raise AttributeError(name)
        return getattr(node, name)

    for name in annotations:
        setattr(cls, name, field(name))
    cls.__init__ = __init__
    cls.__getattr__ = __getattr__
    cls.StartModify = lambda self: self._node.StartModify() if self._node is not None else 0
    cls.EndModify = lambda self, wasModified: self._node.EndModify(wasModified) if self._node is not None else None
    cls.connectGui = lambda self, ui: 1  # the binding itself is Slicer's; test_bound_widgets_* checks the names
    cls.disconnectGui = lambda self, tag: None
    return cls


class StandInLogic:
    """Slicer's ScriptedLoadableModuleLogic.getParameterNode (v5.8.1 and v5.10.0): one singleton
    vtkMRMLScriptedModuleNode per module in the application's scene, kept (but reset) when the scene closes."""

    def __init__(self, parent=None):
        super().__init__()  # as Slicer's: cooperative, so the module's logic must list it last among its bases
        name = type(self).__name__
        self.moduleName = name[:-len("Logic")] if name.endswith("Logic") else name
        self.isSingletonParameterNode = True

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node:
            if node.GetAttribute("ModuleName") != self.moduleName:
                node.SetAttribute("ModuleName", self.moduleName)
            return node
        node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)
        node.SetName(slicer.mrmlScene.GenerateUniqueName(self.moduleName))
        node.SetAttribute("ModuleName", self.moduleName)
        node.SetSingletonTag(self.moduleName)
        return slicer.mrmlScene.AddNode(node)


@pytest.fixture
def module(monkeypatch):
    """DeepRegister.py imported with slicer-core plus stand-ins for what only the Slicer application has."""
    return load_module(monkeypatch)


def load_module(monkeypatch):
    """Imports DeepRegister.py as the ``module`` fixture does (the stand-ins undone by ``monkeypatch``)."""
    import unittest

    slicer = pytest.importorskip("slicer")
    qt = types.ModuleType("qt")
    qt.Qt = Qt
    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = stand_in_parameter_node_wrapper
    wrapper.WithinRange = lambda low, high: (low, high)
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
    scripted.ScriptedLoadableModuleLogic = StandInLogic
    # A unittest.TestCase, as Slicer's is: ctest runs each test_ method through unittest.
    scripted.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,),
                                               {"delayDisplay": lambda self, message, *args, **kwargs: None})
    for name, stand_in in (("qt", qt), ("slicer.i18n", i18n), ("slicer.parameterNodeWrapper", wrapper),
                           ("slicer.ScriptedLoadableModule", scripted)):
        monkeypatch.setitem(sys.modules, name, stand_in)
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    spec = importlib.util.spec_from_file_location("DeepRegister_under_test", MODULE_FILE)
    loaded_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded_module)
    return loaded_module


class PythonQtStyle:
    """A Qt widget whose Qt properties read and write as attributes, as in Slicer's PythonQt
    (``label.text = "..."``); writing a name that is no Qt property of the widget fails."""

    def __init__(self, widget) -> None:
        object.__setattr__(self, "_widget", widget)

    def __getattr__(self, name):
        widget = object.__getattribute__(self, "_widget")
        if widget.metaObject().indexOfProperty(name) >= 0:
            return widget.property(name)
        return getattr(widget, name)

    def __setattr__(self, name, value) -> None:
        widget = object.__getattribute__(self, "_widget")
        assert widget.metaObject().indexOfProperty(name) >= 0, f"{type(widget).__name__} has no property '{name}'"
        widget.setProperty(name, value)


@pytest.fixture
def panel(module, app):
    """The module's widget (not set up: no Slicer application) on a freshly loaded .ui."""
    loader = QUiLoader()
    file = QFile(str(UI_FILE))
    assert file.open(QFile.ReadOnly)
    top = loader.load(file)
    file.close()
    widget = module.DeepRegisterWidget.__new__(module.DeepRegisterWidget)
    widget.__init__()
    widget.ui = types.SimpleNamespace(**{child.objectName(): PythonQtStyle(child)
                                         for child in top.findChildren(QWidget) if child.objectName()})
    widget.logic = module.DeepRegisterLogic()
    yield widget, top
    top.deleteLater()


def fake_card(name: str, iterations: int):
    from DeepRegisterLib.models import ModelCard

    return ModelCard(name=name, description=f"The {name} model.", architecture="unet", config={},
                     input_size=[64, 64, 64], spacing_mm=[2.0, 2.0, 2.0], finetune_iterations=iterations)


def test_panel_settings_reach_the_engine_and_warnings_the_status_line(module, panel, monkeypatch):
    import numpy as np
    import SimpleITK as sitk
    import slicer
    from DeepRegisterLib import registration
    from test_logic import FakeEngine, add_label_map, add_volume

    widget, top = panel
    warnings = ["The finetune stage was rejected: it made the alignment worse (MIND 0.31 -> 0.35).",
                "The result is the network stage: check it before relying on it."]
    engine = FakeEngine(warnings=warnings, kept_stage="network", min_jacobian=0.4)
    monkeypatch.setattr(registration, "register", engine)
    shown = []
    monkeypatch.setattr(slicer.util, "warningDisplay", lambda text, **options: shown.append((text, options)))

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 14, 16)).astype(np.float32))
    fixed, moving = add_volume(slicer.mrmlScene, image, "US"), add_volume(slicer.mrmlScene, image * 2.0, "MR")
    inside = np.zeros((12, 14, 16), np.uint8)
    inside[2:9, 3:10, 4:12] = 1
    mask_image = sitk.GetImageFromArray(inside)
    mask = add_label_map(slicer.mrmlScene, mask_image, "US fan")
    parameterNode = module.DeepRegisterParameterNode()
    parameterNode.fixedVolume, parameterNode.movingVolume, parameterNode.fixedMask = fixed, moving, mask
    parameterNode.detectFieldOfView = False
    parameterNode.similarity = module.Similarity.MIND
    parameterNode.initialPosition = module.InitialPosition.CENTERS
    parameterNode.model = module.NO_MODEL

    result = widget.logic.registerFromParameterNode(parameterNode)
    call = engine.calls[-1]
    assert (call["model"], call["similarity"], call["initial"], call["detect_fov"]) == (None, "mind", "centers", False)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(call["fixed_mask"]), inside)
    assert call["moving_mask"] is None and parameterNode.outputTransform is result.transformNode

    widget.showRegistrationResult(result, 2.5)
    status = top.findChild(QLabel, "statusLabel")
    lines = status.text().splitlines()
    assert lines[0].startswith("Warning") and "Registered" not in status.text()
    assert all(any(warning in line for line in lines[1:3]) for warning in warnings)
    assert "Took 2.5 s on CPU" in status.text() and "smallest Jacobian determinant 0.40" in status.text()
    assert "font-weight: bold" in status.styleSheet()
    assert len(shown) == 1 and all(warning in shown[0][0] for warning in warnings)

    engine.overrides["warnings"] = []
    widget.showRegistrationResult(widget.logic.registerFromParameterNode(parameterNode), 1.0)
    assert status.text().startswith("Registered in 1.0 s on CPU with no trained model")
    assert "Similarity: MIND; start: image centres aligned." in status.text()
    assert status.styleSheet() == "" and len(shown) == 1  # a plain success shows no message box


def test_model_choice_default_general_model_or_none(module, panel, monkeypatch):
    from DeepRegisterLib.models import default_model

    widget, top = panel
    cards = [fake_card("mrus", 100), fake_card("generic", 80)]
    monkeypatch.setattr(widget.logic, "availableModels", lambda: cards)
    monkeypatch.setattr(module.DeepRegisterLogic, "torchAvailable", staticmethod(lambda: True))
    best = default_model(cards)
    assert best in ("mrus", "generic")
    assert widget.logic.resolveModel("") == best and widget.logic.resolveModel(None) == best
    assert widget.logic.resolveModel("none") is None and widget.logic.resolveModel("None") is None
    assert widget.logic.resolveModel("mrus") == "mrus"
    monkeypatch.setattr(widget.logic, "availableModels", lambda: [])
    assert widget.logic.resolveModel("") is None  # nothing installed: fine-tuning alone
    monkeypatch.setattr(widget.logic, "availableModels", lambda: cards)

    widget._parameterNode = module.DeepRegisterParameterNode()
    assert widget._parameterNode.model == ""  # nothing chosen
    widget.populateModels()
    combo = top.findChild(QComboBox, "modelComboBox")
    items = [(combo.itemText(i), combo.itemData(i)) for i in range(combo.count())]
    assert items == [(f"Default: {best}", ""), ("mrus", "mrus"), ("generic", "generic"),
                     ("None (fine-tuning only)", "none")]
    assert combo.currentIndex() == 0
    description = top.findChild(QLabel, "modelDescriptionLabel").text()
    assert f"best general model installed ('{best}')" in description and "without --model" in description
    iterations = {card.name: card.finetune_iterations for card in cards}[best]
    assert top.findChild(QObject, "iterationsSpinBox").specialValueText() == f"Default ({iterations})"
    widget.onModelChanged(combo.count() - 1)
    assert widget._parameterNode.model == "none"
    widget._updateModelComboBoxFromParameterNode()
    assert "fine-tuning only" in top.findChild(QLabel, "modelDescriptionLabel").text()
    assert top.findChild(QObject, "iterationsSpinBox").specialValueText() == "Default (150)"


def test_enum_choices_match_the_library_and_the_ui(module, panel):
    from DeepRegisterLib.display import FIELD_MODES
    from DeepRegisterLib.logic import INITIAL_POSITIONS, SIMILARITIES

    widget, top = panel
    assert tuple(choice.value for choice in module.Similarity) == SIMILARITIES
    assert tuple(choice.value for choice in module.InitialPosition) == INITIAL_POSITIONS
    assert tuple(choice.value for choice in module.FieldDisplay) == FIELD_MODES
    for name, choices in (("similarityComboBox", module.Similarity), ("initialPositionComboBox", module.InitialPosition)):
        combo = top.findChild(QComboBox, name)
        # The binding refills the items with label(); the .ui shows the same ones (screenshot, Designer).
        assert [combo.itemText(i) for i in range(combo.count())] == [choice.label() for choice in choices]
    widget._setItemToolTips()
    combo = top.findChild(QComboBox, "initialPositionComboBox")
    assert combo.itemData(2, Qt.ToolTipRole) == module.InitialPosition.PHYSICAL.description()
    assert "common frame" in combo.itemData(2, Qt.ToolTipRole)


# -- issue #21: a real 3D Slicer ------------------------------------------------------------------
MODELS_DIR = ROOT / "Resources" / "Models"
SAMPLE_DATA_DIR = ROOT / "Resources" / "SampleData"
# SampleData.SampleDataLogic.registerCustomSampleDataSource's parameters, the same in Slicer v5.8.1 and
# v5.10.0 (Modules/Scripted/SampleData/SampleData.py).
SAMPLE_DATA_PARAMETERS = {"category", "sampleName", "uris", "fileNames", "nodeNames", "customDownloader",
                          "thumbnailFileName", "loadFileTypes", "loadFiles", "loadFileProperties", "checksums",
                          "loadFileType"}


def shipped_cards() -> dict:
    import json

    return {folder.name: json.loads((folder / "model.json").read_text(encoding="utf-8"))
            for folder in sorted(MODELS_DIR.iterdir()) if (folder / "model.json").is_file()}


def test_default_model_survives_a_scene_close_and_models_installed_later(module, panel, monkeypatch):
    """The model setting "" (no choice) is resolved when registering: a parameter node made before PyTorch
    and the models were there, kept through a scene close (singleton parameter nodes are reset, not removed),
    registers with models.default_model once they are."""
    import numpy as np
    import SimpleITK as sitk
    import slicer
    from DeepRegisterLib import registration
    from DeepRegisterLib.models import default_model, list_models
    from test_logic import FakeEngine, add_volume

    widget, top = panel
    widget.parent = types.SimpleNamespace(isEntered=True)
    scene = slicer.mrmlScene
    installed = module.DeepRegisterLogic.availableModels
    monkeypatch.setitem(sys.modules, "torch", None)  # no PyTorch yet ...
    monkeypatch.setattr(module.DeepRegisterLogic, "availableModels", lambda self: [])  # ... and no model
    widget.populateModels()
    widget.initializeParameterNode()
    singleton = scene.GetSingletonNode("DeepRegister", "vtkMRMLScriptedModuleNode")
    assert singleton is not None and widget._parameterNode.model == ""
    combo = top.findChild(QComboBox, "modelComboBox")
    assert combo.currentText() == "Default: best general model"

    widget.onSceneStartClose(scene, None)
    scene.Clear(0)
    widget.onSceneEndClose(scene, None)
    assert scene.GetSingletonNode("DeepRegister", "vtkMRMLScriptedModuleNode") is singleton  # kept, reset
    parameterNode = widget._parameterNode
    assert parameterNode is not None and parameterNode.model == ""

    # PyTorch and the models arrive (the Register button installs PyTorch); the panel is not reopened.
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(module.DeepRegisterLogic, "availableModels", installed)
    engine = FakeEngine()
    monkeypatch.setattr(registration, "register", engine)
    image = sitk.GetImageFromArray(np.random.default_rng(2).random((10, 12, 14)).astype(np.float32))
    parameterNode.fixedVolume = add_volume(scene, image, "US")
    parameterNode.movingVolume = add_volume(scene, image * 3.0, "MR")
    widget.logic.registerFromParameterNode(parameterNode)
    best = default_model(list_models())
    assert best == "generic"
    assert engine.calls[-1]["model"] == best
    assert parameterNode.model == ""  # still "no choice": it follows the installed models


def test_panel_lists_the_installed_models_without_torch(module, panel, monkeypatch):
    """Opening the panel reads the model cards only: it imports no PyTorch and lists the models before
    PyTorch is installed; the iterations box states the cards' defaults."""
    monkeypatch.setitem(sys.modules, "torch", None)
    widget, top = panel
    widget.populateModels()
    widget._parameterNode = module.DeepRegisterParameterNode()
    widget._updateModelComboBoxFromParameterNode()
    cards = shipped_cards()
    combo = top.findChild(QComboBox, "modelComboBox")
    items = [combo.itemText(i) for i in range(combo.count())]
    assert items == ["Default: generic", *cards, "None (fine-tuning only)"]
    spin = top.findChild(QObject, "iterationsSpinBox")
    assert spin.specialValueText() == f"Default ({cards['generic']['finetune_iterations']})"
    for name, card in cards.items():
        assert f"{card['finetune_iterations']} for {name}" in spin.toolTip()
    assert f"{module.DEFAULT_ITERATIONS_WITHOUT_MODEL} without a model" in spin.toolTip()
    assert sys.modules["torch"] is None  # nothing tried to import it (an import would have raised)


def test_texts_state_the_model_cards_defaults(ui_xml, module):
    """The iterations texts say what the engine does: each card's finetune_iterations and
    DEFAULT_ITERATIONS_WITHOUT_MODEL without a model. The panel writes them from the cards and the engine's
    constant; the .ui's own texts name no number, so they cannot go stale."""
    cards = shipped_cards()
    assert {name: card["finetune_iterations"] for name, card in cards.items()} == {"generic": 100, "mrus": 100}
    from DeepRegisterLib import registration

    without = registration.DEFAULT_ITERATIONS_WITHOUT_MODEL
    assert module.DEFAULT_ITERATIONS_WITHOUT_MODEL == without
    spin = ui_widgets(ui_xml)["iterationsSpinBox"][1]
    assert ui_property(spin, "specialValueText") == "Default"
    assert not re.search(r"\d", ui_property(spin, "toolTip"))
    tooltip = module.iterationsToolTip([fake_card(name, card["finetune_iterations"]) for name, card in cards.items()])
    assert f"{without} without a model" in tooltip and "100 for generic, 100 for mrus" in tooltip
    docstring = module.DeepRegisterParameterNode.__doc__
    assert not re.search(r"\b(100|150)\b", docstring), "the parameter node's docstring states no default"


def test_translated_texts_are_literals(tree):
    """Slicer's translation tools (lupdate) read the strings inside _() and translate(): each must be a
    literal; values are filled in with .format after translation."""
    offending = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name):
            continue
        if node.func.id == "_":
            texts = node.args
        elif node.func.id == "translate":
            texts = node.args[1:]
        else:
            continue
        if len(texts) != 1 or not (isinstance(texts[0], ast.Constant) and isinstance(texts[0].value, str)):
            offending.append(f"line {node.lineno}: {ast.unparse(node)}")
    assert not offending, offending


def test_self_tests_that_need_torch_skip_one_by_one(module, monkeypatch):
    """ctest runs each test_ method of DeepRegisterTest on its own (slicer.testing.runUnitTest ->
    unittest's loadTestsFromName): without PyTorch, those that need it are skipped, not errors."""
    import io
    import unittest

    monkeypatch.setitem(sys.modules, "torch", None)
    needs_torch = ["test_RegisterPhantomReducesTRE", "test_SegmentationMaskIsUsed", "test_CancelLeavesSceneUnchanged",
                   "test_WidgetEnablesRegister", "test_HardenAndSaveResults"]
    names = unittest.TestLoader().getTestCaseNames(module.DeepRegisterTest)
    needs_torch = [name for name in needs_torch if name in names]
    assert len(needs_torch) >= 4, names
    for name in needs_torch:
        suite = unittest.TestLoader().loadTestsFromName(name, module.DeepRegisterTest)
        result = unittest.TextTestRunner(stream=io.StringIO(), verbosity=0).run(suite)
        problems = [text for _test, text in result.errors + result.failures]
        assert not problems, f"{name}: {problems}"
        assert len(result.skipped) == 1 and "PyTorch" in result.skipped[0][1], name


def test_sample_data_is_registered_with_local_files(module, monkeypatch, tmp_path):
    """The bundled MR/TRUS pair is offered in the Sample Data module (category DeepRegister) from the
    extension's own files, with arguments Slicer 5.8.1 and 5.10.0 accept; a file:// URI is what
    SampleDataLogic.downloadFile fetches with urllib.request.urlretrieve."""
    import hashlib
    import urllib.request

    calls = []
    sample_data = types.ModuleType("SampleData")
    sample_data.SampleDataLogic = types.SimpleNamespace(registerCustomSampleDataSource=lambda **kw: calls.append(kw))
    monkeypatch.setitem(sys.modules, "SampleData", sample_data)
    module.registerSampleData()
    assert [call["sampleName"] for call in calls] == ["MR-TRUS prostate pair", "MR-TRUS gland label maps"]
    pair, glands = calls
    assert all(call["category"] == "DeepRegister" and set(call) <= SAMPLE_DATA_PARAMETERS for call in calls)
    assert pair["nodeNames"] == ["Sample fixed US", "Sample moving MR", "Sample fixed landmarks",
                                 "Sample moving landmarks"]
    assert glands["loadFileProperties"] == {"labelmap": True} and pair["loadFileProperties"] == {}
    for call in calls:
        assert len(call["uris"]) == len(call["fileNames"]) == len(call["nodeNames"]) == len(call["checksums"])
        for uri, file_name, checksum in zip(call["uris"], call["fileNames"], call["checksums"]):
            assert uri.startswith("file://") and file_name.startswith("DeepRegister-")
            copy = tmp_path / file_name
            urllib.request.urlretrieve(uri, copy)
            source = SAMPLE_DATA_DIR / file_name[len("DeepRegister-"):]
            assert copy.read_bytes() == source.read_bytes()
            assert checksum == "SHA256:" + hashlib.sha256(source.read_bytes()).hexdigest()
    # The names lead the panel to the right volumes (guessInputVolumes: us/fixed and mr/moving).
    import slicer

    fixed = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", pair["nodeNames"][0])
    moving = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", pair["nodeNames"][1])
    assert module.DeepRegisterLogic.guessInputVolumes(module.DeepRegisterParameterNode()) == (fixed, moving)
    source_text = MODULE_FILE.read_text(encoding="utf-8")
    assert 'slicer.app.connect("startupCompleted()", registerSampleData)' in source_text


def test_harden_and_save_buttons_follow_the_result(module, panel, monkeypatch, tmp_path):
    """Harden and Save are enabled only once a registration produced a result; Harden leaves the transform,
    Save asks before replacing files."""
    import numpy as np
    import SimpleITK as sitk
    import slicer
    from DeepRegisterLib import registration
    from test_logic import FakeEngine, add_volume

    widget, top = panel
    harden, save = top.findChild(QObject, "hardenButton"), top.findChild(QObject, "saveResultsButton")
    assert (harden.text(), save.text()) == ("Harden transform", "Save results...")
    assert not harden.isEnabled() and not save.isEnabled()  # the .ui's state before any result
    monkeypatch.setattr(registration, "register", FakeEngine())
    image = sitk.GetImageFromArray(np.random.default_rng(3).random((10, 12, 14)).astype(np.float32))
    parameterNode = module.DeepRegisterParameterNode()
    parameterNode.fixedVolume = add_volume(slicer.mrmlScene, image, "US")
    parameterNode.movingVolume = add_volume(slicer.mrmlScene, image * 2.0, "MR")
    widget._parameterNode = parameterNode
    widget._updateButtonStates()
    assert not harden.isEnabled() and not save.isEnabled()

    widget._lastResult = widget.logic.registerFromParameterNode(parameterNode)
    widget._updateButtonStates()
    assert harden.isEnabled() and save.isEnabled()
    asked = []
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", lambda text, title=None, **kw: asked.append(text) or False)
    monkeypatch.setattr(slicer.util, "errorDisplay", lambda text, **kw: asked.append(text))
    widget.saveResults(str(tmp_path))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saliency.nii.gz", "transform.h5"]
    assert not asked and "Saved transform.h5" in top.findChild(QLabel, "statusLabel").text()
    widget.saveResults(str(tmp_path))  # the files exist: asked, refused, kept
    assert len(asked) == 1 and "Replace them?" in asked[0]
    assert "were kept" in top.findChild(QLabel, "statusLabel").text()

    widget.onHardenButton()
    assert parameterNode.movingVolume.GetParentTransformNode() is None
    assert slicer.mrmlScene.GetNodeByID(parameterNode.outputTransform.GetID()) is not None
    assert not harden.isEnabled() and save.isEnabled()  # hardened once; the results can still be saved
    assert "transform hardened" in top.findChild(QLabel, "statusLabel").text()
    slicer.mrmlScene.RemoveNode(parameterNode.outputTransform)
    widget._updateButtonStates()
    assert not harden.isEnabled() and not save.isEnabled()
