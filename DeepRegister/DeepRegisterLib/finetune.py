"""Fine-tuning on the pair: an affine plus diffeomorphic correction (:class:`PairDeformation`) optimised
on a two-level image pyramid. Displacements are (1, 3, Z, Y, X) in mm (LPS); images (1, 1, Z, Y, X).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from . import spatial
from .filters import gaussian_smooth
from .imageio import InputError
from .losses import BendingEnergy, grid_regions, lncc_loss, mind_loss, mind_ssc, mutual_information_loss, soft_dice
from .options import SIMILARITIES
from .preprocess import SALIENCY_GRID_VOXELS, steps_covering
from .progress import ProgressCallback, report_progress
from .saliency import FixedSaliency
from .spatial import Grid

FINEST_SIGMA_MM = 0.5  # Gaussian smoothing of the finest fine-tuning level (sub-millimetre noise such as speckle)
BENDING_WEIGHT = 5.0  # weight of the velocity control points' bending energy in the loss
MATRIX_LR, TRANSLATION_LR = 5e-4, 0.1  # Adam steps: unitless, mm (the local field's: the card's finetune_step_mm)
CONTROL_DIVISIONS = (4, 8)  # velocity control-point spacings = the grid's longest extent / these
VELOCITY_SQUARINGS = 2  # fewest scaling and squaring steps of the fine-tuning velocity
MAX_STEP_VOXELS = 0.25  # more squarings until the scaled velocity is below this many velocity-grid voxels
FINAL_STEP_SCALE = 0.2  # Adam's step sizes fall linearly to this fraction over each level
COARSE_FRACTION = 0.25  # share of the fine-tuning steps run on the half-resolution level
COARSE_SAMPLE_FRACTION = 0.5  # share of the finest level's MI samples taken on the half-resolution level
MIN_ORGAN_ML = 1.0  # smallest organ map (mL above probability 0.5) that fine-tuning follows
INSIDE_TOLERANCE = 0.01  # share of a mask's outside that smoothing or interpolation may mix into a compared voxel
ANCHOR_RADIUS_MM = 20.0  # the affine correction's departure is averaged over a ball of this radius (a gland's size) about the grid's centre
ANCHOR_SCALE_MM = 5.0  # ... and counted in units of this displacement squared (the prior's typical error)
MIND_WEIGHT = 10.0  # MIND-SSC SSD (about 0.01-0.1 per voxel) scaled to the range of mutual information
MI_REGIONS = 4  # mutual information is conditional on position: one joint histogram per region of a lattice this many per axis


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
            size = tuple(steps_covering(e, step) + 5 for e in extent)
            self.velocity_grid = Grid.centered(grid.center, size, (step,) * 3, grid.direction)
            self.integrator = spatial.VelocityIntegrator(self.velocity_grid, steps=VELOCITY_SQUARINGS)
            velocity_extent = (np.asarray(size) - 1) * step
        for spacing in control_spacings_mm:
            # two control points beyond the velocity grid on each side: full B-spline support
            control_size = tuple(steps_covering(e, spacing) + 5 for e in velocity_extent)
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

    def affine_departure(self) -> torch.Tensor:
        """Mean squared displacement (scalar, in ANCHOR_SCALE_MM^2) of the affine correction over a
        ball of ANCHOR_RADIUS_MM around its centre (the fine-tuning grid's, i.e. the fixed image's, not the
        organ's): |t|^2 + R^2 / 5 |A - I|_F^2."""
        squared = self.translation.square().sum() + ANCHOR_RADIUS_MM ** 2 / 5.0 * self.matrix.square().sum()
        return squared / ANCHOR_SCALE_MM ** 2

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
              organ_weight: float = 0.0, anchor_weight: float = 0.0) -> PairDeformation:
    """Optimise a :class:`PairDeformation` on the pyramid's pair from ``initial`` (1, 3, Z, Y, X mm on
    the pyramid's grid).

    Two resolution levels (half, for COARSE_FRACTION of the steps, then full), Adam; the
    similarity is mutual information (Mattes et al.'s estimator, "mi", conditional on position: one
    joint histogram per region of a MI_REGIONS^3 lattice over the level, so that an intensity
    relation drifting across the image, such as a bias field or an ultrasound's depth attenuation,
    is not taken for misalignment) or the SSD of MIND-SSC
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
    ``anchor_weight``: adds this times the affine correction's mean squared departure from ``initial``
    (:meth:`PairDeformation.affine_departure`): it stays near the model's prediction (e.g. its gland
    prior) unless the images pay for the move.
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
            if step == 0:  # saliency of the alignment each level starts from (once per level)
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
                    regions = None
                    if metric == "mi" and MI_REGIONS > 1:
                        regions = grid_regions(level_grid.shape, MI_REGIONS, (oz, oy, ox), stride, device)
                    subgrids[offset] = (level_grid.strided(offset, stride), fixed_features[voxels].contiguous(),
                                        weight_map[voxels].contiguous(), initial_coordinates[voxels + (slice(None),)].contiguous(),
                                        fixed_organ[voxels].contiguous() if use_organs else None, regions)
                subgrid, subgrid_fixed, subgrid_weight, subgrid_coordinates, subgrid_organ, regions = subgrids[offset]
                correction = deformation.displacement_on(subgrid)
                coordinates = subgrid_coordinates + correction.permute(0, 2, 3, 4, 1) @ per_mm
                values = spatial.sample_normalized(moving_stack, coordinates)
                if pyramid.moving_masked:
                    values, landed = values.split([moving_features.shape[1], 1], dim=1)
                    landed = inside(landed)
                else:
                    landed = (coordinates.abs() <= 1).all(dim=-1, keepdim=True).movedim(-1, 1).to(values.dtype)
                if metric == "mi":
                    similarity = mutual_information_loss(subgrid_fixed, values, weight=subgrid_weight * landed.detach(), regions=regions)
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
            if anchor_weight > 0:
                loss = loss + anchor_weight * deformation.affine_departure()
            loss.backward()
            optimizer.step(1.0 - (1.0 - FINAL_STEP_SCALE) * step / steps)
            done += 1
            report_progress(progress, "finetune", done / iterations)
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
