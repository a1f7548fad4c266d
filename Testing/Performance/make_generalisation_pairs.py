"""Write the generalisation suite: pair families DeepRegister was not tuned on, each with a ``dev``
split (for choosing settings) and a ``test`` split (for reporting only). Fixed seeds: the same files
on every machine.

    python Testing/Performance/make_generalisation_pairs.py --out benchmark-pairs-generalisation \
        [--dev 2] [--test 2] [--families scale-small,us-fan,...] [--size 112]
    deepregister benchmark --pairs benchmark-pairs-generalisation/pairs.csv --split dev  --out benchmark-output-gen-dev
    deepregister benchmark --pairs benchmark-pairs-generalisation/pairs.csv --split test --out benchmark-output-gen-test \
        --tuned-on FAMILIES    # the families whose dev pairs settings were chosen on (default: none)

Anatomy: the MNI152 2009a T1 and its grey/white-matter probability maps (from nilearn's wheel, see
training/public_volumes.py) at 1 mm, ``--size``^3 voxels around the volume centre; labels 1 = grey
matter, 2 = white matter (probability > 0.5); 20 landmarks inside the brain per pair (fixed points
and their images under the true fixed -> moving transform). As in make_benchmark_pairs.py the
moving image is the anatomy on its own grid and the fixed image is that anatomy seen through a
known smooth displacement field (``fixed(x) = anatomy(T(x))``, ``T`` maps fixed points to moving
points), so landmark TRE measures the fixed -> moving transform a method returns.

Displacement fields (built differently from ``synthetic.multi_frequency_field``): either a sum of
Gaussian radial-basis displacements (centres uniform over the field of view, one random width per
basis function within the family's length-scale range, random 3D amplitudes), or a cubic B-spline
grid with random coefficients at every control point (control spacing per axis within the range,
random grid phase). The field is scaled to a median magnitude inside the brain drawn from the
family's range (capped so that its largest magnitude is at most 10 mm), and redrawn while that median
falls below the range or its Jacobian determinant drops to 0.2 or less (no folding); landmarks are
redrawn until their median displacement lies in 2-8 mm.

Families (``kind`` = ``family`` in pairs.csv; ``modality`` picks elastix's metric):

* ``scale-small``: Gaussian RBF sums of 8-16 mm width; monomodal T1, 2 % noise on both images.
* ``scale-large``: random B-spline grids of 24-40 mm control spacing; monomodal.
* ``remap-monotone``: the moving image through a gamma curve (gamma 0.35-0.6 or 1.8-3.0); multi.
* ``remap-nonmonotone``: the moving image through a random non-monotonic piecewise-linear remap of
  its intensities (7 knots; tissue classes change order); multi.
* ``speckle``: the moving image times correlated multiplicative gamma speckle (shape 1-2.5, mean 1); mono.
* ``shadow``: 2-4 acoustic shadows on the moving image: cones or stripes behind a depth, cast from
  a virtual probe outside one face, darkened to 10-35 %; mono.
* ``bias``: the moving image times a smooth quadratic bias field exp(b), max |b| = log(1.4-2.0); mono.
* ``us-fan``: an ultrasound-like image (random non-monotonic remap, gamma speckle, depth
  attenuation) inside a 3D fan (elliptic cone from an apex outside one face) with 50-70 % of its
  volume zero outside the fan; on the fixed side for even pair indices, the moving side for odd
  ones; the fan is written as that side's mask (column fixed_mask or moving_mask); the other image
  is the T1; multi.
* ``aniso``: the fixed image on an anisotropic grid (0.5 x 0.5 x 2 mm for even pair indices,
  1 x 1 x 3 mm for odd ones; the slice profile a Gaussian of the slice thickness as FWHM), the moving
  image isotropic; mono.
* ``overlap``: the moving image cropped on one side so it covers 50-70 % of the fixed field of view
  (the image centres then differ by 15-28 mm: every method starts from the centres aligned); mono.
* ``real``: the MNI152 T1 itself (unchanged) as moving, against a T2-like contrast computed from the
  GM/WM probability maps and the T1 (CSF bright, GM > WM, scalp dim; random tissue values,
  0.7 mm blur, 3 % noise) as fixed; multi. Real anatomy and a real image on one side, without an
  intensity function linking the two. (The other real MR volumes inside PyPI wheels, e.g. nibabel's
  test data, are 33 x 41 x 25 voxels or smaller: too small for this suite.)

Where a field of view is partial (us-fan, overlap), labels count only where both images see the
anatomy (the fixed labels where the true ``T(x)`` lies inside the moving view, the moving labels
inside the moving view and, for a fixed fan, whose preimage lies in the fixed fan), so a perfect
transform scores Dice 1; landmarks lie inside both views.

Per pair, ``truth.json`` (column ``truth``) declares what was drawn: seed, field kind, length
scales, largest and median displacement, smallest Jacobian determinant, spacing, mask empty fraction,
overlap fraction and the family's own parameters.

Seeds: 10000 + 100 x (family's index in FAMILIES) + (0 for dev, 50 for test) + pair index.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

try:  # run as a script (Testing/Performance on sys.path) or imported from a test
    from make_benchmark_pairs import FIELDS, _write_points, brain_labels, write_pairs_csv
except ImportError:  # pragma: no cover
    import importlib.util

    _spec = importlib.util.spec_from_file_location("make_benchmark_pairs",
                                                   Path(__file__).with_name("make_benchmark_pairs.py"))
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    FIELDS, _write_points, brain_labels, write_pairs_csv = (_module.FIELDS, _module._write_points,
                                                            _module.brain_labels, _module.write_pairs_csv)

from DeepRegisterLib.spatial import Grid

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
MAX_MM = 10.0  # largest displacement magnitude of any field
LANDMARK_MEDIAN_MM = (2.0, 8.0)  # median landmark displacement every pair must have
MIN_JACOBIAN = 0.2
EMPTY_FRACTION = (0.5, 0.7)  # us-fan: share of the fan side's volume outside the fan
OVERLAP_FRACTION = (0.5, 0.7)  # overlap: share of the fixed view the moving image covers
ANISO_SPACINGS = ((0.5, 0.5, 2.0), (1.0, 1.0, 3.0))  # times the base spacing (1 mm)
GEN_FIELDS = FIELDS + ["family", "split", "fixed_mask", "moving_mask", "truth"]
SPLITS = ("dev", "test")


@dataclass(frozen=True)
class Family:
    """A pair family: its elastix modality, displacement-field construction and ranges."""

    name: str
    modality: str  # "mono" or "multi"
    field: str  # "rbf" (Gaussian radial basis sum) or "bspline" (random cubic B-spline grid)
    length_scale_mm: tuple[float, float]  # RBF widths (sigma) or B-spline control spacings
    median_mm: tuple[float, float]  # median displacement magnitude inside the brain, drawn per pair
    index: int  # fixes the seeds


_FAMILY_LIST = [
    Family("scale-small", "mono", "rbf", (8.0, 16.0), (2.3, 4.0), 0),
    Family("scale-large", "mono", "bspline", (24.0, 40.0), (3.0, 6.0), 1),
    Family("remap-monotone", "multi", "rbf", (12.0, 30.0), (2.5, 5.0), 2),
    Family("remap-nonmonotone", "multi", "rbf", (12.0, 30.0), (2.5, 5.0), 3),
    Family("speckle", "mono", "rbf", (12.0, 30.0), (2.5, 5.0), 4),
    Family("shadow", "mono", "rbf", (12.0, 30.0), (2.5, 5.0), 5),
    Family("bias", "mono", "rbf", (12.0, 30.0), (2.5, 5.0), 6),
    Family("us-fan", "multi", "bspline", (16.0, 36.0), (2.5, 5.0), 7),
    Family("aniso", "mono", "bspline", (16.0, 36.0), (2.5, 5.0), 8),
    Family("overlap", "mono", "rbf", (12.0, 30.0), (2.5, 5.0), 9),
    Family("real", "multi", "bspline", (16.0, 36.0), (2.5, 5.0), 10),
]
FAMILIES = {family.name: family for family in _FAMILY_LIST}


def seed_of(family: Family, split: str, index: int) -> int:
    """The fixed seed of pair ``index`` of ``split`` in ``family``."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: use dev or test")
    return 10_000 + 100 * family.index + (0 if split == "dev" else 50) + index


