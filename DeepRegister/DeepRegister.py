"""DeepRegister: deep-learning registration of 3D volumes in 3D Slicer.

The module is a thin Slicer front end. The work happens in ``DeepRegisterLib``:
``DeepRegisterLib.registration`` registers two images (PyTorch) and
``DeepRegisterLib.logic.RegistrationLogic`` does it on an MRML scene (nodes in, nodes out, result
files, landmark TRE tables; the result display from ``DeepRegisterLib.display``).
``DeepRegisterLogic`` is that logic on the application's scene plus what needs the Slicer
application (dependencies, parameter node, model list, landmark placement). The logic imports
PyTorch only when registering: the module loads, and its panel shows, before PyTorch is installed.
"""

import enum
import importlib.util
import logging
import os
import re
import time
import traceback
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from DeepRegisterLib.logic import BEFORE_FROM_START_ATTRIBUTE, NO_MODEL, RegistrationLogic, ResultFilesExist
from DeepRegisterLib.options import DEFAULT_ITERATIONS_WITHOUT_MODEL
from DeepRegisterLib.resources import sample_data_dir

PROJECT_URL = "https://github.com/deepregister/SlicerDeepRegister"
MINIMUM_TORCH_VERSION = "2.2"
# The model setting, as on the command line: no choice ("") = the best general model installed
# (DeepRegisterLib.models.default_model), "none" = no network, fine-tuning on the pair alone.
DEFAULT_MODEL = ""
WARNING_STYLE = "color: #d35400; font-weight: bold;"  # the status line when the result has warnings
SAMPLE_DATA_CATEGORY = "DeepRegister"
# Sample Data module entries: (sample name, [(file in Resources/SampleData, node name)], load properties).
SAMPLE_DATA_SETS = (
    ("MR-TRUS prostate pair", [("fixed_us.nii.gz", "Sample fixed US"), ("moving_mr.nii.gz", "Sample moving MR"),
                               ("fixed_landmarks.fcsv", "Sample fixed landmarks"),
                               ("moving_landmarks.fcsv", "Sample moving landmarks")], {}),
    ("MR-TRUS gland label maps", [("fixed_gland.nii.gz", "Sample fixed gland"),
                                  ("moving_gland.nii.gz", "Sample moving gland")], {"labelmap": True}),
)

# Texts shown in the panel. Each is a literal inside _() so that Slicer's translation tools find it;
# values are filled in after translation.


def defaultModelText(model: str) -> str:
    return _("Default: {model}").format(model=model)


def defaultModelDescription(model: str, description: str) -> str:
    return _("No choice: the best general model installed ('{model}'), as the command line uses without "
             "--model. {description}").format(model=model, description=description)


def noModelText() -> str:
    return _("None (fine-tuning only)")


def noModelDescription() -> str:
    return _("No trained model: the deformation is optimised on this pair alone (fine-tuning only), from the "
             "initial position chosen below. Slower than a trained model and less robust to large deformations.")


def stageName(stage: str) -> str:
    """The progress bar's and status line's name of an engine stage."""
    names = {"preprocess": _("Preprocessing"), "network": _("Network"), "finetune": _("Fine-tuning"),
             "output": _("Outputs")}
    return names.get(stage, stage.capitalize())


def iterationsToolTip(cards) -> str:
    """The iterations box's tooltip, with each installed model card's default number of steps."""
    defaults = ", ".join(_("{count} for {model}").format(count=card.finetune_iterations, model=card.name)
                         for card in cards)
    if not defaults:
        defaults = _("no model is installed")
    return _("Optimisation steps on this pair after the network's prediction. \"Default\" uses the model "
             "card's number ({defaults}) and {count} without a model. More steps fit the pair more closely "
             "but take longer.").format(defaults=defaults, count=DEFAULT_ITERATIONS_WITHOUT_MODEL)


def resourcePath(relativePath: str) -> str:
    """Absolute path of a file in the module's Resources folder.

    Installed extension: ``<module dir>/Resources/...`` (CMakeLists.txt copies the project's
    top-level Resources there). Source checkout (module path set to ``DeepRegister/``): the
    project's top-level ``Resources/``, one level up.
    """
    moduleDir = os.path.dirname(os.path.abspath(__file__))
    candidates = [os.path.join(moduleDir, "Resources", relativePath),
                  os.path.join(os.path.dirname(moduleDir), "Resources", relativePath)]
    for path in candidates:
        if os.path.exists(path):
            return path
    return candidates[0]


#
# DeepRegister
#


class DeepRegister(ScriptedLoadableModule):
    """Module description shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepRegister")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # Markups, Transforms and Tables are core modules
        self.parent.contributors = ["DeepRegister authors"]
        self.parent.helpText = _("""
<p>Registers a moving volume (e.g. prostate MR) to a fixed volume (e.g. transrectal ultrasound) with a
deep network, optionally fine-tuned on the pair, and writes a displacement-field transform. The moving
volume is shown through the transform.</p>
<p>The <b>joint saliency</b> map shows where both images carry matching structure: the alignment can be
judged there, while dark regions carry little evidence either way. Place corresponding <b>landmarks</b> on
both volumes to measure the target registration error (TRE) before and after registration; the table
updates as points are moved.</p>
<p>With no model chosen, the best general model installed is used (as on the command line); the model
"None" computes the registration by fine-tuning on the pair alone.</p>
<p>Optional <b>masks</b> (label maps or segmentations, drawn on any volume) say where each volume holds data
worth comparing; for a volume without one, the ultrasound <b>field of view</b> can be detected and used.
Each stage of the registration is checked: when one made the alignment worse it is dropped and the panel
shows a <b>warning</b>; check such a result before relying on it.</p>
<p>After a registration, <b>Harden transform</b> resamples the moving volume where the transform shows it
(the transform is kept) and <b>Save results</b> writes the transform (transform.h5), the joint saliency and
warped volumes and the TRE table (tre.csv) into a folder, asking before replacing files. To try the module,
load the simulated MR/TRUS pair from the <b>Sample Data</b> module (category DeepRegister).</p>
<p>See the <a href="{project}#readme">project documentation</a> and, for the approach,
<a href="https://arxiv.org/abs/1711.01666">Hu et al. 2018, Weakly-supervised convolutional neural networks
for multimodal image registration (arXiv:1711.01666)</a>.</p>
""").format(project=PROJECT_URL)
        self.parent.acknowledgementText = _("""
