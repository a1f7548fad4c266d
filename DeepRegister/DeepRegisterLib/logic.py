"""Headless logic of the DeepRegister Slicer module: works on any vtkMRMLScene (slicer-core, no Qt).

```python
logic = RegistrationLogic(scene)
result = logic.register(fixedVolumeNode, movingVolumeNode, fixedMaskNode=segmentationNode)
result.transformNode      # TransformFromParent maps fixed RAS -> moving RAS
result.warnings           # non-empty: not a plain success (e.g. the guard kept an earlier stage)
table = logic.measureTRE(fixedLandmarksNode, movingLandmarksNode, result.transformNode)
logic.showResults(result)                # inherited from display.ResultDisplay
logic.hardenTransform(result)            # the moving volume resampled as shown; the transform is kept
logic.saveResults(result, folder, table) # transform.h5, saliency.nii.gz, warped.nii.gz, tre.csv
```

The Slicer module's ``DeepRegisterLogic`` is this class on the application's scene. Bad input raises
:class:`LogicError` and leaves the scene (and the disk) as it was.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk
import vtk

from . import mrml
from .display import ResultDisplay
from .imageio import InputError
from .landmarks import tre, tre_summary
from .mrml import LogicError
from .options import INITIAL_POSITIONS
from .options import SIMILARITY_CHOICES as SIMILARITIES

if TYPE_CHECKING:
    from .progress import ProgressCallback

NO_MODEL = "none"  # model name meaning "no trained network: fine-tuning on the pair alone" (as on the command line)
# Attribute of the output transform node: the registration's start (fixed -> moving RAS, 16 numbers, row by
# row), so "Before" TRE is measured from where the registration started (e.g. with image centres aligned).
INITIAL_TRANSFORM_ATTRIBUTE = "DeepRegister.InitialTransform"
# What saveResults writes into the chosen folder (the warped volume and the TRE table only when there are some).
RESULT_FILES = {"transform": "transform.h5", "saliency": "saliency.nii.gz", "warped": "warped.nii.gz",
                "tre": "tre.csv"}
BEFORE_FROM_START_ATTRIBUTE = "DeepRegister.BeforeFromStart"  # of a TRE table: "1" = Before from the start
TRE_STATISTICS = ("Mean", "Std", "Median", "Max")  # a TRE table's rows after the pairs: landmarks.tre_summary's


class ResultFilesExist(LogicError):
    """saveResults would overwrite files: ``paths`` lists them. Ask, then call again with ``overwrite=True``."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = list(paths)
        names = ", ".join(os.path.basename(path) for path in self.paths)
        super().__init__(f"The folder already holds {names}; nothing was written. Choose another folder or "
                         "allow overwriting.")


@dataclass
class MRMLRegistrationResult:
    """Nodes and figures of one registration."""

    fixedVolumeNode: object
    movingVolumeNode: object
    transformNode: object
    saliencyNode: object
    warpedNode: object | None
    timings: dict[str, float]
    foldingPercent: float
    model: str
    device: str
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # non-empty: NOT a plain success; show them
    keptStage: str = ""  # the stage whose alignment was kept (an earlier one when a later made it worse)
    stages: list[dict] = field(default_factory=list)  # {"stage", "score", "folding_percent", "accepted"}
    minJacobian: float | None = None  # smallest Jacobian determinant of the field (<= 0: folding)
    similarity: str = ""  # the similarity used ("mi", "mind", "lncc")
    initial: str = ""  # the start used: "centers" or "physical"
    initialTransform: sitk.Transform | None = None  # the start, fixed -> moving (LPS)
    fixedMask: sitk.Image | None = None  # the masks used (UInt8 on each image's grid), None without
    movingMask: sitk.Image | None = None

    @property
    def succeeded(self) -> bool:
        """True for a plain success: no warning."""
        return not self.warnings


def _check_volume_node(node, role: str) -> None:
    if node is None:
        raise LogicError(f"Select a {role} volume.")
    if not node.IsA("vtkMRMLScalarVolumeNode") or node.GetImageData() is None:
        raise LogicError(f"The {role} volume '{node.GetName()}' holds no image data.")
    if node.GetImageData().GetNumberOfScalarComponents() != 1:
        raise LogicError(f"The {role} volume '{node.GetName()}' is a colour or vector volume; "
                         "select a single-component (scalar) volume.")
    if min(node.GetImageData().GetDimensions()) < 4:
        raise LogicError(f"The {role} volume '{node.GetName()}' is a 2D image or a few slices "
                         f"({node.GetImageData().GetDimensions()}); DeepRegister registers 3D volumes.")