@dataclass
class Volumes:
    """Source anatomy: T1 intensities and GM/WM probabilities, all in [0, 1], on one grid."""

    t1: sitk.Image
    gm: sitk.Image
    wm: sitk.Image

    @classmethod
    def mni152(cls) -> "Volumes":
        from deepregister_training.public_volumes import fetch

        t1, gm, wm = (sitk.ReadImage(str(path), sitk.sitkFloat32) / 255.0 for path in fetch())
        return cls(t1, gm, wm)

    @property
    def labels(self) -> sitk.Image:
        """1 = grey matter, 2 = white matter (probability > 0.5)."""
        if getattr(self, "_labels", None) is None:
            self._labels = brain_labels(self.gm, self.wm)
        return self._labels


@dataclass
class GeneratedPair:
    """One pair in memory: images on the [0, 255] scale, uint8 labels and masks, LPS points."""

    family: str
    split: str
    seed: int
    modality: str
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    fixed_points: np.ndarray
    moving_points: np.ndarray
    transform: sitk.Transform
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None
    truth: dict = dataclass_field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.family}-{self.split}-{self.seed}"


# -- geometry helpers ---------------------------------------------------------------------------
def _axes(grid: Grid) -> list[np.ndarray]:
    """Physical coordinates of the voxel centres along x, y and z (grids here are axis-aligned)."""
    if not np.allclose(grid.direction, IDENTITY):
        raise ValueError("the generator's grids are axis-aligned")
    return [grid.origin[a] + grid.spacing[a] * np.arange(grid.size[a]) for a in range(3)]


