"""MIND-SSC descriptors and their loss: definition, intensity invariance, translation recovery, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from DeepRegisterLib.losses import mind_loss, mind_ssc

SIZE = 48
NEIGHBOURS = ((1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1))  # (z, y, x)


def phantom(shift: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> torch.Tensor:
    """A smooth phantom (1, 1, SIZE^3): 40 Gaussian blobs of 2.5-6 voxels and amplitudes 0.2-1 on a 0.5
    background, its content moved by ``shift`` (z, y, x) voxels (evaluated there, not resampled)."""
    rng = np.random.default_rng(0)
    centres = torch.tensor(rng.uniform(6, SIZE - 7, (40, 3))) + torch.tensor(shift, dtype=torch.float64)
    widths, amplitudes = rng.uniform(2.5, 6.0, 40), rng.uniform(0.2, 1.0, 40)
    axis = torch.arange(SIZE, dtype=torch.float64)
    points = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1)
    image = torch.full((SIZE, SIZE, SIZE), 0.5, dtype=torch.float64)
    for centre, width, amplitude in zip(centres, widths, amplitudes):
        image += amplitude * torch.exp(-((points - centre) ** 2).sum(-1) / (2 * width * width))
    return image[None, None].float()


def fold(image: torch.Tensor) -> torch.Tensor:
    """A non-monotone remap: the distance to the median intensity."""
    return (image - image.median()).abs()


def translate(volume: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``volume`` (B, C, Z, Y, X) sampled at x + shift (z, y, x voxels), trilinear, border replicated."""
    axes = [torch.arange(n, dtype=shift.dtype) for n in volume.shape[2:]]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) + shift
    normalised = 2 * points / torch.tensor([n - 1 for n in volume.shape[2:]], dtype=shift.dtype) - 1
    return F.grid_sample(volume, normalised.flip(-1)[None].to(volume.dtype), align_corners=True,
                         padding_mode="border")


def mind_by_definition(image: torch.Tensor, dilation: int, sigma: float) -> torch.Tensor:
    """MIND-SSC edge by edge: each orthogonal neighbour pair, in order, with a full 3D Gaussian patch."""
    radius = max(1, math.ceil(2 * sigma))
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=image.dtype) / sigma) ** 2)
    patch = taps[:, None, None] * taps[None, :, None] * taps[None, None, :]
    patch = (patch / patch.sum())[None, None]
    margin = dilation + radius
    padded = F.pad(image, (margin,) * 6, mode="replicate")
    extent = [n + 2 * radius for n in image.shape[2:]]

    def at(offset: tuple[int, int, int]) -> torch.Tensor:
        starts = [dilation + o * dilation for o in offset]
        return padded[..., starts[0]:starts[0] + extent[0], starts[1]:starts[1] + extent[1],
                      starts[2]:starts[2] + extent[2]]

    edges = [(p, q) for i, p in enumerate(NEIGHBOURS) for q in NEIGHBOURS[i + 1:] if np.dot(p, q) == 0]
    distances = torch.cat([F.conv3d((at(p) - at(q)) ** 2, patch) for p, q in edges], dim=1)
    variance = distances.mean(dim=1, keepdim=True)
    mean = variance.mean(dim=(2, 3, 4), keepdim=True)
    variance = torch.maximum(torch.minimum(variance, 1000 * mean), 0.001 * mean)
    descriptors = torch.exp(-distances / variance)
    return descriptors / descriptors.amax(dim=1, keepdim=True)


def test_shape_range_and_flat_image() -> None:
    image = torch.rand(2, 1, 10, 12, 14, generator=torch.Generator().manual_seed(2))
    image = image * torch.tensor([300.0, 3e5]).view(2, 1, 1, 1, 1) - 100  # two intensity scales
    descriptors = mind_ssc(image)
    assert descriptors.shape == (2, 12, 10, 12, 14)
    assert descriptors.min() > 0 and descriptors.max() <= 1
    torch.testing.assert_close(descriptors.amax(dim=1), torch.ones(2, 10, 12, 14))
    assert descriptors.std() > 0.1
    torch.testing.assert_close(descriptors[1:], mind_ssc(image[1:]))  # the clamp is per batch item
    torch.testing.assert_close(mind_ssc(torch.full((1, 1, 6, 6, 6), 7.0)), torch.ones(1, 12, 6, 6, 6))


