"""The Slicer module's headless logic on a real vtkMRMLScene (slicer-core)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from DeepRegisterLib import mrml
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.display import SALIENCY_COLORMAP_NAME
from DeepRegisterLib.logic import LogicError, RegistrationLogic
from DeepRegisterLib.progress import RegistrationCancelled
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
    # "Before" is at the registration's start (here the centres aligned: the phantom's volumes lie apart).
    assert result.initial == "centers"
    expected_before = tre(pair.fixed_points, pair.moving_points, result.initialTransform)
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
    np.testing.assert_allclose([no_transform.GetTable().GetColumnByName("Before (mm)").GetValue(r) for r in range(n)],
                               tre(pair.fixed_points, pair.moving_points), atol=1e-9)


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


def test_results_show_without_matplotlib(registered, monkeypatch: pytest.MonkeyPatch) -> None:
    """3D Slicer does not bundle matplotlib: colours, overlays, legend and field display must not need it."""
    scene, logic, result = registered
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # any import of matplotlib now fails
    with pytest.raises(ImportError):
        import matplotlib  # noqa: F401
    scene.RemoveNode(scene.GetFirstNodeByName(SALIENCY_COLORMAP_NAME))  # built again below
    for mode in ("glyphs", "grid", "contours"):
        logic.showResults(result, saliencyOpacity=0.4, fieldDisplay=mode)
        assert result.transformNode.GetDisplayNode().GetVisibility2D()
    color = result.saliencyNode.GetDisplayNode().GetColorNode()
    rgba = [0.0] * 4
    color.GetColor(0, rgba)
    assert max(rgba[:3]) < 0.05 and rgba[3] == 0.0  # inferno's black start, transparent
    color.GetColor(255, rgba)
    assert rgba[0] > 0.9 and rgba[2] < 0.7 and rgba[3] == 1.0
    colors = result.transformNode.GetDisplayNode().GetColorMap()  # viridis: dark blue -> yellow
    low, high = colors.GetRange()
    assert high > low
    assert colors.GetColor(low)[2] > colors.GetColor(low)[0] and colors.GetColor(high)[0] > 0.9


# -- masks, start position and warnings (issue #20) --------------------------------------------------
class FakeEngine:
    """Stands in for DeepRegisterLib.registration.register (its keyword contract): records what the logic
    passes and returns a result with the contract's fields (an identity field on the fixed grid)."""

    def __init__(self, **overrides) -> None:
        self.calls: list[dict] = []
        self.overrides = overrides

    def __call__(self, fixed, moving, model=None, device="auto", iterations=None, progress=None, *,
                 similarity="auto", initial="auto", fixed_mask=None, moving_mask=None, detect_fov=True):
        self.calls.append(dict(fixed=fixed, moving=moving, model=model, similarity=similarity, initial=initial,
                               fixed_mask=fixed_mask, moving_mask=moving_mask, detect_fov=detect_fov))
        field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat64, 3)
        field.CopyInformation(fixed)
        transform = sitk.DisplacementFieldTransform(sitk.Image(field))
        saliency = sitk.Image(fixed.GetSize(), sitk.sitkFloat32)
        saliency.CopyInformation(fixed)
        values = dict(transform=transform, warped=sitk.Resample(moving, fixed), saliency=saliency,
                      timings={"total": 0.1}, folding_percent=0.0, model="none (fine-tuning only)", device="cpu",
                      iterations=0, messages=[], similarity="mind" if similarity == "auto" else similarity,
                      initial="physical" if initial == "auto" else initial, initial_transform=sitk.Transform(),
                      fixed_mask=fixed_mask, moving_mask=moving_mask, kept_stage="finetune", warnings=[],
                      stages=[{"stage": "start", "score": 1.0, "folding_percent": 0.0, "accepted": True},
                              {"stage": "finetune", "score": 0.8, "folding_percent": 0.0, "accepted": True}],
                      min_jacobian=0.6)
        values.update(self.overrides)

        class Result:
            def displacement_field(self):
                return sitk.Image(self.transform.GetDisplacementField())

            @property
            def succeeded(self):
                return not self.warnings

        result = Result()
        result.__dict__.update(values)
        return result