def _points(grid: Grid) -> np.ndarray:
    """Physical points (Z, Y, X, 3) of an axis-aligned grid, last axis (x, y, z)."""
    x, y, z = _axes(grid)
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    return np.stack((xx, yy, zz), axis=-1)


def _bounds(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    axes = _axes(grid)
    return np.array([a[0] for a in axes]), np.array([a[-1] for a in axes])


def _image(array: np.ndarray, grid: Grid, pixel: int = sitk.sitkFloat32) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    return grid.place(sitk.Cast(image, pixel))


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _resample(image: sitk.Image, grid: Grid, transform: sitk.Transform | None = None, labels: bool = False) -> sitk.Image:
    return sitk.Resample(image, grid.reference_image(), transform or sitk.Transform(),
                         sitk.sitkNearestNeighbor if labels else sitk.sitkLinear, 0.0,
                         sitk.sitkUInt8 if labels else sitk.sitkFloat32)


# -- displacement fields ------------------------------------------------------------------------
def rbf_field(grid: Grid, rng: np.random.Generator, widths_mm: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """Sum of Gaussian radial-basis displacements, unscaled: (3, Z, Y, X) along physical x, y, z.

    Centres uniform over the grid's extent grown by the largest width, one width per basis
    function uniform in ``widths_mm``, amplitudes standard normal 3D vectors; about one basis
    function per (1.5 x mean width)^3. Evaluated exactly and separably (a Gaussian is a product of
    three 1D Gaussians)."""
    low, high = _bounds(grid)
    low, high = low - widths_mm[1], high + widths_mm[1]
    count = int(np.clip(np.prod(high - low) / (1.5 * np.mean(widths_mm)) ** 3, 16, 2000))
    centres = rng.uniform(low, high, (count, 3))
    sigmas = rng.uniform(*widths_mm, count)
    amplitudes = rng.normal(size=(count, 3))
    gx, gy, gz = (np.exp(-(axis[None, :] - centres[:, a, None]) ** 2 / (2 * sigmas[:, None] ** 2)).astype(np.float32)
                  for a, axis in enumerate(_axes(grid)))
    partial = amplitudes.astype(np.float32)[:, :, None, None] * gz[:, None, :, None] * gy[:, None, None, :]
    field = np.tensordot(partial, gx, axes=([0], [0]))  # (3, Z, Y, X): one matrix product
    return field, {"field": "rbf", "basis_functions": count,
                   "length_scale_mm": [float(sigmas.min()), float(sigmas.max())]}


def _cubic_bspline(t: np.ndarray) -> np.ndarray:
    t = np.abs(t)
    return np.where(t < 1, 2 / 3 - t ** 2 + t ** 3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))


def bspline_field(grid: Grid, rng: np.random.Generator, spacing_mm: tuple[float, float]) -> tuple[np.ndarray, dict]:
    """Random cubic B-spline displacement, unscaled: (3, Z, Y, X). Control spacing per axis uniform
    in ``spacing_mm``, a random phase of the control grid, standard normal coefficients at every
    control point (covering the grid with two control points to spare on each side)."""
    spacing = rng.uniform(*spacing_mm, 3)
    phase = rng.uniform(0, 1, 3) * spacing
    low, high = _bounds(grid)
    bases = []
    for a, axis in enumerate(_axes(grid)):
        knots = np.arange(low[a] - 2 * spacing[a] - phase[a], high[a] + 2 * spacing[a] + 1e-6, spacing[a])
        bases.append(_cubic_bspline((axis[None, :] - knots[:, None]) / spacing[a]))
    bx, by, bz = bases
    coefficients = rng.normal(size=(3, len(bz), len(by), len(bx)))
    field = np.einsum("cijk,iz,jy,kx->czyx", coefficients, bz, by, bx, optimize=True)
    return field, {"field": "bspline", "length_scale_mm": [float(s) for s in spacing]}


def min_jacobian(field: np.ndarray, grid: Grid) -> float:
    """Smallest Jacobian determinant of x -> x + u(x) (central differences) over the grid."""
    sx, sy, sz = grid.spacing
    # gradients[c][a]: d u_c / d x_a, a over (x, y, z); np.gradient returns along (z, y, x)
    gradients = [[g for g in reversed(np.gradient(field[c], sz, sy, sx))] for c in range(3)]
    j = [[gradients[c][a] + (1.0 if a == c else 0.0) for a in range(3)] for c in range(3)]
    det = (j[0][0] * (j[1][1] * j[2][2] - j[1][2] * j[2][1]) - j[0][1] * (j[1][0] * j[2][2] - j[1][2] * j[2][0])
           + j[0][2] * (j[1][0] * j[2][1] - j[1][1] * j[2][0]))
    return float(det.min())


def field_transform(field: np.ndarray, grid: Grid) -> sitk.DisplacementFieldTransform:
    """A (3, Z, Y, X) displacement in mm on ``grid`` as a SimpleITK transform (fixed -> moving)."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(field, 0, -1), dtype=np.float64), isVector=True)
    return sitk.DisplacementFieldTransform(grid.place(image))


def smooth_field(grid: Grid, family: Family, rng: np.random.Generator, brain: np.ndarray) -> tuple[np.ndarray, dict]:
    """A field of ``family``'s kind on ``grid`` scaled to a median magnitude (inside ``brain``, a
    boolean array on ``grid``) drawn from the family's range, or less where that would take its
    largest magnitude past MAX_MM; redrawn while that leaves the median below the range or the
    field folds (Jacobian <= MIN_JACOBIAN)."""
    build = rbf_field if family.field == "rbf" else bspline_field
    for _ in range(200):
        raw, info = build(grid, rng, family.length_scale_mm)
        magnitude = np.linalg.norm(raw, axis=0)
        median, largest = float(np.median(magnitude[brain])), float(magnitude.max())
        # the drawn median, unless that would take the largest magnitude past MAX_MM
        scale = min(rng.uniform(*family.median_mm) / median, MAX_MM / largest)
        if median * scale < family.median_mm[0]:
            continue
        field = raw * scale
        jacobian = min_jacobian(field, grid)
        if jacobian <= MIN_JACOBIAN:
            continue
        return field.astype(np.float32), {**info, "median_brain_mm": median * scale, "max_mm": largest * scale,
                                          "min_jacobian": jacobian}
    raise RuntimeError(f"{family.name}: no field within the ranges after 200 draws")


# -- intensity models (arrays in about [0, 1]) --------------------------------------------------
def gamma_remap(array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    gamma = float(np.exp(rng.uniform(np.log(0.35), np.log(0.6)))) if rng.random() < 0.5 else \
        float(np.exp(rng.uniform(np.log(1.8), np.log(3.0))))
    return np.clip(array, 0, None) ** gamma, {"gamma": gamma}


def piecewise_remap(array: np.ndarray, rng: np.random.Generator, knots: int = 7) -> tuple[np.ndarray, dict]:
    """A random non-monotonic piecewise-linear remap of [0, 1] (at least two changes of direction,
    the background kept dark)."""
    xs = np.linspace(0, 1, knots)
    while True:
        ys = np.concatenate([[rng.uniform(0.0, 0.15)], rng.uniform(0.1, 1.0, knots - 1)])
        steps = np.sign(np.diff(ys[1:]))
        if np.count_nonzero(np.diff(steps)) >= 2 and np.ptp(ys[1:]) > 0.5:
            break
    return np.interp(np.clip(array, 0, 1), xs, ys), {"remap_knots": [float(y) for y in ys]}


def _smooth(array: np.ndarray, grid: Grid, sigma_mm: float) -> np.ndarray:
    return _array(sitk.SmoothingRecursiveGaussian(_image(array.astype(np.float32), grid), sigma_mm))


def gamma_speckle(shape: tuple[int, ...], grid: Grid, rng: np.random.Generator, shape_range=(1.0, 2.5)) -> tuple[np.ndarray, dict]:
    """Multiplicative speckle: gamma-distributed (shape k, mean 1), correlated by a 0.7 mm blur,
    renormalised to mean 1."""
    k = float(rng.uniform(*shape_range))
    speckle = rng.gamma(k, 1.0 / k, shape).astype(np.float32)
    speckle = _smooth(speckle, grid, 0.7 * min(grid.spacing) if min(grid.spacing) < 1.5 else 0.7)
    return speckle / speckle.mean(), {"speckle_shape": k}


def _probe_apex(grid: Grid, rng: np.random.Generator, standoff_mm: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """A virtual probe outside a random face of the grid, aimed at the grid centre (tilted up to
    10 degrees): apex point and unit axis."""
    low, high = _bounds(grid)
    centre = (low + high) / 2
    axis = rng.integers(0, 3)
    sign = rng.choice([-1.0, 1.0])
    apex = centre.copy()
    apex[axis] = (high[axis] if sign > 0 else low[axis]) + sign * rng.uniform(*standoff_mm)
    apex += np.where(np.arange(3) == axis, 0.0, rng.uniform(-10, 10, 3))
    direction = centre - apex
    direction /= np.linalg.norm(direction)
    tilt = rng.normal(0, 1, 3)
    tilt -= tilt.dot(direction) * direction
    direction = direction + np.tan(np.radians(rng.uniform(0, 10))) * tilt / np.linalg.norm(tilt)
    return apex, direction / np.linalg.norm(direction)


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0, 1)
    return t * t * (3 - 2 * t)


def fan_mask(grid: Grid, rng: np.random.Generator, empty_fraction: float) -> tuple[np.ndarray, dict]:
    """A 3D ultrasound fan (an elliptic cone from an apex outside one face, aimed at the centre)
    whose outside is ``empty_fraction`` of the grid's voxels (to the nearest voxel; the opening
    angle is found by bisection). Returns a boolean (Z, Y, X) array and its geometry."""
    apex, axis = _probe_apex(grid, rng, (5.0, 15.0))
    helper = np.eye(3)[np.argmin(np.abs(axis))]
    e1 = np.cross(axis, helper)
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    ratio = float(rng.uniform(0.6, 1.0))
    v = _points(grid) - apex
    along = v @ axis
    a1 = np.arctan2(v @ e1, along)
    a2 = np.arctan2(v @ e2, along)
    inside_at = lambda half_angle: (along > 0) & ((a1 / half_angle) ** 2 + (a2 / (ratio * half_angle)) ** 2 <= 1)  # noqa: E731
    low, high = np.radians(1.0), np.radians(89.0)
    for _ in range(40):
        middle = (low + high) / 2
        if 1 - inside_at(middle).mean() > empty_fraction:
            low = middle
        else:
            high = middle
    mask = inside_at(high)
    return mask, {"fan_apex_mm": apex.tolist(), "fan_axis": axis.tolist(), "fan_half_angles_deg":
                  [float(np.degrees(high)), float(np.degrees(high * ratio))],
                  "empty_fraction": float(1 - mask.mean())}


def shadows(grid: Grid, rng: np.random.Generator, brain: np.ndarray) -> tuple[np.ndarray, dict]:
    """Multiplicative acoustic shadows: 2-4 cones (half-angle 3-8 degrees) or stripes (slabs 6-12 mm
    thick) cast from a virtual probe outside one face, beyond a depth near a random brain point,
    darkened to 10-35 %, with soft edges. Returns the factor (Z, Y, X) and the parameters."""
    apex, _ = _probe_apex(grid, rng, (10.0, 30.0))
    v = _points(grid) - apex
    distance = np.linalg.norm(v, axis=-1) + 1e-9
    factor = np.ones(grid.shape, dtype=np.float64)
    brain_points = _points(grid)[brain]
    described = []
    for _ in range(int(rng.integers(2, 5))):
        target = brain_points[rng.integers(len(brain_points))]
        direction = (target - apex) / np.linalg.norm(target - apex)
        depth = float(np.linalg.norm(target - apex) - rng.uniform(5, 20))
        along = v @ direction
        remaining = float(rng.uniform(0.1, 0.35))
        if rng.random() < 0.5:
            half_angle = float(rng.uniform(3, 8))
            angle = np.degrees(np.arccos(np.clip(along / distance, -1, 1)))
            across = _smoothstep((half_angle - angle) / 1.5 + 0.5)
            described.append({"shape": "cone", "half_angle_deg": half_angle})
        else:
            normal = np.cross(direction, rng.normal(size=3))
            normal /= np.linalg.norm(normal)
            half_thickness = float(rng.uniform(3, 6))
            across = _smoothstep((half_thickness - np.abs(v @ normal)) / 2.0 + 0.5)
            described.append({"shape": "stripe", "thickness_mm": 2 * half_thickness})
        described[-1].update(depth_mm=depth, remaining=remaining)
        factor *= 1 - (1 - remaining) * across * _smoothstep((along - depth) / 3.0 + 0.5)
    return factor, {"shadows": described, "darkened_brain_fraction": float((factor[brain] < 0.9).mean())}


def bias_field(grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A smooth multiplicative bias exp(b): b a random quadratic polynomial of the normalised
    coordinates, zero mean, scaled so max |b| = log(r), r uniform in 1.4-2.0."""
    low, high = _bounds(grid)
    u = (_points(grid) - (low + high) / 2) / ((high - low) / 2)
    x, y, z = u[..., 0], u[..., 1], u[..., 2]
    terms = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z])
    b = np.tensordot(rng.normal(size=len(terms)), terms, axes=1)
    b -= b.mean()
    ratio = float(rng.uniform(1.4, 2.0))
    b *= np.log(ratio) / np.abs(b).max()
    factor = np.exp(b)
    return factor, {"bias_max_ratio": ratio, "bias_range": [float(factor.min()), float(factor.max())]}