@pytest.mark.parametrize("dilation,sigma", [(2, 0.8), (1, 0.5), (3, 1.2)])
def test_matches_edge_by_edge_definition(dilation: int, sigma: float) -> None:
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(2, 1, 9, 11, 13, dtype=torch.float64, generator=generator)
    image *= torch.tensor([1.0, 1e3], dtype=torch.float64).view(2, 1, 1, 1, 1)
    image[..., :5] *= 1e-4  # a faint half, where V is clamped to 0.001 x its mean
    torch.testing.assert_close(mind_ssc(image, dilation, sigma), mind_by_definition(image, dilation, sigma))


def test_intensity_invariance() -> None:
    image = phantom()
    reference = mind_ssc(image)
    shifted = min(mind_loss(reference, mind_ssc(phantom(shift))).item()
                  for shift in ((2.0, 0.0, 0.0), (0.0, 2.0, 0.0), (0.0, 0.0, 2.0)))
    torch.testing.assert_close(mind_ssc(40 * image - 3), reference, atol=1e-5, rtol=1e-4)
    for remapped in (3 * image ** 2 + 5, fold(image)):
        loss = mind_loss(reference, mind_ssc(remapped)).item()
        assert 3 * loss < shifted, (loss, shifted)


def test_translation_recovery() -> None:
    true_shift = torch.tensor([2.0, -2.0, 1.0])
    fixed = mind_ssc(phantom())
    moving = mind_ssc(fold(phantom(tuple(true_shift.tolist()))))
    steps = [torch.zeros(3)] + [sign * torch.eye(3)[axis] for axis in range(3) for sign in (1, -1)]
    losses = [mind_loss(fixed, translate(moving, true_shift + step)).item() for step in steps]
    assert losses[0] < 0.7 * min(losses[1:]), losses
    assert mind_loss(fixed, translate(moving, torch.zeros(3))).item() > 3 * losses[0]

    shift = torch.nn.Parameter(torch.zeros(3))
    optimiser = torch.optim.Adam([shift], lr=0.1)
    for _ in range(50):
        optimiser.zero_grad()
        mind_loss(fixed, translate(moving, shift)).backward()
        optimiser.step()
    assert (shift.detach() - true_shift).abs().max() < 0.3, shift


def test_gradients() -> None:
    generator = torch.Generator().manual_seed(0)
    fixed, warped = torch.rand(2, 2, 12, 5, 1, 1, dtype=torch.float64, generator=generator)
    weight = torch.rand(2, 1, 5, 1, 1, dtype=torch.float64, generator=generator)
    warped.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda w: mind_loss(fixed, w), (warped,))
    assert torch.autograd.gradcheck(lambda w: mind_loss(fixed, w, weight), (warped,))
    image = torch.rand(1, 1, 6, 6, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(mind_ssc, (image,), fast_mode=True)


def test_weight_selects_voxels() -> None:
    generator = torch.Generator().manual_seed(1)
    fixed, warped = torch.rand(2, 2, 12, 8, 6, 5, generator=generator)
    weight = torch.zeros(1, 1, 8, 6, 5)  # broadcast over the batch
    weight[:, :, :4] = 1
    torch.testing.assert_close(mind_loss(fixed, fixed + 0.5), torch.tensor(0.25))
    loss = mind_loss(fixed, warped, weight)
    torch.testing.assert_close(loss, mind_loss(fixed[:, :, :4], warped[:, :, :4]))
    changed = warped.clone()
    changed[:, :, 4:] = torch.rand(2, 12, 4, 6, 5, generator=generator)
    torch.testing.assert_close(mind_loss(fixed, changed, weight), loss)
    changed[:, :, :4] = fixed[:, :, :4]
    assert mind_loss(fixed, changed, weight) == 0
    assert mind_loss(fixed, changed) > 0.01