@pytest.fixture
def fake_engine(monkeypatch):
    from DeepRegisterLib import registration

    def install(**overrides) -> FakeEngine:
        engine = FakeEngine(**overrides)
        monkeypatch.setattr(registration, "register", engine)
        return engine

    return install


def add_label_map(scene, image: sitk.Image, name: str, cls: str = "vtkMRMLLabelMapVolumeNode"):
    node = scene.AddNewNodeByClass(cls, name)
    mrml.update_volume_from_sitk(node, sitk.Cast(image, sitk.sitkUInt8))
    return node


def box_on(image: sitk.Image, low: tuple[int, int, int], high: tuple[int, int, int]) -> np.ndarray:
    """(Z, Y, X) uint8 array on ``image``'s grid, 1 on the voxel index box [low, high) (x, y, z)."""
    array = np.zeros(image.GetSize()[::-1], np.uint8)
    array[low[2]:high[2], low[1]:high[1], low[0]:high[0]] = 1
    return array


def as_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def add_segmentation(scene, name: str, reference_node, arrays: list[np.ndarray]):
    """A segmentation with one segment per (Z, Y, X) array, each on ``reference_node``'s voxel grid."""
    from vtk.util import numpy_support

    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    for index, array in enumerate(arrays):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = array.ravel()
        image.SetGeometryFromImageToWorldMatrix(mrml.vtk_matrix(mrml.ijk_to_ras(reference_node)))
        node.AddSegmentFromBinaryLabelmapRepresentation(image, f"segment {index + 1}")
    return node


def test_label_map_mask_on_the_volume_grid_reaches_the_engine(pair, fake_engine) -> None:
    engine = fake_engine()
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    inside = box_on(pair.fixed, (5, 8, 10), (30, 33, 28))
    mask = add_label_map(scene, as_image(inside * 3, pair.fixed), "gland")  # any nonzero label is inside
    result = RegistrationLogic(scene).register(fixed, moving, fixedMaskNode=mask, detectFieldOfView=False,
                                               similarity="lncc", initial="physical", model="none")
    call = engine.calls[-1]
    assert call["model"] is None and call["similarity"] == "lncc" and call["initial"] == "physical"
    assert call["detect_fov"] is False and call["moving_mask"] is None
    given = call["fixed_mask"]
    assert given.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(given), inside)
    for attribute in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection"):
        assert getattr(given, attribute)() == getattr(call["fixed"], attribute)(), attribute
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.fixedMask), inside)
    assert result.movingMask is None and not any("resampled" in m for m in result.messages)
    assert (result.similarity, result.initial) == ("lncc", "physical")


def test_segmentation_mask_is_the_union_of_its_segments(pair, fake_engine) -> None:
    engine = fake_engine()
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    first, second = box_on(pair.moving, (4, 4, 4), (20, 20, 20)), box_on(pair.moving, (15, 25, 10), (40, 44, 30))
    segmentation = add_segmentation(scene, "MR prostate", moving, [first, second])
    nodes = scene.GetNumberOfNodes()
    result = RegistrationLogic(scene).register(fixed, moving, movingMaskNode=segmentation)
    union = np.maximum(first, second)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(engine.calls[-1]["moving_mask"]), union)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.movingMask), union)
    assert engine.calls[-1]["fixed_mask"] is None and engine.calls[-1]["detect_fov"] is True
    assert any("union of the 2 segments of 'MR prostate'" in m for m in result.messages)
    # Exporting the segments added no node (no temporary label map, no colour table).
    assert scene.GetNumberOfNodes() == nodes + 2  # the transform and the saliency volume


