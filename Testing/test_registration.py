"""register() end to end on phantom pairs with known deformation, plus saliency and loss properties."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegisterLib import finetune, preprocess, registration, spatial
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.losses import BendingEnergy, bending_energy, lncc_loss, mutual_information_loss, position_regions
from DeepRegisterLib.metrics import dice_per_label
from DeepRegisterLib.models import ModelCard, save_model
from DeepRegisterLib.nets import GlobalNet
from DeepRegisterLib.filters import gaussian_smooth
from DeepRegisterLib.saliency import joint_saliency, single_saliency, structure_tensor, tensor_distance
from DeepRegisterLib.spatial import Grid
from DeepRegisterLib.synthetic import make_phantom_pair


def centre_shift(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    shift = Grid.from_image(moving).center - Grid.from_image(fixed).center
    return sitk.TranslationTransform(3, shift.tolist())


@pytest.fixture(scope="module", params=[False, True], ids=["monomodal", "ultrasound-like"])
def registered(request: pytest.FixtureRequest) -> tuple:
    pair = make_phantom_pair(12, (64, 64, 64), spacing=2.0, max_mm=10.0, ultrasound=request.param)
    result = registration.register(pair.fixed, pair.moving, iterations=100, device="cpu")
    return pair, result


def test_finetuning_halves_median_tre(registered: tuple) -> None:
    pair, result = registered
    before = np.median(tre(pair.fixed_points, pair.moving_points, centre_shift(pair.fixed, pair.moving)))
    after = np.median(tre(pair.fixed_points, pair.moving_points, result.transform))
    assert before > 3.0
    assert after < 0.5 * before, (before, after)
    assert result.folding_percent < 0.5
    assert result.messages and "fine-tuning" in result.messages[0]


def test_gland_dice_rises(registered: tuple) -> None:
    pair, result = registered
    before = dice_per_label(pair.fixed_gland, pair.moving_gland, centre_shift(pair.fixed, pair.moving))["label 1"]
    after = dice_per_label(pair.fixed_gland, pair.moving_gland, result.transform)["label 1"]
    assert after > before and after > 0.85, (before, after)


def test_outputs_on_fixed_grid_and_transform_round_trip(registered: tuple, tmp_path) -> None:
    pair, result = registered
    for image in (result.warped, result.saliency, result.displacement_field()):
        assert image.GetSize() == pair.fixed.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), pair.fixed.GetSpacing())
        np.testing.assert_allclose(image.GetOrigin(), pair.fixed.GetOrigin())
        np.testing.assert_allclose(image.GetDirection(), pair.fixed.GetDirection(), atol=1e-12)
    saliency = sitk.GetArrayFromImage(result.saliency)
    assert saliency.min() >= 0.0 and saliency.max() <= 1.0 and saliency.std() > 0.01
    path = tmp_path / "transform.h5"
    sitk.WriteTransform(result.transform, str(path))
    loaded = sitk.ReadTransform(str(path))
    for point in pair.fixed_points:
        np.testing.assert_allclose(loaded.TransformPoint(tuple(point)), result.transform.TransformPoint(tuple(point)),
                                   atol=1e-9)
    # The warped image is the moving image resampled through the transform (ITK convention).
    expected = sitk.Resample(pair.moving, pair.fixed, loaded, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(result.warped), sitk.GetArrayFromImage(expected), atol=1e-3)
    assert set(result.timings) >= {"preprocess", "network", "finetune", "output", "total"}


def test_finetuning_is_not_limited_to_a_coarse_model_grid(tmp_path) -> None:
    """Fine-tuning runs on a grid fitted to the fixed image, not on the model's grid: a model whose
    1 mm grid covers only the central 7 mm (an identity network) and fine-tuning reach the accuracy of
    fine-tuning alone, at the landmarks outside the model grid too."""
    pair = make_phantom_pair(12, (64, 64, 64), spacing=2.0, max_mm=10.0)
    network = GlobalNet((8, 8, 8), (1.0, 1.0, 1.0), channels=[4, 8])
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.zero_()
    settings = registration.instance_card()  # the same fine-tuning settings as without a model
    card = ModelCard(name="coarse", description="identity on a coarse central grid", architecture="GlobalNet",
                     config=network.config, input_size=[8, 8, 8], spacing_mm=[1.0, 1.0, 1.0], finetune_iterations=60,
                     finetune_step_mm=settings.finetune_step_mm, finetune_samples=settings.finetune_samples)
    folder = save_model(tmp_path / "coarse", card, network)
    with_model = registration.register(pair.fixed, pair.moving, model=str(folder), device="cpu")
    alone = registration.register(pair.fixed, pair.moving, iterations=60, device="cpu")
    grid = preprocess.model_grid(pair.fixed, card)
    outside = np.any(np.abs(grid.physical_to_index(pair.fixed_points) - 3.5) > 3.5, axis=1)
    assert outside.sum() >= 3
    before = tre(pair.fixed_points, pair.moving_points, centre_shift(pair.fixed, pair.moving))
    after = tre(pair.fixed_points, pair.moving_points, with_model.transform)
    assert np.median(after) < 0.5 * np.median(before), (np.median(before), np.median(after))
    assert np.median(after[outside]) < 0.5 * np.median(before[outside])
    assert np.median(after) < 1.2 * np.median(tre(pair.fixed_points, pair.moving_points, alone.transform)) + 0.1


def test_spacing_rounding_does_not_change_the_result() -> None:
    """A fixed image whose spacing differs in the 16th digit (as after a round trip through Slicer's
    MRML) gets the same grids and the same registration: grid sizes do not flip on float rounding."""
    pair = make_phantom_pair(4, (32, 32, 32), spacing=3.0)
    nudged = sitk.Image(pair.fixed)
    spacing = list(pair.fixed.GetSpacing())
    spacing[1] = float(np.nextafter(np.nextafter(spacing[1], np.inf), np.inf))
    nudged.SetSpacing(spacing)
    assert preprocess.finetune_grid(nudged).size == preprocess.finetune_grid(pair.fixed).size
    results = [registration.register(image, pair.moving, iterations=8, device="cpu") for image in (pair.fixed, nudged)]
    fields = [sitk.GetArrayFromImage(result.displacement_field()) for result in results]
    np.testing.assert_allclose(fields[1], fields[0], atol=1e-4)


def test_zero_iterations_without_model_is_centre_alignment() -> None:
    pair = make_phantom_pair(2, (32, 32, 32), spacing=4.0)
    result = registration.register(pair.fixed, pair.moving, iterations=0)
    shift = centre_shift(pair.fixed, pair.moving)
    for point in pair.fixed_points:
        np.testing.assert_allclose(result.transform.TransformPoint(tuple(point)), shift.TransformPoint(tuple(point)),
                                   atol=1e-4)


def test_gpu_out_of_memory_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the OOM path is simulated: the CPU rerun is the real engine."""
    pair = make_phantom_pair(3, (32, 32, 32), spacing=4.0)
    real = registration._register
    devices = []

    def fake(fixed, moving, device, *args):
        devices.append(device.type)
        if device.type == "cuda":
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(fixed, moving, device, *args)

    monkeypatch.setattr(registration, "_register", fake)
    monkeypatch.setattr(registration, "resolve_device", lambda device: torch.device("cuda"))
    with pytest.warns(RuntimeWarning, match="out of memory"):
        result = registration.register(pair.fixed, pair.moving, iterations=2, device="cuda")
    assert devices == ["cuda", "cpu"] and result.device == "cpu"
    assert "out of memory" in result.messages[0]


