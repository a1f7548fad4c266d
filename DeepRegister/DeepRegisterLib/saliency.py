"""Joint saliency map (JSM): where fixed and warped moving image share local structure.

3D, differentiable version of the reference design (ThesisWork; Qin et al. 2010, 2018),
as written down in shared/notes/joint-saliency.md, with these documented decisions:

* 3x3 structure tensors from forward differences in mm, Gaussian window with sigma in mm;
* each image's tensors are divided by their mean trace (per sample), so the map does not
  depend on either modality's intensity scale or offset;
* single-image saliency averages the tensor distance to the 26 neighbours (divided by 27);
* ``norm`` is per sample and maps to exactly [0, 1]: ``(t - min) / (max - min)`` (the
  reference divides by ``max`` and normalises over the whole batch);
* JSM = norm(min(norm(s_a), norm(s_b)) / (norm(s_ab) + 1)).

Images are (B, 1, Z, Y, X) on one grid; the map is (B, 1, Z, Y, X) in [0, 1].
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .filters import gaussian_smooth

_EPS = 1e-6
_TENSOR_CONSTANT = 8.0 * math.pi / 15.0
# Unique components of a symmetric 3x3 tensor: xx, yy, zz, xy, xz, yz.
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def structure_tensor(image: torch.Tensor, spacing: tuple[float, float, float], sigma_mm: float) -> torch.Tensor:
    """Smoothed structure tensor (B, 6, Z, Y, X), components xx yy zz xy xz yz, mean trace 1."""
    gradients = []
    for dim, axis_spacing in zip((4, 3, 2), spacing):
        n = image.shape[dim]
        forward = image.narrow(dim, 0, n - 1) - image.narrow(dim, 1, n - 1)
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim) + 1] = 1  # zero difference on the last row
        gradients.append(F.pad(forward, pad) / axis_spacing)
    products = torch.cat([gradients[i] * gradients[j] for i, j in _PAIRS], dim=1)
    tensor = gaussian_smooth(products, sigma_mm, spacing)
    trace = tensor[:, :3].sum(dim=1, keepdim=True).mean(dim=(2, 3, 4), keepdim=True)
    return tensor / trace.clamp(min=1e-30)


def tensor_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """d(A, B) = sqrt(max(0, 8 pi / 15 (tr(D^2) - tr(D)^2 / 3))), D = A - B; (B, 6, ...) -> (B, 1, ...)."""
    d = a - b
    trace_sq = (d[:, :3] ** 2).sum(dim=1, keepdim=True) + 2.0 * (d[:, 3:] ** 2).sum(dim=1, keepdim=True)
    trace = d[:, :3].sum(dim=1, keepdim=True)
    value = _TENSOR_CONSTANT * (trace_sq - trace ** 2 / 3.0)
    return torch.sqrt(value.clamp(min=0.0) + _EPS ** 2)


def _neighbour_slices(offset: tuple[int, int, int], shape: tuple[int, ...]) -> tuple[tuple, tuple, tuple, tuple]:
    """Slices for one neighbour offset of a volume padded by one voxel: the pairs (p, p + offset)
    that involve an interior voxel, and where each interior voxel x finds d(x, x + offset) and
    d(x, x - offset) among them."""
    pairs, moved, forward, backward = [slice(None)] * 2, [slice(None)] * 2, [slice(None)] * 2, [slice(None)] * 2
    for o, n in zip(offset, shape):
        low = 0 if o == 1 else 1
        high = n + 1 if o == -1 else n  # inclusive, in padded coordinates
        pairs.append(slice(low, high + 1))
        moved.append(slice(low + o, high + o + 1))
        forward.append(slice(1, n + 1) if o == 1 else slice(0, n))
        backward.append(slice(1, n + 1) if o == -1 else slice(0, n))
    return tuple(pairs), tuple(moved), tuple(forward), tuple(backward)


def single_saliency(tensor: torch.Tensor) -> torch.Tensor:
    """Mean tensor distance to the 26 neighbours (sum / 27), borders replicated: (B, 1, Z, Y, X).

    Distances are symmetric: each of the 13 offsets' distances serves both voxels of a pair.
    """
    padded = F.pad(tensor, (1, 1, 1, 1, 1, 1), mode="replicate")
    total = torch.zeros_like(tensor[:, :1])
    for offset in itertools.product((-1, 0, 1), repeat=3):
        if offset <= (0, 0, 0):
            continue
        pairs, moved, forward, backward = _neighbour_slices(offset, tensor.shape[2:])
        distance = tensor_distance(padded[pairs], padded[moved])
        total = total + distance[forward] + distance[backward]
    return total / 27.0


def normalize(values: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1]."""
    flat = values.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (values.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (values.dim() - 1)))
    return (values - low) / (high - low + _EPS)


class FixedSaliency:
    """The fixed image's half of the joint saliency map, computed once: ``FixedSaliency(fixed, ...)(warped)``
    equals ``joint_saliency(fixed, warped, ...)``, at about half the cost when the fixed image stays
    the same while the warped one changes (fine-tuning refreshes the map during optimisation)."""

    def __init__(self, fixed: torch.Tensor, spacing: tuple[float, float, float], sigma_mm: float = 1.5) -> None:
        self.spacing, self.sigma_mm = spacing, sigma_mm
        self.tensor = structure_tensor(fixed, spacing, sigma_mm)
        self.single = normalize(single_saliency(self.tensor))

    def __call__(self, warped: torch.Tensor) -> torch.Tensor:
        """Joint saliency map in [0, 1] (B, 1, Z, Y, X) against ``warped`` on the fixed image's grid."""
        tensor = structure_tensor(warped, self.spacing, self.sigma_mm)
        common = torch.minimum(self.single, normalize(single_saliency(tensor)))
        cross = normalize(tensor_distance(self.tensor, tensor))
        return normalize(common / (cross + 1.0))


def joint_saliency(fixed: torch.Tensor, warped: torch.Tensor, spacing: tuple[float, float, float],
                   sigma_mm: float = 1.5) -> torch.Tensor:
    """Joint saliency map in [0, 1] of two images on the same grid (B, 1, Z, Y, X)."""
    return FixedSaliency(fixed, spacing, sigma_mm)(warped)


class JointSaliency(torch.nn.Module):
    """Differentiable joint saliency layer for images on a grid of ``spacing`` (x, y, z) mm."""

    def __init__(self, spacing: tuple[float, float, float], sigma_mm: float = 1.5) -> None:
        super().__init__()
        self.spacing = tuple(float(s) for s in spacing)
        self.sigma_mm = float(sigma_mm)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return joint_saliency(fixed, warped, self.spacing, self.sigma_mm)
