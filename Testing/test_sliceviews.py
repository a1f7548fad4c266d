"""Offscreen Slicer slice views (DeepRegisterLib.tools.sliceviews): scene nodes, navigation and pixels.

Set DEEPREGISTER_SLICEVIEWS_EXAMPLES=<folder> to also keep example screenshots there.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk
from vtk.util import numpy_support

from DeepRegisterLib.tools.sliceviews import SliceViews

SIZE = (160, 160)  # view width, height in pixels
DIMS = (64, 64, 40)  # I, J, K voxels
SPACING = (1.0, 1.0, 2.0)
ORIGIN = (40.0, 25.0, -30.0)
SPHERE_IJK = (44, 20, 26)  # off-centre bright sphere
SPHERE_RADIUS_MM = 7.0
SPHERE_VALUE = 1000.0


def ijk_to_ras() -> np.ndarray:
    """Oblique grid: LPS-like axes (I to the patient's left, J posterior) turned 20 degrees about S."""
    a = np.radians(20.0)
    turn = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    matrix = np.eye(4)
    matrix[:3, :3] = turn @ np.diag([-1.0, -1.0, 1.0]) @ np.diag(SPACING)
    matrix[:3, 3] = ORIGIN
    return matrix


def ras_of(ijk) -> np.ndarray:
    return (ijk_to_ras() @ [*ijk, 1.0])[:3]


def add_volume(scene, array_kji: np.ndarray, name: str, class_name: str = "vtkMRMLScalarVolumeNode"):
    """A volume node on the oblique test grid from a (K, J, I) array, with default display nodes."""
    node = scene.AddNewNodeByClass(class_name, name)
    image = vtk.vtkImageData()
    image.SetDimensions(*array_kji.shape[::-1])
    scalars = numpy_support.numpy_to_vtk(np.ascontiguousarray(array_kji).ravel(), deep=True)
    image.GetPointData().SetScalars(scalars)
    node.SetAndObserveImageData(image)
    matrix = vtk.vtkMatrix4x4()
    for row in range(4):
        for column in range(4):
            matrix.SetElement(row, column, ijk_to_ras()[row, column])
    node.SetIJKToRASMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def voxel_grid():
    return np.mgrid[: DIMS[2], : DIMS[1], : DIMS[0]]  # k, j, i


def background_array() -> np.ndarray:
    k, j, i = voxel_grid()
    array = (60.0 + i + j + k).astype(np.float32)  # dim ramp, never zero
    distance = np.sqrt(
        ((i - SPHERE_IJK[0]) * SPACING[0]) ** 2
        + ((j - SPHERE_IJK[1]) * SPACING[1]) ** 2
        + ((k - SPHERE_IJK[2]) * SPACING[2]) ** 2
    )
    array[distance <= SPHERE_RADIUS_MM] = SPHERE_VALUE
    return array


@pytest.fixture()
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture()
def views(scene):
    with SliceViews(scene, SIZE) as slice_views:
        yield slice_views


@pytest.fixture()
def volume(scene, views):
    node = add_volume(scene, background_array(), "background")
    display = node.GetDisplayNode()
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
    display.AutoWindowLevelOff()
    display.SetWindowLevel(SPHERE_VALUE, SPHERE_VALUE / 2)
    views.setLayers(background=node)
    views.fitToVolume(node)
    return node


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of pixels that differ."""
    return np.abs(a.astype(int) - b.astype(int)).sum(axis=-1) > 0


def centre_box(image: np.ndarray, half: int = 12) -> np.ndarray:
    h, w = image.shape[:2]
    return image[h // 2 - half : h // 2 + half, w // 2 - half : w // 2 + half]


def examples_dir() -> Path | None:
    folder = os.environ.get("DEEPREGISTER_SLICEVIEWS_EXAMPLES")
    return Path(folder) if folder else None


def test_views_are_created_like_slicers_layout_and_reused(scene, views) -> None:
    expected = {"Red": "Axial", "Yellow": "Sagittal", "Green": "Coronal"}
    assert views.names == list(expected)
    for name, orientation in expected.items():
        node = scene.GetNodeByID(f"vtkMRMLSliceNode{name}")
        assert node is views.sliceNode(name)
        assert (node.GetLayoutName(), node.GetSingletonTag(), node.GetName()) == (name, name, name)
        assert node.GetOrientation() == orientation and node.GetLayoutLabel() == name[0]
        assert tuple(node.GetDimensions()[:2]) == SIZE
        composite = scene.GetNodeByID(f"vtkMRMLSliceCompositeNode{name}")
        assert composite is views.compositeNode(name) and composite.GetLayoutName() == name
    composites = scene.GetNodesByClass("vtkMRMLSliceCompositeNode")
    assert sorted(composites.GetItemAsObject(i).GetLayoutName() for i in range(composites.GetNumberOfItems())) == sorted(
        expected
    )
    for class_name in ("vtkMRMLSelectionNode", "vtkMRMLInteractionNode", "vtkMRMLCrosshairNode"):
        assert scene.GetFirstNodeByClass(class_name) is not None
    assert scene.GetNodeByID("vtkMRMLColorTableNodeGrey") is not None
    assert views.failedManagers == {}
    for manager in (
        "vtkMRMLVolumeGlyphSliceDisplayableManager",
        "vtkMRMLModelSliceDisplayableManager",
        "vtkMRMLCrosshairDisplayableManager",
        "vtkMRMLTransformsDisplayableManager2D",
        "vtkMRMLMarkupsDisplayableManager",
        "vtkMRMLScalarBarDisplayableManager",
        "vtkMRMLColorLegendDisplayableManager",
    ):
        assert views.displayableManager("Red", manager) is not None, manager

    assert scene.GetFirstNodeByName("Red Volume Slice") is not None  # the slice logic's helper model

    nodes = scene.GetNumberOfNodes()
    with SliceViews(scene, (64, 48)) as again:  # a second set of views finds the same nodes
        for class_name in ("vtkMRMLSliceNode", "vtkMRMLSliceCompositeNode", "vtkMRMLCrosshairNode"):
            assert scene.GetNumberOfNodesByClass(class_name) == (3 if "Slice" in class_name else 1), class_name
        assert again.sliceNode("Yellow") is views.sliceNode("Yellow")
        assert again.compositeNode("Yellow") is views.compositeNode("Yellow")
        assert again.render("Yellow").shape == (48, 64, 3)
    assert scene.GetNumberOfNodes() == nodes  # closing removes only its slice logics' helper nodes


def test_background_is_shown_in_radiological_orientation_and_sphere_where_expected(views, volume) -> None:
    image = views.render("Red")
    assert image.shape == (SIZE[1], SIZE[0], 3) and image.dtype == np.uint8
    assert image.mean() > 5 and image.std() > 3  # not blank
    assert np.array_equal(image[..., 0], image[..., 1])  # Grey colour table

    # Fit: the slice goes through the volume centre.
    bounds = [0.0] * 6
    volume.GetRASBounds(bounds)
    centre = np.array(bounds).reshape(3, 2).mean(axis=1)
    for name in views.names:
        slice_to_ras = views.sliceNode(name).GetSliceToRAS()
        normal = [slice_to_ras.GetElement(row, 2) for row in range(3)]
        # Slicer's reset-field-of-view snaps the offset to the nearest voxel centre.
        assert views.sliceOffset(name) == pytest.approx(np.dot(normal, centre), abs=0.51 * max(SPACING)), name
    sphere = ras_of(SPHERE_IJK)
    views.jumpToPoint(sphere)
    assert views.sliceOffset("Red") == pytest.approx(sphere[2])

    for name, (right, up) in {
        # screen right / screen up in RAS: patient right on screen left, anterior / superior up
        "Red": ((-1, 0, 0), (0, 1, 0)),
        "Green": ((-1, 0, 0), (0, 0, 1)),
        "Yellow": ((0, -1, 0), (0, 0, 1)),  # anterior on the left
    }.items():
        image = views.render(name)
        fov = views.sliceNode(name).GetFieldOfView()
        mm_per_pixel = fov[0] / SIZE[0]
        offset = sphere - centre
        expected_col = SIZE[0] / 2 + np.dot(offset, right) / mm_per_pixel
        expected_row = SIZE[1] / 2 - np.dot(offset, up) / mm_per_pixel
        bright = np.argwhere(image[..., 0] > 200)
        assert len(bright) > 30, name
        row, col = bright.mean(axis=0)
        assert abs(row - expected_row) < 3 and abs(col - expected_col) < 3, (name, row, col, expected_row, expected_col)
        assert np.allclose(views.rasToPixel(name, sphere), (row, col), atol=2)
        assert centre_box(image, 6)[..., 0].max() < 100  # the volume centre itself is dim

    views.jumpToPoint(sphere, centered=True)
    for name in views.names:
        assert centre_box(views.render(name), 3)[..., 0].min() > 200, name


def test_window_level_and_colour_table_are_applied(views, volume) -> None:
    views.jumpToPoint(ras_of(SPHERE_IJK))
    before = views.render("Red")
    display = volume.GetDisplayNode()
    display.SetWindowLevel(200, 100)  # ramp saturates
    brighter = views.render("Red")
    assert brighter.mean() > before.mean() + 40
    display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
    iron = views.render("Red")
    assert np.abs(iron[..., 0].astype(int) - iron[..., 2]).mean() > 20  # no longer grey


def test_foreground_opacity_blends(scene, views, volume) -> None:
    k, j, i = voxel_grid()
    foreground = add_volume(scene, (((i // 8 + j // 8 + k // 4) % 2) * 100.0).astype(np.float32), "checker")
    foreground.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
    alone = views.render("Red")
    views.setLayers(foreground=foreground, foregroundOpacity=0.0)
    hidden = views.render("Red")
    views.setLayers(foregroundOpacity=0.5)
    half = views.render("Red")
    views.setLayers(foregroundOpacity=1.0)
    full = views.render("Red")
    assert np.array_equal(hidden, alone)
    assert changed(half, hidden).mean() > 0.3
    assert changed(full, half).mean() > 0.3
    assert np.abs(half[..., 0].astype(int) - half[..., 1]).mean() > 10  # colour from the rainbow table


def test_label_layer_is_drawn_over_the_background(scene, views, volume) -> None:
    k, j, i = voxel_grid()
    labels = ((abs(i - 32) < 6) & (abs(j - 32) < 6)).astype(np.int16) * 5
    label_node = add_volume(scene, labels, "labels", "vtkMRMLLabelMapVolumeNode")
    label_node.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")
    before = views.render("Red")
    views.setLayers(label=label_node, labelOpacity=1.0)
    after = views.render("Red")
    mask = changed(after, before)
    assert mask.any() and mask[SIZE[1] // 2, SIZE[0] // 2]
    assert not mask[:10].any() and not mask[:, :10].any()  # only around the labelled box


def test_markups_fiducial_with_label_is_rendered_at_the_point(scene, views, volume) -> None:
    centre = ras_of([(n - 1) / 2 for n in DIMS])
    before = views.render("Red")
    fiducials = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "F")
    fiducials.CreateDefaultDisplayNodes()
    fiducials.AddControlPoint(vtk.vtkVector3d(*centre), "F-1")
    after = views.render("Red")
    mask = changed(after, before)
    row, col = views.rasToPixel("Red", centre)
    assert abs(row - SIZE[1] / 2) < 2 and abs(col - SIZE[0] / 2) < 2
    assert mask[int(round(row)) - 2 : int(round(row)) + 3, int(round(col)) - 2 : int(round(col)) + 3].all()
    glyph_colour = after[int(round(row)), int(round(col))].astype(int)
    assert glyph_colour[0] > glyph_colour[2] + 60  # Slicer's default point colour is reddish
    changed_rows, changed_cols = np.nonzero(mask)
    assert changed_cols.max() - col > 10  # the label text is drawn to the right of the point
    assert np.hypot(changed_rows - row, changed_cols - col).max() < 40
    fiducials.GetDisplayNode().SetVisibility(False)
    assert np.array_equal(views.render("Red"), before)
    if examples_dir():
        fiducials.GetDisplayNode().SetVisibility(True)
        views.captureAll(examples_dir(), "markups_")


def grid_transform(scene, centre: np.ndarray):
    """A smooth displacement field (up to about 8 mm) around ``centre`` as a grid transform node."""
    dims = (16, 16, 12)
    spacing = 6.0
    grid = vtk.vtkImageData()
    grid.SetDimensions(*dims)
    grid.SetSpacing(spacing, spacing, spacing)
    grid.SetOrigin(*(centre - spacing * (np.array(dims) - 1) / 2))
    k, j, i = np.mgrid[: dims[2], : dims[1], : dims[0]]
    displacement = np.stack([6 * np.sin(j / 3.0), 6 * np.cos(i / 3.0), np.zeros(i.shape)], axis=-1)
    grid.GetPointData().SetScalars(numpy_support.numpy_to_vtk(displacement.reshape(-1, 3), deep=True))
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    node = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "deformation")
    node.SetAndObserveTransformFromParent(transform)
    node.CreateDefaultDisplayNodes()
    return node


def test_transform_is_shown_as_glyphs_grid_and_contours(scene, views, volume) -> None:
    centre = ras_of([(n - 1) / 2 for n in DIMS])
    baseline = views.render("Red")
    transform = grid_transform(scene, centre)
    display = transform.GetDisplayNode()
    display.SetAndObserveRegionNode(volume)
    assert np.array_equal(views.render("Red"), baseline)  # transform display nodes start hidden
    display.SetVisibility(True)
    display.SetVisibility2D(True)
    renders = {}
    for mode in ("Glyph", "Grid", "Contour"):
        display.SetVisualizationMode(getattr(display, f"VIS_MODE_{mode.upper()}"))
        if mode == "Contour":
            display.SetContourLevelsMmFromString("2 4 6")
        renders[mode] = views.render("Red")
        assert changed(renders[mode], baseline).mean() > 0.01, mode
        if examples_dir():
            views.captureAll(examples_dir(), f"transform_{mode.lower()}_")
    assert changed(renders["Glyph"], renders["Grid"]).mean() > 0.01
    assert changed(renders["Grid"], renders["Contour"]).mean() > 0.01
    display.SetVisibility2D(False)
    assert np.array_equal(views.render("Red"), baseline)


def test_colour_legend(views, volume) -> None:
    before = views.render("Red")
    views.showColorLegend(volume)
    after = views.render("Red")
    mask = changed(after, before)
    assert mask.mean() > 0.01
    assert mask[:, SIZE[0] // 2 :].sum() > 5 * mask[:, : SIZE[0] // 2].sum()  # legend on the right side
    views.showColorLegend(volume, False)
    assert np.array_equal(views.render("Red"), before)


def read_png(path: Path) -> np.ndarray:
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    image = reader.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return pixels.reshape(height, width, -1)[::-1]


def test_png_capture_capture_all_and_montage(views, volume, tmp_path: Path) -> None:
    views.jumpToPoint(ras_of(SPHERE_IJK))
    path = views.capture("Green", tmp_path / "sub" / "green.png")
    assert path == tmp_path / "sub" / "green.png"
    np.testing.assert_array_equal(read_png(path)[..., :3], views.render("Green"))

    paths = views.captureAll(tmp_path / "all", prefix="case1_")
    assert [p.name for p in paths] == ["case1_Red.png", "case1_Yellow.png", "case1_Green.png", "case1_montage.png"]
    for p in paths[:3]:
        assert read_png(p).shape[:2] == (SIZE[1], SIZE[0])
    montage = read_png(paths[3])
    assert montage.shape[0] == SIZE[1] and montage.shape[1] >= 3 * SIZE[0]
    np.testing.assert_array_equal(montage[:, : SIZE[0], :3], views.render("Red"))
    np.testing.assert_array_equal(montage[:, -SIZE[0] :, :3], views.render("Green"))
    assert views.montage(tmp_path / "m.png", names=["Yellow"], gap=0).exists()
    assert read_png(tmp_path / "m.png").shape[:2] == (SIZE[1], SIZE[0])
    if examples_dir():
        views.captureAll(examples_dir(), "background_")


def test_close_releases_views_and_keeps_scene_nodes(scene) -> None:
    with SliceViews(scene, (32, 32)) as views:
        assert views.render("Red").shape == (32, 32, 3)
    with pytest.raises(RuntimeError):
        views.render("Red")
    views.close()  # idempotent
    assert scene.GetNodeByID("vtkMRMLSliceNodeRed") is not None
    with pytest.raises(KeyError):
        SliceViews(scene, (32, 32), names=("Red",)).render("Blue")