def ultrasound_image(array: np.ndarray, grid: Grid, fan: np.ndarray, apex: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Ultrasound-like appearance inside ``fan``: a random non-monotonic remap (5 knots), gamma
    speckle (shape 1-2), depth attenuation to 35-70 % at the far side; zero outside the fan."""
    remapped, remap = piecewise_remap(array, rng, knots=5)
    speckle, speckle_info = gamma_speckle(array.shape, grid, rng, (1.0, 2.0))
    depth = np.linalg.norm(_points(grid) - apex, axis=-1)
    far = float(rng.uniform(0.35, 0.7))
    near, deepest = depth[fan].min(), depth[fan].max()
    attenuation = far ** ((depth - near) / max(deepest - near, 1e-6))
    return (remapped * speckle * attenuation * fan).astype(np.float32), {**remap, **speckle_info, "far_attenuation": far}


def t2_like(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, grid: Grid, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """A T2-like contrast from tissue probabilities and the T1: CSF (dark in T1, not GM or WM)
    bright, GM above WM, scalp and fat dim; random tissue values; 0.7 mm blur."""
    values = {"wm": float(rng.uniform(0.2, 0.35)), "gm": float(rng.uniform(0.45, 0.6)),
              "csf": float(rng.uniform(0.8, 1.0)), "other": float(rng.uniform(0.25, 0.45))}
    head = _smooth((t1 > 0.08).astype(np.float32), grid, 2.0) > 0.5
    rest = np.clip(1 - gm - wm, 0, 1)
    brightness = np.clip(t1 / 0.8, 0, 1)
    image = head * (values["gm"] * gm + values["wm"] * wm
                    + rest * (values["csf"] * (1 - brightness) + values["other"] * brightness))
    return _smooth(image.astype(np.float32), grid, 0.7), {"t2_like_values": values}


# -- pairs --------------------------------------------------------------------------------------
def _noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float = 0.02) -> np.ndarray:
    return rng.normal(0, sigma, shape).astype(np.float32)


def _inside(points: np.ndarray, grid: Grid, mask: np.ndarray | None, margin: float = 2.0) -> np.ndarray:
    """Which physical points (N, 3) lie at least ``margin`` voxels inside ``grid`` (and in ``mask``)."""
    index = grid.physical_to_index(points)
    inside = np.all((index >= margin) & (index <= np.asarray(grid.size) - 1 - margin), axis=1)
    if mask is not None:
        nearest = np.clip(np.round(index).astype(int), 0, np.asarray(grid.size) - 1)
        inside &= mask[nearest[:, 2], nearest[:, 1], nearest[:, 0]]
    return inside


def make_pair(volumes: Volumes, family: str | Family, split: str, index: int, size: int = 112,
              spacing: float = 1.0, landmarks: int = 20) -> GeneratedPair:
    """Pair ``index`` of ``split`` in ``family`` on a ``size``^3 grid of ``spacing`` mm around the
    centre of ``volumes`` (deterministic: the seed is :func:`seed_of`)."""
    family = FAMILIES[family] if isinstance(family, str) else family
    seed = seed_of(family, split, index)
    rng = np.random.default_rng(seed)
    centre = Grid.from_image(volumes.t1).center
    base = Grid.centered(centre, (size,) * 3, (spacing,) * 3, IDENTITY)
    truth: dict = {"family": family.name, "split": split, "seed": seed, "modality": family.modality}

    fixed_grid = moving_grid = base
    if family.name == "aniso":
        relative = ANISO_SPACINGS[index % len(ANISO_SPACINGS)]
        fixed_spacing = tuple(spacing * s for s in relative)
        extent = size * spacing
        fixed_grid = Grid.centered(centre, tuple(int(round(extent / s)) for s in fixed_spacing), fixed_spacing, IDENTITY)
    labels_full = volumes.labels
    brain_fixed = _array(_resample(labels_full, fixed_grid, labels=True)) > 0
    field, info = smooth_field(fixed_grid, family, rng, brain_fixed)
    truth.update(info)
    transform = field_transform(field, fixed_grid)

    if family.name == "overlap":
        # crop the moving grid on one side so it covers the target share of the fixed view
        target = float(rng.uniform(0.52, 0.68))
        axis, keep_high = int(rng.integers(0, 3)), bool(rng.random() < 0.5)
        mapped = (_points(fixed_grid).reshape(-1, 3)
                  + np.moveaxis(field, 0, -1).reshape(-1, 3))
        best = None
        for kept in range(int(0.4 * size), int(0.8 * size) + 1):
            offset = (size - kept) if keep_high else 0
            origin = np.asarray(base.origin, dtype=float)
            origin[axis] += offset * spacing
            grid = Grid(tuple(kept if a == axis else size for a in range(3)), base.spacing, tuple(origin), IDENTITY)
            covered = float(_inside(mapped, grid, None, margin=0.0).mean())
            if best is None or abs(covered - target) < abs(best[1] - target):
                best = (grid, covered)
        moving_grid, covered = best
        truth.update(overlap_fraction=covered, overlap_target=target, cropped_axis="xyz"[axis],
                     kept_side="high" if keep_high else "low", moving_size=list(moving_grid.size))

    t1_source = volumes.t1
    if family.name == "aniso":  # slice profile: a Gaussian whose FWHM is the slice thickness
        thick = fixed_grid.spacing[2]
        t1_source = sitk.RecursiveGaussian(volumes.t1, thick / 2.355, direction=2)
        truth["fixed_spacing"] = list(fixed_grid.spacing)
    moving_array = _array(_resample(volumes.t1, moving_grid))
    fixed_array = _array(_resample(t1_source, fixed_grid, transform))
    fixed_array = fixed_array + _noise(fixed_array.shape, rng)
    moving_array = moving_array + _noise(moving_array.shape, rng)
    fixed_fov = np.ones(fixed_grid.shape, bool)
    moving_fov = np.ones(moving_grid.shape, bool)
    fixed_mask = moving_mask = None

    name = family.name
    if name == "remap-monotone":
        moving_array, extra = gamma_remap(moving_array, rng)
    elif name == "remap-nonmonotone":
        moving_array, extra = piecewise_remap(moving_array, rng)
    elif name == "speckle":
        speckle, extra = gamma_speckle(moving_array.shape, moving_grid, rng)
        moving_array = np.clip(moving_array, 0, None) * speckle
    elif name == "shadow":
        brain_moving = _array(_resample(labels_full, moving_grid, labels=True)) > 0
        factor, extra = shadows(moving_grid, rng, brain_moving)
        moving_array = moving_array * factor
    elif name == "bias":
        factor, extra = bias_field(moving_grid, rng)
        moving_array = moving_array * factor
    elif name == "us-fan":
        side = "fixed" if index % 2 == 0 else "moving"
        grid = fixed_grid if side == "fixed" else moving_grid
        fan, extra = fan_mask(grid, rng, float(rng.uniform(EMPTY_FRACTION[0] + 0.01, EMPTY_FRACTION[1] - 0.01)))
        extra["fan_side"] = side
        source = fixed_array if side == "fixed" else moving_array
        image, us = ultrasound_image(source, grid, fan, np.asarray(extra["fan_apex_mm"]), rng)
        extra.update(us)
        if side == "fixed":
            fixed_array, fixed_fov, fixed_mask = image, fan, _image(fan.astype(np.uint8), fixed_grid, sitk.sitkUInt8)
        else:
            moving_array, moving_fov, moving_mask = image, fan, _image(fan.astype(np.uint8), moving_grid, sitk.sitkUInt8)
    elif name == "real":
        moving_array = _array(_resample(volumes.t1, moving_grid))  # the real image, unchanged
        fixed_t1, fixed_gm, fixed_wm = (_array(_resample(v, fixed_grid, transform))
                                        for v in (volumes.t1, volumes.gm, volumes.wm))
        fixed_array, extra = t2_like(fixed_t1, fixed_gm, fixed_wm, fixed_grid, rng)
        fixed_array = fixed_array + _noise(fixed_array.shape, rng, 0.03)
    else:
        extra = {}
    truth.update(extra)

    # labels where both images see the anatomy (see the module docstring)
    moving_fov_image = _image(moving_fov.astype(np.uint8), moving_grid, sitk.sitkUInt8)
    seen = _array(_resample(moving_fov_image, fixed_grid, transform, labels=True)).astype(bool) & fixed_fov
    fixed_labels = _array(_resample(labels_full, fixed_grid, transform, labels=True)) * seen
    moving_labels = _array(_resample(labels_full, moving_grid, labels=True)) * moving_fov
    if not fixed_fov.all():
        inverse_field = sitk.InvertDisplacementField(transform.GetDisplacementField(), maximumNumberOfIterations=30,
                                                     maxErrorToleranceThreshold=0.01, meanErrorToleranceThreshold=0.001,
                                                     enforceBoundaryCondition=False)
        inverse = sitk.DisplacementFieldTransform(inverse_field)
        fixed_fov_image = _image(fixed_fov.astype(np.uint8), fixed_grid, sitk.sitkUInt8)
        moving_labels = moving_labels * _array(_resample(fixed_fov_image, moving_grid, inverse, labels=True))

    # landmarks: fixed brain voxels seen by both images, 2 voxels from every border
    candidates = np.argwhere(fixed_labels > 0)
    points = _points(fixed_grid)
    for _ in range(100):
        chosen = candidates[rng.permutation(len(candidates))[: 20 * landmarks]]
        fixed_points = points[tuple(chosen.T)]
        moving_points = np.asarray([transform.TransformPoint(tuple(p)) for p in fixed_points])
        ok = _inside(fixed_points, fixed_grid, fixed_fov) & _inside(moving_points, moving_grid, moving_fov)
        fixed_points, moving_points = fixed_points[ok][:landmarks], moving_points[ok][:landmarks]
        distances = np.linalg.norm(moving_points - fixed_points, axis=1)
        if len(fixed_points) == landmarks and LANDMARK_MEDIAN_MM[0] <= np.median(distances) <= LANDMARK_MEDIAN_MM[1]:
            break
    else:
        raise RuntimeError(f"{family.name} seed {seed}: no landmarks with a median displacement in "
                           f"{LANDMARK_MEDIAN_MM} mm")
    truth.update(median_landmark_mm=float(np.median(distances)), max_landmark_mm=float(distances.max()),
                 fixed_spacing=list(fixed_grid.spacing), moving_spacing=list(moving_grid.spacing),
                 fixed_size=list(fixed_grid.size), moving_size=list(moving_grid.size))
    if fixed_mask is not None or moving_mask is not None:
        truth["mask_side"] = "fixed" if fixed_mask is not None else "moving"

    return GeneratedPair(
        family.name, split, seed, family.modality,
        _image(np.clip(fixed_array, 0, None) * 255.0, fixed_grid), _image(np.clip(moving_array, 0, None) * 255.0, moving_grid),
        _image(fixed_labels.astype(np.uint8), fixed_grid, sitk.sitkUInt8),
        _image(moving_labels.astype(np.uint8), moving_grid, sitk.sitkUInt8),
        fixed_points, moving_points, transform, fixed_mask, moving_mask, truth)


def write_pair(pair: GeneratedPair, out: Path) -> dict:
    """Write a pair's files under ``out/<family>/<split>-<seed>/``; returns its pairs.csv row."""
    relative = Path(pair.family) / f"{pair.split}-{pair.seed}"
    folder = out / relative
    folder.mkdir(parents=True, exist_ok=True)
    row = {"name": pair.name, "kind": pair.family, "modality": pair.modality, "family": pair.family,
           "split": pair.split, "fixed_mask": "", "moving_mask": ""}
    files = {"fixed": pair.fixed, "moving": pair.moving, "fixed_labels": pair.fixed_labels,
             "moving_labels": pair.moving_labels, "fixed_mask": pair.fixed_mask, "moving_mask": pair.moving_mask}
    for key, image in files.items():
        if image is not None:
            sitk.WriteImage(image, str(folder / f"{key}.nii.gz"), useCompression=True)
            row[key] = (relative / f"{key}.nii.gz").as_posix()
    for side, points in (("fixed", pair.fixed_points), ("moving", pair.moving_points)):
        _write_points(folder / f"{side}_landmarks.fcsv", points)
        row[f"{side}_landmarks"] = (relative / f"{side}_landmarks.fcsv").as_posix()
    (folder / "truth.json").write_text(json.dumps(pair.truth, indent=1) + "\n", encoding="utf-8")
    row["truth"] = (relative / "truth.json").as_posix()
    return row


def generate(volumes: Volumes, out: Path, families: list[str], dev: int = 2, test: int = 2, size: int = 112,
             spacing: float = 1.0, log=print) -> Path:
    """Every requested family's dev and test pairs written under ``out``; returns pairs.csv."""
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    rows = []
    for name in families:
        for split, count in (("dev", dev), ("test", test)):
            for index in range(count):
                pair = make_pair(volumes, name, split, index, size, spacing)
                rows.append(write_pair(pair, out))
                log(f"{pair.name:<28} median landmark displacement {pair.truth['median_landmark_mm']:.2f} mm, "
                    f"max field {pair.truth['max_mm']:.2f} mm")
    return write_pairs_csv(rows, out, GEN_FIELDS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark-pairs-generalisation"))
    parser.add_argument("--dev", type=int, default=2, help="dev pairs per family (default 2)")
    parser.add_argument("--test", type=int, default=2, help="test pairs per family (default 2)")
    parser.add_argument("--families", default=",".join(FAMILIES),
                        help=f"comma-separated subset of: {', '.join(FAMILIES)} (default: all)")
    parser.add_argument("--size", type=int, default=112, help="voxels per side of the 1 mm grid (default 112)")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    print(generate(Volumes.mni152(), args.out, families, args.dev, args.test, args.size))


if __name__ == "__main__":
    main()
