"""One-shot registration of two SimpleITK volumes: preprocessing -> network -> fine-tuning -> outputs.

Data flows one way. Both images are resampled, in physical space, onto the model's input
grid (centred on the fixed image, with its direction); the moving image is first shifted so
the two image centres coincide. The network predicts a displacement on that grid; optional
fine-tuning refines it on this pair; the result is expressed at the fixed image's full
resolution as a fixed->moving ITK displacement-field transform (LPS mm).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import guard, spatial
from .imageio import InputError, check_volume
from .losses import BendingEnergy, lncc_loss, mind_loss, mind_ssc, mutual_information_loss, soft_dice
from .masks import foreground_center, resolve_masks
from .models import ModelCard, load_model
from .options import INITIAL_POSITIONS, SIMILARITIES
from .saliency import FixedSaliency, gaussian_smooth
from .spatial import Grid

#: ``progress(stage, fraction)``; returning ``False`` cancels the registration.
ProgressCallback = Callable[[str, float], "bool | None"]

DEFAULT_ITERATIONS_WITHOUT_MODEL = 150
FINETUNE_GRID_VOXELS = 128  # longest side of the fine-tuning grid (fitted to the fixed image)
SALIENCY_GRID_VOXELS = 64  # longest side of the grid the joint saliency map is computed on
FINEST_SIGMA_MM = 0.5  # Gaussian smoothing of the finest fine-tuning level (ultrasound-like brain pairs: 0.50 -> 0.38 mm)
BENDING_WEIGHT = 5.0
MATRIX_LR, TRANSLATION_LR = 5e-4, 0.1  # Adam steps: unitless, mm (the local field's: the card's finetune_step_mm)
CONTROL_DIVISIONS = (4, 8)  # velocity control-point spacings = the grid's longest extent / these
VELOCITY_SQUARINGS = 2  # fewest scaling and squaring steps of the fine-tuning velocity
MAX_STEP_VOXELS = 0.25  # more squarings until the scaled velocity is below this many velocity-grid voxels
FINAL_STEP_SCALE = 0.2  # Adam's step sizes fall linearly to this fraction over each level
COARSE_FRACTION = 0.25  # fine-tuning steps on the half-resolution level (dev ultrasound-like pairs: 0.5 -> 0.31 mm, 0.25: 0.29)
MIN_ORGAN_ML = 1.0  # smallest organ map (mL above probability 0.5) that fine-tuning follows
COARSE_SAMPLE_FRACTION = 0.5  # of the MI samples on that level (generic at 128^3: stride 3 instead of 2, 13 % less fine-tuning time, the same TRE on 12 dev pairs x 2 seeds)
INSIDE_TOLERANCE = 0.01  # share of a mask's outside that smoothing or interpolation may mix into a compared voxel
OVERLAP_SAMPLES = 4096  # fixed foreground voxels the overlap checks count
MIN_OVERLAP = 0.05  # the fixed foreground share that must lie in the moving one at the start
MIN_PHYSICAL_OVERLAP = 0.5  # "auto" start: the fixed foreground share that must map into the moving image
MIND_WEIGHT = 10.0  # MIND-SSC SSD (about 0.01-0.1 per voxel) scaled to the range of mutual information
CENTERS_MARGIN = 0.02  # "auto" start: relative MIND gain another start needs over the foreground centres


class RegistrationCancelled(RuntimeError):
    """The progress callback asked to stop."""


@dataclass
class RegistrationResult:
    """Outputs of :func:`register`, all on the fixed image's grid."""

    transform: sitk.DisplacementFieldTransform  # fixed -> moving, LPS mm
    warped: sitk.Image
    saliency: sitk.Image  # joint saliency in [0, 1]
    timings: dict[str, float]
    folding_percent: float
    model: str
    device: str
    iterations: int
    similarity: str  # "mi", "mind" or "lncc": what fine-tuning compared
    initial: str  # "centers" or "physical": the start position used
    initial_transform: sitk.TranslationTransform  # fixed -> moving start position, LPS mm
    fixed_mask: sitk.Image | None  # UInt8 masks used (given or detected), on their images' grids
    moving_mask: sitk.Image | None
    stages: list[dict]  # each stage's scores and whether the guard accepted it
    kept_stage: str
    min_jacobian: float
    messages: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # the guard's: the result is not a plain success

    @property
    def succeeded(self) -> bool:
        """Every stage was accepted and nothing needs the user's attention."""
        return not self.warnings

    def displacement_field(self) -> sitk.Image:
        """A copy of the displacement field (vector image, mm, LPS) on the fixed grid."""
        return sitk.Image(self.transform.GetDisplacementField())


def resolve_device(device: str) -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cuda" without a GPU is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("A GPU (cuda) was requested but PyTorch sees none; use device 'cpu' or 'auto'.")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise InputError(f"Unknown device '{device}': use 'auto', 'cpu' or 'cuda'.")
    return torch.device(device)


def instance_card() -> ModelCard:
    """The settings used when no trained model is given (fine-tuning from the identity)."""
    return ModelCard(name="none", description="No network: fine-tuning on the pair from the identity.",
                     architecture="", config={}, input_size=[FINETUNE_GRID_VOXELS] * 3, spacing_mm=[0.0] * 3,
                     finetune_step_mm=0.3, finetune_samples=16384)  # 150 steps from the identity (generic: 100 of 65536)


def _steps_covering(length: float, step: float) -> int:
    """How many ``step``s cover ``length`` (mm), ignoring float rounding: an image whose spacing
    differs in the 16th digit (as after a round trip through Slicer) gets the same grids."""
    return int(math.ceil(length / step - 1e-6))


def finetune_grid(fixed: sitk.Image) -> Grid:
    """The grid of fine-tuning and of the saliency map: the fixed image's extent and direction,
    isotropic, at most FINETUNE_GRID_VOXELS along its longest side and never finer than the
    fixed image (a model's grid is often coarser and may cover only part of the image)."""
    return model_grid(fixed, instance_card())