DeepRegister builds on 3D Slicer, PyTorch (through the SlicerPyTorch extension) and SimpleITK. Its design
follows Hu et al., Medical Image Analysis 2018 (weakly-supervised MR-TRUS registration) and Slicer's
scripted-module template by Jean-Christophe Fillion-Robin (Kitware), Andras Lasso (PerkLab) and
Steve Pieper (Isomics).
""")
        # Source checkouts keep the icon in the project's top-level Resources folder.
        iconPath = resourcePath("Icons/DeepRegister.png")
        if os.path.isfile(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        # The bundled sample pair in the Sample Data module, once the application has started (as Slicer's
        # scripted-module template does: the Sample Data module may not be loaded before then).
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def sampleDataSources() -> list:
    """Keyword arguments of ``SampleData.SampleDataLogic.registerCustomSampleDataSource`` (Slicer 5.8 and
    5.10) for the bundled MR/TRUS sample: local files given as file:// URIs (Sample Data copies them into
    its cache) with their SHA256, so an updated extension replaces an outdated cached copy. Files that are
    missing (a partial installation) leave their data set out."""
    import hashlib
    from pathlib import Path

    sources = []
    for sampleName, files, properties in SAMPLE_DATA_SETS:
        paths = [str(sample_data_dir() / fileName) for fileName, _nodeName in files]
        if not all(os.path.isfile(path) for path in paths):
            logging.warning("DeepRegister: sample data '%s' is incomplete; not offered in Sample Data", sampleName)
            continue
        checksums = []
        for path in paths:
            with open(path, "rb") as stream:
                checksums.append("SHA256:" + hashlib.sha256(stream.read()).hexdigest())
        thumbnail = resourcePath("Icons/DeepRegister.png")
        sources.append(dict(
            category=SAMPLE_DATA_CATEGORY, sampleName=sampleName,
            thumbnailFileName=thumbnail if os.path.isfile(thumbnail) else None,
            uris=[Path(path).resolve().as_uri() for path in paths],
            # Cached under these names: prefixed so that they cannot meet another module's files.
            fileNames=["DeepRegister-" + fileName for fileName, _nodeName in files],
            nodeNames=[nodeName for _fileName, nodeName in files],
            checksums=checksums, loadFileProperties=dict(properties)))
    return sources


def registerSampleData() -> None:
    """Adds the bundled sample data to the Sample Data module (category "DeepRegister")."""
    try:
        import SampleData

        for source in sampleDataSources():
            SampleData.SampleDataLogic.registerCustomSampleDataSource(**source)
    except Exception:  # the module must load even if Sample Data is missing or changed
        logging.exception("DeepRegister: registering sample data failed")


#
# DeepRegisterParameterNode
#


class Device(enum.Enum):
    """Where the network runs; the value is what DeepRegisterLib expects."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"auto": _("Automatic (GPU if available)"), "cpu": _("CPU"), "cuda": _("GPU (CUDA)")}[self.value]


class Similarity(enum.Enum):
    """How fine-tuning compares the images; the value is what DeepRegisterLib expects."""

    AUTO = "auto"
    MI = "mi"
    MIND = "mind"
    LNCC = "lncc"

    def label(self) -> str:
        return {"auto": _("Automatic"), "mi": _("Mutual information (MI)"), "mind": _("MIND descriptors"),
                "lncc": _("Local cross-correlation (LNCC)")}[self.value]

    def description(self) -> str:
        return {
            "auto": _("DeepRegister picks the measure: the model's own choice, mutual information without a model."),
            "mi": _("Mutual information: compares intensity histograms; for different modalities (MR to ultrasound)."),
            "mind": _("MIND: compares local self-similarity patterns; robust to different modalities and to "
                      "intensity changes across the image."),
            "lncc": _("Local normalised cross-correlation: for the same modality with similar contrast."),
        }[self.value]


class InitialPosition(enum.Enum):
    """Where the registration starts; the value is what DeepRegisterLib expects."""

    AUTO = "auto"
    CENTERS = "centers"
    PHYSICAL = "physical"

    def label(self) -> str:
        return {"auto": _("Automatic"), "centers": _("Align centres"),
                "physical": _("Physical positions")}[self.value]

    def description(self) -> str:
        return {
            "auto": _("Aligns the centres of the volumes (or of their masks) unless the volumes' own positions, "
                      "where they overlap, match better by two similarity measures."),
            "centers": _("Moves the moving volume so that the centres of the volumes (or of their masks) coincide; "
                         "for volumes from different scanners whose coordinates are unrelated."),
            "physical": _("Starts from the volumes' positions as they are; for volumes already in a common frame "
                          "(tracked ultrasound, an earlier rigid registration)."),
        }[self.value]


class FieldDisplay(enum.Enum):
    """How the displacement field is drawn in the slice views; the value is what DeepRegisterLib expects."""

    OFF = "off"
    GLYPHS = "glyphs"
    GRID = "grid"
    CONTOURS = "contours"

    def label(self) -> str:
        return {"off": _("Hidden"), "glyphs": _("Arrows"), "grid": _("Warped grid"),
                "contours": _("Magnitude contours")}[self.value]