def test_mask_on_another_grid_is_resampled_in_physical_space(pair, fake_engine) -> None:
    engine = fake_engine()
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    # A label map drawn on the moving volume's (unrotated, 2.5 mm) grid, given as the fixed mask.
    drawn = as_image(box_on(pair.moving, (10, 12, 14), (40, 38, 36)), pair.moving)
    mask = add_label_map(scene, drawn, "drawn on MR")
    result = RegistrationLogic(scene).register(fixed, moving, fixedMaskNode=mask)
    got = sitk.GetArrayFromImage(engine.calls[-1]["fixed_mask"])
    expected = sitk.GetArrayFromImage(sitk.Resample(drawn, pair.fixed, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert expected.sum() > 1000
    assert np.mean(got != expected) < 0.002  # SimpleITK and VTK may round a voxel on the box's faces differently
    assert any("'drawn on MR' was resampled onto the fixed volume's grid" in m for m in result.messages)

    # Across parent transforms: a mask placed under a translation is resampled where it is shown.
    shifted = add_label_map(scene, drawn, "shifted")
    translation = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 10.0)  # +10 mm R (world) = -10 mm x in LPS
    translation.SetMatrixTransformToParent(matrix)
    shifted.SetAndObserveTransformNodeID(translation.GetID())
    RegistrationLogic(scene).register(fixed, moving, fixedMaskNode=shifted)
    got = sitk.GetArrayFromImage(engine.calls[-1]["fixed_mask"])
    expected = sitk.GetArrayFromImage(sitk.Resample(drawn, pair.fixed, sitk.TranslationTransform(3, (10.0, 0, 0)),
                                                    sitk.sitkNearestNeighbor))
    assert np.mean(got != expected) < 0.002 and np.mean(got != sitk.GetArrayFromImage(
        sitk.Resample(drawn, pair.fixed, sitk.Transform(), sitk.sitkNearestNeighbor))) > 0.01


def test_unusable_masks_and_options_are_refused_and_leave_the_scene_unchanged(pair, fake_engine) -> None:
    engine = fake_engine()
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    empty = add_label_map(scene, as_image(box_on(pair.fixed, (0, 0, 0), (0, 0, 0)), pair.fixed), "empty")
    far = sitk.Image(pair.moving)
    far.SetOrigin((500.0, 500.0, 500.0))
    elsewhere = add_label_map(scene, far > -1e9, "elsewhere")  # all inside, but 500 mm away
    no_segments = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing")
    no_data = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "no data")
    logic = RegistrationLogic(scene)
    state = scene_state(scene)
    cases = [
        (dict(fixedMaskNode=empty), "fixed mask 'empty' has no voxel inside the fixed volume 'TRUS': it is empty"),
        (dict(movingMaskNode=elsewhere), "moving mask 'elsewhere' has no voxel inside .* does not overlap"),
        (dict(fixedMaskNode=no_segments), "fixed mask cannot be used: the segmentation 'nothing' has no segments"),
        (dict(movingMaskNode=no_data), "moving mask cannot be used: 'no data' holds no image data"),
        (dict(fixedMaskNode=fixed), "fixed mask is the fixed volume itself"),
        (dict(similarity="ncc"), "Unknown similarity 'ncc'"),
        (dict(initial="centres"), "Unknown initial position 'centres'"),
    ]
    for arguments, message in cases:
        with pytest.raises(LogicError, match=message):
            logic.register(fixed, moving, **arguments)
        assert scene_state(scene) == state, message
    assert moving.GetParentTransformNode() is None and not engine.calls


def test_warnings_and_stage_details_reach_the_result(pair, fake_engine) -> None:
    warnings = ["The finetune stage was rejected: it made the alignment worse.",
                "The result is the network stage: check it before relying on it."]
    fake_engine(warnings=warnings, kept_stage="network", min_jacobian=-0.2, folding_percent=0.3)
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    result = RegistrationLogic(scene).register(fixed, moving)
    assert result.warnings == warnings and not result.succeeded
    assert (result.keptStage, result.minJacobian, result.foldingPercent) == ("network", -0.2, 0.3)
    assert [stage["stage"] for stage in result.stages] == ["start", "finetune"]
    fake_engine()
    assert RegistrationLogic(scene).register(fixed, moving).succeeded


