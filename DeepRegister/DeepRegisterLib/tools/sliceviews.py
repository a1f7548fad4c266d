"""Offscreen Slicer slice views (Red, Yellow, Green) for a MRML scene, without the Slicer application.

:class:`SliceViews` builds, in a ``vtkMRMLScene``, the slice view nodes that Slicer's layout
manager creates (``vtkMRMLSliceNodeRed`` ... with their ``vtkMRMLSliceCompositeNode``), one
``vtkMRMLSliceLogic`` per view and one offscreen render window per view that holds the slice image
actor and Slicer's own slice-view displayable managers (volume glyphs, model intersections,
crosshair, transforms, markups, scalar bar, ruler, orientation marker, segmentations...).  What is
rendered therefore follows the scene exactly as in Slicer: background / foreground / label layers
and opacities of the composite nodes, window/level and colour node of the volume display nodes,
transform display nodes shown in 2D (glyph, grid, contour) and markups with their labels.

Rendering is offscreen (EGL or OSMesa; the first :class:`SliceViews` sets ``VTK_DEFAULT_OPENGL_WINDOW``
to ``vtkEGLRenderWindow`` when unset and no X display is available; importing this module changes
no environment variable).  Inside the Slicer application use the application's own slice views
instead (``slicer.app.layoutManager()``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

__all__ = ["SliceViews", "DISPLAYABLE_MANAGERS", "SLICE_VIEW_DEFAULTS"]

# Layout defaults of Slicer's standard slice views (vtkMRMLLayoutLogic's layout descriptions):
# orientation, view label, view colour.
SLICE_VIEW_DEFAULTS: dict[str, tuple[str, str, str]] = {
    "Red": ("Axial", "R", "#F34A33"),
    "Yellow": ("Sagittal", "Y", "#EDD54C"),
    "Green": ("Coronal", "G", "#6EB04B"),
}
_ORIENTATIONS = ("Axial", "Sagittal", "Coronal")

# Slice-view displayable managers registered in Slicer's slice views (qSlicerCoreApplication and
# the modules' qSlicer*Module::setup), those that are wrapped in slicer-core.  One that cannot be
# registered or instantiated is skipped and reported in SliceViews.failedManagers.
DISPLAYABLE_MANAGERS: tuple[str, ...] = (
    "vtkMRMLVolumeGlyphSliceDisplayableManager",
    "vtkMRMLModelSliceDisplayableManager",
    "vtkMRMLCrosshairDisplayableManager",
    "vtkMRMLOrientationMarkerDisplayableManager",
    "vtkMRMLRulerDisplayableManager",
    "vtkMRMLScalarBarDisplayableManager",
    "vtkMRMLColorLegendDisplayableManager",
    "vtkMRMLTransformsDisplayableManager2D",
    "vtkMRMLSegmentationsDisplayableManager2D",
    "vtkMRMLMarkupsDisplayableManager",
)


def _choose_offscreen_window() -> None:
    """Ask VTK for an EGL render window when none is chosen and no X display is available (Linux).

    VTK reads ``VTK_DEFAULT_OPENGL_WINDOW`` when it creates a render window, so this runs in
    :class:`SliceViews` before its first window, not at import: importing the module changes nothing.
    """
    unset = "VTK_DEFAULT_OPENGL_WINDOW" not in os.environ
    if unset and not os.environ.get("DISPLAY") and sys.platform.startswith("linux"):
        os.environ["VTK_DEFAULT_OPENGL_WINDOW"] = "vtkEGLRenderWindow"


def _hex_to_rgb(color: str) -> tuple[float, float, float]:
    """'#RRGGBB' as three floats in [0, 1]."""
    color = color.lstrip("#")
    return tuple(int(color[i : i + 2], 16) / 255.0 for i in (0, 2, 4))  # type: ignore[return-value]


def _find_singleton(scene: slicer.vtkMRMLScene, class_name: str, tag: str):
    """The node of ``class_name`` whose singleton tag is ``tag``, or None."""
    for i in range(scene.GetNumberOfNodesByClass(class_name)):
        node = scene.GetNthNodeByClass(i, class_name)
        if node.GetSingletonTag() == tag:
            return node
    return None


def _write_png(rgb: np.ndarray, path: Path) -> Path:
    """Write an (H, W, 3|4) uint8 array, row 0 at the top, as a PNG with vtkPNGWriter."""
    rgb = np.ascontiguousarray(rgb[::-1])  # VTK images start at the bottom row
    height, width, components = rgb.shape
    image = vtk.vtkImageData()
    image.SetDimensions(width, height, 1)
    scalars = numpy_support.numpy_to_vtk(rgb.reshape(-1, components), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    scalars.SetNumberOfComponents(components)
    image.GetPointData().SetScalars(scalars)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = vtk.vtkPNGWriter()
    writer.SetFileName(str(path))
    writer.SetInputData(image)
    writer.Write()
    if writer.GetErrorCode():
        raise OSError(f"could not write {path}")
    return path


class _SliceView:
    """One offscreen slice view: slice node, composite node, slice logic, render window, managers."""

    def __init__(self, owner: SliceViews, name: str, index: int):
        scene = owner.scene
        self.name = name
        self.sliceNode = self._sliceNode(scene, name, index)

        # Slice logic, as qMRMLSliceWidget sets it up; it finds or creates the composite node
        # (vtkMRMLSliceCompositeNode<Name>, singleton tag and layout name <Name>).
        # The slice node goes first so that the logic's hidden helper nodes get the view's name
        # ("Red Volume Slice", "Red Display", "Red Transform"), as in Slicer.
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(owner.appLogic)
        self.logic.SetSliceNode(self.sliceNode)
        self.logic.SetMRMLScene(scene)
        owner.appLogic.GetSliceLogics().AddItem(self.logic)
        self.compositeNode = self.logic.GetSliceCompositeNode()

        # Offscreen render window with the slice image actor in the background, like
        # ctkVTKSliceView's vtkLightBoxRendererManager (one image, no lightbox).
        self.renderWindow = vtk.vtkRenderWindow()
        self.renderWindow.SetOffScreenRendering(1)
        self.renderWindow.SetMultiSamples(0)
        self.renderWindow.SetAlphaBitPlanes(1)
        self.renderWindow.SetSize(*owner.size)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.renderer.SetBackground(*self.sliceNode.GetBackgroundColor())
        self.renderWindow.AddRenderer(self.renderer)
        self.interactor = vtk.vtkGenericRenderWindowInteractor()  # widgets look for one; no events
        self.interactor.SetRenderWindow(self.renderWindow)
        self.interactor.Initialize()

        self.imageMapper = vtk.vtkImageMapper()
        self.imageMapper.SetColorWindow(255.0)  # the slice logic outputs RGBA in 0..255
        self.imageMapper.SetColorLevel(127.5)
        self.imageActor = vtk.vtkActor2D()
        self.imageActor.SetMapper(self.imageMapper)
        self.imageActor.GetProperty().SetDisplayLocationToBackground()
        self.imageActor.SetVisibility(False)
        self.renderer.AddViewProp(self.imageActor)
        self._connection = None

        self.managers = slicer.vtkMRMLDisplayableManagerGroup()
        self.managers.Initialize(owner.factory, self.renderer)
        self.managers.SetMRMLDisplayableNode(self.sliceNode)

        self.size = owner.size
        self.logic.ResizeSliceNode(*self.size)
        self._observer = self.logic.AddObserver(vtk.vtkCommand.ModifiedEvent, self._updateImageConnection)
        self._updateImageConnection()

    @staticmethod
    def _sliceNode(scene: slicer.vtkMRMLScene, name: str, index: int) -> slicer.vtkMRMLSliceNode:
        """The slice node with layout name ``name``; created as vtkMRMLLayoutLogic does if missing."""
        node = _find_singleton(scene, "vtkMRMLSliceNode", name)
        if node is not None:
            return node
        orientation, label, color = SLICE_VIEW_DEFAULTS.get(
            name, (_ORIENTATIONS[index % len(_ORIENTATIONS)], name[:1], "#808080")
        )
        node = scene.CreateNodeByClass("vtkMRMLSliceNode")
        node.SetLayoutName(name)  # also the singleton tag, hence the ID vtkMRMLSliceNode<Name>
        node.SetName(name)
        node.SetDefaultOrientation(orientation)
        node.SetOrientation(orientation)
        node.SetLayoutLabel(label)
        node.SetLayoutColor(*_hex_to_rgb(color))
        added = scene.AddNode(node)
        node.UnRegister(None)  # CreateNodeByClass returns a new reference
        return added

    def _updateImageConnection(self, *_) -> None:
        connection = self.logic.GetImageDataConnection()
        if connection is self._connection:
            return
        self._connection = connection
        self.imageMapper.SetInputConnection(connection)
        self.imageActor.SetVisibility(connection is not None)

    def render(self) -> np.ndarray:
        """Render offscreen and return (H, W, 3) uint8 RGB, row 0 at the top."""
        if tuple(self.sliceNode.GetDimensions()[:2]) != self.size:  # another view of the same node resized it
            self.logic.ResizeSliceNode(*self.size)
        self._updateImageConnection()
        self.renderer.SetBackground(*self.sliceNode.GetBackgroundColor())
        self.managers.RequestRender()
        self.renderWindow.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.renderWindow)
        grab.SetInputBufferTypeToRGB()
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        width, height, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
        return np.ascontiguousarray(pixels.reshape(height, width, -1)[::-1, :, :3])

    def close(self) -> None:
        """Detach from the scene, remove the logic's helper nodes and release the OpenGL context."""
        helpers = [
            self.logic.GetSliceModelNode(),
            self.logic.GetSliceModelDisplayNode(),
            self.logic.GetSliceModelTransformNode(),
        ]
        if self._observer is not None:
            self.logic.RemoveObserver(self._observer)
            self._observer = None
        self.managers.SetMRMLDisplayableNode(None)
        self.renderer.RemoveAllViewProps()
        self.imageMapper.SetInputConnection(None)
        self.renderWindow.Finalize()
        self.interactor.SetRenderWindow(None)
        scene = self.logic.GetMRMLScene()
        self.logic.GetMRMLApplicationLogic().GetSliceLogics().RemoveItem(self.logic)
        self.logic.SetMRMLScene(None)
        for node in helpers:
            if scene is not None and node is not None and scene.IsNodePresent(node):
                scene.RemoveNode(node)


