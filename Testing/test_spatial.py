"""Spatial operations against SimpleITK resampling of the same fields, in physical space."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib import spatial
from DeepRegisterLib.spatial import Grid


def rotation_direction(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    a, b = np.radians(degrees_z), np.radians(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


FIXED = Grid((22, 19, 15), (1.2, 1.5, 2.0), (-10.0, 4.0, 30.0), rotation_direction(25, 10))
MOVING = Grid((30, 26, 21), (1.0, 1.1, 1.7), (-14.0, -3.0, 22.0), rotation_direction(-15, 0))


def smooth_field(grid: Grid, amplitude: float = 3.0, seed: int = 0) -> torch.Tensor:
    """A smooth random displacement (1, 3, Z, Y, X) in mm."""
    rng = np.random.default_rng(seed)
    points = spatial.physical_points(grid, torch.float64)
    field = torch.zeros(1, 3, *grid.shape, dtype=torch.float64)
    for k in range(3):
        w = torch.as_tensor(rng.normal(size=3) / 15.0)
        phase = float(rng.uniform(0, 6.28))
        field[0, k] = amplitude * torch.sin(points @ w + phase)
    return field.float()


def coordinate_image(grid: Grid, axis: int) -> tuple[sitk.Image, torch.Tensor]:
    """An image whose value is the physical coordinate ``axis`` (mm): linear, so trilinear
    interpolation returns the sampled position exactly."""
    points = spatial.physical_points(grid, torch.float64)
    values = points[..., axis].numpy()
    image = sitk.GetImageFromArray(values)
    image.SetSpacing(grid.spacing)
    image.SetOrigin(grid.origin)
    image.SetDirection(grid.direction)
    return image, torch.from_numpy(values)[None, None].float()


def interior(array: np.ndarray, margin: int = 2) -> np.ndarray:
    return array[margin:-margin, margin:-margin, margin:-margin]


def mapped_inside(field: torch.Tensor, grid: Grid, target: Grid, margin: float = 0.5) -> np.ndarray:
    """Mask (Z, Y, X) of fixed voxels whose mapped point lies inside ``target`` by ``margin`` voxels
    (SimpleITK and torch treat the last half voxel differently)."""
    points = spatial.physical_points(grid, torch.float64).numpy() + field[0].permute(1, 2, 3, 0).double().numpy()
    index = target.physical_to_index(points)
    return np.all((index >= margin) & (index <= np.asarray(target.size) - 1 - margin), axis=-1)


def sitk_warp(image: sitk.Image, field: torch.Tensor, grid: Grid) -> np.ndarray:
    transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(field, grid))
    out = sitk.Resample(image, grid.reference_image(), transform, sitk.sitkLinear, -1e6, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_warp_matches_simpleitk_between_grids(axis: int) -> None:
    field = smooth_field(FIXED)
    image, tensor = coordinate_image(MOVING, axis)
    ours = spatial.warp(tensor, field, FIXED, MOVING)[0, 0].numpy()
    reference = sitk_warp(image, field, FIXED)
    inside = interior(mapped_inside(field, FIXED, MOVING))
    assert inside.mean() > 0.3
    difference_voxels = np.abs(interior(ours) - interior(reference))[inside] / min(MOVING.spacing)
    assert difference_voxels.max() < 0.05


def test_normalized_coordinates_move_by_displacements_times_per_mm_matrix() -> None:
    """Fine-tuning moves grid_sample coordinates by u @ normalized_per_mm: the same points, and the
    same interpolated values, as mapping p + u on an oblique, anisotropic grid."""
    points = spatial.physical_points(FIXED, torch.float64)
    field = smooth_field(FIXED).double()[0].permute(1, 2, 3, 0)
    direct = spatial.normalized_coordinates(points + field, MOVING)
    moved = spatial.normalized_coordinates(points, MOVING) + field @ spatial.normalized_per_mm(MOVING, torch.float64)
    torch.testing.assert_close(moved, direct, atol=1e-12, rtol=0)
    torch.testing.assert_close(spatial.identity_coordinates(FIXED)[0].double(),
                               spatial.normalized_coordinates(points, FIXED), atol=1e-6, rtol=0)
    image, values = coordinate_image(MOVING, 1)
    sampled = spatial.sample_normalized(values.double(), moved[None])[0, 0]
    inside = torch.from_numpy(mapped_inside(smooth_field(FIXED), FIXED, MOVING))
    torch.testing.assert_close(sampled[inside], (points + field)[..., 1][inside], atol=1e-5, rtol=0)


def test_sample_normalized_splits_points_over_threads_with_the_same_values_and_gradients() -> None:
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(1, 2, 12, 15, 17, generator=generator, dtype=torch.float64, requires_grad=True)
    coordinates = (2.2 * torch.rand(1, 11, 19, 23, 3, generator=generator, dtype=torch.float64) - 1.1).requires_grad_(True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)  # 4807 points: not a multiple of 3, so the last batch is padded
        values = spatial.sample_normalized(image, coordinates, padding_mode="border")
        gradients = torch.autograd.grad((values * values).sum(), (image, coordinates))
    finally:
        torch.set_num_threads(threads)
    expected = torch.nn.functional.grid_sample(image, coordinates, padding_mode="border", align_corners=True)
    expected_gradients = torch.autograd.grad((expected * expected).sum(), (image, coordinates))
    torch.testing.assert_close(values, expected, atol=1e-12, rtol=0)
    for gradient, reference in zip(gradients, expected_gradients):
        torch.testing.assert_close(gradient, reference, atol=1e-10, rtol=0)


def test_warp_moves_points_where_transform_says() -> None:
    """The value sampled at a fixed voxel is the moving image at p + u(p)."""
    field = smooth_field(FIXED, seed=3)
    transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(field, FIXED))
    fixed_points = spatial.physical_points(FIXED, torch.float64).numpy()
    warped = [spatial.warp(coordinate_image(MOVING, a)[1], field, FIXED, MOVING)[0, 0].numpy() for a in range(3)]
    inside = np.argwhere(mapped_inside(field, FIXED, MOVING))
    assert len(inside) > 100
    for index in map(tuple, inside[:: len(inside) // 7]):
        expected = transform.TransformPoint(tuple(fixed_points[index]))
        got = [w[index] for w in warped]
        np.testing.assert_allclose(got, expected, atol=1e-3)


def test_affine_displacement_matches_simpleitk_affine() -> None:
    theta = torch.tensor([[[1.05, 0.04, -0.02, 3.0], [-0.03, 0.97, 0.05, -2.0], [0.02, 0.01, 1.02, 1.5]]])
    field = spatial.affine_displacement(theta, FIXED)
    center = FIXED.center
    affine = sitk.AffineTransform(theta[0, :, :3].numpy().astype(float).ravel().tolist(),
                                  theta[0, :, 3].numpy().astype(float).tolist(), center.tolist())
    points = spatial.physical_points(FIXED, torch.float64).numpy()
    for index in [(0, 0, 0), (7, 9, 11), (14, 18, 21)]:
        expected = np.asarray(affine.TransformPoint(tuple(points[index]))) - points[index]
        np.testing.assert_allclose(field[0, :, index[0], index[1], index[2]].numpy(), expected, atol=1e-4)
    identity = spatial.affine_displacement(torch.eye(3, 4)[None], FIXED)
    assert identity.abs().max() < 1e-5


def test_compose_matches_simpleitk_composite() -> None:
    first, second = smooth_field(FIXED, 2.0, 1), smooth_field(FIXED, 2.0, 2)
    composed = spatial.compose(first, second, FIXED)
    composite = sitk.CompositeTransform(3)
    # ITK applies the last added transform first.
    composite.AddTransform(sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(second, FIXED)))
    composite.AddTransform(sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(first, FIXED)))
    points = spatial.physical_points(FIXED, torch.float64).numpy()
    for index in [(7, 9, 11), (6, 8, 8), (8, 12, 14)]:
        expected = np.asarray(composite.TransformPoint(tuple(points[index]))) - points[index]
        np.testing.assert_allclose(composed[0, :, index[0], index[1], index[2]].numpy(), expected, atol=1e-3)


def test_scaling_and_squaring_inverts_with_negated_velocity() -> None:
    velocity = smooth_field(FIXED, 2.0, 4)
    integrate = spatial.VelocityIntegrator(FIXED, steps=7)
    forward, backward = integrate(velocity), integrate(-velocity)
    round_trip = spatial.compose(forward, backward, FIXED)
    assert forward.abs().max() > 1.0
    assert interior(round_trip[0].permute(1, 2, 3, 0).numpy(), 3).__abs__().max() < 0.1
    # small velocities integrate to themselves
    tiny = integrate(velocity * 1e-3)
    torch.testing.assert_close(tiny, velocity * 1e-3, atol=1e-5, rtol=1e-2)


def test_velocity_integrator_is_repeated_composition_in_physical_space() -> None:
    """The cached-coordinate integrator equals squaring by :func:`spatial.compose` (the definition)."""
    velocity = smooth_field(FIXED, 6.0, 4)
    expected = velocity / 2 ** 5
    for _ in range(5):
        expected = spatial.compose(expected, expected, FIXED)
    integrated = spatial.VelocityIntegrator(FIXED, steps=5)(velocity)
    assert expected.abs().max() > 3.0
    torch.testing.assert_close(integrated, expected, atol=1e-4, rtol=1e-4)


def test_bspline_field_reproduces_linear_fields_in_physical_space() -> None:
    """Cubic B-splines reproduce linear functions: coefficients that are an affine function of the
    control points' physical positions give that function at every target voxel (any offset,
    spacing and rotation shared by both grids), and a constant falls off outside the support."""
    direction = rotation_direction(25, 10)
    control = Grid.centered(np.array([3.0, -2.0, 5.0]), (9, 8, 7), (6.0, 6.0, 6.0), direction)
    target = Grid.centered(np.array([4.0, -1.0, 4.0]), (11, 10, 9), (2.3, 2.3, 2.3), direction)
    coefficients_of = lambda grid: spatial.physical_points(grid, torch.float64) @ torch.tensor(
        [[0.5, -1.0, 0.2], [0.1, 0.3, -0.7]], dtype=torch.float64).T + torch.tensor([1.0, -2.0], dtype=torch.float64)
    values = spatial.SeparableInterpolator(control, target, "bspline")(coefficients_of(control).permute(3, 0, 1, 2)[None].float())
    expected = coefficients_of(target).permute(3, 0, 1, 2)[None].float()
    torch.testing.assert_close(values, expected, atol=1e-4, rtol=1e-5)
    far = Grid.centered(np.array([4.0, -1.0, 4.0]) + 60.0, (4, 4, 4), (2.3, 2.3, 2.3), direction)
    assert spatial.SeparableInterpolator(control, far, "bspline")(torch.ones(1, 1, 7, 8, 9)).abs().max() == 0
    with pytest.raises(ValueError, match="same direction"):
        spatial.SeparableInterpolator(control, MOVING)


def test_integrate_gradients_identity_and_monotone() -> None:
    grid = Grid((12, 10, 8), (1.5, 2.0, 1.0), (0.0, 0.0, 0.0), rotation_direction(30, 0))
    ones = torch.ones(1, 3, *grid.shape)
    assert spatial.integrate_gradients(ones, grid).abs().max() < 1e-5
    gradients = torch.rand(1, 3, *grid.shape) * 2.0
    displacement = spatial.integrate_gradients(gradients, grid)
    # back to index units along each axis: positions must not decrease
    inverse = torch.as_tensor(np.linalg.inv(grid.index_to_physical), dtype=torch.float32)
    offsets = displacement.permute(0, 2, 3, 4, 1) @ inverse.T
    positions_x = offsets[..., 0] + torch.arange(grid.size[0]).float()
    assert (positions_x.diff(dim=3) >= -1e-5).all()
    positions_z = offsets[..., 2] + torch.arange(grid.size[2]).float().view(-1, 1, 1)
    assert (positions_z.diff(dim=1) >= -1e-5).all()
    # a constant gradient of 2 along x doubles the spacing: the sampling position is c + 2 (i - c)
    doubled = torch.ones(1, 3, *grid.shape)
    doubled[:, 0] = 2.0
    offsets = spatial.integrate_gradients(doubled, grid).permute(0, 2, 3, 4, 1) @ inverse.T
    center = (grid.size[0] - 1) // 2
    expected = torch.arange(grid.size[0]).float() - center
    torch.testing.assert_close(offsets[0, 0, 0, :, 0], expected, atol=1e-4, rtol=0)


def test_resample_field_keeps_physical_values() -> None:
    field = smooth_field(FIXED, 2.0, 5)
    fine = Grid.centered(FIXED.center, (40, 36, 28), (0.6, 0.8, 1.0), FIXED.direction)
    resampled = spatial.resample_field(field, FIXED, fine)
    reference = sitk.Resample(spatial.displacement_to_sitk(field, FIXED), fine.reference_image(sitk.sitkVectorFloat64),
                              sitk.Transform(), sitk.sitkLinear)
    expected = spatial.sitk_to_displacement(reference)
    difference = (resampled - expected).abs()[..., 3:-3, 3:-3, 3:-3]
    assert difference.max() < 0.05 * min(fine.spacing)


def test_separable_linear_interpolation_equals_grid_sample_with_border() -> None:
    """Same-direction grids: the separable path gives trilinear interpolation with border
    extension, also where the target reaches beyond the source; other directions keep grid_sample."""
    field = smooth_field(FIXED, 2.0, 6)
    wider = Grid.centered(FIXED.center + 3.0, (31, 27, 25), (1.1, 1.3, 1.7), FIXED.direction)
    separable = spatial.SeparableInterpolator(FIXED, wider)(field)
    points = spatial.physical_points(wider)[None]
    torch.testing.assert_close(separable, spatial.sample(field, points, FIXED, "bilinear", "border"), atol=1e-5, rtol=1e-5)
    rotated = spatial.resample_field(field, FIXED, MOVING)
    expected = spatial.sample(field, spatial.physical_points(MOVING)[None], FIXED, "bilinear", "border")
    torch.testing.assert_close(rotated, expected)


def test_resize_voxel_field_rescales_values() -> None:
    field = torch.zeros(1, 3, 9, 11, 13)
    field[:, 0] = 2.0  # 2 voxels along x
    field[:, 2] = 1.0  # 1 voxel along z
    resized = spatial.resize_voxel_field(field, (17, 21, 25))
    torch.testing.assert_close(resized[:, 0], torch.full((1, 17, 21, 25), 4.0))
    torch.testing.assert_close(resized[:, 2], torch.full((1, 17, 21, 25), 2.0))


def test_jacobian_determinant_matches_simpleitk_and_detects_folding() -> None:
    grid = Grid((24, 20, 16), (1.0, 1.5, 2.0), (0.0, 0.0, 0.0))
    field = smooth_field(grid, 2.0, 6)
    ours = spatial.jacobian_determinant(field, grid)[0].numpy()
    reference = sitk.GetArrayFromImage(sitk.DisplacementFieldJacobianDeterminant(
        spatial.displacement_to_sitk(field, grid), True))
    np.testing.assert_allclose(interior(ours), interior(reference), atol=1e-3)
    scale = torch.tensor([[[1.1, 0, 0, 0], [0, 0.9, 0, 0], [0, 0, 1.2, 0]]])
    rotated_grid = Grid(grid.size, grid.spacing, grid.origin, rotation_direction(40, 20))
    determinant = spatial.jacobian_determinant(spatial.affine_displacement(scale, rotated_grid), rotated_grid)
    torch.testing.assert_close(determinant, torch.full_like(determinant, 1.1 * 0.9 * 1.2), atol=1e-4, rtol=0)
    folded = smooth_field(grid, 40.0, 6)
    assert spatial.folding_percent(folded, grid) > 1.0
    assert spatial.folding_percent(field, grid) == 0.0


def test_spatial_transformer_gradients_flow() -> None:
    transformer = spatial.SpatialTransformer(FIXED)
    image = torch.rand(1, 1, *FIXED.shape)
    displacement = torch.zeros(1, 3, *FIXED.shape, requires_grad=True)
    transformer(image, displacement + 0.3).sum().backward()
    assert displacement.grad is not None and displacement.grad.abs().sum() > 0


def test_random_smooth_field_is_bounded_and_smooth_on_a_large_grid() -> None:
    """RegNet-style fields: largest magnitude = max_mm, smooth at the blur scale (blurred on a coarse grid)."""
    from DeepRegisterLib.synthetic import multi_frequency_field, random_smooth_field

    grid = Grid.centered((5.0, -3.0, 2.0), (96, 80, 64), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    field = random_smooth_field(grid, 8.0, 12.0, 40, np.random.default_rng(3))
    assert field.shape == (1, 3, 64, 80, 96)
    assert float(field.norm(dim=1).max()) == pytest.approx(8.0, rel=1e-5)
    step = max(float((field[..., 1:] - field[..., :-1]).abs().max()), float((field[:, :, 1:] - field[:, :, :-1]).abs().max()))
    assert step < 8.0 * 2.0 / 12.0  # no jump larger than max / sigma per 2 mm voxel
    combined = multi_frequency_field(grid, 5.0, np.random.default_rng(4))
    assert float(combined.norm(dim=1).max()) == pytest.approx(5.0, rel=1e-5)