def test_before_tre_is_measured_from_the_registration_start(pair, fake_engine) -> None:
    shift = (Grid.from_image(pair.moving).center - Grid.from_image(pair.fixed).center).tolist()
    fake_engine(initial="centers", initial_transform=sitk.TranslationTransform(3, shift))
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    fixed_points, moving_points = add_fiducials(scene, pair.fixed_points, "F"), add_fiducials(scene, pair.moving_points, "M")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving)
    table = logic.measureTRE(fixed_points, moving_points, result.transformNode).GetTable()
    before = np.array([table.GetColumnByName("Before (mm)").GetValue(r) for r in range(len(pair.fixed_points))])
    np.testing.assert_allclose(before, tre(pair.fixed_points, pair.moving_points, sitk.TranslationTransform(3, shift)),
                               atol=1e-6)
    assert np.median(before) < 0.5 * np.median(tre(pair.fixed_points, pair.moving_points))
    assert logic.measureTRE(fixed_points, moving_points, result.transformNode).GetAttribute(
        "DeepRegister.BeforeFromStart") == "1"
    # Registering again into the same transform node from the physical positions: no stale start is kept.
    fake_engine(initial="physical", initial_transform=sitk.Transform())
    logic.register(fixed, moving, outputTransformNode=result.transformNode)
    table = logic.measureTRE(fixed_points, moving_points, result.transformNode).GetTable()
    np.testing.assert_allclose(table.GetColumnByName("Before (mm)").GetValue(0),
                               tre(pair.fixed_points, pair.moving_points)[0], atol=1e-6)
    assert logic.initialTransformMatrix(result.transformNode) is not None
    fake_engine(initial_transform=nonlinear_transform())
    logic.register(fixed, moving, outputTransformNode=result.transformNode)
    assert logic.initialTransformMatrix(result.transformNode) is None


def nonlinear_transform() -> sitk.Transform:
    field = sitk.Image([5, 5, 5], sitk.sitkVectorFloat64, 3)
    field.SetSpacing((200.0,) * 3)
    field.SetOrigin((-400.0,) * 3)
    values = sitk.GetArrayFromImage(field)
    values[..., 0] = np.random.default_rng(1).normal(0, 5, values.shape[:3])
    image = sitk.GetImageFromArray(values, isVector=True)
    image.CopyInformation(field)
    return sitk.DisplacementFieldTransform(image)


def test_linear_transform_to_ras_matches_simpleitk_and_refuses_fields() -> None:
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.0))
    ras = mrml.linear_transform_to_ras(euler)
    point_lps = np.array([10.0, -20.0, 30.0])
    expected_lps = np.asarray(euler.TransformPoint(tuple(point_lps)))
    np.testing.assert_allclose(ras[:3, :3] @ (mrml.FLIP @ point_lps) + ras[:3, 3], mrml.FLIP @ expected_lps, atol=1e-9)
    np.testing.assert_allclose(mrml.linear_transform_to_ras(sitk.Transform()), np.eye(4), atol=1e-12)
    assert mrml.linear_transform_to_ras(nonlinear_transform()) is None
    assert mrml.linear_transform_to_ras(None) is None


@pytest.fixture(scope="module")
def masked(pair):
    """A real registration from the aligned centres with a segmentation as the fixed mask and, as the moving
    mask, a label map drawn on a coarser grid than the moving volume's."""
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    fixed_inside = box_on(pair.fixed, (4, 6, 8), (30, 36, 38))  # off-centre: its centre is not the image's
    segmentation = add_segmentation(scene, "TRUS gland", fixed, [fixed_inside])
    coarse = sitk.Image([20, 20, 20], sitk.sitkUInt8)
    coarse.SetSpacing((5.0, 5.0, 5.0))
    coarse.SetOrigin((np.asarray(pair.moving.GetOrigin()) + 1.1).tolist())  # no voxel centre on a box face
    coarse = as_image(box_on(coarse, (6, 3, 5), (20, 16, 18)), coarse)
    drawn = add_label_map(scene, coarse, "MR gland (5 mm)")
    fixed_points, moving_points = add_fiducials(scene, pair.fixed_points, "F"), add_fiducials(scene, pair.moving_points, "M")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving, iterations=20, device="cpu", fixedMaskNode=segmentation,
                            movingMaskNode=drawn, detectFieldOfView=False, initial="centers")
    return logic, result, fixed_inside, coarse, fixed_points, moving_points


