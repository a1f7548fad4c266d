"""Tests of the registration networks in DeepRegisterLib.nets (tiny CPU volumes)."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from DeepRegisterLib.nets import (ARCHITECTURES, GlobalNet, GlobalToLocal, LinearDeformable, LocalNet, RegNet,
                                  build_network)
from DeepRegisterLib.spatial import Grid, affine_displacement, compose, physical_points, warp

SIZE = (20, 18, 17)  # x, y, z voxels: non-cubic and odd
SPACING = (1.5, 1.2, 2.0)  # x, y, z mm
SHAPE = (17, 18, 20)  # Z, Y, X
SMALL = {
    "GlobalNet": {"channels": [4, 8, 8]},
    "LocalNet": {"channels": [4, 8, 8]},
    "GlobalToLocal": {"global_channels": [4, 8, 8], "local_channels": [4, 8, 8], "coarse_scale_mm": 5.0},
    "RegNet": {"channels": [4, 8], "merge_channels": [8]},
    "LinearDeformable": {"encoder_channels": 4, "decoder_channels": [8], "se_reduction": 2},
}
EXTRA_SHAPES = {
    "GlobalNet": {"theta": (3, 4)},
    "LocalNet": {},
    "GlobalToLocal": {"coarse": (3, *SHAPE), "theta": (3, 4), "saliency": (1, *SHAPE)},
    "RegNet": {},
    "LinearDeformable": {"theta": (3, 4), "gradients": (3, *SHAPE), "deformable": (3, *SHAPE)},
}


def _images(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth random fixed image and a shifted, noisy moving image, (B, 1, Z, Y, X)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(batch, 1, *SHAPE, generator=generator)
    base = nn.functional.avg_pool3d(base, 3, stride=1, padding=1)
    noise = 0.05 * torch.randn(base.shape, generator=generator)
    moving = torch.roll(base, shifts=(1, -2), dims=(3, 4)) + noise
    return base, moving


def _perturb_zero_parameters(net: nn.Module, std: float = 0.05) -> None:
    """Give the zero-initialised output layers random weights (a trained-like, non-initial state)."""
    with torch.no_grad():
        for parameter in net.parameters():
            if parameter.abs().max() == 0:
                parameter.normal_(0.0, std)


def test_registry_names() -> None:
    assert ARCHITECTURES == {"GlobalNet": GlobalNet, "LocalNet": LocalNet, "GlobalToLocal": GlobalToLocal,
                             "RegNet": RegNet, "LinearDeformable": LinearDeformable}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_output_shapes_on_odd_grid(name: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    assert net.grid == Grid.canonical(SIZE, SPACING)
    fixed, moving = _images()
    output = net(fixed, moving)
    assert set(output) == {"displacement", *EXTRA_SHAPES[name]}
    assert output["displacement"].shape == (2, 3, *SHAPE)
    for key, shape in EXTRA_SHAPES[name].items():
        assert output[key].shape == (2, *shape), key
    for key, value in output.items():
        assert torch.isfinite(value).all(), key


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_rejects_images_in_wrong_axis_order(name: str) -> None:
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    wrong = torch.zeros(1, 1, 20, 18, 17)  # (X, Y, Z) instead of (Z, Y, X)
    with pytest.raises(ValueError, match="Z, Y, X"):
        net(wrong, wrong)


@pytest.mark.parametrize("size", [(9, 5, 3), (7, 11, 6)])
def test_localnet_sizes_not_divisible_by_levels(size: tuple[int, int, int]) -> None:
    net = LocalNet(size, (1.0, 1.0, 1.0), channels=(4, 4, 8, 8))
    shape = (size[2], size[1], size[0])
    fixed = torch.randn(1, 1, *shape)
    assert net(fixed, fixed)["displacement"].shape == (1, 3, *shape)
    assert net.predict(torch.randn(1, 2, *shape)).shape == (1, 3, *shape)


@pytest.mark.parametrize("name", ["GlobalToLocal", "LocalNet"])
def test_register_pair_equals_the_forward_pass(name: str) -> None:
    """One pair through register_pair (on the CPU a batch of two, for oneDNN's convolution) gives
    the displacement of the plain forward pass of that pair."""
    net = build_network(name, SIZE, SPACING, **SMALL[name]).eval()
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for parameter in net.parameters():  # random weights: an initialised network predicts ~0
            parameter.copy_(0.05 * torch.randn(parameter.shape, generator=generator))
    fixed, moving = _images()
    with torch.no_grad():
        expected = net(fixed[:1], moving[:1])["displacement"]
    scale = float(expected.abs().max())
    assert scale > 0.01
    displacement = net.register_pair(fixed[:1], moving[:1])["displacement"]
    assert displacement.shape == expected.shape and not displacement.requires_grad
    torch.testing.assert_close(displacement, expected, atol=1e-5 * scale, rtol=0)  # float32 summation order


@pytest.mark.parametrize("name", ["GlobalNet", "LinearDeformable"])
def test_exact_identity_at_init(name: str) -> None:
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    fixed, moving = _images()
    output = net(fixed, moving)
    assert torch.equal(output["theta"], torch.eye(3, 4).expand(2, 3, 4))
    assert output["displacement"].abs().max() < 1e-5
    if name == "LinearDeformable":
        assert torch.equal(output["gradients"], torch.ones(2, 3, *SHAPE))
        assert output["deformable"].abs().max() < 1e-5


@pytest.mark.parametrize("name", ["LocalNet", "RegNet", "GlobalToLocal"])
def test_near_zero_displacement_at_init(name: str) -> None:
    torch.manual_seed(1)
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    fixed, moving = _images()
    magnitude = net(fixed, moving)["displacement"].abs().max()
    assert 0 < magnitude < 0.1  # small random output layer: tiny but not exactly zero


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_all_parameters_receive_gradients(name: str) -> None:
    torch.manual_seed(2)
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    _perturb_zero_parameters(net)
    fixed, moving = _images()
    displacement = net(fixed, moving)["displacement"]
    target = torch.randn_like(displacement)
    ((displacement - target) ** 2).mean().backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None, parameter_name
        assert torch.isfinite(parameter.grad).all(), parameter_name
        assert parameter.grad.abs().max() > 0, parameter_name


@pytest.mark.parametrize("name", ["GlobalNet", "LinearDeformable"])
def test_affine_head_gets_gradients_at_init(name: str) -> None:
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    fixed, moving = _images()
    displacement = net(fixed, moving)["displacement"]
    (displacement - 1.0).pow(2).mean().backward()
    assert net.affine.linear.weight.grad.abs().max() > 0
    assert net.affine.linear.bias.grad.abs().max() > 0


def test_global_to_local_gradients_reach_global_net_through_saliency() -> None:
    torch.manual_seed(3)
    net = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"])
    _perturb_zero_parameters(net.global_net)
    fixed, moving = _images()
    output = net(fixed, moving)
    assert output["saliency"].requires_grad
    assert 0.0 <= output["saliency"].min() and output["saliency"].max() <= 1.0
    global_parameters = list(net.global_net.parameters())
    through_saliency = torch.autograd.grad(output["saliency"].sum(), global_parameters, retain_graph=True)
    assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in through_saliency)
    output["displacement"].pow(2).mean().backward()
    for parameter in global_parameters:
        assert torch.isfinite(parameter.grad).all() and parameter.grad.abs().max() > 0


def test_global_to_local_segmenters_feed_both_stages() -> None:
    """With segmentation_channels each image gets an organ probability in [0, 1]; GlobalNet reads
    both maps (4 channels), LocalNet the fixed map and the moving map warped by the coarse field
    (8 channels), and every parameter, the segmenters' included, gets a gradient from the field."""
    torch.manual_seed(4)
    net = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"], segmentation_channels=[4, 8])
    assert net.global_net.config["in_channels"] == 4 and net.local_net.config["in_channels"] == 8
    _perturb_zero_parameters(net)
    fixed, moving = _images()
    output = net(fixed, moving)
    for key in ("fixed_segmentation", "moving_segmentation"):
        assert output[key].shape == (2, 1, *SHAPE)
        assert 0.0 < output[key].min() and output[key].max() < 1.0
    output["displacement"].pow(2).mean().backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, parameter_name
    plain = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"])
    assert not hasattr(plain, "fixed_segmenter") and "fixed_segmentation" not in plain(fixed, moving)


def test_global_to_local_without_saliency_is_globalnet_plus_localnet() -> None:
    """joint_saliency=False: LocalNet reads [coarse, fixed, warped] (5 channels) and no saliency is
    computed; the same weights otherwise give the field, and the config rebuilds it."""
    torch.manual_seed(5)
    net = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"], joint_saliency=False)
    assert net.local_net.config["in_channels"] == 5 and net.saliency is None
    _perturb_zero_parameters(net)
    fixed, moving = _images()
    output = net(fixed, moving)
    assert "saliency" not in output and output["displacement"].shape == (2, 3, *SHAPE)
    output["displacement"].pow(2).mean().backward()
    for parameter_name, parameter in net.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().max() > 0, parameter_name
    rebuilt = build_network("GlobalToLocal", net.grid.size, net.grid.spacing, **net.config)
    rebuilt.load_state_dict(net.state_dict())
    assert torch.equal(rebuilt(fixed, moving)["displacement"], output["displacement"].detach())
    with_saliency = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"])
    assert with_saliency.config["joint_saliency"] and with_saliency.local_net.config["in_channels"] == 6


def test_global_to_local_warps_by_coarse_then_residual() -> None:
    """Residual r is predicted on (fixed, moving warped by coarse c): map p -> q + c(q), q = p + r(p)."""
    net = GlobalToLocal(SIZE, SPACING, **SMALL["GlobalToLocal"])
    scale = torch.tensor([[1.1, 0.0, 0.0], [0.0, 0.9, 0.0], [0.0, 0.0, 1.05]])
    with torch.no_grad():
        raw = torch.cat([scale - torch.eye(3), torch.zeros(3, 1)], dim=1)
        net.global_net.affine.linear.bias.copy_(raw.flatten())
    shift = torch.tensor([0.6, -0.4, 0.5])  # mm, constant residual
    net.local_net.predict = lambda inputs: shift.view(1, 3, 1, 1, 1).expand(inputs.shape[0], 3, *SHAPE)
    fixed, moving = _images(batch=1)
    output = net(fixed, moving)
    assert torch.allclose(output["coarse"], affine_displacement(output["theta"], net.grid))
    expected = output["coarse"] + (scale @ shift).view(1, 3, 1, 1, 1)  # u_c(p) + A r, c linear
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2), slice(2, -2))
    assert torch.allclose(output["displacement"][interior], expected[interior], atol=1e-4)
    reversed_order = output["coarse"] + shift.view(1, 3, 1, 1, 1)  # compose(c, r) for a constant r
    assert not torch.allclose(output["displacement"][interior], reversed_order[interior], atol=1e-2)