class SliceViews:
    """Slicer's slice views (default Red axial, Yellow sagittal, Green coronal), rendered offscreen.

    Views are addressed by layout name.  Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        scene: slicer.vtkMRMLScene,
        size: tuple[int, int] = (512, 512),
        names: Sequence[str] = ("Red", "Yellow", "Green"),
        appLogic: slicer.vtkMRMLApplicationLogic | None = None,
    ):
        """Find or create the slice nodes ``names`` in ``scene`` and an offscreen view for each.

        ``size`` is (width, height) in pixels.  ``appLogic`` defaults to a new
        vtkSlicerApplicationLogic on ``scene`` (which adds the selection and interaction node
        singletons when missing).
        """
        if not names or len(set(names)) != len(names):
            raise ValueError(f"names must be distinct and not empty: {names!r}")
        _choose_offscreen_window()  # before the first render window
        self.scene = scene
        self.size = (int(size[0]), int(size[1]))
        self._closed = False

        self._ownsAppLogic = appLogic is None
        if appLogic is None:
            appLogic = slicer.vtkSlicerApplicationLogic()
            appLogic.SetMRMLScene(scene)
        if appLogic.GetSliceLogics() is None:
            appLogic.SetSliceLogics(vtk.vtkCollection())
        if appLogic.GetViewLogics() is None:
            appLogic.SetViewLogics(vtk.vtkCollection())
        self.appLogic = appLogic
        self._ensureSingletons()

        # Slicer's default colour tables (Grey, Iron, Labels, ...): volume display nodes refer to
        # them by ID, and a slice rendered before its colour node exists stays black.
        colorLogic = appLogic.GetColorLogic()
        if colorLogic is None:
            colorLogic = slicer.vtkMRMLColorLogic()
            appLogic.SetColorLogic(colorLogic)
        if colorLogic.GetMRMLScene() is None:
            colorLogic.SetMRMLScene(scene)
        if scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is None:
            colorLogic.AddDefaultColorNodes()
        self.colorLogic = colorLogic
        if not scene.IsNodeClassRegistered("vtkMRMLColorLegendDisplayNode"):
            scene.RegisterNodeClass(slicer.vtkMRMLColorLegendDisplayNode())  # as the Colors module does

        # The markups displayable manager asks the "Markups" module logic for its widgets.
        self.markupsLogic = appLogic.GetModuleLogic("Markups")
        self._ownsMarkupsLogic = self.markupsLogic is None
        if self.markupsLogic is None:
            self.markupsLogic = slicer.vtkSlicerMarkupsLogic()
            self.markupsLogic.SetMRMLApplicationLogic(appLogic)
            self.markupsLogic.SetMRMLScene(scene)
            appLogic.SetModuleLogic("Markups", self.markupsLogic)

        self.factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        self.factory.SetMRMLApplicationLogic(appLogic)
        self.failedManagers: dict[str, str] = {}
        for manager in DISPLAYABLE_MANAGERS:
            if not hasattr(slicer, manager):
                self.failedManagers[manager] = "not wrapped in this slicer-core"
            elif not self.factory.IsDisplayableManagerRegistered(manager) and not self.factory.RegisterDisplayableManager(manager):
                self.failedManagers[manager] = "factory refused to register it"

        self._views: dict[str, _SliceView] = {}
        for index, name in enumerate(names):
            self._views[name] = _SliceView(self, name, index)
        # Managers that did not get instantiated in the views (e.g. unknown to the object factory).
        group = next(iter(self._views.values())).managers
        for manager in DISPLAYABLE_MANAGERS:
            if manager not in self.failedManagers and group.GetDisplayableManagerByClassName(manager) is None:
                self.failedManagers[manager] = "could not be instantiated"

    # -- scene set-up ------------------------------------------------------------------------
    def _ensureSingletons(self) -> None:
        """Selection, interaction and crosshair nodes that Slicer's application always has."""
        scene = self.scene
        for class_name in ("vtkMRMLSelectionNode", "vtkMRMLInteractionNode"):
            if scene.GetFirstNodeByClass(class_name) is None:
                node = scene.CreateNodeByClass(class_name)
                node.SetSingletonTag("Singleton")
                scene.AddNode(node)
                node.UnRegister(None)
        if scene.GetFirstNodeByClass("vtkMRMLCrosshairNode") is None:
            crosshair = slicer.vtkMRMLCrosshairNode()
            crosshair.SetCrosshairName("default")  # as qSlicerCoreApplication does
            scene.AddNode(crosshair)

    # -- access ------------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """Layout names of the views, in order."""
        return list(self._views)

    def _view(self, name: str) -> _SliceView:
        if self._closed:
            raise RuntimeError("SliceViews is closed")
        try:
            return self._views[name]
        except KeyError:
            raise KeyError(f"no slice view {name!r}; views: {self.names}") from None

    def sliceNode(self, name: str) -> slicer.vtkMRMLSliceNode:
        """The view's vtkMRMLSliceNode."""
        return self._view(name).sliceNode

    def compositeNode(self, name: str) -> slicer.vtkMRMLSliceCompositeNode:
        """The view's vtkMRMLSliceCompositeNode."""
        return self._view(name).compositeNode

    def sliceLogic(self, name: str) -> slicer.vtkMRMLSliceLogic:
        """The view's vtkMRMLSliceLogic."""
        return self._view(name).logic

    def renderWindow(self, name: str) -> vtk.vtkRenderWindow:
        """The view's offscreen vtkRenderWindow."""
        return self._view(name).renderWindow

    def displayableManager(self, name: str, className: str):
        """The view's displayable manager of class ``className``, or None."""
        return self._view(name).managers.GetDisplayableManagerByClassName(className)

    # -- layers ------------------------------------------------------------------------------
    def setLayers(
        self,
        background=None,
        foreground=None,
        label=None,
        foregroundOpacity: float | None = None,
        labelOpacity: float | None = None,
    ) -> None:
        """Set the volumes (nodes or IDs; None leaves a layer unchanged) of all views' composite nodes."""

        def node_id(node):
            return node if isinstance(node, str) or node is None else node.GetID()

        for view in self._views.values():
            composite = view.compositeNode
            if background is not None:
                composite.SetBackgroundVolumeID(node_id(background))
            if foreground is not None:
                composite.SetForegroundVolumeID(node_id(foreground))
            if label is not None:
                composite.SetLabelVolumeID(node_id(label))
            if foregroundOpacity is not None:
                composite.SetForegroundOpacity(float(foregroundOpacity))
            if labelOpacity is not None:
                composite.SetLabelOpacity(float(labelOpacity))

    def showColorLegend(self, displayableNode, visible: bool = True):
        """Show (or hide) the colour legend of a volume or model in the slice views.

        Uses the Colors module's default legend node (vtkSlicerColorLogic); returns it.
        """
        legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(displayableNode)
        if legend is None:
            raise ValueError(f"no colour legend for {displayableNode.GetID()}: it needs a display node")
        legend.SetVisibility(visible)
        legend.SetVisibility2D(visible)
        return legend

    # -- navigation --------------------------------------------------------------------------
    def fitToVolume(self, volumeNode=None) -> None:
        """Reset every view's field of view to ``volumeNode`` (default: the background volume).

        Like Slicer's "reset field of view": the slice is centred on the volume, so the offset goes
        through the volume centre.
        """
        for view in self._views.values():
            width, height = self.size
            if volumeNode is None:
                view.logic.FitSliceToBackground(width, height)
            else:
                view.logic.FitSliceToVolume(volumeNode, width, height)

    def setSliceOffset(self, name: str, offsetMm: float) -> None:
        """Move one view's slice plane along its normal to ``offsetMm``."""
        self._view(name).logic.SetSliceOffset(float(offsetMm))

    def sliceOffset(self, name: str) -> float:
        """The view's slice offset in mm."""
        return self._view(name).logic.GetSliceOffset()

    def jumpToPoint(self, rasPoint: Iterable[float], centered: bool = False) -> None:
        """Make all views' slice planes go through ``rasPoint``.

        By default only the offsets change (Slicer's offset jump mode); with ``centered`` the point
        is also moved to the centre of each view.
        """
        r, a, s = (float(v) for v in rasPoint)
        for view in self._views.values():
            if centered:
                view.sliceNode.JumpSliceByCentering(r, a, s)
            else:
                view.sliceNode.JumpSliceByOffsetting(r, a, s)

    def rasToPixel(self, name: str, rasPoint: Iterable[float]) -> tuple[float, float]:
        """(row, column) of a RAS point projected on a view, in :meth:`render` image coordinates."""
        xy_to_ras = vtk.vtkMatrix4x4()
        xy_to_ras.DeepCopy(self._view(name).sliceNode.GetXYToRAS())
        xy_to_ras.Invert()
        x, y, _, _ = xy_to_ras.MultiplyPoint((*[float(v) for v in rasPoint], 1.0))
        return (self.size[1] - 1 - y, x)

    # -- rendering ---------------------------------------------------------------------------
    def render(self, name: str) -> np.ndarray:
        """The view rendered offscreen: (height, width, 3) uint8 RGB, row 0 at the top."""
        return self._view(name).render()

    def capture(self, name: str, path: str | os.PathLike) -> Path:
        """Write the view as a PNG; returns the path."""
        return _write_png(self.render(name), Path(path))

    def montage(self, path: str | os.PathLike, names: Sequence[str] | None = None, gap: int = 2) -> Path:
        """Write the views side by side (left to right in ``names`` order) as one PNG."""
        images = [self.render(name) for name in (names or self.names)]
        height = max(image.shape[0] for image in images)
        parts = []
        for i, image in enumerate(images):
            if image.shape[0] < height:
                image = np.pad(image, ((0, height - image.shape[0]), (0, 0), (0, 0)))
            if i and gap:
                parts.append(np.full((height, gap, 3), 64, np.uint8))
            parts.append(image)
        return _write_png(np.concatenate(parts, axis=1), Path(path))

    def captureAll(self, folder: str | os.PathLike, prefix: str = "", montage: bool = True) -> list[Path]:
        """Write ``<prefix><Name>.png`` for every view and, with ``montage``, ``<prefix>montage.png``."""
        folder = Path(folder)
        paths = [self.capture(name, folder / f"{prefix}{name}.png") for name in self.names]
        if montage:
            paths.append(self.montage(folder / f"{prefix}montage.png"))
        return paths

    # -- lifetime ----------------------------------------------------------------------------
    def close(self) -> None:
        """Release the render windows and detach the slice logics; the scene nodes are kept."""
        if self._closed:
            return
        self._closed = True
        for view in self._views.values():
            view.close()
        self._views.clear()
        if self._ownsMarkupsLogic:
            self.appLogic.SetModuleLogic("Markups", None)
            self.markupsLogic.SetMRMLScene(None)
        if self._ownsAppLogic:
            if self.colorLogic.GetMRMLScene() is self.scene:
                self.colorLogic.SetMRMLScene(None)
            self.appLogic.SetMRMLScene(None)

    def __enter__(self) -> SliceViews:
        return self

    def __exit__(self, *_) -> None:
        self.close()