def mask_center_lps(mask: sitk.Image) -> np.ndarray:
    index = np.argwhere(sitk.GetArrayFromImage(mask) > 0)[:, ::-1].mean(axis=0)
    return np.asarray(mask.TransformContinuousIndexToPhysicalPoint(index.tolist()))


def test_real_engine_uses_the_mask_nodes(pair, masked) -> None:
    logic, result, fixed_inside, coarse, _, _ = masked
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.fixedMask), fixed_inside)
    expected = sitk.GetArrayFromImage(sitk.Resample(coarse, pair.moving, sitk.Transform(), sitk.sitkNearestNeighbor))
    assert np.mean(sitk.GetArrayFromImage(result.movingMask) != expected) < 0.002
    assert result.movingMask.GetSize() == pair.moving.GetSize()
    # The masks restrict the start: the centres aligned are the masks' centres, not the images'.
    assert result.initial == "centers"
    shift = np.asarray(result.initialTransform.TransformPoint((0.0, 0.0, 0.0)))
    np.testing.assert_allclose(shift, mask_center_lps(result.movingMask) - mask_center_lps(result.fixedMask), atol=1e-3)
    image_shift = Grid.from_image(pair.moving).center - Grid.from_image(pair.fixed).center
    assert np.linalg.norm(shift - image_shift) > 5.0
    assert result.similarity in ("mi", "mind", "lncc") and result.stages
    assert result.keptStage in [stage["stage"] for stage in result.stages]
    assert np.isfinite(result.minJacobian) and isinstance(result.warnings, list)
    assert any("union of the 1 segment of 'TRUS gland'" in m for m in result.messages)
    assert any("'MR gland (5 mm)' was resampled onto the moving volume's grid" in m for m in result.messages)


def test_real_engine_before_tre_is_from_its_start(pair, masked) -> None:
    logic, result, _, _, fixed_points, moving_points = masked
    table = logic.measureTRE(fixed_points, moving_points, result.transformNode).GetTable()
    before = np.array([table.GetColumnByName("Before (mm)").GetValue(r) for r in range(len(pair.fixed_points))])
    np.testing.assert_allclose(before, tre(pair.fixed_points, pair.moving_points, result.initialTransform), atol=1e-4)
    assert not np.allclose(before, tre(pair.fixed_points, pair.moving_points), atol=1.0)


# -- harden and save (issue #21) ---------------------------------------------------------------------
def smooth_field_transform(reference: sitk.Image, amplitude_mm: float = 3.0) -> sitk.DisplacementFieldTransform:
    """A smooth, clearly non-linear displacement field (LPS, mm) on ``reference``'s grid."""
    size = reference.GetSize()
    z, y, x = np.meshgrid(*(np.linspace(0.0, np.pi, n) for n in size[::-1]), indexing="ij")
    field = np.stack([amplitude_mm * np.sin(y) * np.sin(z), amplitude_mm * np.sin(x) * np.cos(z),
                      0.5 * amplitude_mm * np.sin(x + y)], axis=-1)
    image = sitk.GetImageFromArray(field.astype(np.float64), isVector=True)
    image.CopyInformation(reference)
    return sitk.DisplacementFieldTransform(image)


def trilinear(array: np.ndarray, ijk: np.ndarray) -> np.ndarray:
    """Values of a (Z, Y, X) array at continuous (i, j, k) = (x, y, z) indices."""
    from scipy.ndimage import map_coordinates

    return map_coordinates(array.astype(np.float64), ijk[:, ::-1].T, order=1, mode="nearest")