def model_grid(fixed: sitk.Image, card: ModelCard) -> Grid:
    """The network's input grid for this fixed image: card size and spacing, centred on the fixed
    image with its direction. A card spacing of 0 fits the fixed image's extent (isotropic,
    never finer than the fixed image)."""
    grid = Grid.from_image(fixed)
    if min(card.spacing_mm) > 0:
        return Grid.centered(grid.center, tuple(card.input_size), tuple(card.spacing_mm), grid.direction)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    step = max(float(extent.max()) / (max(card.input_size) - 1), min(grid.spacing))
    size = tuple(min(n, _steps_covering(e, step) + 1) for n, e in zip(card.input_size, extent))
    return Grid.centered(grid.center, size, (step,) * 3, grid.direction)


def normalize_intensity(image: sitk.Image, percentiles: list[float], mask: sitk.Image | None = None
                        ) -> tuple[float, float]:
    """Intensity window (low, high) from the image's percentiles (inside ``mask`` when given)."""
    array = sitk.GetArrayViewFromImage(image)
    if mask is not None:
        array = array[sitk.GetArrayViewFromImage(mask) > 0]
    low, high = np.percentile(array, percentiles)
    if high <= low:
        low, high = float(array.min()), float(array.max())
    return float(low), float(high)


def to_model_tensor(image: sitk.Image, grid: Grid, transform: sitk.Transform, window: tuple[float, float],
                    device: torch.device) -> torch.Tensor:
    """Resample ``image`` through ``transform`` onto ``grid`` and scale ``window`` to [0, 1]: (1, 1, Z, Y, X)."""
    low, high = window
    resampled = sitk.Resample(image, grid.reference_image(), transform, sitk.sitkLinear, low, sitk.sitkFloat32)
    array = (sitk.GetArrayFromImage(resampled) - low) / (high - low)
    return torch.from_numpy(np.clip(array, 0, 1)).to(device)[None, None]


