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

import math

import torch
import torch.nn.functional as F

_EPS = 1e-6
_TENSOR_CONSTANT = 8.0 * math.pi / 15.0
# Unique components of a symmetric 3x3 tensor: xx, yy, zz, xy, xz, yz.
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _gaussian_kernel(sigma_voxels: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(3.0 * sigma_voxels)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (x / max(sigma_voxels, 1e-3)) ** 2)
    return kernel / kernel.sum()


def gaussian_smooth(volume: torch.Tensor, sigma_mm: float, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Separable Gaussian smoothing of (B, C, Z, Y, X); ``spacing`` (x, y, z) mm, edges replicated."""
    channels = volume.shape[1]
    for dim, axis_spacing in zip((4, 3, 2), spacing):
        kernel = _gaussian_kernel(sigma_mm / axis_spacing).to(volume)
        radius = kernel.numel() // 2
        shape = [1, 1, 1, 1, 1]
        shape[dim] = kernel.numel()
        weight = kernel.view(shape).expand(channels, 1, *shape[2:]).contiguous()
        pad = [0, 0, 0, 0, 0, 0]
        pad[2 * (4 - dim)] = pad[2 * (4 - dim) + 1] = radius
        volume = F.conv3d(F.pad(volume, pad, mode="replicate"), weight, groups=channels)
    return volume


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


def single_saliency(tensor: torch.Tensor) -> torch.Tensor:
    """Mean tensor distance to the 26 neighbours (sum / 27), borders replicated: (B, 1, Z, Y, X)."""
    padded = F.pad(tensor, (1, 1, 1, 1, 1, 1), mode="replicate")
    z, y, x = tensor.shape[2:]
    total = torch.zeros_like(tensor[:, :1])
    for dz in range(3):
        for dy in range(3):
            for dx in range(3):
                if dz == dy == dx == 1:
                    continue
                neighbour = padded[:, :, dz:dz + z, dy:dy + y, dx:dx + x]
                total = total + tensor_distance(tensor, neighbour)
    return total / 27.0


def normalize(values: torch.Tensor) -> torch.Tensor:
    """Per-sample min-max normalisation to [0, 1]."""
    flat = values.flatten(1)
    low = flat.min(dim=1).values.view(-1, *([1] * (values.dim() - 1)))
    high = flat.max(dim=1).values.view(-1, *([1] * (values.dim() - 1)))
    return (values - low) / (high - low + _EPS)


def joint_saliency(fixed: torch.Tensor, warped: torch.Tensor, spacing: tuple[float, float, float],
                   sigma_mm: float = 1.5) -> torch.Tensor:
    """Joint saliency map in [0, 1] of two images on the same grid (B, 1, Z, Y, X)."""
    tensor_a = structure_tensor(fixed, spacing, sigma_mm)
    tensor_b = structure_tensor(warped, spacing, sigma_mm)
    common = torch.minimum(normalize(single_saliency(tensor_a)), normalize(single_saliency(tensor_b)))
    cross = normalize(tensor_distance(tensor_a, tensor_b))
    return normalize(common / (cross + 1.0))


class JointSaliency(torch.nn.Module):
    """Differentiable joint saliency layer for images on a grid of ``spacing`` (x, y, z) mm."""

    def __init__(self, spacing: tuple[float, float, float], sigma_mm: float = 1.5) -> None:
        super().__init__()
        self.spacing = tuple(float(s) for s in spacing)
        self.sigma_mm = float(sigma_mm)

    def forward(self, fixed: torch.Tensor, warped: torch.Tensor) -> torch.Tensor:
        return joint_saliency(fixed, warped, self.spacing, self.sigma_mm)