@parameterNodeWrapper
class DeepRegisterParameterNode:
    """The module's settings, saved with the scene.

    fixedVolume, movingVolume - the volumes to register (moving is aligned to fixed).
    fixedMask, movingMask - where each volume holds data worth comparing: a label map (nonzero = inside) or a
        segmentation (the union of its segments); resampled onto its volume's grid when drawn on another one.
    detectFieldOfView - for a volume without a mask, detect an ultrasound field of view and use it as its mask.
    model - name of a trained model (see DeepRegisterLib.models); "" (no choice) uses the best general model
        installed (DeepRegisterLib.models.default_model), "none" registers by fine-tuning on the pair only.
    device - where the network runs.
    iterations - fine-tuning steps on the pair; -1 uses the default: the model card's, DEFAULT_ITERATIONS_WITHOUT_MODEL
        without a model (see iterationsToolTip).
    similarity - how fine-tuning compares the images.
    initialPosition - where the registration starts (image centres aligned or physical positions).
    outputTransform - receives the fixed->moving displacement field (created when empty).
    createWarpedVolume, warpedVolume - also resample the moving volume onto the fixed grid.
    saliencyVolume - receives the joint saliency map (created when empty).
    saliencyOpacity - opacity of the saliency overlay in the slice views.
    fieldDisplay - how the displacement field is drawn in the slice views.
    fixedLandmarks, movingLandmarks - corresponding points, paired by order, for TRE.
    treTable - the TRE table (created on first measurement).
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingMask: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    detectFieldOfView: bool = True
    model: str = DEFAULT_MODEL
    device: Device = Device.AUTO
    iterations: Annotated[int, WithinRange(-1, 2000)] = -1
    similarity: Similarity = Similarity.AUTO
    initialPosition: InitialPosition = InitialPosition.AUTO
    outputTransform: vtkMRMLTransformNode
    createWarpedVolume: bool = False
    warpedVolume: vtkMRMLScalarVolumeNode
    saliencyVolume: vtkMRMLScalarVolumeNode
    saliencyOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    fieldDisplay: FieldDisplay = FieldDisplay.GLYPHS
    fixedLandmarks: vtkMRMLMarkupsFiducialNode
    movingLandmarks: vtkMRMLMarkupsFiducialNode
    treTable: vtkMRMLTableNode


#
# DeepRegisterWidget
#


class DeepRegisterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: binds the .ui to the parameter node and forwards actions to DeepRegisterLogic."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._cancelRequested = False
        self._updatingModelComboBox = False
        self._cards = {}
        self._lastResult = None  # the last registration's result: what Harden and Save act on
        self._treInputs = None
        self._treObservations = []
        self._appliedDisplay = None
        self._treTimer = None

    def resourcePath(self, filename: str) -> str:
        return resourcePath(filename)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegister.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level widget's mrmlSceneChanged signal to each MRML widget's setMRMLScene slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepRegisterLogic()

        # Landmark edits arrive in bursts (dragging a point): measure once they settle.
        self._treTimer = qt.QTimer()
        self._treTimer.setSingleShot(True)
        self._treTimer.setInterval(150)
        self._treTimer.connect("timeout()", self.updateTRE)

        self.ui.progressBar.hide()
        self.populateModels()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.registerButton.connect("clicked(bool)", self.onRegisterButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.placeFixedLandmarksButton.connect("clicked(bool)", self.onPlaceFixedLandmarks)
        self.ui.placeMovingLandmarksButton.connect("clicked(bool)", self.onPlaceMovingLandmarks)
        self.ui.hardenButton.connect("clicked(bool)", self.onHardenButton)
        self.ui.saveResultsButton.connect("clicked(bool)", self.onSaveResultsButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._cancelRequested = True
        if self._treTimer:
            self._treTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)

    def onSceneStartClose(self, caller, event) -> None:
        self._lastResult = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        parameterNode = self._parameterNode
        if not parameterNode.fixedVolume or not parameterNode.movingVolume:
            fixed, moving = self.logic.guessInputVolumes(parameterNode)
            if fixed and not parameterNode.fixedVolume:
                parameterNode.fixedVolume = fixed
            if moving and not parameterNode.movingVolume:
                parameterNode.movingVolume = moving

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        self._treInputs = None
        self._appliedDisplay = None
        self._observeTREInputs()
        if self._parameterNode:
            # Widgets carrying the "SlicerParameterName" dynamic property in the .ui are bound here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self._setItemToolTips()
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None) -> None:
        """Refreshes what the parameter binding does not: button states, the model list, display, TRE."""
        parameterNode = self._parameterNode
        if parameterNode is None:
            return
        self._updateButtonStates()
        self._updateModelComboBoxFromParameterNode()
        self._applyDisplaySettings()
        treInputs = (parameterNode.fixedLandmarks, parameterNode.movingLandmarks, parameterNode.outputTransform)
        if treInputs != self._treInputs:
            self._treInputs = treInputs
            self._observeTREInputs()
            self.scheduleTREUpdate()

    def _setItemToolTips(self) -> None:
        """Per-choice tooltips of the enum combo boxes (their items are filled by the parameter node binding,
        one per enum member in order)."""
        for comboBox, choices in ((self.ui.similarityComboBox, Similarity),
                                  (self.ui.initialPositionComboBox, InitialPosition)):
            for index, choice in enumerate(choices):
                if index < comboBox.count:
                    comboBox.setItemData(index, choice.description(), qt.Qt.ToolTipRole)

    def _updateButtonStates(self) -> None:
        parameterNode = self._parameterNode
        fixed, moving = parameterNode.fixedVolume, parameterNode.movingVolume
        if not fixed or not moving:
            reason = _("Select a fixed and a moving volume.")
        elif fixed == moving:
            reason = _("The fixed and moving volumes must be different volumes.")
        else:
            reason = ""
        self.ui.registerButton.enabled = not reason and not self._running
        self.ui.registerButton.toolTip = reason or _("Register the moving volume to the fixed volume.")
        self.ui.warpedVolumeSelector.enabled = parameterNode.createWarpedVolume and not self._running
        result = self._currentResult()
        self.ui.saveResultsButton.enabled = result is not None and not self._running
        self.ui.hardenButton.enabled = (result is not None and not self._running
                                        and result.movingVolumeNode.GetParentTransformNode() is result.transformNode)

    def _currentResult(self):
        """The last result while its nodes are still in the scene, else None."""
        result = self._lastResult
        if result is None:
            return None
        nodes = (result.transformNode, result.saliencyNode, result.movingVolumeNode)
        if any(node is None or node.GetScene() is None for node in nodes):
            return None
        return result

    # -- models --------------------------------------------------------------------------------
    def populateModels(self) -> None:
        """Fills the model list from the installed model cards (read without PyTorch)."""
        comboBox = self.ui.modelComboBox
        self._updatingModelComboBox = True
        try:
            comboBox.clear()
            cards = self.logic.availableModels()
            self._cards = {card.name: card for card in cards}
            default = self.logic.defaultModel(cards)
            comboBox.addItem(defaultModelText(default or _("best general model")), DEFAULT_MODEL)
            comboBox.setItemData(comboBox.count - 1, self._defaultModelDescription(default), qt.Qt.ToolTipRole)
            for card in cards:
                comboBox.addItem(card.name, card.name)
                comboBox.setItemData(comboBox.count - 1, card.description, qt.Qt.ToolTipRole)
            comboBox.addItem(noModelText(), NO_MODEL)
            comboBox.setItemData(comboBox.count - 1, noModelDescription(), qt.Qt.ToolTipRole)
            self.ui.iterationsSpinBox.toolTip = iterationsToolTip(cards)
        finally:
            self._updatingModelComboBox = False
        if self._parameterNode:
            self._updateModelComboBoxFromParameterNode()

    def _updateModelComboBoxFromParameterNode(self) -> None:
        comboBox = self.ui.modelComboBox
        model = self._parameterNode.model
        index = comboBox.findData(model)
        self._updatingModelComboBox = True
        try:
            if index < 0:
                # A model saved with the scene that is not installed here (or not listable without PyTorch).
                comboBox.addItem(_("{model} (not installed)").format(model=model), model)
                index = comboBox.count - 1
            comboBox.currentIndex = index
        finally:
            self._updatingModelComboBox = False
        self._showModelDescription(index)

    def onModelChanged(self, index: int) -> None:
        if self._updatingModelComboBox or self._parameterNode is None or index < 0:
            return
        self._parameterNode.model = self.ui.modelComboBox.itemData(index) or DEFAULT_MODEL

    def _defaultModelDescription(self, default: str) -> str:
        if default:
            card = self._cards.get(default)
            return defaultModelDescription(default, card.description if card else "")
        return _("No choice: the best general model installed; none is installed, so the deformation is "
                 "found by fine-tuning on this pair alone.")

    def _showModelDescription(self, index: int) -> None:
        comboBox = self.ui.modelComboBox
        model = comboBox.itemData(index) or DEFAULT_MODEL
        if model == DEFAULT_MODEL:
            text = comboBox.itemData(index, qt.Qt.ToolTipRole) or self._defaultModelDescription("")
            model = self.logic.defaultModel(list(self._cards.values())) or NO_MODEL
        elif model == NO_MODEL:
            text = noModelDescription()
        else:
            text = comboBox.itemData(index, qt.Qt.ToolTipRole) or _("Model '{model}' is not installed.").format(model=model)
        card = self._cards.get(model)
        if model == NO_MODEL:
            special = _("Default ({count})").format(count=DEFAULT_ITERATIONS_WITHOUT_MODEL)
        elif card is not None:
            special = _("Default ({count})").format(count=card.finetune_iterations)
        else:  # a model saved with the scene that is not installed here: its card is unknown
            special = _("Default (the model's)")
        self.ui.modelDescriptionLabel.text = text
        self.ui.iterationsSpinBox.specialValueText = special

    # -- registration --------------------------------------------------------------------------
    def onRegisterButton(self) -> None:
        if self._running:
            return
        if not self.logic.ensureDependencies():
            self.ui.statusLabel.text = _("Registration needs PyTorch; see the message for how to install it.")
            return
        parameterNode = self._parameterNode
        self._setRunning(True)
        self._showStatus(_("Registering..."))
        start = time.perf_counter()
        try:
            result = self.logic.registerFromParameterNode(parameterNode, progress=self.onProgress)
        except Exception as error:
            self._setRunning(False)
            self._reportFailure(error)
            return
        self._setRunning(False)
        self._lastResult = result
        self._updateButtonStates()
        elapsed = time.perf_counter() - start
        try:
            self.logic.showResults(result, parameterNode.saliencyOpacity, parameterNode.fieldDisplay.value)
            self._appliedDisplay = (parameterNode.saliencyOpacity, parameterNode.fieldDisplay)
        except Exception as error:  # results are in the scene; only their display failed
            logging.exception("DeepRegister: showing results failed")
            self._showStatus(_("Registered, but showing the results failed: {error}").format(error=error), True)
            return
        self.showRegistrationResult(result, elapsed)
        self.scheduleTREUpdate()

    def showRegistrationResult(self, result, elapsedSeconds=None) -> None:
        """The summary in the status line; a result with warnings (not a plain success: e.g. the guard kept
        an earlier stage) is shown prominently there and in a message box."""
        text = self.logic.resultSummary(result, elapsedSeconds)
        self._showStatus(text, bool(result.warnings))
        if result.warnings:
            slicer.util.warningDisplay(text, windowTitle=_("DeepRegister: check the registration"))

    def _showStatus(self, text: str, warning: bool = False) -> None:
        self.ui.statusLabel.text = text
        self.ui.statusLabel.styleSheet = WARNING_STYLE if warning else ""

    def onProgress(self, stage: str, fraction: float) -> bool:
        """Progress callback of the engine: keeps the panel responsive; returns False to cancel."""
        self.ui.progressBar.setFormat(_("{stage}: %p%").format(stage=stageName(stage)))
        self.ui.progressBar.value = int(round(100 * min(max(fraction, 0.0), 1.0)))
        slicer.app.processEvents()
        return not self._cancelRequested

    def onCancelButton(self) -> None:
        self._cancelRequested = True
        self.ui.cancelButton.enabled = False
        self.ui.statusLabel.text = _("Cancelling...")

    def _setRunning(self, running: bool) -> None:
        self._running = running
        self._cancelRequested = False
        for section in (self.ui.inputsCollapsibleButton, self.ui.registrationCollapsibleButton,
                        self.ui.outputsCollapsibleButton, self.ui.landmarksCollapsibleButton):
            section.enabled = not running
        self.ui.cancelButton.enabled = running
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        if running:
            slicer.app.setOverrideCursor(qt.Qt.BusyCursor)
        else:
            slicer.app.restoreOverrideCursor()
        self._updateButtonStates()

    def _reportFailure(self, error: Exception) -> None:
        if self.logic.isCancellation(error):
            self._showStatus(_("Registration cancelled; the scene was left as it was."))
        elif isinstance(error, ValueError):  # LogicError, bad model, bad input: the message says what to do
            self._showStatus(str(error), True)
            slicer.util.errorDisplay(str(error), windowTitle=_("DeepRegister"))
        else:
            logging.exception("DeepRegister: registration failed")
            self._showStatus(_("Registration failed: {error}").format(error=error), True)
            slicer.util.errorDisplay(_("Registration failed: {error}").format(error=error),
                                     windowTitle=_("DeepRegister"), detailedText=traceback.format_exc())

    # -- results -------------------------------------------------------------------------------
    def onHardenButton(self) -> None:
        """Applies the transform to the moving volume (its voxels are resampled); the transform is kept."""
        result = self._currentResult()
        if result is None or self._running:
            return
        try:
            node = self.logic.hardenTransform(result)
        except ValueError as error:
            self._showStatus(str(error), True)
            slicer.util.errorDisplay(str(error), windowTitle=_("DeepRegister"))
            return
        finally:
            self._updateButtonStates()
        self._showStatus(_("'{volume}' now holds the registered image (transform hardened); the transform "
                           "'{transform}' is kept.").format(volume=node.GetName(),
                                                            transform=result.transformNode.GetName()))

    def onSaveResultsButton(self) -> None:
        """Asks for a folder and writes the transform, the volumes and the TRE table there; asks before
        replacing files."""
        result = self._currentResult()
        if result is None or self._running:
            return
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Save registration results in"))
        if not folder:
            return
        self.saveResults(folder)

    def saveResults(self, folder: str, askOverwrite: bool = True) -> None:
        result = self._currentResult()
        table = self._parameterNode.treTable if self._parameterNode else None
        try:
            try:
                paths = self.logic.saveResults(result, folder, table)
            except ResultFilesExist as exists:
                names = "\n".join(os.path.basename(path) for path in exists.paths)
                if askOverwrite and not slicer.util.confirmOkCancelDisplay(
                        _("These files exist in {folder}:\n{names}\n\nReplace them?").format(folder=folder, names=names),
                        _("DeepRegister: replace files?")):
                    self._showStatus(_("Results not saved: the files in {folder} were kept.").format(folder=folder))
                    return
                paths = self.logic.saveResults(result, folder, table, overwrite=True)
        except ValueError as error:
            self._showStatus(str(error), True)
            slicer.util.errorDisplay(str(error), windowTitle=_("DeepRegister"))
            return
        self._showStatus(_("Saved {files} in {folder}.").format(
            files=", ".join(os.path.basename(path) for path in paths.values()), folder=folder))

    # -- display -------------------------------------------------------------------------------
    def _applyDisplaySettings(self) -> None:
        """Applies saliency opacity and field display when they change and results exist."""
        parameterNode = self._parameterNode
        if self._running or not parameterNode.outputTransform or not parameterNode.saliencyVolume:
            return
        settings = (parameterNode.saliencyOpacity, parameterNode.fieldDisplay)
        if settings == self._appliedDisplay:
            return
        self._appliedDisplay = settings
        try:
            self.logic.setSaliencyOpacity(parameterNode.saliencyOpacity)
            self.logic.setFieldDisplay(parameterNode.outputTransform, parameterNode.fieldDisplay.value)
        except Exception:
            logging.exception("DeepRegister: updating the display failed")

    # -- landmarks -----------------------------------------------------------------------------
    def onPlaceFixedLandmarks(self) -> None:
        self._placeLandmarks(fixed=True)

    def onPlaceMovingLandmarks(self) -> None:
        self._placeLandmarks(fixed=False)

    def _placeLandmarks(self, fixed: bool) -> None:
        parameterNode = self._parameterNode
        node = parameterNode.fixedLandmarks if fixed else parameterNode.movingLandmarks
        if node is None:
            node = self.logic.createLandmarksNode(fixed)
            if fixed:
                parameterNode.fixedLandmarks = node
            else:
                parameterNode.movingLandmarks = node
        if not fixed:
            # Clicks on the moving volume as displayed (through the transform) must land in moving coordinates.
            self.logic.followMovingVolume(node, parameterNode.movingVolume)
        self.logic.startPlacing(node)

    def _observeTREInputs(self) -> None:
        """Observes the landmark nodes and the transform so the TRE table follows every edit."""
        wanted = []
        parameterNode = self._parameterNode
        if parameterNode is not None:
            for node in (parameterNode.fixedLandmarks, parameterNode.movingLandmarks):
                if node:
                    wanted += [(node, event) for event in DeepRegisterLogic.LANDMARK_EVENTS]
            if parameterNode.outputTransform:
                wanted.append((parameterNode.outputTransform, slicer.vtkMRMLTransformableNode.TransformModifiedEvent))
        for node, event in self._treObservations:
            if (node, event) not in wanted:
                self.removeObserver(node, event, self.scheduleTREUpdate)
        for node, event in wanted:
            if not self.hasObserver(node, event, self.scheduleTREUpdate):
                self.addObserver(node, event, self.scheduleTREUpdate)
        self._treObservations = wanted

    def scheduleTREUpdate(self, caller=None, event=None) -> None:
        if self._treTimer:
            self._treTimer.start()

    def updateTRE(self) -> None:
        """Measures TRE with the current landmarks and transform and shows the table."""
        parameterNode = self._parameterNode
        if parameterNode is None or self._running:
            return
        fixed, moving = parameterNode.fixedLandmarks, parameterNode.movingLandmarks
        if not fixed or not moving:
            self.ui.treSummaryLabel.text = _("Place pairs of corresponding landmarks on the fixed and moving "
                                             "volumes to measure the target registration error (TRE).")
            return
        try:
            table = self.logic.measureTRE(fixed, moving, parameterNode.outputTransform, parameterNode.treTable)
        except ValueError as error:  # e.g. unequal counts while points are being placed
            self.ui.treSummaryLabel.text = str(error)
            return
        if parameterNode.treTable != table:
            parameterNode.treTable = table
        self.ui.treTableView.setMRMLTableNode(table)
        self.ui.treSummaryLabel.text = self.logic.treSummary(table)


#
# DeepRegisterLogic
#


class DeepRegisterLogic(RegistrationLogic, ScriptedLoadableModuleLogic):
    """``DeepRegisterLib.logic.RegistrationLogic`` (registration, result files, TRE, result display) on the
    application's scene, plus what needs the Slicer application: dependencies, parameter node, the installed
    models (``model=""``, the default, registers with the best general model installed), landmark placement.
    Usable from the Python console::

        logic = slicer.util.getModuleLogic("DeepRegister")  # or DeepRegisterLogic()
        result = logic.register(fixedNode, movingNode, model=None, device="auto", iterations=100)
        table = logic.measureTRE(fixedPointsNode, movingPointsNode, result.transformNode)
        logic.showResults(result, saliencyOpacity=0.5, fieldDisplay="glyphs")
    """

    LANDMARK_EVENTS = (slicer.vtkMRMLMarkupsNode.PointAddedEvent, slicer.vtkMRMLMarkupsNode.PointRemovedEvent,
                       slicer.vtkMRMLMarkupsNode.PointModifiedEvent,
                       slicer.vtkMRMLTransformableNode.TransformModifiedEvent)

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        RegistrationLogic.__init__(self, slicer.mrmlScene)

    def getParameterNode(self) -> DeepRegisterParameterNode:
        # model "" (no choice) follows the installed models: see resolveModel.
        return DeepRegisterParameterNode(super().getParameterNode())

    # -- dependencies --------------------------------------------------------------------------
    @staticmethod
    def torchAvailable() -> bool:
        return importlib.util.find_spec("torch") is not None

    @staticmethod
    def missingPackages() -> list:
        """Python packages registering needs that are not installed (import names). SimpleITK and NumPy come
        with 3D Slicer; the logic imports them with the module."""
        return [name for name in ("torch", "safetensors") if importlib.util.find_spec(name) is None]

    def ensureDependencies(self, askConfirmation: bool = True) -> bool:
        """Installs what is missing, after the user agrees: PyTorch through the PyTorch extension's
        PyTorchUtils (it picks the build that fits the GPU driver), the rest with pip. Returns True
        when everything is importable; otherwise tells the user why and returns False."""
        missing = self.missingPackages()
        torchLogic = None
        if "torch" in missing:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                slicer.util.errorDisplay(
                    _('DeepRegister needs PyTorch, which 3D Slicer gets from the "PyTorch" extension.\n\n'
                      'Open View > Extensions Manager, install "PyTorch", restart 3D Slicer and press Register again.'),
                    windowTitle=_("PyTorch extension needed"))
                return False
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if torchLogic.torchInstalled():
                missing.remove("torch")
        elif not self._torchVersionIsSupported():
            slicer.util.errorDisplay(
                _("The installed PyTorch is older than version {version}, which DeepRegister needs. Use the "
                  '"PyTorch Utils" module to install a newer one (version requirement ">={version}").')
                .format(version=MINIMUM_TORCH_VERSION), windowTitle=_("DeepRegister"))
            return False
        if not missing:
            return True

        names = {"torch": "PyTorch", "safetensors": "safetensors"}
        packageList = ", ".join(names.get(name, name) for name in missing)
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("DeepRegister needs additional Python packages: {packages}.\n\nInstalling them needs a network "
                  "connection and may take several minutes (PyTorch is a large download). Click OK to install "
                  "them now.").format(packages=packageList),
                _("Install Python packages")):
            return False
        slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
        try:
            if "torch" in missing:
                logging.info("DeepRegister: installing PyTorch through PyTorchUtils...")
                # Already confirmed above, as TotalSegmentator does: one question for all packages.
                torch = torchLogic.installTorch(askConfirmation=False,
                                                torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
                if torch is None:
                    raise RuntimeError(_('PyTorch was not installed. Install it with the "PyTorch Utils" module.'))
            if "safetensors" in missing:
                slicer.util.pip_install("safetensors>=0.4")
        except Exception as error:
            slicer.app.restoreOverrideCursor()
            logging.exception("DeepRegister: installing Python packages failed")
            slicer.util.errorDisplay(_("Installing {packages} failed: {error}").format(packages=packageList, error=error),
                                     windowTitle=_("DeepRegister"), detailedText=traceback.format_exc())
            return False
        slicer.app.restoreOverrideCursor()
        importlib.invalidate_caches()
        return not self.missingPackages()

    @staticmethod
    def _torchVersionIsSupported() -> bool:
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = version("torch")
        except PackageNotFoundError:
            return True  # importable but not pip-installed (e.g. a development build): trust it

        def numbers(text):
            return tuple(int(part) for part in re.findall(r"\d+", text)[:2])

        return numbers(installed) >= numbers(MINIMUM_TORCH_VERSION)

    # -- models --------------------------------------------------------------------------------
    def availableModels(self) -> list:
        """Installed model cards (``DeepRegisterLib.models.ModelCard``), read without PyTorch: the panel
        lists them before PyTorch is installed."""
        try:
            from DeepRegisterLib.models import list_models

            return list_models()
        except Exception:
            logging.exception("DeepRegister: listing models failed")
            return []

    @staticmethod
    def defaultModel(cards) -> str:
        """The model used when none is chosen: ``DeepRegisterLib.models.default_model`` (the best general
        model installed), "" when no model is installed."""
        if not cards:
            return ""
        from DeepRegisterLib.models import default_model

        return default_model(cards)

    def resolveModel(self, model) -> Optional[str]:
        """The model to register with (:meth:`register` asks), as the command line reads --model: "" (or None,
        no choice) -> the best general model installed (fine-tuning alone when none is); "none" -> None."""
        model = (model or DEFAULT_MODEL).strip()
        if model.lower() == NO_MODEL:
            return None
        if model == DEFAULT_MODEL:
            return self.defaultModel(self.availableModels()) or None
        return model

    # -- registration --------------------------------------------------------------------------
    def registerFromParameterNode(self, parameterNode: DeepRegisterParameterNode, progress=None):
        """Runs :meth:`register` with the settings of the parameter node and stores the output nodes in it."""
        result = self.register(
            parameterNode.fixedVolume, parameterNode.movingVolume, model=parameterNode.model,
            device=parameterNode.device.value,
            iterations=None if parameterNode.iterations < 0 else parameterNode.iterations,
            progress=progress, outputTransformNode=parameterNode.outputTransform,
            saliencyNode=parameterNode.saliencyVolume,
            warpedNode=parameterNode.warpedVolume if parameterNode.createWarpedVolume else None,
            createWarped=parameterNode.createWarpedVolume, fixedMaskNode=parameterNode.fixedMask,
            movingMaskNode=parameterNode.movingMask, detectFieldOfView=parameterNode.detectFieldOfView,
            similarity=parameterNode.similarity.value, initial=parameterNode.initialPosition.value)
        wasModified = parameterNode.StartModify()
        parameterNode.outputTransform = result.transformNode
        parameterNode.saliencyVolume = result.saliencyNode
        if result.warpedNode is not None:
            parameterNode.warpedVolume = result.warpedNode
        parameterNode.EndModify(wasModified)
        if parameterNode.movingLandmarks:
            self.followMovingVolume(parameterNode.movingLandmarks, parameterNode.movingVolume)
        return result

    @staticmethod
    def isCancellation(error: Exception) -> bool:
        if not DeepRegisterLogic.torchAvailable():
            return False
        from DeepRegisterLib.progress import RegistrationCancelled

        return isinstance(error, RegistrationCancelled)

    @staticmethod
    def resultSummary(result, elapsedSeconds=None) -> str:
        """The status line's text: time, device, model, per-stage timings, similarity, start, folding,
        messages. A result with warnings (not a plain success) starts with them, not with "Registered"."""
        timings = dict(result.timings)
        total = elapsedSeconds if elapsedSeconds is not None else timings.get("total", sum(timings.values()))
        stages = ", ".join(f"{stageName(name).lower()} {seconds:.1f} s"
                           for name, seconds in timings.items() if name != "total")
        trained = result.model and not str(result.model).lower().startswith("none")
        model = _("model '{model}'").format(model=result.model) if trained else _("no trained model")
        details = dict(seconds=total, device=str(result.device).upper(), model=model, stages=stages)
        if result.warnings:
            lines = [_("Warning: registration finished, but check the result before relying on it:")]
            lines += [f"\u2022 {warning}" for warning in result.warnings]
            lines.append(_("Took {seconds:.1f} s on {device} with {model} ({stages}).").format(**details))
        else:
            lines = [_("Registered in {seconds:.1f} s on {device} with {model} ({stages}).").format(**details)]
        start = {"centers": _("image centres aligned"), "physical": _("physical positions")}.get(result.initial,
                                                                                                   result.initial)
        if result.similarity or start:
            lines.append(_("Similarity: {similarity}; start: {start}.").format(
                similarity=str(result.similarity).upper() or "-", start=start or "-"))
        if result.foldingPercent is not None:
            folding = _("Folding: {percent:.2f} % of voxels").format(percent=result.foldingPercent)
            if result.minJacobian is not None:
                folding += _(" (smallest Jacobian determinant {value:.2f})").format(value=result.minJacobian)
            lines.append(folding + ".")
        lines += list(result.messages)
        return "\n".join(lines)

    # -- landmarks -----------------------------------------------------------------------------
    def treSummary(self, tableNode) -> str:
        """"n pairs: mean TRE a mm before, b mm after registration (max c mm)." for the panel."""
        statistics = self.treStatistics(tableNode)
        before, after = statistics["before"], statistics["after"]
        text = _("{pairs} landmark pairs: mean TRE {before:.1f} mm before registration").format(
            pairs=before["n"], before=before["mean"])
        if tableNode.GetAttribute(BEFORE_FROM_START_ATTRIBUTE) == "1":
            text += _(" (from its start position)")
        if after["mean"] == after["mean"]:  # not NaN: a transform was given
            text += _(", {after:.1f} mm after (largest {worst:.1f} mm).").format(after=after["mean"], worst=after["max"])
        else:
            text += _(". Register to see the error after registration.")
        return text

    @staticmethod
    def createLandmarksNode(fixed: bool):
        """A new point list for fixed (green) or moving (orange) landmarks."""
        name = _("Fixed landmarks") if fixed else _("Moving landmarks")
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", slicer.mrmlScene.GenerateUniqueName(name))
        node.CreateDefaultDisplayNodes()
        node.GetDisplayNode().SetSelectedColor((0.2, 0.8, 0.3) if fixed else (1.0, 0.55, 0.1))
        node.SetControlPointLabelFormat("F-%d" if fixed else "M-%d")
        return node

    @staticmethod
    def followMovingVolume(landmarksNode, movingVolumeNode) -> None:
        """Puts the moving landmarks under the moving volume's transform (if it has one and they have none),
        so they are stored in moving-image coordinates and drawn where the transformed volume shows them."""
        if landmarksNode is None or movingVolumeNode is None:
            return
        transformNode = movingVolumeNode.GetParentTransformNode()
        if transformNode is not None and landmarksNode.GetParentTransformNode() is None:
            landmarksNode.SetAndObserveTransformNodeID(transformNode.GetID())

    @staticmethod
    def startPlacing(markupsNode) -> None:
        """Makes ``markupsNode`` the active point list and enters persistent place mode."""
        selectionNode = slicer.app.applicationLogic().GetSelectionNode()
        selectionNode.SetReferenceActivePlaceNodeClassName("vtkMRMLMarkupsFiducialNode")
        selectionNode.SetActivePlaceNodeID(markupsNode.GetID())
        slicer.modules.markups.logic().StartPlaceMode(1)

    @staticmethod
    def guessInputVolumes(parameterNode):
        """(fixed, moving) scalar volumes for a new session: names with us/trus/fixed for the fixed volume,
        mr/mri/t2/moving for the moving one, else the first two volumes; never the module's outputs."""
        outputs = {parameterNode.saliencyVolume, parameterNode.warpedVolume} - {None}
        volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                   if not node.IsA("vtkMRMLLabelMapVolumeNode") and node not in outputs]

        def tokens(node):
            return set(re.split(r"[^a-z0-9]+", (node.GetName() or "").lower()))

        fixed = parameterNode.fixedVolume or next(
            (node for node in volumes if tokens(node) & {"us", "trus", "ultrasound", "fixed"}), None)
        moving = parameterNode.movingVolume or next(
            (node for node in volumes if node != fixed and tokens(node) & {"mr", "mri", "t2", "t2w", "moving"}), None)
        remaining = iter(node for node in volumes if node not in (fixed, moving))
        fixed = fixed or next(remaining, None)
        moving = moving or next(remaining, None)
        return fixed, moving