def _mask_image(maskNode, volumeNode, role: str, volumeImage: sitk.Image, messages: list[str]) -> sitk.Image | None:
    """The mask node as a UInt8 0/1 SimpleITK image on ``volumeImage``'s grid (None without a mask node)."""
    if maskNode is None:
        return None
    if not (maskNode.IsA("vtkMRMLScalarVolumeNode") or maskNode.IsA("vtkMRMLSegmentationNode")):
        raise LogicError(f"The {role} mask '{maskNode.GetName()}' is a {maskNode.GetClassName()}; select a label map "
                         "or a segmentation.")
    if maskNode is volumeNode:
        raise LogicError(f"The {role} mask is the {role} volume itself; select a label map or a segmentation.")
    try:
        array, resampled = mrml.mask_on_volume_grid(maskNode, volumeNode)
    except ValueError as error:
        raise LogicError(f"The {role} mask cannot be used: {error}.") from None
    if not array.any():
        raise LogicError(f"The {role} mask '{maskNode.GetName()}' has no voxel inside the {role} volume "
                         f"'{volumeNode.GetName()}'" + (" once resampled onto its grid: it is empty or does not "
                                                        "overlap the volume." if resampled else ": it is empty."))
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        count = maskNode.GetSegmentation().GetNumberOfSegments()
        messages.append(f"The {role} mask is the union of the {count} segment{'s' if count != 1 else ''} of "
                        f"'{maskNode.GetName()}' on the {role} volume's grid ({array.mean():.0%} of it).")
    elif resampled:
        messages.append(f"The {role} mask '{maskNode.GetName()}' was resampled onto the {role} volume's grid "
                        f"({array.mean():.0%} of it).")
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(volumeImage)
    return image