def mask_tensor(image: sitk.Image, mask: sitk.Image | None, grid: Grid, transform: sitk.Transform,
                device: torch.device) -> torch.Tensor:
    """Where ``image`` holds data (``mask``, or its whole volume), resampled through ``transform`` onto
    ``grid`` (linear, 0 outside): (1, 1, Z, Y, X) in [0, 1]."""
    if mask is None:
        mask = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
        mask.CopyInformation(image)
    resampled = sitk.Resample(mask, grid.reference_image(), transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return torch.from_numpy(sitk.GetArrayFromImage(resampled)).to(device)[None, None]


@dataclass(frozen=True)
class PairInputs:
    """A pair as the network and fine-tuning see it: the moving image under ``shift`` (fixed ->
    moving, mm; the start position), each image's intensity window and mask (None: all of it),
    to be placed on any grid."""

    fixed: sitk.Image
    moving: sitk.Image
    shift: sitk.TranslationTransform
    fixed_window: tuple[float, float]
    moving_window: tuple[float, float]
    fixed_mask: sitk.Image | None = None
    moving_mask: sitk.Image | None = None

    @classmethod
    def prepare(cls, fixed: sitk.Image, moving: sitk.Image, card: ModelCard, shift: sitk.TranslationTransform,
                fixed_mask: sitk.Image | None = None, moving_mask: sitk.Image | None = None) -> "PairInputs":
        """The card's percentile windows, taken inside the masks."""
        return cls(fixed, moving, shift, normalize_intensity(fixed, card.intensity_percentiles, fixed_mask),
                   normalize_intensity(moving, card.intensity_percentiles, moving_mask), fixed_mask, moving_mask)

    def on(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Fixed and shifted moving image resampled onto ``grid``, windowed to [0, 1]: (1, 1, Z, Y, X) each."""
        return (to_model_tensor(self.fixed, grid, sitk.Transform(), self.fixed_window, device),
                to_model_tensor(self.moving, grid, self.shift, self.moving_window, device))

    def masks_on(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Where the fixed and the shifted moving image hold data, on ``grid``: (1, 1, Z, Y, X) in [0, 1] each."""
        return (mask_tensor(self.fixed, self.fixed_mask, grid, sitk.Transform(), device),
                mask_tensor(self.moving, self.moving_mask, grid, self.shift, device))

    def judge(self, grid: Grid, device: torch.device) -> guard.StageJudge:
        """The guard's judge of alignments of this pair on ``grid``."""
        return guard.StageJudge(*self.on(grid, device), *self.masks_on(grid, device), grid)


def downsample(volume: torch.Tensor, grid: Grid, factor: int) -> tuple[torch.Tensor, Grid]:
    """Smooth (Gaussian, sigma = ``factor`` / 2 voxels of ``grid``) and resample a volume to a grid
    ``factor`` times coarser over the same extent; ``factor`` 1 only smooths, by FINEST_SIGMA_MM
    (sub-millimetre noise such as speckle)."""
    if factor == 1:
        return gaussian_smooth(volume, FINEST_SIGMA_MM, grid.spacing), grid
    size = tuple(max(4, (n - 1) // factor + 1) for n in grid.size)
    spacing = tuple((n - 1) * s / (m - 1) for n, s, m in zip(grid.size, grid.spacing, size))
    coarse = Grid.centered(grid.center, size, spacing, grid.direction)
    smoothed = gaussian_smooth(volume, 0.5 * factor * min(grid.spacing), grid.spacing)
    resized = F.interpolate(smoothed, size=coarse.shape, mode="trilinear", align_corners=True)
    return resized, coarse


def inside(mask: torch.Tensor) -> torch.Tensor:
    """1 where a smoothed or interpolated mask (values in [0, 1]) is within INSIDE_TOLERANCE of 1, else 0."""
    return (mask >= 1.0 - INSIDE_TOLERANCE).to(mask.dtype)


class PairDeformation(torch.nn.Module):
    """Fine-tuned correction on top of a fixed initial field: affine + diffeomorphic local field.

    ``displacement_on(grid)`` gives, at the voxels ``p`` of a grid, the displacement (mm) added to
    the initial field: ``(A - I)(p - c) + t`` plus the exponential of a
    stationary velocity field. The velocity is the sum of cubic B-spline control-point grids of
    ``control_spacings_mm``, evaluated on a grid of half the finest control spacing and
    integrated there by scaling and squaring, so the local correction cannot fold. No
    ``control_spacings_mm``: the affine part alone (no velocity grid is built).
    """

    def __init__(self, grid: Grid, control_spacings_mm: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("center", torch.as_tensor(grid.center, dtype=torch.float32))
        self.matrix = torch.nn.Parameter(torch.zeros(3, 3))
        self.translation = torch.nn.Parameter(torch.zeros(3))
        self.control_grids: list[Grid] = []
        fields, splines = [], []
        if control_spacings_mm:
            extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
            step = min(control_spacings_mm) / 2.0
            size = tuple(_steps_covering(e, step) + 5 for e in extent)
            self.velocity_grid = Grid.centered(grid.center, size, (step,) * 3, grid.direction)
            self.integrator = spatial.VelocityIntegrator(self.velocity_grid, steps=VELOCITY_SQUARINGS)
            velocity_extent = (np.asarray(size) - 1) * step
        for spacing in control_spacings_mm:
            # two control points beyond the velocity grid on each side: full B-spline support
            control_size = tuple(_steps_covering(e, spacing) + 5 for e in velocity_extent)
            self.control_grids.append(Grid.centered(grid.center, control_size, (spacing,) * 3, grid.direction))
            fields.append(torch.nn.Parameter(torch.zeros(1, 3, *self.control_grids[-1].shape)))
            splines.append(spatial.SeparableInterpolator(self.control_grids[-1], self.velocity_grid, "bspline"))
        self.fields = torch.nn.ParameterList(fields)
        self.splines = torch.nn.ModuleList(splines)
        self.bending = torch.nn.ModuleList(BendingEnergy(control.shape, control.spacing) for control in self.control_grids)
        self._interpolators: dict[Grid, spatial.SeparableInterpolator] = {}  # from the velocity grid, per target grid

    def squarings(self, velocity: torch.Tensor) -> int:
        """Scaling and squaring steps for ``velocity``: at least VELOCITY_SQUARINGS, and enough that
        the scaled velocity moves no voxel by more than MAX_STEP_VOXELS of the velocity grid."""
        largest = float(velocity.detach().abs().amax()) / (MAX_STEP_VOXELS * self.velocity_grid.spacing[0])
        return max(VELOCITY_SQUARINGS, math.ceil(math.log2(largest)) if largest > 1.0 else 0)

    def local_field(self) -> torch.Tensor:
        """The integrated local displacement (1, 3, Z, Y, X) in mm on ``velocity_grid`` (only with
        control grids); when gradients are recorded, they flow to the velocity as if the exponential
        were the identity."""
        velocity = sum(spline(values) for spline, values in zip(self.splines, self.fields))
        steps = self.squarings(velocity)
        if not torch.is_grad_enabled():
            return self.integrator(velocity, steps)
        # the exact exponential forward, its gradient taken as the identity (first order in the
        # velocity's spatial derivatives): no backward pass through the squarings, same accuracy
        with torch.no_grad():
            correction = self.integrator(velocity, steps) - velocity
        return velocity + correction

    def displacement_on(self, grid: Grid, local: bool = True) -> torch.Tensor:
        """The correction (1, 3, Z, Y, X) in mm at every voxel of ``grid`` (which has the fine-tuning
        grid's direction): the affine part per index axis, the local field (unless not ``local``) by
        separable trilinear interpolation from the velocity grid (border values outside it)."""
        index_to_physical = torch.as_tensor(grid.index_to_physical, dtype=self.matrix.dtype, device=self.matrix.device)
        per_index = self.matrix @ index_to_physical  # displacement per voxel step along x, y, z
        origin = torch.as_tensor(grid.origin, dtype=self.matrix.dtype, device=self.matrix.device)
        affine = ((origin - self.center) @ self.matrix.T + self.translation).view(1, 3, 1, 1, 1)
        for axis, shape in enumerate(((1, 1, -1), (1, -1, 1), (-1, 1, 1))):
            steps = torch.arange(grid.size[axis], dtype=affine.dtype, device=affine.device).view(1, 1, *shape)
            affine = affine + per_index[:, axis].view(1, 3, 1, 1, 1) * steps
        if not (self.control_grids and local):
            return affine
        if grid not in self._interpolators:
            self._interpolators[grid] = spatial.SeparableInterpolator(self.velocity_grid, grid).to(affine.device)
        return affine + self._interpolators[grid](self.local_field())

    def regularization(self) -> torch.Tensor:
        """Bending energy of the velocity control-point fields (unitless)."""
        return sum((bending(values) for bending, values in zip(self.bending, self.fields)),
                   torch.zeros((), device=self.matrix.device))


class Pyramid:
    """The pair's images (fixed, moving on ``grid``) at coarser levels, each computed once.

    ``organs``: optionally the network's organ probability maps of the fixed and the (centre-shifted)
    moving image on ``grid``, (1, 1, Z, Y, X) in [0, 1] each; ``organ_level(f)`` gives them at level ``f``.
    ``masks``: where the fixed and the shifted moving image hold data on ``grid`` (default: everywhere);
    ``mask_level(f)`` gives them at level ``f``; ``moving_masked``: the moving one leaves part of
    ``grid`` out (a mask, or an image that does not cover the grid), so fine-tuning interpolates it
    with the image to know where each sample lands.

    ``level(f)`` smooths with sigma = f / 2 voxels (FINEST_SIGMA_MM for f = 1) and resamples
    ``f`` times coarser over the same extent (:func:`downsample`); ``saliency_level(f)`` is the
    level that level ``f``'s joint saliency map is computed on (at most SALIENCY_GRID_VOXELS per side);
    ``joint_saliency(f, displacement)`` the map there, Gaussian window ``saliency_sigma_mm``, zero
    outside the masks.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, grid: Grid, saliency_sigma_mm: float,
                 organs: tuple[torch.Tensor, torch.Tensor] | None = None,
                 masks: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        self.fixed, self.moving, self.grid, self.saliency_sigma_mm = fixed, moving, grid, saliency_sigma_mm
        self.organs = organs
        self.masks = masks if masks is not None else (torch.ones_like(fixed), torch.ones_like(moving))
        self.moving_masked = bool((self.masks[1] < 1.0).any())
        self._levels: dict[int, tuple[torch.Tensor, torch.Tensor, Grid]] = {}
        self._organ_levels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._mask_levels: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._fixed_saliency: dict[Grid, FixedSaliency] = {}

    def level(self, factor: int) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """(fixed, moving, grid) of level ``factor`` (1 = the finest)."""
        if factor not in self._levels:
            fixed, grid = downsample(self.fixed, self.grid, factor)
            moving, _ = downsample(self.moving, self.grid, factor)
            self._levels[factor] = (fixed, moving, grid)
        return self._levels[factor]

    def organ_level(self, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed organ, moving organ) on level ``factor``'s grid; needs ``organs``."""
        if self.organs is None:
            raise ValueError("This pyramid has no organ maps.")
        if factor not in self._organ_levels:
            fixed, moving = self.organs
            self._organ_levels[factor] = (downsample(fixed, self.grid, factor)[0], downsample(moving, self.grid, factor)[0])
        return self._organ_levels[factor]

    def mask_level(self, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(fixed mask, moving mask) on level ``factor``'s grid: 1 where the level's smoothing mixed
        no more than INSIDE_TOLERANCE of the region outside the mask into the image, else 0."""
        if factor not in self._mask_levels:
            self._mask_levels[factor] = tuple(inside(downsample(mask, self.grid, factor)[0]) for mask in self.masks)
        return self._mask_levels[factor]

    def saliency_factor(self, factor: int) -> int:
        """The level whose grid level ``factor``'s joint saliency is computed on: ``factor`` itself,
        or a coarser one (at most SALIENCY_GRID_VOXELS per side)."""
        return factor * max(1, math.ceil(max(self.level(factor)[2].size) / SALIENCY_GRID_VOXELS))

    def saliency_level(self, factor: int) -> tuple[torch.Tensor, torch.Tensor, Grid]:
        """The saliency images for level ``factor``: the level itself, or a coarser one."""
        return self.level(self.saliency_factor(factor))

    def joint_saliency(self, factor: int, displacement: torch.Tensor) -> torch.Tensor:
        """Joint saliency (1, 1, Z, Y, X) in [0, 1] on the grid of ``saliency_level(factor)``, of the fixed
        image and the moving image warped by ``displacement`` (1, 3, Z, Y, X) in mm on that grid; the
        fixed image's half of the map is computed once per grid. Zero where either image has no data
        (outside the masks, eroded by the saliency window), rescaled to [0, 1] inside."""
        fixed, moving, grid = self.saliency_level(factor)
        fixed_mask, moving_mask = self.mask_level(self.saliency_factor(factor))
        if grid not in self._fixed_saliency:
            self._fixed_saliency[grid] = FixedSaliency(fixed, grid.spacing, self.saliency_sigma_mm)
        warped, warped_mask = spatial.warp(torch.cat([moving, moving_mask], dim=1), displacement, grid).split(1, dim=1)
        saliency = self._fixed_saliency[grid](warped) * inside(fixed_mask * warped_mask)
        return saliency / saliency.amax().clamp(min=1e-6)


def organ_loss(fixed_organ: torch.Tensor, moving_organ: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice (scalar) of fixed organ values (1, 1, *S) and the moving organ map (1, 1, Z, Y, X)
    sampled at ``grid_sample`` coordinates (1, *S, 3); zero outside the moving map's grid."""
    return 1.0 - soft_dice(fixed_organ, spatial.sample_normalized(moving_organ, coordinates))[0]


def _report(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    if progress is not None and progress(stage, fraction) is False:
        raise RegistrationCancelled(f"Registration cancelled during {stage}.")


class Adam:
    """Adam (Kingma and Ba 2015; torch.optim.Adam's defaults and arithmetic) over parameter groups
    with their own step sizes, scaled at each step by ``step(scale)``.

    Not torch.optim: its first use imports torch._dynamo, 1.5 s on 2 CPU threads that a
    one-shot registration in a fresh process (Slicer's first run, a command line) paid in full.
    """

    def __init__(self, groups: list[tuple[list[torch.nn.Parameter], float]],
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.groups, self.betas, self.eps, self.count = groups, betas, eps, 0
        self.moments = {id(p): (torch.zeros_like(p), torch.zeros_like(p)) for params, _ in groups for p in params}

    @torch.no_grad()
    def step(self, scale: float = 1.0) -> None:
        """One update of every parameter that has a gradient, with step sizes times ``scale``."""
        self.count += 1
        beta1, beta2 = self.betas
        correction1, correction2 = 1.0 - beta1 ** self.count, math.sqrt(1.0 - beta2 ** self.count)
        for params, lr in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                first, second = self.moments[id(p)]
                first.mul_(beta1).add_(p.grad, alpha=1.0 - beta1)
                second.mul_(beta2).addcmul_(p.grad, p.grad, value=1.0 - beta2)
                p.addcdiv_(first, (second.sqrt() / correction2).add_(self.eps), value=-lr * scale / correction1)

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None


def fine_tune(pyramid: Pyramid, initial: torch.Tensor, iterations: int,
              metric: str, progress: ProgressCallback | None = None,
              seed: int = 0, field_step_mm: float = 0.05, samples: int = 24576,
              organ_weight: float = 0.0) -> PairDeformation:
    """Optimise a :class:`PairDeformation` on the pyramid's pair from ``initial`` (1, 3, Z, Y, X mm on
    the pyramid's grid).

    Two resolution levels (half, for COARSE_FRACTION of the steps, then full), Adam; the
    similarity is mutual information (Mattes et al.'s estimator, "mi") or the SSD of MIND-SSC
    descriptors ("mind", computed once per level and interpolated) on a strided subgrid of voxels
    at a random offset each step, or dense LNCC ("lncc"), each voxel weighted by
    ``1 + joint saliency`` of the alignment the level starts from (on the saliency grid) and by
    the pyramid's masks (the moving one where the voxel lands; only voxels the smoothing kept clear
    of the region outside a mask: :func:`inside`), plus
    bending energy of the correction. ``field_step_mm``: Adam's step for the local
    field's control points (mm, doubled on the coarse level); small for a few steps from a good
    network prediction; 0: no local field, an affine correction alone. ``samples``: about this many MI samples per step on the finest level,
    COARSE_SAMPLE_FRACTION of them on the coarse one (the stride is the nearest integer to the
    cube root of the level's voxels / those samples). ``organ_weight``: with the pyramid's organ maps,
    adds this times (1 - soft Dice) of the fixed organ map and the warped moving one, on the same
    voxels as the similarity: it pulls the organ's outline together where intensities alone do not.
    """
    if metric not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{metric}': use one of {', '.join(SIMILARITIES)}.")
    grid = pyramid.grid
    device = initial.device
    extent = float(((np.asarray(grid.size) - 1) * np.asarray(grid.spacing)).max())
    spacings = tuple(extent / d for d in CONTROL_DIVISIONS) if field_step_mm > 0 else ()
    deformation = PairDeformation(grid, spacings).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    coarse = int(iterations * COARSE_FRACTION)
    levels = [(2, coarse), (1, iterations - coarse)]
    use_organs = organ_weight > 0 and pyramid.organs is not None
    done = 0
    for factor, steps in levels:
        if steps == 0:
            continue
        level_fixed, level_moving, level_grid = pyramid.level(factor)
        fixed_mask, moving_mask = pyramid.mask_level(factor)
        fixed_organ, moving_organ = pyramid.organ_level(factor) if use_organs else (None, None)
        if metric == "mind":
            fixed_features, moving_features = mind_ssc(level_fixed), mind_ssc(level_moving)
        else:
            fixed_features, moving_features = level_fixed, level_moving
        # a moving mask is interpolated with the image; without one the samples inside the grid count
        moving_stack = torch.cat([moving_features, moving_mask], dim=1) if pyramid.moving_masked else moving_features
        level_initial = spatial.resample_field(initial, grid, level_grid) if factor > 1 else initial
        # grid_sample coordinates of the voxels mapped by the initial field, and their change per mm
        per_mm = spatial.normalized_per_mm(level_grid, device=device)
        initial_coordinates = spatial.identity_coordinates(level_grid, device) + level_initial.permute(0, 2, 3, 4, 1) @ per_mm
        # MI samples: a strided subgrid of about ``samples`` voxels at a random offset each step
        level_samples = samples * (COARSE_SAMPLE_FRACTION if factor > 1 else 1.0)
        stride = max(1, round((math.prod(level_grid.size) / level_samples) ** (1.0 / 3.0)))
        optimizer = Adam([([deformation.matrix], MATRIX_LR), ([deformation.translation], TRANSLATION_LR * factor),
                          (list(deformation.fields), field_step_mm * factor)])
        small_grid = pyramid.saliency_level(factor)[2]
        small_initial = spatial.resample_field(initial, grid, small_grid)
        for step in range(steps):
            if step == 0:  # saliency of the alignment each level starts from (once: the same TRE as twice)
                with torch.no_grad():
                    saliency = pyramid.joint_saliency(factor, small_initial + deformation.displacement_on(small_grid))
                    weight_map = fixed_mask * (1.0 + F.interpolate(saliency, size=level_grid.shape,
                                                                   mode="trilinear", align_corners=True))
                subgrids: dict[tuple[int, int, int],
                               tuple[Grid, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
            optimizer.zero_grad()
            if metric != "lncc":
                offset = tuple(torch.randint(0, stride, (3,), generator=generator, device=device).tolist())
                if offset not in subgrids:  # each subgrid's fixed values, weights and start coordinates, gathered once
                    ox, oy, oz = offset
                    voxels = (..., slice(oz, None, stride), slice(oy, None, stride), slice(ox, None, stride))
                    subgrids[offset] = (level_grid.strided(offset, stride), fixed_features[voxels].contiguous(),
                                        weight_map[voxels].contiguous(), initial_coordinates[voxels + (slice(None),)].contiguous(),
                                        fixed_organ[voxels].contiguous() if use_organs else None)
                subgrid, subgrid_fixed, subgrid_weight, subgrid_coordinates, subgrid_organ = subgrids[offset]
                correction = deformation.displacement_on(subgrid)
                coordinates = subgrid_coordinates + correction.permute(0, 2, 3, 4, 1) @ per_mm
                values = spatial.sample_normalized(moving_stack, coordinates)
                if pyramid.moving_masked:
                    values, landed = values.split([moving_features.shape[1], 1], dim=1)
                    landed = inside(landed)
                else:
                    landed = (coordinates.abs() <= 1).all(dim=-1, keepdim=True).movedim(-1, 1).to(values.dtype)
                if metric == "mi":
                    similarity = mutual_information_loss(subgrid_fixed, values, weight=subgrid_weight * landed.detach())
                else:
                    similarity = MIND_WEIGHT * mind_loss(subgrid_fixed, values, subgrid_weight * landed.detach())
                if use_organs:
                    similarity = similarity + organ_weight * organ_loss(subgrid_organ, moving_organ, coordinates)
            else:
                coordinates = initial_coordinates + deformation.displacement_on(level_grid).permute(0, 2, 3, 4, 1) @ per_mm
                warped = spatial.sample_normalized(level_moving, coordinates, padding_mode="border")
                landed = inside(spatial.sample_normalized(moving_mask, coordinates).detach())
                similarity = lncc_loss(level_fixed, warped, weight=weight_map * landed)
                if use_organs:
                    similarity = similarity + organ_weight * organ_loss(fixed_organ, moving_organ, coordinates)
            loss = similarity + BENDING_WEIGHT * deformation.regularization()
            loss.backward()
            optimizer.step(1.0 - (1.0 - FINAL_STEP_SCALE) * step / steps)
            done += 1
            _report(progress, "finetune", done / iterations)
    return deformation


def organ_maps(outputs: dict[str, torch.Tensor], grid: Grid, target: Grid, messages: list[str]
               ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The network's organ maps ("fixed_segmentation", "moving_segmentation" on its ``grid``) on the
    ``target`` grid (same direction), zero outside ``grid``; None, with a message, when the network
    gives none or either map holds less than MIN_ORGAN_ML of organ (fine-tuning then uses intensities alone)."""
    if "fixed_segmentation" not in outputs:
        messages.append("This model has no organ maps: fine-tuning used image similarity alone.")
        return None
    voxel_ml = math.prod(grid.spacing) / 1000.0
    for side in ("fixed", "moving"):
        if float((outputs[f"{side}_segmentation"] > 0.5).sum()) * voxel_ml < MIN_ORGAN_ML:
            messages.append(f"The network found no organ in the {side} image: fine-tuning used image similarity alone.")
            return None
    # both maps in one pass, with a zero border around the model grid so the values beyond it are zero
    both = torch.cat([outputs["fixed_segmentation"], outputs["moving_segmentation"]], dim=1)
    padded = Grid.centered(grid.center, tuple(n + 2 for n in grid.size), grid.spacing, grid.direction)
    placed = spatial.SeparableInterpolator(padded, target).to(both.device)(F.pad(both, (1,) * 6))
    messages.append("Fine-tuning followed the network's organ outlines as well as image similarity.")
    return placed[:, :1], placed[:, 1:]


def resolve_similarity(similarity: str, card: ModelCard) -> str:
    """"auto" -> the model card's similarity (the one its fine-tuning settings were chosen with)."""
    return card.finetune_metric if similarity == "auto" else similarity


def judge_grid(fixed: sitk.Image) -> Grid:
    """The grid the guard scores alignments on: the fixed image's extent, at most
    SALIENCY_GRID_VOXELS along its longest side."""
    return model_grid(fixed, ModelCard(name="", description="", architecture="", config={},
                                       input_size=[SALIENCY_GRID_VOXELS] * 3, spacing_mm=[0.0] * 3))


def physical_overlap(fixed: sitk.Image, fixed_mask: sitk.Image | None, moving: sitk.Image,
                     moving_mask: sitk.Image | None, shift: sitk.TranslationTransform) -> float:
    """Share of the fixed foreground (its mask, else the whole image) that ``shift`` maps into the
    moving foreground (its mask, else the whole image), counted on a regular subgrid of about
    OVERLAP_SAMPLES foreground voxels (the same stride along every axis)."""
    shape = fixed.GetSize()[::-1]
    foreground = sitk.GetArrayViewFromImage(fixed_mask) > 0 if fixed_mask is not None else None
    count = int(foreground.sum()) if foreground is not None else math.prod(shape)
    stride = max(1, int((count / OVERLAP_SAMPLES) ** (1.0 / 3.0)))
    axes = np.meshgrid(*(np.arange(stride // 2, n, stride) for n in shape), indexing="ij")
    zyx = np.stack([axis.ravel() for axis in axes], axis=1)
    if foreground is not None:
        zyx = zyx[foreground[tuple(zyx.T)]]
    grid, moving_grid = Grid.from_image(fixed), Grid.from_image(moving)
    points = np.asarray(grid.origin) + zyx[:, ::-1] @ grid.index_to_physical.T + np.asarray(shift.GetOffset())
    voxels = np.round(moving_grid.physical_to_index(points)).astype(int)
    inside = np.all((voxels >= 0) & (voxels < np.asarray(moving_grid.size)), axis=1)
    if moving_mask is not None:
        x, y, z = voxels[inside].T
        inside[inside] = sitk.GetArrayViewFromImage(moving_mask)[z, y, x] > 0
    return float(inside.mean()) if len(inside) else 0.0


def start_position(inputs: PairInputs, judge_masks: tuple[sitk.Image | None, sitk.Image | None], initial: str,
                   device: torch.device, messages: list[str]
                   ) -> tuple[sitk.TranslationTransform, str, guard.StageJudge | None]:
    """The fixed -> moving translation registration starts from, its name ("physical" or "centers"),
    and (for "auto") the judge that scored it, on :func:`judge_grid` inside ``judge_masks``.

    "physical": the images' physical positions; "centers": the centres of the foregrounds (the
    masks of ``inputs``, else the whole images) coincide; "auto": the foreground centres, unless
    the physical positions (when at least MIN_PHYSICAL_OVERLAP of the fixed foreground lies in the
    moving one there) or, with masks, the image centres score better by both MIND-SSC (by
    CENTERS_MARGIN) and mutual information inside ``judge_masks``: two similarities must agree
    before the start moves away from the centres.
    """
    fixed, moving = inputs.fixed, inputs.moving
    centers = sitk.TranslationTransform(3, (foreground_center(moving, inputs.moving_mask)
                                            - foreground_center(fixed, inputs.fixed_mask)).tolist())
    if initial != "auto":
        return (sitk.TranslationTransform(3), "physical", None) if initial == "physical" else (centers, "centers", None)
    candidates = {"the foreground centres aligned": centers}
    if inputs.fixed_mask is not None or inputs.moving_mask is not None:
        candidates["the image centres aligned"] = sitk.TranslationTransform(
            3, (foreground_center(moving, None) - foreground_center(fixed, None)).tolist())
    overlap = physical_overlap(fixed, judge_masks[0], moving, judge_masks[1], sitk.TranslationTransform(3))
    if overlap >= MIN_PHYSICAL_OVERLAP:
        candidates["the physical positions"] = sitk.TranslationTransform(3)
    grid = judge_grid(fixed)
    zero = torch.zeros(1, 3, *grid.shape, device=device)
    judged = replace(inputs, fixed_mask=judge_masks[0], moving_mask=judge_masks[1])
    judges: dict[str, guard.StageJudge] = {}
    for name, shift in candidates.items():
        shifted = replace(judged, shift=shift)
        judges[name] = (shifted.judge(grid, device) if not judges else next(iter(judges.values())).with_moving(
            shifted.on(grid, device)[1], shifted.masks_on(grid, device)[1]))
    scores = {name: judge.score(name, zero, 0.0) for name, judge in judges.items()}
    default = scores["the foreground centres aligned"]
    agreeing = [name for name, score in scores.items()
                if score.mind < default.mind * (1.0 - CENTERS_MARGIN) and score.mi < default.mi]
    best = min(agreeing, key=lambda name: scores[name].mind) if agreeing else default.stage
    messages.append(f"Started from {best}" + ("." if best == default.stage else
                                              ": both similarities rate it above the foreground centres."))
    physical = np.allclose(candidates[best].GetOffset(), 0.0, atol=1e-3)  # image centres may coincide already
    return candidates[best], "physical" if physical else "centers", judges[best]


def register(fixed: sitk.Image, moving: sitk.Image, model: str | None = None, device: str = "auto",
             iterations: int | None = None, progress: ProgressCallback | None = None, *,
             similarity: str = "auto", initial: str = "auto", fixed_mask: sitk.Image | None = None,
             moving_mask: sitk.Image | None = None, detect_fov: bool = True) -> RegistrationResult:
    """Register ``moving`` to ``fixed`` (SimpleITK 3D scalar volumes of any size, spacing, direction).

    ``model``: a model name or folder (see :mod:`DeepRegisterLib.models`); ``None`` or "none" runs
    fine-tuning alone from the identity. ``iterations``: fine-tuning steps (default: the model
    card's ``finetune_iterations``, DEFAULT_ITERATIONS_WITHOUT_MODEL without a model).
    ``similarity``: "mi", "mind" (MIND-SSC) or "lncc" for fine-tuning; "auto": the model card's.
    ``initial``: the start position, "physical", "centers" (of the foregrounds) or "auto" (see
    :func:`start_position`). ``fixed_mask``, ``moving_mask``: label images on their image's grid,
    nonzero where the image holds data to compare; without one, ``detect_fov`` looks for an
    ultrasound field of view (see :mod:`DeepRegisterLib.masks`). Masks restrict intensity
    normalisation, similarity, joint saliency and the centre alignment.

    Each stage (start, network, affine and deformable fine-tuning) is judged inside the masks
    (:mod:`DeepRegisterLib.guard`); a stage that makes the alignment worse, or folds, is dropped
    and ``warnings`` say so. ``progress(stage, fraction)`` is called during each stage; return
    ``False`` to cancel (raises :class:`RegistrationCancelled`). On a CUDA out-of-memory error the
    registration is redone on the CPU with a warning.
    """
    fixed = check_volume(fixed, "fixed")
    moving = check_volume(moving, "moving")
    if iterations is not None and iterations < 0:
        raise InputError("The number of fine-tuning iterations cannot be negative.")
    if initial not in INITIAL_POSITIONS:
        raise InputError(f"Unknown initial position '{initial}': use {', '.join(INITIAL_POSITIONS)}.")
    if similarity != "auto" and similarity not in SIMILARITIES:
        raise InputError(f"Unknown similarity '{similarity}': use auto or one of {', '.join(SIMILARITIES)}.")
    messages: list[str] = []
    masks = resolve_masks(fixed, moving, fixed_mask, moving_mask, detect_fov, messages)
    judge_masks = masks if detect_fov else resolve_masks(fixed, moving, fixed_mask, moving_mask, True, [])
    model = None if model in (None, "", "none") else model
    target = resolve_device(device)
    options = (model, iterations, progress, similarity, initial, masks, judge_masks, messages)
    try:
        return _register(fixed, moving, target, *options)
    except torch.OutOfMemoryError:
        if target.type != "cuda":
            raise
        torch.cuda.empty_cache()
        message = "The GPU ran out of memory; registration was redone on the CPU."
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        result = _register(fixed, moving, torch.device("cpu"), *options)
        result.messages.insert(0, message)
        return result


def _register(fixed: sitk.Image, moving: sitk.Image, device: torch.device, model: str | None, iterations: int | None,
              progress: ProgressCallback | None, similarity: str, initial: str,
              masks: tuple[sitk.Image | None, sitk.Image | None],
              judge_masks: tuple[sitk.Image | None, sitk.Image | None], messages: list[str]) -> RegistrationResult:
    timings: dict[str, float] = {}
    messages = list(messages)
    start = time.perf_counter()
    _report(progress, "preprocess", 0.0)
    if model is None:
        card, network = instance_card(), None
        iterations = DEFAULT_ITERATIONS_WITHOUT_MODEL if iterations is None else iterations
        messages.append("No trained model: the result comes from fine-tuning on this pair alone.")
    else:
        card, network = load_model(model, device)
        iterations = card.finetune_iterations if iterations is None else iterations
    metric = resolve_similarity(similarity, card)
    fixed_mask, moving_mask = masks
    inputs = PairInputs.prepare(fixed, moving, card, sitk.TranslationTransform(3), fixed_mask, moving_mask)
    shift, initial, start_judge = start_position(inputs, judge_masks, initial, device, messages)
    inputs = replace(inputs, shift=shift)
    grid = model_grid(fixed, card)
    tune_grid = finetune_grid(fixed)
    fixed_grid = Grid.from_image(fixed)
    if physical_overlap(fixed, fixed_mask, moving, moving_mask, shift) < MIN_OVERLAP:
        raise InputError(f"The fixed and moving {'volumes' if fixed_mask is None and moving_mask is None else 'masks'} do not "
                         f"overlap at the {initial} start position (less than {MIN_OVERLAP:.0%} of the fixed one "
                         "lies in the moving one). Check their origins, directions and masks, or start from "
                         "the centres aligned (initial 'centers').")
    tune_images = inputs.on(tune_grid, device)
    tune_masks = inputs.masks_on(tune_grid, device)
    timings["preprocess"] = time.perf_counter() - start

    start = time.perf_counter()
    _report(progress, "network", 0.0)
    initial_field = torch.zeros(1, 3, *tune_grid.shape, device=device)
    network_field = None  # the network's displacement (1, 3, Z, Y, X) in mm on its grid
    organs = None  # the network's organ maps of the fixed and moving image on the fine-tuning grid
    if network is not None:
        outputs = network.register_pair(*inputs.on(grid, device))
        canonical = outputs["displacement"]
        direction = torch.as_tensor(np.reshape(grid.direction, (3, 3)), dtype=canonical.dtype, device=device)
        network_field = torch.einsum("ij,bjzyx->bizyx", direction, canonical)
        initial_field = spatial.resample_field(network_field, grid, tune_grid)
        if card.finetune_organ_weight > 0 and iterations > 0:
            organs = organ_maps(outputs, grid, tune_grid, messages)
    pyramid = Pyramid(*tune_images, tune_grid, card.saliency_sigma_mm, organs, tune_masks)
    timings["network"] = time.perf_counter() - start

    start = time.perf_counter()
    deformation = None
    if iterations > 0:
        deformation = fine_tune(pyramid, initial_field, iterations, metric, progress,
                                field_step_mm=card.finetune_step_mm, samples=card.finetune_samples,
                                organ_weight=card.finetune_organ_weight)
    timings["finetune"] = time.perf_counter() - start

    start = time.perf_counter()
    _report(progress, "output", 0.0)
    with torch.no_grad():
        def stage_field(stage: str, target: Grid) -> torch.Tensor:
            """A stage's displacement (1, 3, Z, Y, X) in mm on ``target``, on top of the start position."""
            field = (torch.zeros(1, 3, *target.shape, device=device) if network_field is None or stage == "start"
                     else spatial.resample_field(network_field, grid, target))
            if stage in ("affine", "deformable"):
                field = field + deformation.displacement_on(target, local=stage == "deformable")
            return field

        stages = ["start"] + (["network"] if network is not None else [])
        if deformation is not None:
            stages += ["affine"] + (["deformable"] if deformation.control_grids else [])
        small = judge_grid(fixed)
        judge = start_judge or replace(inputs, fixed_mask=judge_masks[0], moving_mask=judge_masks[1]).judge(small, device)
        if network is not None and "fixed_segmentation" in outputs:
            judge_organs = organ_maps(outputs, grid, small, [])
            if judge_organs is not None:
                judge.add_organs(*judge_organs)
        scores = []
        for stage in stages:
            field_small = stage_field(stage, small)
            scores.append(judge.score(stage, field_small, spatial.folding_percent(field_small, small)))
        kept, guard_warnings = guard.choose(scores)
        saliency_grid = pyramid.saliency_level(1)[2]
        saliency_small = pyramid.joint_saliency(1, stage_field(kept.stage, saliency_grid))
        full = stage_field(kept.stage, fixed_grid)
        full = full + torch.as_tensor(shift.GetOffset(), dtype=full.dtype, device=device).view(1, 3, 1, 1, 1)
        determinant = spatial.jacobian_determinant(full, fixed_grid)
        folding = float((determinant <= 0).double().mean() * 100.0)
        if folding > guard.MAX_FOLDING_PERCENT:
            guard_warnings.append(f"The result folds on {folding:.2f} % of the fixed image's voxels (non-positive "
                                  "Jacobian determinant): check it before relying on it.")
        transform = sitk.DisplacementFieldTransform(spatial.displacement_to_sitk(full.cpu(), fixed_grid))
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    saliency = sitk.Resample(saliency_grid.place(sitk.GetImageFromArray(saliency_small[0, 0].cpu().numpy())), fixed,
                             sitk.Transform(), sitk.sitkLinear, 0.0)
    saliency = sitk.Clamp(saliency, sitk.sitkFloat32, 0.0, 1.0)
    timings["output"] = time.perf_counter() - start
    timings["total"] = sum(timings.values())
    _report(progress, "output", 1.0)
    name = card.name if network is not None else "none (fine-tuning only)"
    return RegistrationResult(transform, warped, saliency, timings, folding, name, str(device), iterations, metric,
                              initial, shift, fixed_mask, moving_mask, [score.as_dict() for score in scores],
                              kept.stage, float(determinant.min()), messages, guard_warnings)
