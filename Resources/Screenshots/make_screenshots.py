"""Render the README's screenshots headless with the project's own code.

Usage: OMP_NUM_THREADS=2 .venv/bin/python Resources/Screenshots/make_screenshots.py [--panel]
Registers the bundled sample pair through the Slicer module's logic on a real MRML scene, shows the
results as the module does (fixed background, moving foreground, joint saliency overlay with legend,
displacement field, landmarks) and captures the Red/Yellow/Green views with Slicer's displayable managers.

``--panel`` renders only the module panel (panel-designer.png): Resources/UI/DeepRegister.ui loaded with
PySide6 offscreen, Slicer's custom widgets drawn by plain Qt stand-ins (node selectors as combo boxes
showing the sample data's names, collapsible sections as group boxes, the TRE table's columns).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import slicer
import vtk

from DeepRegisterLib import mrml
from DeepRegisterLib.imageio import read_image
from DeepRegisterLib.landmarks import read_landmarks
from DeepRegisterLib.logic import RegistrationLogic
from DeepRegisterLib.tools.sliceviews import SliceViews

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "SampleData"
OUT = ROOT / "Resources" / "Screenshots"
UI_FILE = ROOT / "Resources" / "UI" / "DeepRegister.ui"
# What the node selectors show in the panel screenshot: the sample data loaded from the Sample Data module
# (DeepRegister.py SAMPLE_DATA_SETS names the nodes), outputs not yet created.
PANEL_NODES = {"fixedVolumeSelector": "Sample fixed US", "movingVolumeSelector": "Sample moving MR",
               "fixedLandmarksSelector": "Sample fixed landmarks", "movingLandmarksSelector": "Sample moving landmarks"}
TRE_COLUMNS = ["Pair", "Label", "Before (mm)", "After (mm)", "Worst"]


def render_panel(path: Path, width: int = 420) -> None:
    """The module panel as a PNG (see the module docstring)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QFile, Qt
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import (QApplication, QComboBox, QDoubleSpinBox, QGroupBox, QHBoxLayout, QHeaderView,
                                   QSlider, QTableWidget, QWidget)

    class SliderWidget(QWidget):
        """ctkSliderWidget: a slider and a spin box."""

        def __init__(self, parent=None) -> None:
            super().__init__(parent)
            layout = QHBoxLayout(self)
            layout.setContentsMargins(0, 0, 0, 0)
            self.slider, self.spinBox = QSlider(Qt.Horizontal), QDoubleSpinBox()
            layout.addWidget(self.slider)
            layout.addWidget(self.spinBox)

        def configure(self) -> None:
            low, high, value = (float(self.property(name)) for name in ("minimum", "maximum", "value"))
            self.spinBox.setDecimals(int(self.property("decimals")))
            self.spinBox.setRange(low, high)
            self.spinBox.setValue(value)
            self.slider.setRange(0, 100)
            self.slider.setValue(round(100 * (value - low) / (high - low)))

    stand_ins = {"qMRMLNodeComboBox": QComboBox, "ctkCollapsibleButton": QGroupBox, "ctkSliderWidget": SliderWidget,
                 "qMRMLTableView": QTableWidget, "qMRMLWidget": QWidget}

    class Loader(QUiLoader):
        def createWidget(self, className, parent=None, name=""):
            if className in stand_ins:
                widget = stand_ins[className](parent)
                widget.setObjectName(name)
                return widget
            return super().createWidget(className, parent, name)

    app = QApplication.instance() or QApplication(sys.argv[:1])
    file = QFile(str(UI_FILE))
    file.open(QFile.ReadOnly)
    panel = Loader().load(file)
    file.close()
    for box in panel.findChildren(QGroupBox):
        box.setTitle("\u25bc " + str(box.property("text")))
    for combo in panel.findChildren(QComboBox):
        if combo.property("nodeTypes") is not None:  # a node selector
            combo.addItem(PANEL_NODES.get(combo.objectName()) or combo.property("noneDisplay") or "None")
    for slider in panel.findChildren(SliderWidget):
        slider.configure()
    for table in panel.findChildren(QTableWidget):
        table.setColumnCount(len(TRE_COLUMNS))
        table.setHorizontalHeaderLabels(TRE_COLUMNS)
        table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()
    panel.findChild(QWidget, "progressBar").hide()  # shown only while registering
    panel.findChild(QWidget, "registerButton").setEnabled(True)  # two different volumes are selected
    # The model list as the panel fills it: no choice = the best general model installed.
    from DeepRegisterLib.models import default_model, list_models

    cards = {card.name: card for card in list_models()}
    default = default_model(list(cards.values()))
    if default:
        panel.findChild(QComboBox, "modelComboBox").setItemText(0, f"Default: {default}")
        panel.findChild(QWidget, "iterationsSpinBox").setSpecialValueText(
            f"Default ({cards[default].finetune_iterations})")
    panel.resize(width, panel.heightForWidth(width) if panel.hasHeightForWidth() else panel.sizeHint().height())
    app.processEvents()
    assert panel.grab().save(str(path)), f"could not write {path}"


def main() -> None:
    scene = slicer.vtkMRMLScene()
    with SliceViews(scene, size=(420, 420)) as views:
        volumes = {}
        for name, file in (("TRUS", "fixed_us.nii.gz"), ("MR", "moving_mr.nii.gz")):
            volumes[name] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            mrml.update_volume_from_sitk(volumes[name], read_image(SAMPLE / file))
        logic = RegistrationLogic(scene)
        result = logic.register(volumes["TRUS"], volumes["MR"], device="cpu")
        markups = {}
        for name, color in (("fixed", (1.0, 0.3, 0.3)), ("moving", (0.2, 0.8, 1.0))):
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} landmarks")
            for point in read_landmarks(SAMPLE / f"{name}_landmarks.fcsv").points:
                node.AddControlPoint(vtk.vtkVector3d(*(mrml.FLIP @ point)))
            node.GetDisplayNode().SetSelectedColor(*color)
            markups[name] = node
        markups["moving"].SetAndObserveTransformNodeID(result.transformNode.GetID())
        table = logic.measureTRE(markups["fixed"], markups["moving"], result.transformNode)
        print("TRE (mm):", logic.treStatistics(table))
        views.fitToVolume(volumes["TRUS"])
        views.jumpToPoint(mrml.markups_points_ras(markups["fixed"])[0])
        for mode in ("glyphs", "grid", "contours"):
            logic.showResults(result, saliencyOpacity=0.8, fieldDisplay=mode)
            views.montage(OUT / f"slice-views-{mode}.png")


if __name__ == "__main__":
    if "--panel" in sys.argv[1:]:
        render_panel(OUT / "panel-designer.png")
    else:
        main()