def test_harden_keeps_what_the_transform_showed_and_the_transform(pair, fake_engine) -> None:
    fake_engine(transform=smooth_field_transform(pair.fixed))
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving)
    transformNode = result.transformNode
    original = sitk.GetArrayFromImage(mrml.volume_to_sitk(moving))
    ijk_to_ras = mrml.ijk_to_ras(moving)
    from_parent = transformNode.GetTransformFromParent()

    def shown_before(world: np.ndarray) -> np.ndarray:
        """What the moving volume under the transform showed at world (RAS) points."""
        local = np.array([from_parent.TransformPoint(point) for point in world])
        return trilinear(original, (np.linalg.inv(ijk_to_ras) @ np.c_[local, np.ones(len(local))].T).T[:, :3])

    assert logic.hardenTransform(result) is moving
    assert moving.GetParentTransformNode() is None
    assert scene.GetNodeByID(transformNode.GetID()) is transformNode  # the transform is kept
    assert moving.GetImageData() is not None
    # Slicer resamples onto a grid of the same spacing and axes, widened to hold the warped volume.
    after_to_ras = mrml.ijk_to_ras(moving)
    np.testing.assert_allclose(after_to_ras[:3, :3], ijk_to_ras[:3, :3], atol=1e-9)
    hardened = sitk.GetArrayFromImage(mrml.volume_to_sitk(moving)).astype(np.float64)
    # Voxels well inside the original volume's footprint: their world positions now hold what was shown there.
    size = np.array(hardened.shape[::-1])
    ijk = np.random.default_rng(0).integers(10, size - 10, size=(300, 3))
    world = (after_to_ras @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    after = hardened[ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    np.testing.assert_allclose(after, shown_before(world), atol=1e-3 * np.abs(original).max())
    local = np.array([from_parent.TransformPoint(point) for point in world])
    assert np.abs(local - world).max() > 1.0  # the transform moved these points

    with pytest.raises(LogicError, match="under no transform"):  # hardened already
        logic.hardenTransform(result)
    with pytest.raises(LogicError, match="nothing to harden"):
        logic.hardenTransform(fixed)


def test_harden_with_a_linear_transform_moves_the_voxels_world_positions(pair) -> None:
    scene = slicer.vtkMRMLScene()
    moving = add_volume(scene, pair.moving, "MR")
    before = mrml.ijk_to_ras(moving)
    values = sitk.GetArrayFromImage(mrml.volume_to_sitk(moving))
    transformNode = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "rigid")
    angle = np.radians(12.0)
    matrix = np.array([[np.cos(angle), -np.sin(angle), 0, 4.0], [np.sin(angle), np.cos(angle), 0, -7.0],
                       [0, 0, 1, 2.5], [0, 0, 0, 1]])
    transformNode.SetMatrixTransformToParent(mrml.vtk_matrix(matrix))
    moving.SetAndObserveTransformNodeID(transformNode.GetID())
    probe = [3.0, -2.0, 5.0]
    shown = [0.0, 0.0, 0.0]
    moving.TransformPointToWorld(probe, shown)

    RegistrationLogic(scene).hardenTransform(moving)
    assert moving.GetParentTransformNode() is None and scene.GetNodeByID(transformNode.GetID()) is transformNode
    np.testing.assert_allclose(mrml.ijk_to_ras(moving), matrix @ before, atol=1e-9)  # world = what was shown
    np.testing.assert_array_equal(sitk.GetArrayFromImage(mrml.volume_to_sitk(moving)), values)
    np.testing.assert_allclose(np.asarray(mrml.ijk_to_ras(moving)) @ np.linalg.inv(before) @ [*probe, 1],
                               [*shown, 1], atol=1e-9)


def test_save_results_writes_files_that_read_back_with_the_same_values(pair, fake_engine, tmp_path: Path) -> None:
    fake_engine(transform=smooth_field_transform(pair.fixed))
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving, createWarped=True)
    rng = np.random.default_rng(1)
    mrml.update_volume_from_sitk(result.saliencyNode, as_image(
        rng.random(pair.fixed.GetSize()[::-1]).astype(np.float32), pair.fixed))
    fixed_points = add_fiducials(scene, pair.fixed_points, "F")
    moving_points = add_fiducials(scene, pair.moving_points, "M")
    table = logic.measureTRE(fixed_points, moving_points, result.transformNode)
    nodes = scene.GetNumberOfNodes()

    paths = logic.saveResults(result, tmp_path, table)
    assert sorted(Path(path).name for path in paths.values()) == sorted(
        ["transform.h5", "saliency.nii.gz", "warped.nii.gz", "tre.csv"])
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(Path(path).name for path in paths.values())
    assert scene.GetNumberOfNodes() == nodes  # no storage node left behind

    transform = sitk.ReadTransform(str(tmp_path / "transform.h5"))
    from_parent = result.transformNode.GetTransformFromParent()
    for point_lps in pair.fixed_points:
        expected_ras = from_parent.TransformPoint(mrml.FLIP @ point_lps)
        np.testing.assert_allclose(transform.TransformPoint(tuple(point_lps)), mrml.FLIP @ expected_ras, atol=1e-3)
    for name, node in (("saliency.nii.gz", result.saliencyNode), ("warped.nii.gz", result.warpedNode)):
        image, expected = sitk.ReadImage(str(tmp_path / name)), mrml.volume_to_sitk(node)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(expected))
        np.testing.assert_allclose(image.GetOrigin(), expected.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(image.GetDirection(), expected.GetDirection(), atol=1e-6)
        np.testing.assert_allclose(image.GetSpacing(), expected.GetSpacing(), atol=1e-6)
    import csv

    with open(tmp_path / "tre.csv", newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    statistics = logic.treStatistics(table)
    by_pair = {row["Pair"]: row for row in rows}
    assert len(rows) == len(pair.fixed_points) + 4
    for stage, column in (("before", "Before (mm)"), ("after", "After (mm)")):
        assert float(by_pair["Mean"][column]) == statistics[stage]["mean"]
        assert float(by_pair["Max"][column]) == statistics[stage]["max"]


def test_save_results_refuses_bad_input_and_never_overwrites_without_asking(pair, fake_engine, tmp_path: Path) -> None:
    from DeepRegisterLib.logic import ResultFilesExist

    fake_engine()
    scene = slicer.vtkMRMLScene()
    fixed, moving = add_volume(scene, pair.fixed, "TRUS"), add_volume(scene, pair.moving, "MR")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving)
    with pytest.raises(LogicError, match="register first"):
        logic.saveResults(None, tmp_path)
    with pytest.raises(LogicError, match="not an existing folder"):
        logic.saveResults(result, tmp_path / "missing")
    with pytest.raises(LogicError, match="Choose a folder"):
        logic.saveResults(result, "")
    with pytest.raises(LogicError, match="not a TRE table"):
        logic.saveResults(result, tmp_path, scene.AddNewNodeByClass("vtkMRMLTableNode", "empty"))
    assert not list(tmp_path.iterdir())  # refused before writing anything

    (tmp_path / "saliency.nii.gz").write_bytes(b"keep me")
    with pytest.raises(ResultFilesExist) as refused:
        logic.saveResults(result, tmp_path)
    assert [Path(path).name for path in refused.value.paths] == ["saliency.nii.gz"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["saliency.nii.gz"]
    assert (tmp_path / "saliency.nii.gz").read_bytes() == b"keep me"
    logic.saveResults(result, tmp_path, overwrite=True)
    assert sitk.ReadImage(str(tmp_path / "saliency.nii.gz")).GetSize() == pair.fixed.GetSize()

    # A failure while writing leaves neither half-made files nor partial ones.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    original_write = sitk.WriteImage

    def failing_write(*args, **kwargs):
        raise RuntimeError("disk full")

    sitk.WriteImage = failing_write
    try:
        with pytest.raises(LogicError, match="nothing was written"):
            logic.saveResults(result, fresh)
    finally:
        sitk.WriteImage = original_write
    assert not list(fresh.iterdir())
    scene.RemoveNode(result.saliencyNode)
    with pytest.raises(LogicError, match="no longer in the scene"):
        logic.saveResults(result, fresh)
