"""The Slicer module's headless logic on a real vtkMRMLScene (slicer-core)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from DeepRegisterLib import mrml
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.logic import LogicError, RegistrationLogic
from DeepRegisterLib.registration import RegistrationCancelled
from DeepRegisterLib.spatial import Grid
from DeepRegisterLib.synthetic import make_phantom_pair


def add_volume(scene, image: sitk.Image, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    mrml.update_volume_from_sitk(node, image)
    return node


def add_fiducials(scene, points_lps: np.ndarray, name: str):
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
    for index, point in enumerate(points_lps):
        node.AddControlPoint(vtk.vtkVector3d(*(mrml.FLIP @ point)), f"{name}-{index + 1}")
    return node


@pytest.fixture(scope="module")
def pair():
    # Different spacing, size and orientation for fixed (rotated, 2.75 mm) and moving (2.5 mm).
    return make_phantom_pair(12, (48, 48, 48), spacing=2.5, max_mm=10.0)


@pytest.fixture(scope="module")
def registered(pair):
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving, iterations=80, device="cpu", createWarped=True)
    return scene, logic, result


def test_volume_bridge_round_trip(pair) -> None:
    scene = slicer.vtkMRMLScene()
    node = add_volume(scene, pair.fixed, "TRUS")
    back = mrml.volume_to_sitk(node)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(pair.fixed))
    np.testing.assert_allclose(back.GetOrigin(), pair.fixed.GetOrigin(), atol=1e-9)
    np.testing.assert_allclose(back.GetDirection(), pair.fixed.GetDirection(), atol=1e-9)
    np.testing.assert_allclose(back.GetSpacing(), pair.fixed.GetSpacing(), atol=1e-9)
    # A voxel's RAS position in Slicer is its LPS position in SimpleITK with x and y negated.
    ras = np.array(mrml.ijk_to_ras(node) @ [3, 5, 7, 1])[:3]
    np.testing.assert_allclose(mrml.FLIP @ ras, pair.fixed.TransformIndexToPhysicalPoint((3, 5, 7)), atol=1e-9)


def test_register_creates_nodes_and_puts_moving_under_transform(pair, registered) -> None:
    scene, logic, result = registered
    assert result.movingVolumeNode.GetParentTransformNode() is result.transformNode
    assert result.fixedVolumeNode.GetParentTransformNode() is None
    for node in (result.saliencyNode, result.warpedNode):
        np.testing.assert_allclose(mrml.ijk_to_ras(node), mrml.ijk_to_ras(result.fixedVolumeNode), atol=1e-9)
    saliency = sitk.GetArrayFromImage(mrml.volume_to_sitk(result.saliencyNode))
    assert saliency.min() >= 0 and saliency.max() <= 1 and saliency.std() > 0.01
    assert result.foldingPercent < 0.5 and result.timings["total"] > 0


def test_saved_transform_reads_back_in_simpleitk_with_same_displacements(pair, registered, tmp_path: Path) -> None:
    scene, logic, result = registered
    path = tmp_path / "transform.h5"
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(result.transformNode)
    itk_transform = sitk.ReadTransform(str(path))
    vtk_transform = result.transformNode.GetTransformFromParent()
    grid = Grid.from_image(pair.fixed)
    rng = np.random.default_rng(0)
    for index in rng.integers(5, np.asarray(grid.size) - 5, size=(20, 3)):
        point_lps = np.asarray(pair.fixed.TransformIndexToPhysicalPoint(tuple(int(i) for i in index)))
        from_mrml = mrml.FLIP @ np.asarray(vtk_transform.TransformPoint(mrml.FLIP @ point_lps))
        from_file = np.asarray(itk_transform.TransformPoint(tuple(point_lps)))
        np.testing.assert_allclose(from_mrml, from_file, atol=1e-4)
    # ... and the storage node reads it back into MRML unchanged (compared at a grid point, where
    # Slicer's default cubic interpolation of a loaded grid and our linear one agree).
    reloaded = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    assert storage.ReadData(reloaded)
    point = mrml.FLIP @ np.asarray(pair.fixed.TransformIndexToPhysicalPoint((20, 17, 23)))
    np.testing.assert_allclose(reloaded.GetTransformFromParent().TransformPoint(point),
                               vtk_transform.TransformPoint(point), atol=1e-4)


def test_measure_tre_matches_independent_computation_and_drops(pair, registered, tmp_path: Path) -> None:
    scene, logic, result = registered
    fixed_points = add_fiducials(scene, pair.fixed_points, "F")
    moving_points = add_fiducials(scene, pair.moving_points, "M")
    # Moving landmarks go under the transform like the moving volume; their own coordinates count.
    moving_points.SetAndObserveTransformNodeID(result.transformNode.GetID())
    table = logic.measureTRE(fixed_points, moving_points, result.transformNode)
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "t.h5"))
    storage.WriteData(result.transformNode)
    expected_after = tre(pair.fixed_points, pair.moving_points, sitk.ReadTransform(str(tmp_path / "t.h5")))
    expected_before = tre(pair.fixed_points, pair.moving_points)
    values = table.GetTable()
    n = len(pair.fixed_points)
    after = np.array([values.GetColumnByName("After (mm)").GetValue(r) for r in range(n)])
    before = np.array([values.GetColumnByName("Before (mm)").GetValue(r) for r in range(n)])
    np.testing.assert_allclose(after, expected_after, atol=1e-3)
    np.testing.assert_allclose(before, expected_before, atol=1e-9)
    statistics = logic.treStatistics(table)
    assert statistics["after"]["median"] == pytest.approx(np.median(expected_after), abs=1e-3)
    assert statistics["after"]["max"] == pytest.approx(expected_after.max(), abs=1e-3)
    shift = Grid.from_image(pair.moving).center - Grid.from_image(pair.fixed).center
    centred = tre(pair.fixed_points, pair.moving_points, sitk.TranslationTransform(3, shift.tolist()))
    assert statistics["after"]["median"] < 0.5 * np.median(centred)
    worst = [values.GetColumnByName("Worst").GetValue(r) for r in range(n)]
    assert worst[int(np.argmax(after))] == "yes" and worst.count("yes") < n
    # Landmarks placed before registering: a table without a transform has before values only.
    no_transform = logic.measureTRE(fixed_points, moving_points)
    assert np.isnan(no_transform.GetTable().GetColumnByName("After (mm)").GetValue(0))


def scene_state(scene) -> tuple:
    nodes = scene.GetNodes()
    return scene.GetNumberOfNodes(), tuple(nodes.GetItemAsObject(i).GetID() for i in range(nodes.GetNumberOfItems()))


def test_bad_input_raises_and_leaves_scene_unchanged(pair) -> None:
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    flat = add_volume(scene, sitk.Image([40, 40, 1], sitk.sitkFloat32) + 1.0, "slice")
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    data = vtk.vtkImageData()
    data.SetDimensions(20, 20, 20)
    data.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    vector.SetAndObserveImageData(data)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    few = add_fiducials(scene, pair.fixed_points[:3], "few")
    many = add_fiducials(scene, pair.moving_points, "many")
    logic = RegistrationLogic(scene)
    state = scene_state(scene)
    cases = [
        (lambda: logic.register(None, moving), "Select a fixed volume"),
        (lambda: logic.register(fixed, None), "Select a moving volume"),
        (lambda: logic.register(fixed, fixed), "same volume"),
        (lambda: logic.register(flat, moving), "2D"),
        (lambda: logic.register(fixed, vector), "vector"),
        (lambda: logic.register(fixed, empty), "no image data"),
        (lambda: logic.register(fixed, moving, model="no-such-model"), "no-such-model"),
        (lambda: logic.measureTRE(few, many), "3 fixed and 12 moving"),
        (lambda: logic.measureTRE(few, None), "Select both"),
    ]
    for call, message in cases:
        with pytest.raises((LogicError, ValueError), match=message):
            call()
        assert scene_state(scene) == state, message
    assert moving.GetParentTransformNode() is None


def test_cancel_leaves_scene_unchanged(pair) -> None:
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    state = scene_state(scene)
    with pytest.raises(RegistrationCancelled):
        RegistrationLogic(scene).register(fixed, moving, iterations=40,
                                          progress=lambda stage, fraction: not (stage == "finetune" and fraction > 0.1))
    assert scene_state(scene) == state and moving.GetParentTransformNode() is None


def test_show_results_sets_layers_colours_and_field(registered) -> None:
    scene, logic, result = registered
    composite = scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    logic.showResults(result, saliencyOpacity=0.3, fieldDisplay="contours")
    assert composite.GetBackgroundVolumeID() == result.fixedVolumeNode.GetID()
    assert composite.GetForegroundVolumeID() == result.movingVolumeNode.GetID()
    assert composite.GetLabelVolumeID() == result.saliencyNode.GetID()
    assert composite.GetLabelOpacity() == pytest.approx(0.3)
    color = result.saliencyNode.GetDisplayNode().GetColorNode()
    assert color.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    color.GetColor(255, rgba)
    assert rgba[0] > 0.9 and rgba[2] < 0.7  # inferno's bright yellow end
    display = result.transformNode.GetDisplayNode()
    assert display.GetVisibility2D() and display.GetVisualizationMode() == display.VIS_MODE_CONTOUR
    logic.setFieldDisplay(result.transformNode, "off")
    assert not display.GetVisibility2D()
    with pytest.raises(LogicError, match="Unknown field display"):
        logic.setFieldDisplay(result.transformNode, "arrows")
