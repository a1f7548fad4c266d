"""Differentiable spatial operations in physical space.

Conventions used by every function here:

* Image tensors are ``(B, C, Z, Y, X)``: the axis order of ``sitk.GetArrayFromImage``
  with batch and channel axes in front.
* Displacement tensors are ``(B, 3, Z, Y, X)``; channel ``k`` is the displacement along
  physical axis ``k`` (0 = x, 1 = y, 2 = z) in millimetres, in the image's LPS physical
  frame (the frame of ITK and SimpleITK).  A displacement ``u`` on a fixed grid maps the
  fixed physical point ``p`` to the moving physical point ``p + u(p)`` (ITK resampling
  convention, Slicer "TransformFromParent").
* Geometry (size, spacing, origin, direction) is carried by :class:`Grid`, never implied
  by array shapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Grid:
    """A 3D image grid in physical space.

    ``size`` and ``spacing`` are in ITK order (x, y, z); ``spacing`` in mm; ``origin`` is
    the physical (LPS, mm) position of voxel (0, 0, 0); ``direction`` is the 3x3 matrix
    whose columns are the physical directions of the index axes.
    """

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    @classmethod
    def from_image(cls, image: sitk.Image) -> "Grid":
        """The grid of a 3D SimpleITK image."""
        return cls(
            tuple(int(v) for v in image.GetSize()),
            tuple(float(v) for v in image.GetSpacing()),
            tuple(float(v) for v in image.GetOrigin()),
            tuple(float(v) for v in image.GetDirection()),
        )

    @classmethod
    def centered(
        cls,
        center: np.ndarray,
        size: tuple[int, int, int],
        spacing: tuple[float, float, float],
        direction: tuple[float, ...],
    ) -> "Grid":
        """A grid of ``size`` voxels whose physical centre is ``center``."""
        matrix = np.reshape(direction, (3, 3)) * np.asarray(spacing)
        origin = np.asarray(center) - matrix @ ((np.asarray(size) - 1) / 2.0)
        return cls(tuple(int(v) for v in size), tuple(float(v) for v in spacing),
                   tuple(float(v) for v in origin), tuple(float(v) for v in direction))

    @classmethod
    def canonical(cls, size: tuple[int, int, int], spacing: tuple[float, float, float]) -> "Grid":
        """The networks' frame: identity direction, centred on the physical origin."""
        return cls.centered(np.zeros(3), size, spacing, (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))

    def shares_direction(self, other: "Grid") -> bool:
        """Whether both grids' index axes point the same physical ways (to 1e-6)."""
        return bool(np.allclose(self.direction, other.direction, atol=1e-6))

    def strided(self, offset: tuple[int, int, int], stride: int) -> "Grid":
        """Every ``stride``-th voxel from index ``offset`` (x, y, z) on: the grid of the array
        slice ``[..., oz::stride, oy::stride, ox::stride]``."""
        origin = np.asarray(self.origin) + self.index_to_physical @ np.asarray(offset, dtype=float)
        size = tuple((n - 1 - o) // stride + 1 for n, o in zip(self.size, offset))
        return Grid(size, tuple(s * stride for s in self.spacing), tuple(float(v) for v in origin), self.direction)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Array shape (Z, Y, X)."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def index_to_physical(self) -> np.ndarray:
        """3x3 matrix ``direction @ diag(spacing)``: index offsets (x, y, z) to mm."""
        return np.reshape(self.direction, (3, 3)) * np.asarray(self.spacing)

    @property
    def center(self) -> np.ndarray:
        """Physical position (mm) of the grid's centre."""
        return np.asarray(self.origin) + self.index_to_physical @ ((np.asarray(self.size) - 1) / 2.0)

    def physical_to_index(self, points: np.ndarray) -> np.ndarray:
        """Continuous (x, y, z) indices of physical points given as (..., 3) in mm."""
        inverse = np.linalg.inv(self.index_to_physical)
        return (np.asarray(points, dtype=float) - np.asarray(self.origin)) @ inverse.T

    def place(self, image: sitk.Image) -> sitk.Image:
        """Give ``image`` (of this grid's size) this grid's spacing, origin and direction; returns it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def reference_image(self, pixel_type: int = sitk.sitkFloat32) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for resampling)."""
        return self.place(sitk.Image([int(v) for v in self.size], pixel_type))


def physical_points(grid: Grid, dtype: torch.dtype = torch.float32,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Physical coordinates (mm) of every voxel centre: tensor ``(Z, Y, X, 3)``, last axis (x, y, z)."""
    axes = [torch.arange(n, dtype=torch.float64, device=device) for n in grid.shape]
    zz, yy, xx = torch.meshgrid(*axes, indexing="ij")
    index = torch.stack((xx, yy, zz), dim=-1)
    matrix = torch.as_tensor(grid.index_to_physical, dtype=torch.float64, device=device)
    origin = torch.as_tensor(grid.origin, dtype=torch.float64, device=device)
    return (index @ matrix.T + origin).to(dtype)


def normalized_coordinates(points: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Map physical points ``(..., 3)`` (mm, x y z) to ``grid_sample`` coordinates of ``grid``.

    The result is in [-1, 1] inside the grid (``align_corners=True``), last axis (x, y, z).
    """
    origin = torch.as_tensor(grid.origin, dtype=points.dtype, device=points.device)
    return (points - origin) @ normalized_per_mm(grid, points.dtype, points.device) - 1.0


def normalized_per_mm(grid: Grid, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """The (3, 3) matrix ``M`` with ``normalized_coordinates(p + u) = normalized_coordinates(p) + u @ M``
    for displacements ``u`` (..., 3) in mm (x, y, z): the change of ``grid_sample`` coordinates per mm."""
    inverse = np.linalg.inv(grid.index_to_physical)
    scale = 2.0 / np.maximum(np.asarray(grid.size, dtype=float) - 1.0, 1.0)
    return torch.as_tensor(inverse.T * scale[None, :], dtype=dtype, device=device)


def identity_coordinates(grid: Grid, device: torch.device | str = "cpu") -> torch.Tensor:
    """``grid_sample`` coordinates (1, Z, Y, X, 3) of the grid's own voxels: what
    :func:`normalized_coordinates` gives for :func:`physical_points`, without the physical points."""
    return F.affine_grid(torch.eye(3, 4, device=device)[None], (1, 1, *grid.shape), align_corners=True)


def sample_normalized(image: torch.Tensor, coordinates: torch.Tensor, mode: str = "bilinear",
                      padding_mode: str = "zeros") -> torch.Tensor:
    """Interpolate ``image`` (B, C, Z, Y, X) at ``grid_sample`` coordinates (B, *S, 3) -> (B, C, *S).

    On a CPU with several threads a single image's points are split into one batch per thread
    (the image expanded, not copied): PyTorch's 3D ``grid_sample`` runs its batch in parallel
    but each batch on one thread (2 threads: forward and backward 2x faster, the same values).
    """
    threads = torch.get_num_threads()
    points = math.prod(coordinates.shape[1:-1])
    if image.device.type != "cpu" or image.shape[0] != 1 or threads < 2 or points < 4096:
        return F.grid_sample(image, coordinates, mode=mode, padding_mode=padding_mode, align_corners=True)
    flat = coordinates.reshape(-1, 3)
    per_batch = -(-points // threads)
    flat = F.pad(flat, (0, 0, 0, per_batch * threads - points))  # padding points sample the centre
    values = F.grid_sample(image.expand(threads, -1, -1, -1, -1), flat.view(threads, per_batch, 1, 1, 3), mode=mode,
                           padding_mode=padding_mode, align_corners=True)  # (threads, C, per_batch, 1, 1)
    values = values.movedim(0, 1).reshape(image.shape[1], -1)[:, :points]
    return values.reshape(1, image.shape[1], *coordinates.shape[1:-1])


def sample(image: torch.Tensor, points: torch.Tensor, grid: Grid, mode: str = "bilinear",
           padding_mode: str = "zeros") -> torch.Tensor:
    """Interpolate ``image`` (B, C, Z, Y, X) on ``grid`` at physical points (B, *S, 3) -> (B, C, *S).

    ``S`` is any 3D arrangement of points; ``mode`` "bilinear" is trilinear interpolation.
    """
    return sample_normalized(image, normalized_coordinates(points, grid), mode, padding_mode)


def warp(image: torch.Tensor, displacement: torch.Tensor, grid: Grid, image_grid: Grid | None = None,
         mode: str = "bilinear", padding_mode: str = "zeros") -> torch.Tensor:
    """Resample ``image`` through a displacement field.

    ``image`` (B, C, Zm, Ym, Xm) lies on ``image_grid`` (default: ``grid``); ``displacement``
    (B, 3, Z, Y, X) in mm lies on ``grid``. Returns ``image(p + u(p))`` for every voxel
    ``p`` of ``grid``: (B, C, Z, Y, X).
    """
    points = physical_points(grid, displacement.dtype, displacement.device)
    points = points.unsqueeze(0) + displacement.permute(0, 2, 3, 4, 1)
    return sample(image, points, image_grid or grid, mode, padding_mode)


class SpatialTransformer(torch.nn.Module):
    """Warp images on one fixed grid by displacement fields (mm) on the same grid.

    Caches the grid's physical coordinates; see :func:`warp` for axis order and units.
    """

    def __init__(self, grid: Grid) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("points", physical_points(grid), persistent=False)

    def forward(self, image: torch.Tensor, displacement: torch.Tensor,
                padding_mode: str = "border") -> torch.Tensor:
        points = self.points.to(displacement.dtype).unsqueeze(0) + displacement.permute(0, 2, 3, 4, 1)
        return sample(image, points, self.grid, "bilinear", padding_mode)


def affine_displacement(theta: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement (B, 3, Z, Y, X) in mm of the affine maps ``theta`` (B, 3, 4).

    ``theta = [A | t]`` acts on physical coordinates (mm, x y z) relative to the grid's
    centre ``c``: ``p -> c + A (p - c) + t``; ``[I | 0]`` is the identity.
    """
    points = physical_points(grid, theta.dtype, theta.device)
    centered = points - torch.as_tensor(grid.center, dtype=theta.dtype, device=theta.device)
    moved = torch.einsum("bij,zyxj->bzyxi", theta[:, :, :3], centered) + theta[:, None, None, None, :, 3]
    return (moved - centered).permute(0, 4, 1, 2, 3)


def compose(first: torch.Tensor, second: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement of "apply ``first``, then ``second``": ``w(p) = u1(p) + u2(p + u1(p))``.

    Both (B, 3, Z, Y, X) in mm on ``grid``; ``second`` is extended by its border values.
    """
    return first + warp(second, first, grid, padding_mode="border")


def cubic_bspline(t: np.ndarray) -> np.ndarray:
    """The cubic B-spline kernel at offsets ``t`` (in control spacings); support (-2, 2)."""
    t = np.abs(t)
    return np.where(t < 1, 2.0 / 3.0 - t ** 2 + t ** 3 / 2.0, np.where(t < 2, (2.0 - t) ** 3 / 6.0, 0.0))


class SeparableInterpolator(torch.nn.Module):
    """Values (B, C, z, y, x) on a ``source`` grid -> (B, C, Z, Y, X) at the voxels of a ``target``
    grid with the same direction, as one matrix product per axis (weights computed once).

    ``kernel`` "linear": trilinear interpolation, the border value outside ``source`` (the same
    as :func:`sample` with "border", 10-20x faster on CPU). "bspline": the values are cubic
    B-spline coefficients, zero outside ``source`` (target voxels within two source voxels of
    its border lack full support). Units are those of the values (mm for displacements).
    """

    def __init__(self, source: Grid, target: Grid, kernel: str = "linear") -> None:
        super().__init__()
        if not source.shares_direction(target):
            raise ValueError("SeparableInterpolator needs source and target grids with the same direction.")
        if kernel not in ("linear", "bspline"):
            raise ValueError(f"Unknown kernel '{kernel}': use 'linear' or 'bspline'.")
        # target voxel j along axis a lies at source index offset[a] + j * target.spacing[a] / source.spacing[a]
        offset = np.linalg.solve(source.index_to_physical, np.subtract(target.origin, source.origin))
        for axis, name in enumerate(("x", "y", "z")):
            positions = offset[axis] + np.arange(target.size[axis]) * target.spacing[axis] / source.spacing[axis]
            if kernel == "linear":
                positions = positions.clip(0, source.size[axis] - 1)
            distance = positions[:, None] - np.arange(source.size[axis])[None, :]
            weights = cubic_bspline(distance) if kernel == "bspline" else np.clip(1.0 - np.abs(distance), 0, None)
            self.register_buffer(f"weights_{name}", torch.as_tensor(weights, dtype=torch.float32), persistent=False)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        b, c, z = values.shape[:3]
        weights_x, weights_y, weights_z = (w.to(values.dtype) for w in (self.weights_x, self.weights_y, self.weights_z))
        values = weights_y @ (values @ weights_x.T)  # (B, C, z, Y, X)
        y, x = values.shape[3:]
        return (weights_z @ values.reshape(b, c, z, y * x)).reshape(b, c, -1, y, x)


class VelocityIntegrator(torch.nn.Module):
    """Scaling and squaring on one grid: displacement (B, 3, Z, Y, X) in mm of the exponential
    of a stationary velocity field (B, 3, Z, Y, X) in mm (voxelmorph's VecInt, in physical units).

    Each squaring is :func:`compose` of the field with itself (border extension); the grid's
    ``grid_sample`` coordinates and its mm-to-normalised map are computed once, so repeated
    integrations (fine-tuning calls it every step) cost only the ``steps`` interpolations.
    """

    def __init__(self, grid: Grid, steps: int = 7) -> None:
        super().__init__()
        self.steps = steps
        self.register_buffer("identity", normalized_coordinates(physical_points(grid), grid)[None], persistent=False)
        self.register_buffer("per_mm", normalized_per_mm(grid), persistent=False)

    def forward(self, velocity: torch.Tensor, steps: int | None = None) -> torch.Tensor:
        """``steps`` squarings (default: the integrator's)."""
        steps = self.steps if steps is None else steps
        displacement = velocity / (2 ** steps)
        matrix = self.per_mm.to(velocity.dtype)
        for _ in range(steps):
            coordinates = self.identity.to(velocity.dtype) + displacement.permute(0, 2, 3, 4, 1) @ matrix
            displacement = displacement + sample_normalized(displacement, coordinates, padding_mode="border")
        return displacement


def integrate_gradients(gradients: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Displacement (mm) from spatial gradients by cumulative sum (Christodoulidis et al.).

    ``gradients`` (B, 3, Z, Y, X): channel k (index axis x, y, z) is the spacing, in voxels,
    between consecutive sampling positions along that axis; 1 everywhere is the identity and
    values > 0 keep the sampling positions strictly increasing along each axis, so the grid
    cannot fold along it. The sampling grid is anchored at the grid's central voxel:
    ``G(p) = c + S(p) - S(c)`` with ``S`` the cumulative sum along the axis.
    """
    offsets = []
    for channel, dim in enumerate((4, 3, 2)):  # x runs along X (dim 4), y along Y, z along Z
        cumulative = torch.cumsum(gradients[:, channel], dim=dim - 1)
        n = gradients.shape[dim]
        center = (n - 1) // 2
        anchor = cumulative.narrow(dim - 1, center, 1)
        index = torch.arange(n, dtype=gradients.dtype, device=gradients.device)
        shape = [1, 1, 1, 1]
        shape[dim - 1] = n
        offsets.append(cumulative - anchor + center - index.view(shape))
    voxel_offsets = torch.stack(offsets, dim=-1)  # (B, Z, Y, X, 3) in voxels, x y z
    matrix = torch.as_tensor(grid.index_to_physical, dtype=gradients.dtype, device=gradients.device)
    return (voxel_offsets @ matrix.T).permute(0, 4, 1, 2, 3)


def resample_field(displacement: torch.Tensor, source: Grid, target: Grid) -> torch.Tensor:
    """Resample a displacement (mm) from grid ``source`` onto grid ``target`` (trilinear).

    Values are physical mm, so they are unchanged; outside ``source`` the border value is used.
    Grids with the same direction take the separable path (:class:`SeparableInterpolator`).
    """
    if source.shares_direction(target):
        return SeparableInterpolator(source, target).to(displacement.device)(displacement)
    points = physical_points(target, displacement.dtype, displacement.device).unsqueeze(0)
    points = points.expand(displacement.shape[0], *points.shape[1:])
    return sample(displacement, points, source, "bilinear", "border")


def resize_voxel_field(displacement: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Resize a displacement given in voxel units to array ``shape`` (Z, Y, X).

    Channels are (x, y, z) voxel offsets; each is rescaled by the change of voxel size along
    its axis (``align_corners=True``: ``(new - 1) / (old - 1)``).
    """
    old = displacement.shape[2:]
    resized = F.interpolate(displacement, size=shape, mode="trilinear", align_corners=True)
    factors = [(shape[axis] - 1) / max(old[axis] - 1, 1) for axis in (2, 1, 0)]
    scale = torch.as_tensor(factors, dtype=displacement.dtype, device=displacement.device)
    return resized * scale.view(1, 3, 1, 1, 1)


def jacobian_determinant(displacement: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Determinant of the mapping's Jacobian ``det(I + du/dp)``: (B, Z, Y, X); <= 0 means folding.

    Central differences inside, one-sided at the border. With ``M`` = direction x spacing and ``D``
    the derivatives along the index axes, ``I + D M^-1 = (M + D) M^-1``: the determinant is
    ``det(M + D) / det(M)``, by cofactor expansion, without a 3x3 product per voxel.
    """
    matrix = grid.index_to_physical
    columns = [torch.gradient(displacement, dim=dim)[0] for dim in (4, 3, 2)]  # d/d index x, y, z: (B, 3, Z, Y, X)
    m = [[columns[j][:, i] + float(matrix[i, j]) for j in range(3)] for i in range(3)]
    determinant = (m[0][0] * (m[1][1] * m[2][2] - m[1][2] * m[2][1])
                   - m[0][1] * (m[1][0] * m[2][2] - m[1][2] * m[2][0])
                   + m[0][2] * (m[1][0] * m[2][1] - m[1][1] * m[2][0]))
    return determinant / float(np.linalg.det(matrix))


def percent_folded(determinant: torch.Tensor) -> float:
    """Percentage of voxels whose Jacobian determinant (see :func:`jacobian_determinant`) is not positive."""
    return float((determinant <= 0).double().mean() * 100.0)


def folding_percent(displacement: torch.Tensor, grid: Grid) -> float:
    """Percentage of voxels whose Jacobian determinant is not positive."""
    with torch.no_grad():
        return percent_folded(jacobian_determinant(displacement, grid))


def displacement_to_sitk(displacement: torch.Tensor, grid: Grid) -> sitk.Image:
    """One displacement (1, 3, Z, Y, X) in mm to a float64 vector image with ``grid``'s geometry."""
    array = displacement[0].detach().permute(1, 2, 3, 0).to("cpu", torch.float64).contiguous().numpy()
    return grid.place(sitk.GetImageFromArray(array, isVector=True))


def sitk_to_displacement(image: sitk.Image) -> torch.Tensor:
    """A SimpleITK displacement-field image (mm, LPS) to a tensor (1, 3, Z, Y, X) float32."""
    array = sitk.GetArrayFromImage(image).astype(np.float32)
    return torch.from_numpy(array).permute(3, 0, 1, 2).unsqueeze(0).contiguous()