#
# DeepRegisterTest
#


class DeepRegisterTest(ScriptedLoadableModuleTest):
    """Self-test on a synthetic phantom pair with known landmarks (no downloads)."""

    ITERATIONS = 40  # enough for the 48^3 phantom; a few seconds on a CPU
    # Tests that register (PyTorch) or build the phantom (DeepRegisterLib.synthetic imports torch). ctest runs
    # each test_ method on its own (slicer.testing.runUnitTest -> unittest loadTestsFromName), so each
    # skips itself in setUp where PyTorch is missing; runTest (Reload and Test) reports them as skipped.
    NEEDS_TORCH = ("test_RegisterPhantomReducesTRE", "test_SegmentationMaskIsUsed", "test_CancelLeavesSceneUnchanged",
                   "test_WidgetEnablesRegister", "test_HardenAndSaveResults")
    TESTS = ("test_ParameterNodeDefaults", "test_ParameterNodeRoundTripsMaskAndStartSettings", "test_BadInputIsRefused",
             "test_SampleDataIsRegistered") + NEEDS_TORCH

    def setUp(self):
        slicer.mrmlScene.Clear()
        self._skipUnlessRunnable(self._testMethodName)

    def _skipUnlessRunnable(self, testName: str) -> None:
        if testName in self.NEEDS_TORCH and not DeepRegisterLogic.torchAvailable():
            self.skipTest("PyTorch is not installed (install the PyTorch extension): registration tests skipped")

    def runTest(self):
        import unittest

        for name in self.TESTS:
            slicer.mrmlScene.Clear()
            try:
                self._skipUnlessRunnable(name)
            except unittest.SkipTest as skipped:
                self.delayDisplay(f"{name} skipped: {skipped}")
                continue
            getattr(self, name)()

    # -- data ----------------------------------------------------------------------------------
    def _phantom(self, seed=3):
        """Fixed (ultrasound-like) and moving (MR-like) volume nodes and their corresponding landmarks."""
        import sitkUtils
        from DeepRegisterLib.synthetic import make_phantom_pair

        pair = make_phantom_pair(seed, (48, 48, 48), spacing=2.5, landmarks=8)
        fixed = sitkUtils.PushVolumeToSlicer(pair.fixed, name="Phantom fixed US")
        moving = sitkUtils.PushVolumeToSlicer(pair.moving, name="Phantom moving MR")
        fixedPoints = self._pointsNode("Phantom fixed landmarks", pair.fixed_points)
        movingPoints = self._pointsNode("Phantom moving landmarks", pair.moving_points)
        return fixed, moving, fixedPoints, movingPoints

    @staticmethod
    def _pointsNode(name, pointsLPS):
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        for index, (x, y, z) in enumerate(pointsLPS):
            node.AddControlPoint([-float(x), -float(y), float(z)], f"L{index + 1}")  # LPS -> RAS
        return node

    @staticmethod
    def _transformCount():
        return slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode")

    # -- tests ---------------------------------------------------------------------------------
    def test_ParameterNodeDefaults(self):
        self.delayDisplay("Parameter node defaults")
        parameterNode = DeepRegisterLogic().getParameterNode()
        self.assertEqual(parameterNode.device, Device.AUTO)
        self.assertEqual(parameterNode.iterations, -1)
        self.assertAlmostEqual(parameterNode.saliencyOpacity, 0.5)
        self.assertEqual(parameterNode.fieldDisplay, FieldDisplay.GLYPHS)
        self.assertFalse(parameterNode.createWarpedVolume)
        self.assertIsNone(parameterNode.outputTransform)
        self.assertEqual(parameterNode.model, DEFAULT_MODEL)
        self.assertIsNone(parameterNode.fixedMask)
        self.assertIsNone(parameterNode.movingMask)
        self.assertTrue(parameterNode.detectFieldOfView)
        self.assertEqual(parameterNode.similarity, Similarity.AUTO)
        self.assertEqual(parameterNode.initialPosition, InitialPosition.AUTO)
        parameterNode.fieldDisplay = FieldDisplay.GRID
        self.assertEqual(DeepRegisterLogic().getParameterNode().fieldDisplay, FieldDisplay.GRID)

    def test_ParameterNodeRoundTripsMaskAndStartSettings(self):
        self.delayDisplay("Masks, field of view, similarity and start are saved in the parameter node")
        labelMap = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "gland label map")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "gland segmentation")
        parameterNode = DeepRegisterLogic().getParameterNode()
        parameterNode.fixedMask = labelMap
        parameterNode.movingMask = segmentation
        parameterNode.detectFieldOfView = False
        parameterNode.similarity = Similarity.MIND
        parameterNode.initialPosition = InitialPosition.PHYSICAL
        parameterNode.model = NO_MODEL
        again = DeepRegisterLogic().getParameterNode()  # a new wrapper reads the scene's parameter node
        self.assertIs(again.fixedMask, labelMap)
        self.assertIs(again.movingMask, segmentation)
        self.assertFalse(again.detectFieldOfView)
        self.assertEqual(again.similarity, Similarity.MIND)
        self.assertEqual(again.initialPosition, InitialPosition.PHYSICAL)
        self.assertEqual(again.model, NO_MODEL)
        self.assertIsNone(DeepRegisterLogic().resolveModel(NO_MODEL))
        with self.assertRaises(Exception):  # a plain scalar volume is neither a label map nor a segmentation
            again.fixedMask = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "not a mask")
        again.movingMask = None
        self.assertIsNone(DeepRegisterLogic().getParameterNode().movingMask)

    def test_BadInputIsRefused(self):
        self.delayDisplay("Bad input is refused with a message")  # refused before PyTorch is needed
        import numpy as np

        volume = slicer.util.addVolumeFromArray(np.random.default_rng(0).random((16, 16, 16)).astype(np.float32),
                                                name="Noise")
        transforms = self._transformCount()
        with self.assertRaises(ValueError) as context:
            DeepRegisterLogic().register(volume, volume, iterations=1)
        self.assertTrue(str(context.exception))
        self.assertEqual(self._transformCount(), transforms)

    def test_SampleDataIsRegistered(self):
        self.delayDisplay("The bundled sample pair is offered in the Sample Data module")
        import SampleData

        registerSampleData()
        sources = [source for category, sources in slicer.modules.sampleDataSources.items()
                   if category == SAMPLE_DATA_CATEGORY for source in sources]
        self.assertEqual([source.sampleName for source in sources], [name for name, files, properties in SAMPLE_DATA_SETS])
        nodes = SampleData.SampleDataLogic().downloadFromSource(sources[0])
        self.assertEqual([node.GetName() for node in nodes],
                         ["Sample fixed US", "Sample moving MR", "Sample fixed landmarks", "Sample moving landmarks"])
        fixed, moving = DeepRegisterLogic.guessInputVolumes(DeepRegisterLogic().getParameterNode())
        self.assertEqual((fixed.GetName(), moving.GetName()), ("Sample fixed US", "Sample moving MR"))

    def test_RegisterPhantomReducesTRE(self):
        self.delayDisplay("Registering a synthetic phantom pair")
        fixed, moving, fixedPoints, movingPoints = self._phantom()
        logic = DeepRegisterLogic()
        stages = []
        result = logic.register(fixed, moving, model=None, device="cpu", iterations=self.ITERATIONS,
                                progress=lambda stage, fraction: stages.append(stage))
        self.assertIsNotNone(result.transformNode)
        self.assertTrue(result.transformNode.IsA("vtkMRMLTransformNode"))
        self.assertEqual(moving.GetParentTransformNode(), result.transformNode)
        self.assertIsNotNone(result.saliencyNode.GetImageData())
        low, high = result.saliencyNode.GetImageData().GetScalarRange()
        self.assertGreaterEqual(low, -1e-6)
        self.assertLessEqual(high, 1.0 + 1e-6)
        self.assertIsNone(result.warpedNode)
        self.assertIn("finetune", stages)
        self.assertGreater(sum(result.timings.values()), 0.0)

        table = logic.measureTRE(fixedPoints, movingPoints, result.transformNode)
        statistics = logic.treStatistics(table)
        self.delayDisplay(f"TRE mean before {statistics['before']['mean']:.1f} mm, "
                          f"after {statistics['after']['mean']:.1f} mm")
        self.assertLess(statistics["after"]["mean"], 0.25 * statistics["before"]["mean"])
        self.assertLess(statistics["after"]["mean"], 4.0)
        self.assertIn("mm", logic.treSummary(table))

        logic.showResults(result, saliencyOpacity=0.3, fieldDisplay=FieldDisplay.GRID.value)
        logic.setFieldDisplay(result.transformNode, FieldDisplay.OFF.value)
        self.delayDisplay("Test passed")

    def test_SegmentationMaskIsUsed(self):
        self.delayDisplay("A segmentation is used as the fixed mask")
        import numpy as np

        fixed, moving = self._phantom(seed=6)[:2]
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "Fixed gland")
        segmentation.CreateDefaultDisplayNodes()
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(fixed)
        segmentId = segmentation.GetSegmentation().AddEmptySegment("", "gland")
        inside = np.zeros(slicer.util.arrayFromVolume(fixed).shape, np.uint8)
        inside[8:36, 10:38, 6:30] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(inside, segmentation, segmentId, fixed)
        result = DeepRegisterLogic().register(fixed, moving, model=None, device="cpu", iterations=10,
                                              fixedMaskNode=segmentation)
        self.assertIsNotNone(result.fixedMask)
        import SimpleITK as sitk

        np.testing.assert_array_equal(sitk.GetArrayFromImage(result.fixedMask), inside)
        self.assertTrue(any("union of the 1 segment of 'Fixed gland'" in message for message in result.messages))

    def test_CancelLeavesSceneUnchanged(self):
        self.delayDisplay("Cancelling leaves the scene unchanged")
        fixed, moving = self._phantom(seed=4)[:2]
        logic = DeepRegisterLogic()
        transforms = self._transformCount()
        volumes = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        with self.assertRaises(Exception) as context:
            logic.register(fixed, moving, iterations=self.ITERATIONS, device="cpu",
                           progress=lambda stage, fraction: stage != "finetune")
        self.assertTrue(logic.isCancellation(context.exception))
        self.assertEqual(self._transformCount(), transforms)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), volumes)
        self.assertIsNone(moving.GetParentTransformNode())

    def test_WidgetEnablesRegister(self):
        self.delayDisplay("Panel: Register is enabled once two different volumes are selected")
        fixed, moving = self._phantom(seed=5)[:2]
        widget = slicer.util.getModuleWidget("DeepRegister")
        parameterNode = widget.logic.getParameterNode()
        widget.setParameterNode(parameterNode)
        parameterNode.fixedVolume = fixed
        parameterNode.movingVolume = fixed
        self.assertFalse(widget.ui.registerButton.enabled)
        parameterNode.movingVolume = moving
        self.assertTrue(widget.ui.registerButton.enabled)
        self.assertGreaterEqual(widget.ui.modelComboBox.count, 1)
        self.assertFalse(widget.ui.hardenButton.enabled)  # no result yet
        self.assertFalse(widget.ui.saveResultsButton.enabled)

    def test_HardenAndSaveResults(self):
        self.delayDisplay("Harden the transform and save the results")
        import tempfile

        import SimpleITK as sitk

        fixed, moving = self._phantom(seed=7)[:2]
        logic = DeepRegisterLogic()
        result = logic.register(fixed, moving, model=None, device="cpu", iterations=5, createWarped=True)
        with tempfile.TemporaryDirectory() as folder:
            paths = logic.saveResults(result, folder)
            self.assertEqual(sorted(os.path.basename(path) for path in paths.values()),
                             ["saliency.nii.gz", "transform.h5", "warped.nii.gz"])
            sitk.ReadTransform(paths["transform"])
            with self.assertRaises(ValueError):  # never replaces files without being told to
                logic.saveResults(result, folder)
        logic.hardenTransform(result)
        self.assertIsNone(moving.GetParentTransformNode())
        self.assertIsNotNone(slicer.mrmlScene.GetNodeByID(result.transformNode.GetID()))
