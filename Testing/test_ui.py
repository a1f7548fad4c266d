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
S4EXT_FILE = ROOT / "DeepRegister.s4ext"

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
        "DeepRegisterLogic": ["ScriptedLoadableModuleLogic"],
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


def test_module_loads_without_torch(tree):
    """PyTorch and DeepRegisterLib (which needs it) are imported inside functions only, so Slicer can
    load the module and show its panel before PyTorch is installed."""
    for statement in tree.body:
        if isinstance(statement, ast.Import):
            names = [alias.name for alias in statement.names]
        elif isinstance(statement, ast.ImportFrom):
            names = [statement.module or ""]
        else:
            continue
        for name in names:
            assert name.split(".")[0] not in ("torch", "DeepRegisterLib", "safetensors", "numpy"), \
                f"top-level import of {name} in DeepRegister.py"


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


def test_extension_description_is_complete():
    entries = {}
    for line in S4EXT_FILE.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            entries[key] = value.strip()
    for key in ("scm", "scmurl", "depends", "category", "iconurl", "screenshoturls", "contributors",
                "description", "homepage", "status", "enabled"):
        assert entries.get(key), f"DeepRegister.s4ext: no {key}"
    assert entries["scm"] == "git" and entries["depends"] == "PyTorch" and entries["category"] == "Registration"
    assert entries["enabled"] == "1"
    raw = "https://raw.githubusercontent.com/deepregister/SlicerDeepRegister/main/"
    for url in [entries["iconurl"], *entries["screenshoturls"].split()]:
        assert url.startswith(raw), url
        assert (ROOT / url[len(raw):]).is_file(), f"{url} points to a file missing from the repository"


# -- the panel's Python against the real widgets -------------------------------------------------------
def stand_in_parameter_node_wrapper(cls):
    """Instances get the annotated fields with their defaults (None for nodes), like the real wrapper's."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    def __init__(self, parameterNode=None):
        for name, value in defaults.items():
            setattr(self, name, value)

    cls.__init__ = __init__
    cls.StartModify = lambda self: 0
    cls.EndModify = lambda self, wasModified: None
    return cls


@pytest.fixture
def module(monkeypatch):
    """DeepRegister.py imported with slicer-core plus stand-ins for what only the Slicer application has."""
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
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(scripted, name, type(name, (), {"__init__": lambda self, *args: None}))
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
    from DeepRegisterLib.logic import INITIAL_POSITIONS, SIMILARITIES

    widget, top = panel
    assert tuple(choice.value for choice in module.Similarity) == SIMILARITIES
    assert tuple(choice.value for choice in module.InitialPosition) == INITIAL_POSITIONS
    for name, choices in (("similarityComboBox", module.Similarity), ("initialPositionComboBox", module.InitialPosition)):
        combo = top.findChild(QComboBox, name)
        # The binding refills the items with label(); the .ui shows the same ones (screenshot, Designer).
        assert [combo.itemText(i) for i in range(combo.count())] == [choice.label() for choice in choices]
    widget._setItemToolTips()
    combo = top.findChild(QComboBox, "initialPositionComboBox")
    assert combo.itemData(2, Qt.ToolTipRole) == module.InitialPosition.PHYSICAL.description()
    assert "common frame" in combo.itemData(2, Qt.ToolTipRole)
