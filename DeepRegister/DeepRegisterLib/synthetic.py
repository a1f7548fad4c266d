"""Synthetic smooth deformations and a pelvic phantom pair with known ground truth.

Used for the bundled demo data, tests, benchmarks and as training augmentation. Fields are
(1, 3, Z, Y, X) tensors in mm on a :class:`~DeepRegisterLib.spatial.Grid`; points are LPS mm.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from . import spatial
from .filters import gaussian_smooth
from .spatial import Grid


def random_smooth_field(grid: Grid, max_mm: float, sigma_mm: float, peaks: int,
                        rng: np.random.Generator) -> torch.Tensor:
    """RegNet-style random field: random displacement peaks blurred by a Gaussian of ``sigma_mm``,
    scaled so the largest displacement magnitude is ``max_mm``. Returns (1, 3, Z, Y, X) mm.

    The peaks are blurred on a grid of spacing ``sigma_mm / 4`` (or ``grid``'s, if finer) over the
    same extent and resampled trilinearly: the field is smooth at that scale, and a blur of
    hundreds of taps on a large grid would need gigabytes."""
    step = max(sigma_mm / 4.0, min(grid.spacing))
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    coarse = Grid.centered(grid.center, tuple(int(np.ceil(e / step)) + 1 for e in extent), (step,) * 3,
                           grid.direction)
    field = torch.zeros(1, 3, *coarse.shape)
    z, y, x = (rng.integers(0, n, peaks) for n in coarse.shape)
    field[0, :, z, y, x] = torch.as_tensor(rng.uniform(-1.0, 1.0, (3, peaks)), dtype=torch.float32)
    field = gaussian_smooth(field, sigma_mm, coarse.spacing)
    if coarse.shape != grid.shape:
        field = spatial.resample_field(field, coarse, grid)
    magnitude = field.norm(dim=1).max()
    return field * (max_mm / magnitude) if magnitude > 0 else field


def multi_frequency_field(grid: Grid, max_mm: float, rng: np.random.Generator,
                          sigmas_mm: tuple[float, ...] = (30.0, 20.0, 12.0), peaks: int = 60) -> torch.Tensor:
    """Sum of random smooth fields at three spatial frequencies (low, medium, high) of ``peaks``
    random peaks each, scaled to ``max_mm``."""
    field = sum(random_smooth_field(grid, 1.0, sigma, peaks, rng) for sigma in sigmas_mm)
    return field * (max_mm / field.norm(dim=1).max())


def ultrasound_remap(array: np.ndarray, rng: np.random.Generator, phase: float = 0.4) -> np.ndarray:
    """Ultrasound-like appearance of intensities in [0, 1]: a non-monotonic remap times smoothed
    Rayleigh speckle; returns values in about [0, 1]."""
    remapped = 0.15 + 0.7 * np.abs(np.sin(2.6 * np.pi * array + phase))
    speckle = rng.rayleigh(0.8, array.shape).astype(np.float32)
    speckle = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(speckle), 0.6))
    return np.clip(remapped * speckle, 0, 1).astype(np.float32)


def ultrasound_like(image: sitk.Image, rng: np.random.Generator) -> sitk.Image:
    """:func:`ultrasound_remap` of an image with intensities in [0, 1], on the uint8 scale."""
    result = sitk.GetImageFromArray(ultrasound_remap(sitk.GetArrayFromImage(image).astype(np.float32), rng) * 255.0)
    result.CopyInformation(image)
    return result


@dataclass
class PhantomPair:
    """A fixed/moving pair with its true fixed->moving transform and corresponding points."""

    fixed: sitk.Image
    moving: sitk.Image
    fixed_gland: sitk.Image
    moving_gland: sitk.Image
    fixed_points: np.ndarray
    moving_points: np.ndarray
    transform: sitk.DisplacementFieldTransform


def _ellipsoid(points: np.ndarray, center: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((points - center) / radii) ** 2).sum(axis=-1) <= 1.0


def _anatomy(grid: Grid, rng: np.random.Generator, lesions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MR-like pelvic phantom intensities in [0, 1] and the gland mask, arrays (Z, Y, X)."""
    points = spatial.physical_points(grid, torch.float64).numpy() - grid.center
    texture = gaussian_smooth(torch.as_tensor(rng.normal(size=(1, 1, *grid.shape)), dtype=torch.float32),
                              3.0, grid.spacing)[0, 0].numpy()
    image = 0.05 + 0.05 * texture / (np.abs(texture).max() + 1e-6)
    image[_ellipsoid(points, np.zeros(3), np.array([60.0, 45.0, 70.0]))] += 0.3
    image[_ellipsoid(points, np.array([0, 0, 32.0]), np.array([22.0, 18.0, 14.0]))] = 0.9  # bladder
    image[_ellipsoid(points, np.array([0, 27.0, 0]), np.array([9.0, 7.0, 60.0]))] = 0.12  # rectum
    gland = _ellipsoid(points, np.zeros(3), np.array([21.0, 16.0, 18.0]))
    image[gland] = 0.62 + 0.08 * texture[gland] / (np.abs(texture).max() + 1e-6)
    image[_ellipsoid(points, np.array([0, -3.0, 0]), np.array([10.0, 8.0, 12.0]))] = 0.45  # central zone
    image[_ellipsoid(points, np.array([0, -6.0, 0]), np.array([2.0, 2.0, 40.0])) & gland] = 0.85  # urethra
    for index, center in enumerate(lesions):
        image[_ellipsoid(points + grid.center, center, np.full(3, 3.0))] = 0.98 if index % 2 else 0.25
    smoothed = sitk.SmoothingRecursiveGaussian(sitk.GetImageFromArray(image.astype(np.float32)), 0.7)
    return sitk.GetArrayFromImage(smoothed), gland


def make_phantom_pair(seed: int = 0, size: tuple[int, int, int] = (96, 96, 96), spacing: float = 1.0,
                      max_mm: float = 8.0, ultrasound: bool = True, landmarks: int = 12,
                      rotation_deg: float = 4.0, translation_mm: float = 3.0) -> PhantomPair:
    """A phantom pair with known deformation: ``moving`` is MR-like; ``fixed`` is the same anatomy
    seen through ``transform`` (fixed->moving, in physical space) on a differently placed,
    rotated grid, ultrasound-like if ``ultrasound``. Image centres differ by an arbitrary
    offset; after aligning centres a small rotation, translation and a smooth local field of
    up to ``max_mm`` remain. Landmarks are lesion centres inside the gland."""
    rng = np.random.default_rng(seed)
    angles = np.radians(rng.uniform(-10, 10, 3))
    fixed_direction = sitk.Euler3DTransform((0, 0, 0), *angles).GetMatrix()
    fixed_size = tuple(int(round(n * 0.9)) for n in size)
    fixed_grid = Grid.centered(np.array([12.0, -30.0, 45.0]), fixed_size, (spacing * 1.1,) * 3, fixed_direction)
    moving_grid = Grid.centered(np.array([-5.0, 10.0, -20.0]), size, (spacing,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))

    rotation = sitk.Euler3DTransform((0, 0, 0), *np.radians(rng.normal(0, rotation_deg, 3)))
    shift = rng.normal(0, translation_mm / np.sqrt(3), 3)
    points = spatial.physical_points(fixed_grid, torch.float64).numpy()
    rotated = (points - fixed_grid.center) @ np.reshape(rotation.GetMatrix(), (3, 3)).T
    local = multi_frequency_field(fixed_grid, max_mm, rng)[0].permute(1, 2, 3, 0).double().numpy()
    # Taper the local field towards the border so the phantom's body stays inside the view.
    taper = np.prod(np.clip(1.3 - np.abs(fixed_grid.physical_to_index(points) / (np.asarray(fixed_size) - 1) * 2 - 1),
                            0, 1), axis=-1, keepdims=True)
    mapped = moving_grid.center + shift + rotated + local * taper
    displacement = torch.from_numpy(mapped - points).permute(3, 0, 1, 2)[None].float()
    transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(displacement, fixed_grid))

    # Landmarks: points inside the fixed gland; the moving ones are their images under the transform.
    gland_radii = np.array([21.0, 16.0, 18.0]) * 0.6
    fixed_points = []
    while len(fixed_points) < landmarks:
        offset = rng.uniform(-1, 1, 3) * gland_radii
        if np.sum((offset / gland_radii) ** 2) <= 1:
            fixed_points.append(fixed_grid.center + offset)
    fixed_points = np.asarray(fixed_points)
    moving_points = np.asarray([transform.TransformPoint(tuple(p)) for p in fixed_points])

    anatomy, gland = _anatomy(moving_grid, rng, moving_points)
    moving = moving_grid.place(sitk.GetImageFromArray(anatomy.astype(np.float32)))
    moving_gland = moving_grid.place(sitk.GetImageFromArray(gland.astype(np.uint8)))
    reference = fixed_grid.reference_image()
    fixed = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    fixed_gland = sitk.Resample(moving_gland, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if ultrasound:
        fixed = ultrasound_like(fixed, rng)
    else:
        noise = sitk.GetImageFromArray(rng.normal(0, 0.02, fixed_grid.shape).astype(np.float32))
        noise.CopyInformation(fixed)
        fixed = (fixed + noise) * 255.0
    moving = moving * 255.0
    return PhantomPair(fixed, moving, fixed_gland, moving_gland, fixed_points, moving_points, transform)


@dataclass
class DeformedPair:
    """A volume and the same volume through a known smooth deformation, with corresponding points.

    ``fixed`` = ``moving`` seen through ``transform`` (fixed -> moving points); labels, when given,
    are integer label maps on the fixed and moving grids; points are LPS mm.
    """

    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image | None
    moving_labels: sitk.Image | None
    fixed_points: np.ndarray
    moving_points: np.ndarray
    transform: sitk.DisplacementFieldTransform


def deformed_pair(volume: sitk.Image, grid: Grid, rng: np.random.Generator, median_mm: float = 3.0,
                  ultrasound: bool = False, labels: sitk.Image | None = None, landmarks: int = 20,
                  threshold: float = 0.3) -> DeformedPair:
    """Synthetic registration pair from a real ``volume`` with intensities in [0, 1].

    ``moving`` = the volume resampled on ``grid``; a :func:`multi_frequency_field` scaled to a
    median magnitude of ``median_mm`` inside the anatomy (intensity > ``threshold``) deforms it
    into ``fixed`` (plus 2 % Gaussian noise). With ``ultrasound``, the moving image gets an
    ultrasound-like appearance. ``landmarks`` fixed points are drawn inside the fixed anatomy
    and mapped through the field. Images are float32 on the [0, 255] scale.
    """
    reference = grid.reference_image()
    moving = sitk.Resample(sitk.Cast(volume, sitk.sitkFloat32), reference, sitk.Transform(), sitk.sitkLinear, 0.0)
    inside = torch.from_numpy(sitk.GetArrayFromImage(moving) > threshold)
    field = multi_frequency_field(grid, 1.0, rng)
    field = field * (median_mm / float(field.norm(dim=1)[0][inside].median()))
    transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(field, grid))
    fixed = sitk.Resample(moving, reference, transform, sitk.sitkLinear, 0.0)
    fixed_labels = moving_labels = None
    if labels is not None:
        moving_labels = sitk.Resample(labels, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        fixed_labels = sitk.Resample(moving_labels, reference, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    array = sitk.GetArrayFromImage(fixed)
    candidates = np.argwhere(array > threshold)
    chosen = candidates[rng.choice(len(candidates), landmarks, replace=False)]
    fixed_points = spatial.physical_points(grid, torch.float64).numpy()[tuple(chosen.T)]
    moving_points = np.asarray([transform.TransformPoint(tuple(p)) for p in fixed_points])
    noise = sitk.GetImageFromArray(rng.normal(0, 0.02, array.shape).astype(np.float32))
    noise.CopyInformation(fixed)
    fixed = sitk.Clamp(fixed + noise, sitk.sitkFloat32, 0.0, 1.0) * 255.0
    moving = ultrasound_like(moving, rng) if ultrasound else moving * 255.0
    return DeformedPair(fixed, moving, fixed_labels, moving_labels, fixed_points, moving_points, transform)


SAMPLE_FILES = ("fixed_us.nii.gz", "moving_mr.nii.gz", "fixed_gland.nii.gz", "moving_gland.nii.gz",
                "fixed_landmarks.fcsv", "moving_landmarks.fcsv")


def write_sample_data(folder: str, seed: int = 7) -> None:
    """Write the bundled demo pair: a 96^3, 1.33 mm phantom, ultrasound-like fixed and MR-like moving
    (uint8), gland masks and corresponding landmarks (Slicer .fcsv)."""
    from pathlib import Path

    from .landmarks import Landmarks, write_fcsv

    pair = make_phantom_pair(seed, (96, 96, 96), spacing=4.0 / 3.0, max_mm=10.0)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    names = iter(SAMPLE_FILES)
    for image in (pair.fixed, pair.moving, pair.fixed_gland, pair.moving_gland):
        sitk.WriteImage(sitk.Cast(sitk.Clamp(image, image.GetPixelID(), 0, 255), sitk.sitkUInt8),
                        str(folder / next(names)), useCompression=True)
    labels = [f"L{i + 1}" for i in range(len(pair.fixed_points))]
    write_fcsv(folder / next(names), Landmarks(pair.fixed_points, labels))
    write_fcsv(folder / next(names), Landmarks(pair.moving_points, labels))