def test_linear_deformable_applies_affine_to_deformable_grid() -> None:
    """displacement = compose(deformable, affine): p -> A(p + d(p)) about the centre (paper's order)."""
    torch.manual_seed(4)
    net = LinearDeformable(SIZE, SPACING, **SMALL["LinearDeformable"])
    _perturb_zero_parameters(net, std=0.2)
    fixed, moving = _images()
    with torch.no_grad():
        output = net(fixed, moving)
    affine = affine_displacement(output["theta"], net.grid)
    expected = compose(output["deformable"], affine, net.grid)
    assert output["deformable"].abs().max() > 0.5  # a real deformation, not the identity
    assert (output["theta"] - torch.eye(3, 4)).abs().max() > 0.01
    # compose() extends the affine field by its border values: compare where p + d(p) stays inside.
    positions = physical_points(net.grid).unsqueeze(0) + output["deformable"].permute(0, 2, 3, 4, 1)
    half_extent = torch.tensor([(n - 1) * s / 2 for n, s in zip(SIZE, SPACING)])
    inside = (positions.abs() <= half_extent).all(dim=-1).unsqueeze(1).expand_as(expected)
    assert inside.float().mean() > 0.5
    assert torch.allclose(output["displacement"][inside], expected[inside], atol=1e-3)