def blob_image(shift: float = 0.0, size: int = 24) -> torch.Tensor:
    z, y, x = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij")
    image = torch.exp(-((x - 12 - shift) ** 2 + (y - 11) ** 2 + (z - 12) ** 2) / 20.0)
    image = image + 0.5 * torch.exp(-((x - 6 - shift) ** 2 + (y - 16) ** 2 + (z - 8) ** 2) / 8.0)
    return image[None, None]


def test_pyramid_levels_are_computed_once_and_saliency_grid_is_capped() -> None:
    grid = Grid.centered(np.zeros(3), (128, 100, 90), (1.0, 1.0, 1.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    rng = np.random.default_rng(0)
    fixed, moving = (torch.from_numpy(rng.random((1, 1, *grid.shape), dtype=np.float32)) for _ in range(2))
    pyramid = finetune.Pyramid(fixed, moving, grid, 1.5)
    finest_fixed, _, finest_grid = pyramid.level(1)
    assert finest_grid == grid and pyramid.level(1)[0] is finest_fixed
    # the finest level is smoothed by FINEST_SIGMA_MM: white noise loses variance, keeps its mean
    assert finest_fixed.std() < 0.8 * fixed.std() and abs(float(finest_fixed.mean() - fixed.mean())) < 1e-3
    small_fixed, _, small_grid = pyramid.saliency_level(1)
    assert max(small_grid.size) <= preprocess.SALIENCY_GRID_VOXELS and small_grid.size == (64, 50, 45)
    assert small_fixed is pyramid.level(2)[0]  # the coarse fine-tuning level serves the saliency map
    assert pyramid.saliency_level(2)[0] is small_fixed
    extent = lambda g: (np.asarray(g.size) - 1) * np.asarray(g.spacing)
    np.testing.assert_allclose(extent(small_grid), extent(grid))
    np.testing.assert_allclose(small_grid.center, grid.center, atol=1e-9)
    # the saliency map there: the fixed half computed once, the same map as computed in one go
    displacement = torch.from_numpy(rng.normal(0, 2, (1, 3, *small_grid.shape)).astype(np.float32))
    expected = joint_saliency(small_fixed, spatial.warp(pyramid.saliency_level(1)[1], displacement, small_grid),
                              small_grid.spacing, 1.5)
    # zero where the warped moving image has no data (here: beyond its grid), rescaled to [0, 1] inside
    inside = spatial.warp(torch.ones_like(small_fixed), displacement, small_grid) > 0.99
    assert 0.5 < inside.float().mean() < 1.0
    expected = expected * inside / (expected * inside).amax()
    torch.testing.assert_close(pyramid.joint_saliency(1, displacement), expected)
    cached = pyramid._fixed_saliency[small_grid]
    torch.testing.assert_close(pyramid.joint_saliency(2, displacement), expected)
    assert pyramid._fixed_saliency[small_grid] is cached and len(pyramid._fixed_saliency) == 1


def test_pair_deformation_on_a_grid_is_the_pointwise_field() -> None:
    """``displacement_on`` (separable, per axis) equals the affine map plus the integrated local field
    interpolated point by point (grid_sample, border values) at the grid's physical points."""
    direction = tuple(np.linalg.qr(np.random.default_rng(2).normal(size=(3, 3)))[0].ravel())
    grid = Grid.centered(np.array([10.0, -5.0, 3.0]), (30, 26, 22), (2.0, 2.0, 2.0), direction)
    deformation = finetune.PairDeformation(grid, (30.0, 15.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        deformation.matrix.copy_(0.05 * torch.randn(3, 3, generator=generator))
        deformation.translation.copy_(torch.tensor([1.0, -2.0, 0.5]))
        for values in deformation.fields:
            values.copy_(2.0 * torch.randn(values.shape, generator=generator))
        target = Grid.centered(np.array([12.0, -4.0, 1.0]), (17, 13, 11), (2.7, 3.1, 3.3), direction)
        on_grid = deformation.displacement_on(target)
        points = spatial.physical_points(target).reshape(-1, 3)
        affine = (points - deformation.center) @ deformation.matrix.T + deformation.translation
        local = spatial.sample(deformation.local_field(), points.view(1, -1, 1, 1, 3), deformation.velocity_grid,
                               "bilinear", "border").view(3, -1).T
        at_points = (affine + local).T.reshape(1, 3, *target.shape)
    assert on_grid.abs().max() > 2.0
    torch.testing.assert_close(on_grid, at_points, atol=1e-4, rtol=1e-4)


def ball(grid: Grid, center_mm: tuple[float, float, float], radius_mm: float) -> torch.Tensor:
    """A soft ball (1, 1, Z, Y, X) in [0, 1] on ``grid``, edge about 1 mm wide."""
    points = spatial.physical_points(grid)
    distance = (points - torch.tensor(center_mm, dtype=points.dtype)).norm(dim=-1)
    return torch.sigmoid((radius_mm - distance) / 0.5)[None, None]


@pytest.mark.parametrize("metric", ["mi", "lncc"])
def test_organ_term_aligns_the_organ_maps_with_an_affine_correction(metric: str) -> None:
    """Flat images give the similarity nothing to follow; the organ maps (moving ball 4 mm along x)
    do: with ``organ_weight`` the affine-only correction (``field_step_mm`` 0) finds the shift, without
    it nothing moves."""
    grid = Grid.centered(np.zeros(3), (32, 32, 32), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    flat = torch.full((1, 1, *grid.shape), 0.5)
    organs = (ball(grid, (0.0, 0.0, 0.0), 12.0), ball(grid, (4.0, 0.0, 0.0), 12.0))
    pyramid = finetune.Pyramid(flat, flat.clone(), grid, 1.5, organs)
    initial = torch.zeros(1, 3, *grid.shape)
    results = {}
    for weight in (0.0, 1.0):
        # 2,000 MI samples: strided subgrids (stride 3 on the finest level, 2 on the coarse one)
        deformation = finetune.fine_tune(pyramid, initial, 100, metric, field_step_mm=0.0, organ_weight=weight,
                                             samples=2000)
        assert len(deformation.fields) == 0 and not hasattr(deformation, "velocity_grid")
        with torch.no_grad():
            correction = deformation.displacement_on(grid)
        points = spatial.physical_points(grid).reshape(-1, 3)  # an affine map, exactly
        affine = ((points - deformation.center) @ deformation.matrix.T + deformation.translation).detach()
        torch.testing.assert_close(correction, affine.T.reshape(1, 3, *grid.shape), atol=1e-4, rtol=1e-4)
        results[weight] = correction
    assert results[0.0].abs().max() < 0.05  # mm: flat images, no pull
    shift = results[1.0].mean(dim=(2, 3, 4))[0]
    assert abs(float(shift[0]) - 4.0) < 0.5 and float(shift[1:].abs().max()) < 0.5, shift
    warped = spatial.warp(organs[1], results[1.0], grid)
    dice = lambda a, b: float(2 * ((a > 0.5) & (b > 0.5)).sum() / ((a > 0.5).sum() + (b > 0.5).sum()))
    assert dice(organs[0], warped) > 0.97


def test_organ_maps_reach_the_fine_tuning_grid_only_where_the_network_saw() -> None:
    """The network's organ maps go onto the fine-tuning grid with zeros beyond the model grid (not its
    border values); an empty map, or a network without maps, turns the organ term off with a message."""
    model = Grid.centered(np.zeros(3), (10, 10, 10), (3.0, 3.0, 3.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    tune = Grid.centered(np.zeros(3), (40, 40, 40), (1.5, 1.5, 1.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    full = torch.ones(1, 1, *model.shape)  # organ everywhere the network looked (27 mL)
    messages: list[str] = []
    fixed, moving = finetune.organ_maps({"fixed_segmentation": full, "moving_segmentation": full},
                                            model, tune, messages)
    assert fixed.shape == (1, 1, *tune.shape) and "organ outlines" in messages[-1]
    distance = spatial.physical_points(tune).abs().amax(dim=-1)  # model grid's voxel centres reach 13.5 mm
    assert float(fixed[0, 0][distance <= 13.4].min()) == pytest.approx(1.0)
    assert float(fixed[0, 0][distance >= 16.5].max()) == 0.0  # one model voxel beyond: falls to zero
    empty = torch.zeros(1, 1, *model.shape)
    assert finetune.organ_maps({"fixed_segmentation": full, "moving_segmentation": empty}, model, tune,
                                   messages) is None
    assert "no organ in the moving image" in messages[-1]
    assert finetune.organ_maps({"displacement": empty}, model, tune, messages) is None
    assert "no organ maps" in messages[-1]


def test_fine_tuning_adam_follows_torch_adam() -> None:
    """Same trajectory as torch.optim.Adam with per-group step sizes and a scheduled factor."""
    target = torch.linspace(-2, 3, 12).view(3, 4)
    ours = [torch.nn.Parameter(torch.zeros(3, 4)), torch.nn.Parameter(torch.ones(5))]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optimizer = finetune.Adam([([ours[0]], 0.1), ([ours[1]], 0.03)])
    reference = torch.optim.Adam([{"params": [theirs[0]], "lr": 0.1}, {"params": [theirs[1]], "lr": 0.03}])
    schedule = torch.optim.lr_scheduler.LambdaLR(reference, lambda i: 1.0 - 0.05 * i)
    loss = lambda params: ((params[0] - target) ** 2).sum() + (params[1] ** 4).sum()
    for step in range(15):
        optimizer.zero_grad()
        loss(ours).backward()
        optimizer.step(1.0 - 0.05 * step)
        reference.zero_grad()
        loss(theirs).backward()
        reference.step()
        schedule.step()
    assert loss(ours) < 0.5 * loss([torch.zeros(3, 4), torch.ones(5)])
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gaussian_smooth_matches_edge_padded_convolution() -> None:
    """Separable smoothing along x, y, z with each axis's own spacing, edges replicated."""
    rng = np.random.default_rng(5)
    volume = rng.normal(size=(2, 3, 9, 11, 13))
    spacing, sigma_mm = (0.8, 1.5, 2.5), 2.0
    expected = volume
    for axis, step in zip((4, 3, 2), spacing):  # array axis 4 is x
        sigma = sigma_mm / step
        radius = max(1, int(np.ceil(3 * sigma)))
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        padded = np.pad(expected, [(radius, radius) if a == axis else (0, 0) for a in range(5)], mode="edge")
        expected = np.apply_along_axis(lambda line: np.convolve(line, kernel, mode="valid"), axis, padded)
    smoothed = gaussian_smooth(torch.as_tensor(volume, dtype=torch.float32), sigma_mm, spacing)
    np.testing.assert_allclose(smoothed.numpy(), expected, atol=1e-5)


def test_single_saliency_is_the_mean_distance_to_26_neighbours() -> None:
    tensor = structure_tensor(torch.rand(2, 1, 9, 7, 5, generator=torch.Generator().manual_seed(1)), (2.0, 1.0, 3.0), 1.5)
    padded = torch.nn.functional.pad(tensor, (1, 1, 1, 1, 1, 1), mode="replicate")
    z, y, x = tensor.shape[2:]
    expected = sum(tensor_distance(tensor, padded[:, :, dz:dz + z, dy:dy + y, dx:dx + x])
                   for dz in range(3) for dy in range(3) for dx in range(3) if (dz, dy, dx) != (1, 1, 1)) / 27.0
    torch.testing.assert_close(single_saliency(tensor), expected, atol=1e-6, rtol=1e-5)


def test_joint_saliency_properties() -> None:
    spacing = (1.0, 1.0, 1.0)
    fixed = blob_image()
    aligned = joint_saliency(fixed, fixed.clone(), spacing)
    shifted = joint_saliency(fixed, blob_image(4.0), spacing)
    assert aligned.min() >= 0 and aligned.max() <= 1 and shifted.min() >= 0 and shifted.max() <= 1
    # identical images agree everywhere their structure is salient; a shifted one agrees less
    assert aligned.mean() > shifted.mean()
    # the map does not depend on either image's intensity scale or offset
    rescaled = joint_saliency(fixed * 250.0 + 17.0, blob_image(4.0) * 0.01, spacing)
    torch.testing.assert_close(rescaled, shifted, atol=2e-3, rtol=0)
    # per-sample normalisation: one pair's map does not depend on the others in the batch
    batch = joint_saliency(torch.cat([fixed, fixed * 9]), torch.cat([blob_image(4.0), fixed]), spacing)
    torch.testing.assert_close(batch[:1], shifted, atol=1e-5, rtol=0)
    moving = blob_image(2.0).requires_grad_(True)
    joint_saliency(fixed, moving, spacing).sum().backward()
    assert torch.isfinite(moving.grad).all() and moving.grad.abs().sum() > 0


def test_mutual_information_equals_dense_mattes_histogram() -> None:
    """Mattes et al.'s estimator (box window for the fixed values, cubic B-spline for the moving
    ones), value and closed-form gradient, against the histogram built over every bin with autograd."""
    generator = torch.Generator().manual_seed(3)
    fixed = torch.rand(5000, generator=generator, dtype=torch.float64)
    warped = ((1.0 - fixed) ** 2 + 0.1 * torch.randn(5000, generator=generator, dtype=torch.float64)).clamp(0, 1)
    warped.requires_grad_(True)
    weight = 1.0 + torch.rand(5000, generator=generator, dtype=torch.float64)
    bins = 32

    def bspline(x: torch.Tensor) -> torch.Tensor:
        x = x.abs()
        return torch.where(x < 1, 2 / 3 - x ** 2 + x ** 3 / 2, torch.where(x < 2, (2 - x) ** 3 / 6, torch.zeros_like(x)))

    fixed_windows = F.one_hot((fixed * (bins - 1)).round().long(), bins).double()
    moving_windows = bspline(warped[:, None] * (bins - 1) - torch.arange(-2, bins + 2, dtype=torch.float64))
    joint = (fixed_windows * weight[:, None]).T @ moving_windows
    joint = joint / joint.sum()
    ratio = joint / (joint.sum(1, keepdim=True) @ joint.sum(0, keepdim=True)).clamp(min=1e-12)
    expected = (joint * torch.log(ratio.clamp(min=1e-12))).sum()
    (expected_grad,) = torch.autograd.grad(expected, warped)
    loss = mutual_information_loss(fixed, warped, bins=bins, weight=weight)
    (grad,) = torch.autograd.grad(loss, warped)
    assert expected > 0.3
    torch.testing.assert_close(loss, -expected, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(grad, -expected_grad, atol=1e-12, rtol=1e-6)
    inner = (0.02 + 0.96 * warped[:300].detach()).requires_grad_(True)  # away from the clamped ends
    assert torch.autograd.gradcheck(lambda w: mutual_information_loss(fixed[:300], w, bins=8, weight=weight[:300]), (inner,))


def test_position_regions_interpolate_a_lattice_over_the_image() -> None:
    axes = tuple(torch.linspace(0, 1, n) for n in (7, 5, 4))
    block, mixing = position_regions(axes, 3, blocks=4)
    assert block.shape == (7 * 5 * 4,) and mixing.shape == (27, 64)
    assert int(block.min()) == 0 and int(block.max()) == 63
    assert int(block[0]) == 0 and int(block[-1]) == 63 and int(block[(3 * 5 + 2) * 4 + 1]) == (2 * 4 + 2) * 4 + 1
    torch.testing.assert_close(mixing.sum(dim=0), torch.ones(64))  # each block's weights sum to 1
    # a block's weights are the trilinear weights of its centre: block (0, 0, 0), centre 1/8 of the
    # extent = 1/4 of the way from node 0 to node 1 on each axis
    expected = {0: 0.75 ** 3, 1: 0.75 ** 2 * 0.25, 3: 0.75 ** 2 * 0.25, 4: 0.75 * 0.25 ** 2, 13: 0.25 ** 3}
    for region, value in expected.items():
        assert abs(float(mixing[region, 0]) - value) < 1e-6
    assert float(mixing[:, 0].sum()) == pytest.approx(1.0) and int((mixing[:, 0] > 0).sum()) == 8


def test_regional_mutual_information_is_the_mass_weighted_mean_over_regions() -> None:
    generator = torch.Generator().manual_seed(4)
    fixed = torch.rand(3000, generator=generator, dtype=torch.float64)
    warped = (fixed ** 2 + 0.1 * torch.randn(3000, generator=generator, dtype=torch.float64)).clamp(0, 1)
    weight = 1.0 + torch.rand(3000, generator=generator, dtype=torch.float64)
    region = torch.randint(0, 3, (3000,), generator=generator)  # each sample wholly in one of 3 regions
    regions = (region, torch.eye(3, dtype=torch.float64))
    expected = sum(weight[region == r].sum() * mutual_information_loss(fixed[region == r], warped[region == r],
                                                                      weight=weight[region == r])
                   for r in range(3)) / weight.sum()
    torch.testing.assert_close(mutual_information_loss(fixed, warped, weight=weight, regions=regions), expected)
    # a relation that differs between regions (inverted in one) is found by the regional estimate only
    drifting = torch.where(region == 0, 1.0 - warped, warped)
    regional = mutual_information_loss(fixed, drifting, weight=weight, regions=regions)
    assert regional < mutual_information_loss(fixed, drifting, weight=weight) - 0.2
    # blocks shared between regions: the gradient is the derivative of the loss
    mixed = (region, torch.tensor([[0.7, 0.2, 0.0], [0.3, 0.5, 0.4], [0.0, 0.3, 0.6]], dtype=torch.float64))
    inner = (0.02 + 0.96 * warped[:120]).requires_grad_(True)  # away from the clamped ends
    assert torch.autograd.gradcheck(lambda w: mutual_information_loss(fixed[:120], w, bins=8, weight=weight[:120],
                                                                      regions=(region[:120], mixed[1])), (inner,))


def test_fine_tuning_is_not_misled_by_a_bias_field(monkeypatch: pytest.MonkeyPatch) -> None:
    """A smooth multiplicative bias (x0.5-2 across the fixed image, as an MR coil or an ultrasound's depth
    attenuation makes) drags a field fitted with one joint histogram; one histogram per region does not."""
    from DeepRegisterLib import guard

    pair = make_phantom_pair(3, size=(64, 64, 64), spacing=1.5, ultrasound=False)
    array = sitk.GetArrayFromImage(pair.fixed)
    z, y, x = np.indices(array.shape) / (np.asarray(array.shape)[:, None, None, None] - 1.0)
    fixed = sitk.GetImageFromArray((array * np.exp((x - 0.5) + 0.5 * (y - 0.5))).astype(np.float32))
    fixed.CopyInformation(pair.fixed)
    monkeypatch.setattr(guard, "choose", lambda scores: (scores[-1], []))  # the fine-tuned field, whatever the guard says
    errors = {}
    for regions in (1, finetune.MI_REGIONS):
        monkeypatch.setattr(finetune, "MI_REGIONS", regions)
        result = registration.register(fixed, pair.moving, model="generic", device="cpu")
        errors[regions] = float(np.median(tre(pair.fixed_points, pair.moving_points, result.transform)))
    start = float(np.median(tre(pair.fixed_points, pair.moving_points, result.initial_transform)))
    assert errors[finetune.MI_REGIONS] < 0.15 * start and errors[1] > 3 * errors[finetune.MI_REGIONS], errors


def test_similarity_losses_prefer_alignment() -> None:
    fixed = blob_image()
    remapped = 1.0 - fixed  # a different "modality": inverted intensities
    assert mutual_information_loss(fixed, remapped) < mutual_information_loss(fixed, 1.0 - blob_image(3.0)) - 0.05
    assert lncc_loss(fixed, fixed) < lncc_loss(fixed, blob_image(3.0)) - 0.05
    grid = Grid((16, 16, 16), (2.0, 2.0, 2.0), (0.0, 0.0, 0.0))
    from DeepRegisterLib.spatial import affine_displacement

    affine = affine_displacement(torch.tensor([[[1.1, 0.1, 0, 2.0], [0, 0.9, 0, 0], [0, 0, 1.0, -1.0]]]), grid)
    assert bending_energy(affine, grid.spacing) < 1e-8
    wavy = torch.zeros(1, 3, 16, 16, 16)
    wavy[:, 0] = 5.0 * torch.sin(torch.arange(16.0) / 2.0).view(1, 1, 16)
    assert bending_energy(wavy, grid.spacing) > 1e-3


@pytest.mark.parametrize("shape, spacing", [((15, 12, 10), (16.0, 8.0, 4.0)), ((4, 9, 6), (1.0, 2.0, 3.0))])
def test_sparse_bending_energy_equals_the_finite_differences(shape: tuple, spacing: tuple) -> None:
    """The precomputed quadratic form gives bending_energy's value and gradient (also where an axis
    is too short for second differences)."""
    values = torch.randn(2, 3, *shape, generator=torch.Generator().manual_seed(3), requires_grad=True)
    expected = bending_energy(values, spacing)
    (expected_grad,) = torch.autograd.grad(expected, values)
    energy = BendingEnergy(shape, spacing)(values)
    (grad,) = torch.autograd.grad(energy, values)
    torch.testing.assert_close(energy, expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-9)
