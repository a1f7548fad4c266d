"""What a registration looks like in Slicer's slice views: the fixed volume in the background, the
moving volume through the transform in the foreground, the joint saliency as a colour overlay with a
colour legend, and the displacement field (arrows, warped grid or magnitude contours).

:class:`ResultDisplay` works on any vtkMRMLScene (slicer-core, no Qt, no matplotlib);
:class:`DeepRegisterLib.logic.RegistrationLogic` inherits it, so one logic object registers and shows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import vtk

from .colors import colormap
from .mrml import LogicError

if TYPE_CHECKING:
    from .logic import MRMLRegistrationResult

FIELD_MODES = ("off", "glyphs", "grid", "contours")
SALIENCY_COLORMAP_NAME = "DeepRegister saliency (inferno)"


class ResultDisplay:
    """Result display on the MRML scene ``self.scene``."""

    def __init__(self, scene) -> None:
        self.scene = scene

    def showResults(self, result: MRMLRegistrationResult, saliencyOpacity: float = 0.5,
                    fieldDisplay: str = "glyphs") -> None:
        """Fixed in the background, transformed moving in the foreground (50 %), joint saliency as a
        colour overlay (label layer, inferno colours, ``saliencyOpacity``, colour legend), and the
        displacement field in the slice views as ``fieldDisplay``."""
        display = self._ensureDisplayNode(result.saliencyNode)
        display.SetAndObserveColorNodeID(self.saliencyColorNode().GetID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        self._ensureDisplayNode(result.movingVolumeNode)
        self._ensureDisplayNode(result.fixedVolumeNode)
        for composite in self._compositeNodes():
            composite.SetBackgroundVolumeID(result.fixedVolumeNode.GetID())
            composite.SetForegroundVolumeID(result.movingVolumeNode.GetID())
            composite.SetForegroundOpacity(0.5)
            composite.SetLabelVolumeID(result.saliencyNode.GetID())
        self._addColorLegend(result.saliencyNode)  # after the layers: the legend shows where its volume is
        self.setSaliencyOpacity(saliencyOpacity)
        self.setFieldDisplay(result.transformNode, fieldDisplay, result.fixedVolumeNode)

    def setSaliencyOpacity(self, opacity: float) -> None:
        """Opacity (0-1) of the joint saliency overlay in every slice view."""
        for composite in self._compositeNodes():
            composite.SetLabelOpacity(float(np.clip(opacity, 0.0, 1.0)))

    def setFieldDisplay(self, transformNode, mode: str, regionNode=None) -> None:
        """Show the displacement field in the slice views as "off", "glyphs", "grid" or "contours",
        coloured by displacement magnitude (mm)."""
        if mode not in FIELD_MODES:
            raise LogicError(f"Unknown field display '{mode}': use one of {', '.join(FIELD_MODES)}.")
        if transformNode.GetDisplayNode() is None:
            transformNode.CreateDefaultDisplayNodes()
        display = transformNode.GetDisplayNode()
        if regionNode is not None:
            display.SetAndObserveRegionNode(regionNode)
        display.SetVisibility(mode != "off")
        display.SetVisibility2D(mode != "off")
        display.SetVisibility3D(False)
        low, high = self.fieldMagnitudeRange(transformNode)
        display.SetColorMap(self._magnitudeColors(low, high))
        if mode == "glyphs":
            display.SetVisualizationMode(display.VIS_MODE_GLYPH)
            display.SetGlyphSpacingMm(8.0)
            # The longest arrow spans about one glyph spacing, whatever the field's magnitude.
            display.SetGlyphScalePercent(100.0 * 8.0 / max(high, 1e-3))
        elif mode == "grid":
            display.SetVisualizationMode(display.VIS_MODE_GRID)
            display.SetGridSpacingMm(8.0)
        elif mode == "contours":
            display.SetVisualizationMode(display.VIS_MODE_CONTOUR)
            # Six iso-magnitude levels spread over this field's range (space separated, as Slicer reads them).
            levels = np.linspace(low, high, 8)[1:-1] if high > low else [high]
            display.SetContourLevelsMmFromString(" ".join(f"{level:.1f}" for level in levels))

    @staticmethod
    def fieldMagnitudeRange(transformNode) -> tuple[float, float]:
        """Smallest and largest displacement magnitude (mm) of a grid transform (0, 0 otherwise)."""
        from vtk.util import numpy_support

        transform = transformNode.GetTransformFromParent()
        grid = transform.GetDisplacementGrid() if hasattr(transform, "GetDisplacementGrid") else None
        if grid is None:
            return 0.0, 0.0
        magnitude = np.linalg.norm(numpy_support.vtk_to_numpy(grid.GetPointData().GetScalars()), axis=1)
        return float(magnitude.min()), float(magnitude.max())

    @staticmethod
    def _magnitudeColors(low: float, high: float) -> vtk.vtkColorTransferFunction:
        """Viridis from the smallest (dark blue) to the largest (yellow) displacement magnitude (mm)."""
        colors = vtk.vtkColorTransferFunction()
        for value, (r, g, b) in zip(np.linspace(low, max(high, low + 1e-3), 16), colormap("viridis", 16)):
            colors.AddRGBPoint(value, r, g, b)
        return colors

    def saliencyColorNode(self):
        """Inferno colours (perceptual, dark = low saliency), opacity rising from 0 at saliency 0 to 1 at
        saliency 0.5 and above."""
        existing = self.scene.GetFirstNodeByName(SALIENCY_COLORMAP_NAME)
        if existing is not None:
            return existing
        colors = colormap("inferno", 256)
        node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", SALIENCY_COLORMAP_NAME)
        node.SetTypeToUser()
        node.SetNumberOfColors(256)
        for index, (r, g, b) in enumerate(colors):
            # Low saliency fades out so the overlay highlights where the alignment can be trusted.
            node.SetColor(index, f"{index / 255:.3f}", r, g, b, min(1.0, 2.0 * index / 255))
        node.SetAttribute("Category", "DeepRegister")
        return node

    # -- helpers ---------------------------------------------------------------------------------
    def _compositeNodes(self) -> list:
        nodes = self.scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
        return [nodes.GetItemAsObject(i) for i in range(nodes.GetNumberOfItems())]

    @staticmethod
    def _ensureDisplayNode(volumeNode):
        if volumeNode.GetDisplayNode() is None:
            volumeNode.CreateDefaultDisplayNodes()
        return volumeNode.GetDisplayNode()

    def _addColorLegend(self, volumeNode) -> None:
        from slicer import vtkMRMLColorLegendDisplayNode, vtkSlicerColorLogic

        if not self.scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):  # headless scenes
            self.scene.RegisterNodeClass(vtkMRMLColorLegendDisplayNode())
        legend = vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(volumeNode)
        if legend is not None:
            legend.SetTitleText("Joint saliency")
            legend.SetLabelFormat("%.2f")
            legend.SetVisibility(True)
            legend.SetVisibility2D(True)
            legend.SetSize(0.15, 0.4)
            legend.Modified()