def test_linear_deformable_never_folds() -> None:
    torch.manual_seed(5)
    net = LinearDeformable(SIZE, SPACING, **SMALL["LinearDeformable"])
    with torch.no_grad():
        for parameter in net.gradient_branch.parameters():
            parameter.normal_(0.0, 1.0)  # strong random weights: sigmoids saturate somewhere
    fixed, moving = _images()
    with torch.no_grad():
        output = net(fixed, moving)
    gradients = output["gradients"]
    assert gradients.min() >= 0.0 and gradients.max() <= 2.0
    assert gradients.min() < 0.2 and gradients.max() > 1.8  # far from the identity (all ones)
    points = physical_points(net.grid).permute(3, 0, 1, 2).unsqueeze(0) + output["deformable"]
    for channel, dim in enumerate((4, 3, 2)):  # x along X, y along Y, z along Z
        steps = torch.diff(points[:, channel], dim=dim - 1)
        assert steps.min() >= -1e-4, channel
        assert steps.max() > 1.5 * SPACING[channel]  # some positions really are stretched


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_build_network_round_trip(name: str) -> None:
    torch.manual_seed(6)
    net = build_network(name, SIZE, SPACING, **SMALL[name])
    _perturb_zero_parameters(net)
    for key, value in SMALL[name].items():
        assert net.config[key] == value
    config = json.loads(json.dumps(net.config))
    assert config == net.config
    torch.manual_seed(7)
    rebuilt = build_network(name, net.grid.size, net.grid.spacing, **config)
    assert type(rebuilt) is type(net) and rebuilt.config == net.config
    rebuilt.load_state_dict(net.state_dict())
    fixed, moving = _images()
    with torch.no_grad():
        first, second = net(fixed, moving), rebuilt(fixed, moving)
    assert first["displacement"].abs().max() > 1e-3
    for key in first:
        assert torch.equal(first[key], second[key]), key