class RegistrationLogic(ResultDisplay):
    """Registration, result files and TRE measurement on the MRML scene ``scene``; the result display
    (showResults, setSaliencyOpacity, setFieldDisplay) is inherited from :class:`ResultDisplay`."""

    # -- registration --------------------------------------------------------------------------
    def register(self, fixedVolumeNode, movingVolumeNode, model: str | None = "", device: str = "auto",
                 iterations: int | None = None, progress: "ProgressCallback | None" = None,
                 outputTransformNode=None, saliencyNode=None, warpedNode=None,
                 createWarped: bool = False, *, fixedMaskNode=None, movingMaskNode=None,
                 detectFieldOfView: bool = True, similarity: str = "auto",
                 initial: str = "auto") -> MRMLRegistrationResult:
        """Register the moving volume to the fixed one; the moving volume is put under the new transform.

        ``model``: a model name or folder; None or "none" for fine-tuning on the pair alone; "" (no choice)
        as :meth:`resolveModel` reads it.
        ``fixedMaskNode``, ``movingMaskNode``: where each volume holds data worth comparing: a label map
        (or scalar volume; nonzero = inside) or a segmentation (the union of its segments). A mask on
        another grid than its volume is resampled onto it (nearest neighbour, in physical space).
        ``detectFieldOfView``: for a volume without a mask, detect an ultrasound field of view and use it
        as its mask. ``similarity``: "auto", "mi", "mind" or "lncc". ``initial``: the start, "auto",
        "centers" (centres of the masks, else of the volumes, aligned) or "physical" (positions as they are).

        Output nodes that are given are filled in; missing ones are created (the warped volume only
        when ``createWarped``). Nothing in the scene changes before the engine has succeeded. The
        result's ``warnings`` (non-empty: not a plain success) must be shown to the user.
        """
        _check_volume_node(fixedVolumeNode, "fixed")
        _check_volume_node(movingVolumeNode, "moving")
        if fixedVolumeNode is movingVolumeNode:
            raise LogicError("The fixed and moving volumes are the same volume; select two different volumes.")
        if similarity not in SIMILARITIES:
            raise LogicError(f"Unknown similarity '{similarity}': use one of {', '.join(SIMILARITIES)}.")
        if initial not in INITIAL_POSITIONS:
            raise LogicError(f"Unknown initial position '{initial}': use one of {', '.join(INITIAL_POSITIONS)}.")
        model = None if model is None else self.resolveModel(model)
        for node, role in ((outputTransformNode, "output transform"), (saliencyNode, "saliency volume"),
                           (warpedNode, "warped volume")):
            if node is not None and node in (fixedVolumeNode, movingVolumeNode):
                raise LogicError(f"The {role} cannot be one of the input volumes.")
        if outputTransformNode is not None and movingVolumeNode.GetParentTransformNode() is not None \
                and movingVolumeNode.GetParentTransformNode() is not outputTransformNode:
            raise LogicError(f"The moving volume '{movingVolumeNode.GetName()}' is already under the transform "
                             f"'{movingVolumeNode.GetParentTransformNode().GetName()}'; harden or remove it first.")
        fixedImage, movingImage = mrml.volume_to_sitk(fixedVolumeNode), mrml.volume_to_sitk(movingVolumeNode)
        maskMessages: list[str] = []
        fixedMask = _mask_image(fixedMaskNode, fixedVolumeNode, "fixed", fixedImage, maskMessages)
        movingMask = _mask_image(movingMaskNode, movingVolumeNode, "moving", movingImage, maskMessages)
        from .registration import register as register_images  # torch: only needed to register

        try:
            result = register_images(fixedImage, movingImage, model=model, device=device, iterations=iterations,
                                     progress=progress, similarity=similarity, initial=initial,
                                     fixed_mask=fixedMask, moving_mask=movingMask, detect_fov=detectFieldOfView)
        except InputError as error:
            raise LogicError(str(error)) from None
        initialRAS = mrml.linear_transform_to_ras(result.initial_transform)

        created = []

        def node_of(node, class_name: str, name: str):
            if node is None:
                node = self.scene.AddNewNodeByClass(class_name, self.scene.GenerateUniqueName(name))
                created.append(node)
            return node

        base = f"{movingVolumeNode.GetName()} to {fixedVolumeNode.GetName()}"
        try:
            transformNode = node_of(outputTransformNode, "vtkMRMLGridTransformNode", f"{base} DeepRegister")
            transformNode.SetAndObserveTransformFromParent(mrml.grid_transform_from_field(result.displacement_field()))
            if initialRAS is not None:
                transformNode.SetAttribute(INITIAL_TRANSFORM_ATTRIBUTE, " ".join(f"{v:.17g}" for v in initialRAS.ravel()))
            else:  # an output node reused from an earlier registration must not keep that one's start
                transformNode.RemoveAttribute(INITIAL_TRANSFORM_ATTRIBUTE)
            saliencyNode = node_of(saliencyNode, "vtkMRMLScalarVolumeNode", f"{base} joint saliency")
            mrml.update_volume_from_sitk(saliencyNode, result.saliency)
            if warpedNode is not None or createWarped:
                warpedNode = node_of(warpedNode, "vtkMRMLScalarVolumeNode", f"{base} warped")
                mrml.update_volume_from_sitk(warpedNode, result.warped)
            movingVolumeNode.SetAndObserveTransformNodeID(transformNode.GetID())
        except Exception:
            for node in created:
                self.scene.RemoveNode(node)
            raise
        return MRMLRegistrationResult(
            fixedVolumeNode, movingVolumeNode, transformNode, saliencyNode, warpedNode, result.timings,
            result.folding_percent, result.model, result.device, maskMessages + list(result.messages),
            warnings=list(result.warnings), keptStage=result.kept_stage, stages=[dict(s) for s in result.stages],
            minJacobian=result.min_jacobian, similarity=result.similarity, initial=result.initial,
            initialTransform=result.initial_transform, fixedMask=result.fixed_mask, movingMask=result.moving_mask)

    def resolveModel(self, model: str) -> str | None:
        """The model to register with: None (fine-tuning on the pair alone) for "none" and, here, for ""
        (no choice); the Slicer module's logic reads "" as the best general model installed."""
        model = model.strip()
        return None if model.lower() in ("", NO_MODEL) else model

    # -- results -------------------------------------------------------------------------------
    def hardenTransform(self, resultOrNode):
        """Applies the registration to the moving volume for good: its voxels are resampled where the
        transform showed them (``vtkSlicerTransformLogic.hardenTransform``, on the volume's own grid)
        and it leaves the transform, which stays in the scene (for the TRE, saving, the field display).

        ``resultOrNode``: a result of :meth:`register` or a transformable node (its parent transform is
        hardened). Returns the hardened node; raises :class:`LogicError` when there is nothing to harden.
        """
        from slicer import vtkSlicerTransformLogic

        if resultOrNode is None:
            raise LogicError("No registration result: register first.")
        if isinstance(resultOrNode, MRMLRegistrationResult):
            node, transformNode = resultOrNode.movingVolumeNode, resultOrNode.transformNode
            if node is None or node.GetScene() is None:
                raise LogicError("The moving volume of this registration is no longer in the scene.")
            if node.GetParentTransformNode() is None:
                raise LogicError(f"The moving volume '{node.GetName()}' is under no transform: it was hardened "
                                 "already or the transform was removed.")
            if node.GetParentTransformNode() is not transformNode:
                raise LogicError(f"The moving volume '{node.GetName()}' is under the transform "
                                 f"'{node.GetParentTransformNode().GetName()}', not under this registration's.")
        else:
            node = resultOrNode
            if not node.IsA("vtkMRMLTransformableNode") or node.GetParentTransformNode() is None:
                raise LogicError(f"'{node.GetName()}' is under no transform: there is nothing to harden.")
        if not vtkSlicerTransformLogic().hardenTransform(node):
            raise LogicError(f"Hardening the transform of '{node.GetName()}' failed.")
        return node

    def saveResults(self, result: MRMLRegistrationResult, folder, treTableNode=None,
                    overwrite: bool = False) -> dict[str, str]:
        """Writes the registration's results into ``folder`` (which must exist): ``transform.h5`` (the
        fixed -> moving displacement field, ITK HDF5, readable by SimpleITK and Slicer),
        ``saliency.nii.gz``, ``warped.nii.gz`` (when the result has a warped volume) and ``tre.csv``
        (when ``treTableNode`` is given). Returns {kind: path}.

        Existing files are never replaced unless ``overwrite``: :class:`ResultFilesExist` lists them.
        Bad input raises :class:`LogicError` before anything is written; files are written under
        temporary names and renamed once all are complete, so a failure leaves no half-made file.
        """
        from slicer import vtkMRMLTransformStorageNode

        if result is None or not isinstance(result, MRMLRegistrationResult):
            raise LogicError("No registration result to save: register first.")
        folder = os.fspath(folder) if folder is not None else ""
        if not folder:
            raise LogicError("Choose a folder to save the results in.")
        if not os.path.isdir(folder):
            raise LogicError(f"'{folder}' is not an existing folder; choose an existing folder.")
        if not os.access(folder, os.W_OK):
            raise LogicError(f"The folder '{folder}' is not writable; choose another folder.")
        transformNode, saliencyNode, warpedNode = result.transformNode, result.saliencyNode, result.warpedNode
        for node, role in ((transformNode, "transform"), (saliencyNode, "joint saliency volume")):
            if node is None or node.GetScene() is None:
                raise LogicError(f"The {role} of this registration is no longer in the scene; register again.")
        if transformNode.GetTransformFromParent() is None:
            raise LogicError(f"The transform '{transformNode.GetName()}' holds no transform; register again.")
        volumes = [("saliency", saliencyNode)]
        if warpedNode is not None:
            if warpedNode.GetScene() is None:
                raise LogicError("The warped volume of this registration is no longer in the scene; register again.")
            volumes.append(("warped", warpedNode))
        for kind, node in volumes:
            if node.GetImageData() is None:
                raise LogicError(f"The volume '{node.GetName()}' holds no image data; register again.")
        rows = mrml.table_rows(treTableNode) if treTableNode is not None else None
        kinds = ["transform"] + [kind for kind, _node in volumes] + (["tre"] if rows is not None else [])
        targets = {kind: os.path.join(folder, RESULT_FILES[kind]) for kind in kinds}
        existing = [path for path in targets.values() if os.path.lexists(path)]
        if existing and not overwrite:
            raise ResultFilesExist(existing)

        partial = {}
        try:
            for kind, path in targets.items():
                stem, extension = RESULT_FILES[kind].split(".", 1)
                partial[kind] = os.path.join(folder, f".{stem}.deepregister-partial-{os.getpid()}.{extension}")
            storage = vtkMRMLTransformStorageNode()
            storage.SetFileName(partial["transform"])
            if not storage.WriteData(transformNode) or not os.path.isfile(partial["transform"]):
                raise OSError(f"writing the transform '{transformNode.GetName()}' failed")
            for kind, node in volumes:
                sitk.WriteImage(mrml.volume_to_sitk(node), partial[kind], True)
            if rows is not None:
                with open(partial["tre"], "w", newline="", encoding="utf-8") as stream:
                    csv.writer(stream).writerows(rows)
            for kind, path in targets.items():
                os.replace(partial[kind], path)
        except Exception as error:
            for path in partial.values():
                if os.path.lexists(path):
                    os.remove(path)
            raise LogicError(f"Saving the results in '{folder}' failed ({error}); nothing was written.") from None
        return targets

    @staticmethod
    def initialTransformMatrix(transformNode) -> np.ndarray | None:
        """The start of the registration that wrote ``transformNode`` (4x4, fixed -> moving RAS), or None."""
        text = transformNode.GetAttribute(INITIAL_TRANSFORM_ATTRIBUTE) if transformNode is not None else None
        if not text:
            return None
        try:
            values = np.array([float(v) for v in text.split()])
        except ValueError:
            return None
        return values.reshape(4, 4) if values.size == 16 and np.isfinite(values).all() else None

    # -- landmarks -----------------------------------------------------------------------------
    def measureTRE(self, fixedLandmarksNode, movingLandmarksNode, transformNode=None, tableNode=None):
        """Per-pair landmark errors (mm) before and after ``transformNode`` in a table node.

        Pairs are matched by order; positions are each markups node's own coordinates, so moving
        landmarks may sit under the registration transform. "Before" is measured at the
        registration's start: through its initial transform (e.g. image centres aligned) when
        ``transformNode`` was written by :meth:`register`, else the landmarks as they are. Rows: one
        per pair (Pair, Label, Before, After, Worst), then Mean, Std, Median, Max. "Worst" marks the
        pairs whose error is at or above the 80th percentile (the largest one at least).
        """
        if fixedLandmarksNode is None or movingLandmarksNode is None:
            raise LogicError("Select both a fixed and a moving landmarks node.")
        fixed = mrml.markups_points_ras(fixedLandmarksNode)
        moving = mrml.markups_points_ras(movingLandmarksNode)
        if len(fixed) != len(moving):
            raise LogicError(f"{len(fixed)} fixed and {len(moving)} moving landmarks: place the same number; "
                             "pairs are matched by order.")
        if len(fixed) == 0:
            raise LogicError("Place at least one pair of landmarks.")
        initial = self.initialTransformMatrix(transformNode)
        before = tre(fixed if initial is None else fixed @ initial[:3, :3].T + initial[:3, 3], moving)
        transform = transformNode.GetTransformFromParent() if transformNode is not None else None
        mapped = None if transform is None else np.array([transform.TransformPoint(p) for p in fixed])
        after = None if mapped is None else tre(mapped, moving)
        ranked = after if after is not None else before
        worst = ranked >= max(np.percentile(ranked, 80), ranked.max() if len(ranked) < 5 else -np.inf)

        if tableNode is None:
            tableNode = self.scene.AddNewNodeByClass("vtkMRMLTableNode", self.scene.GenerateUniqueName("DeepRegister TRE"))
        table, columns = vtk.vtkTable(), {}
        for name, array_type in (("Pair", vtk.vtkStringArray), ("Label", vtk.vtkStringArray),
                                 ("Before (mm)", vtk.vtkDoubleArray), ("After (mm)", vtk.vtkDoubleArray),
                                 ("Worst", vtk.vtkStringArray)):
            columns[name] = array_type()
            columns[name].SetName(name)
            table.AddColumn(columns[name])
        labels = mrml.markups_labels(fixedLandmarksNode)
        afters = after if after is not None else np.full(len(fixed), np.nan)
        rows = [(str(i + 1), labels[i], before[i], afters[i], "yes" if worst[i] else "") for i in range(len(fixed))]
        summaryBefore, summaryAfter = tre_summary(before), tre_summary(after) if after is not None else {}
        rows += [(name, "", summaryBefore[name.lower()], summaryAfter.get(name.lower(), np.nan), "")
                 for name in TRE_STATISTICS]
        for row in rows:
            for column, value in zip(columns.values(), row):
                column.InsertNextValue(float(value) if column.IsA("vtkDataArray") else value)
        tableNode.SetAndObserveTable(table)
        tableNode.SetUseColumnTitleAsColumnHeader(True)
        fromStart = initial is not None and not np.allclose(initial, np.eye(4))
        tableNode.SetAttribute(BEFORE_FROM_START_ATTRIBUTE, "1" if fromStart else "0")
        for name in ("Before (mm)", "After (mm)"):
            tableNode.SetColumnUnitLabel(name, "mm")
        return tableNode

    @staticmethod
    def treStatistics(tableNode) -> dict:
        """{"before": {...}, "after": {...}}: ``landmarks.tre_summary`` (n, mean, std, median, p90, max; mm)
        of the pairs of a TRE table; NaN after registration when the table was measured without a transform."""
        table = tableNode.GetTable()
        names = table.GetColumnByName("Pair")
        pairs = [r for r in range(table.GetNumberOfRows()) if names.GetValue(r) not in TRE_STATISTICS]
        return {stage: tre_summary([table.GetColumnByName(column).GetValue(r) for r in pairs])
                for stage, column in (("before", "Before (mm)"), ("after", "After (mm)"))}