def test_build_network_default_config_is_json() -> None:
    for name in ARCHITECTURES:
        net = build_network(name, SIZE, SPACING)
        assert json.loads(json.dumps(net.config)) == net.config


def test_build_network_unknown_name() -> None:
    with pytest.raises(ValueError, match="VoxelMorph") as error:
        build_network("VoxelMorph", SIZE, SPACING)
    for name in ARCHITECTURES:
        assert name in str(error.value)


def test_global_net_learns_a_translation() -> None:
    torch.manual_seed(8)
    size, spacing = (16, 16, 16), (1.5, 1.25, 1.75)
    grid = Grid.canonical(size, spacing)
    points = physical_points(grid)
    truth = torch.tensor([3.0, -2.5, 2.0])  # mm, x y z

    def blob(center: torch.Tensor) -> torch.Tensor:
        return torch.exp(-((points - center) ** 2).sum(-1) / (2 * 4.0 ** 2))[None, None]

    fixed, moving = blob(torch.zeros(3)), blob(truth)  # moving(p + truth) == fixed(p)
    net = GlobalNet(size, spacing)
    optimizer = torch.optim.Adam(net.parameters(), lr=0.005)
    losses = []
    for _ in range(50):
        optimizer.zero_grad()
        output = net(fixed, moving)
        loss = ((warp(moving, output["displacement"], grid) - fixed) ** 2).mean()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    with torch.no_grad():
        theta = net(fixed, moving)["theta"][0]
    assert losses[-1] < 0.1 * losses[0]
    assert (theta[:, 3] - truth).abs().max() < 1.0
