"""Preprocessing of a pair: the grids (network, fine-tuning, guard), intensity windows, resampling onto a
grid as (1, 1, Z, Y, X) tensors, the overlap check and the start position (physical positions in LPS mm).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from . import guard
from .masks import foreground_center
from .models import ModelCard
from .spatial import Grid

FINETUNE_GRID_VOXELS = 128  # longest side of the fine-tuning grid (fitted to the fixed image)
SALIENCY_GRID_VOXELS = 64  # longest side of the grid the joint saliency map and the guard's scores are computed on
OVERLAP_SAMPLES = 4096  # fixed foreground voxels the overlap checks count
MIN_OVERLAP = 0.05  # the fixed foreground share that must lie in the moving one at the start
MIN_PHYSICAL_OVERLAP = 0.5  # "auto" start: the fixed foreground share that must map into the moving image
CENTERS_MARGIN = 0.02  # "auto" start: relative MIND gain another start needs over the foreground centres
SEARCH_REACH_MM = 8.0  # the fallback translation search looks about this far from the "auto" start along each grid axis
SEARCH_COARSE_FACTOR = 2  # ... first on the judge's grid this many times coarser, then on the grid itself
SEARCH_MAX_STEPS = 8  # ... and at most this many coarse voxels (a small image's search reaches less far)
SEARCH_MIN_OVERLAP = 0.5  # ... at a translation where at least this share of the start's compared voxels remains
SEARCH_AGREEMENT_MM = 2.5  # ... and when the two halves of the fixed mask, searched alone, find translations this close
SEARCH_MI_REGIONS = 4  # ... kept when mutual information conditional on position (this many regions per axis) agrees


def steps_covering(length: float, step: float) -> int:
    """How many ``step``s cover ``length`` (mm), ignoring float rounding: an image whose spacing
    differs in the 16th digit (as after a round trip through Slicer) gets the same grids."""
    return int(math.ceil(length / step - 1e-6))


def finetune_grid(fixed: sitk.Image) -> Grid:
    """The grid of fine-tuning and of the saliency map: the fixed image's extent and direction,
    isotropic, at most FINETUNE_GRID_VOXELS along its longest side and never finer than the
    fixed image (a model's grid is often coarser and may cover only part of the image)."""
    return _fitted_grid(fixed, FINETUNE_GRID_VOXELS)


def judge_grid(fixed: sitk.Image) -> Grid:
    """The grid the guard scores alignments on: the fixed image's extent, at most
    SALIENCY_GRID_VOXELS along its longest side."""
    return _fitted_grid(fixed, SALIENCY_GRID_VOXELS)


def _fitted_grid(fixed: sitk.Image, voxels: int) -> Grid:
    """:func:`model_grid` for a card fitted to the fixed image (spacing 0), ``voxels`` along its longest side."""
    return model_grid(fixed, ModelCard(name="", description="", architecture="", config={},
                                       input_size=[voxels] * 3, spacing_mm=[0.0] * 3))


def model_grid(fixed: sitk.Image, card: ModelCard) -> Grid:
    """The network's input grid for this fixed image: card size and spacing, centred on the fixed
    image with its direction. A card spacing of 0 fits the fixed image's extent (isotropic,
    never finer than the fixed image)."""
    grid = Grid.from_image(fixed)
    if min(card.spacing_mm) > 0:
        return Grid.centered(grid.center, tuple(card.input_size), tuple(card.spacing_mm), grid.direction)
    extent = (np.asarray(grid.size) - 1) * np.asarray(grid.spacing)
    step = max(float(extent.max()) / (max(card.input_size) - 1), min(grid.spacing))
    size = tuple(min(n, steps_covering(e, step) + 1) for n, e in zip(card.input_size, extent))
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

    def moving_on(self, grid: Grid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The shifted moving image and where it holds data, on ``grid`` (the moving halves of :meth:`on`
        and :meth:`masks_on`)."""
        return (to_model_tensor(self.moving, grid, self.shift, self.moving_window, device),
                mask_tensor(self.moving, self.moving_mask, grid, self.shift, device))

    def judge(self, grid: Grid, device: torch.device) -> guard.StageJudge:
        """The guard's judge of alignments of this pair on ``grid``."""
        return guard.StageJudge(*self.on(grid, device), *self.masks_on(grid, device), grid)


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


def _best_shifts(fixed: torch.Tensor, fixed_weights: torch.Tensor, moving: torch.Tensor, moving_weight: torch.Tensor,
                 centres: list[tuple[int, int, int]], reach: int) -> list[tuple[int, int, int]]:
    """For each fixed weight map k (K, 1, Z, Y, X), the integer voxel shift d (z, y, x) within ``reach``
    of ``centres[k]`` that minimises the weighted mean squared difference of descriptors (1, C, Z, Y, X)
    between fixed(x) and moving(x + d), weights fixed_weights[k](x) * moving_weight(x + d); shifts
    keeping less than SEARCH_MIN_OVERLAP of the weight at d = 0 (the start) are not considered."""
    shape = fixed.shape[2:]
    floors = SEARCH_MIN_OVERLAP * (fixed_weights * moving_weight).sum(dim=(1, 2, 3, 4))  # the start's overlap
    costs: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
    offsets = np.stack([np.asarray(c) for c in centres])
    for d in {tuple(int(v) for v in c + s - reach) for c in offsets for s in np.ndindex(*(2 * reach + 1,) * 3)}:
        if any(abs(v) >= n for v, n in zip(d, shape)):
            continue
        here = tuple(slice(max(0, -v), n - max(0, v)) for v, n in zip(d, shape))
        there = tuple(slice(max(0, v), n - max(0, -v)) for v, n in zip(d, shape))
        weight = fixed_weights[(..., *here)] * moving_weight[(..., *there)]
        ssd = (fixed[(..., *here)] - moving[(..., *there)]).square().mean(dim=1, keepdim=True)
        totals = weight.sum(dim=(1, 2, 3, 4))
        costs[d] = ((ssd * weight).sum(dim=(1, 2, 3, 4)) / totals.clamp(min=1e-8), totals)
    best = []
    for k, centre in enumerate(centres):
        near = {d: float(cost[k]) for d, (cost, totals) in costs.items()
                if max(abs(a - b) for a, b in zip(d, centre)) <= reach and float(totals[k]) >= max(float(floors[k]), 1e-8)}
        best.append(min(near, key=near.get) if near else centre)
    return best


def _halves(mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (1, 1, Z, Y, X) and its two halves across each axis (split at the median of its
    voxels): (7, 1, Z, Y, X)."""
    inside = torch.nonzero(mask[0, 0] > 0.5).float()
    parts = [mask]
    for axis in range(3):
        split = float(inside[:, axis].median()) if len(inside) else 0.0
        along = torch.arange(mask.shape[2 + axis], device=mask.device).view([-1 if a == axis else 1 for a in range(3)])
        parts += [mask * (along < split), mask * (along >= split)]
    return torch.cat(parts)


@torch.no_grad()
def searched_translation(judge: guard.StageJudge) -> tuple[np.ndarray, float]:
    """The translation (mm, LPS, fixed -> moving; to add to the judge's start position) that best aligns
    the MIND-SSC descriptors inside the judge's masks, and how far apart (mm) the translations are that
    the two halves of the fixed mask find alone, across the axis where they agree best. An exhaustive
    search over whole voxels of the judge's grid made SEARCH_COARSE_FACTOR times coarser, SEARCH_REACH_MM
    (to the nearest coarse voxel, at most SEARCH_MAX_STEPS of them) along each axis of the grid, then
    over the neighbouring voxels of the grid itself (so up to one voxel further)."""
    grid, factor = judge.grid, SEARCH_COARSE_FACTOR
    fixed, fixed_weights = judge.fixed_descriptors, _halves((judge.fixed_mask > 0.5).float())
    moving, moving_weight = judge.moving_stack[:, :-2], (judge.moving_stack[:, -1:] > 0.5).float()
    pooled = [F.avg_pool3d(v, factor, ceil_mode=True) for v in (fixed, fixed_weights, moving, moving_weight)]
    pooled[1], pooled[3] = (pooled[1] > 0.99).float(), (pooled[3] > 0.99).float()
    reach = min(SEARCH_MAX_STEPS, max(1, round(SEARCH_REACH_MM / (factor * min(grid.spacing)))))
    coarse = _best_shifts(*pooled, [(0, 0, 0)] * len(fixed_weights), reach)
    fine = _best_shifts(fixed, fixed_weights, moving, moving_weight,
                        [tuple(factor * v for v in shift) for shift in coarse], factor - 1)
    found = [grid.index_to_physical @ np.asarray(shift[::-1], dtype=float) for shift in fine]  # x, y, z voxels
    agreement = min(float(np.linalg.norm(found[1 + 2 * axis] - found[2 + 2 * axis])) for axis in range(3))
    return found[0], agreement


def searched_start(judge: guard.StageJudge, messages: list[str]) -> tuple[np.ndarray, guard.StageScore] | None:
    """The judge's start moved by :func:`searched_translation` (the translation in mm and its score as
    the stage "search"), when the two halves of the fixed mask agree on it (within SEARCH_AGREEMENT_MM,
    and closer than the move is long: a move within its own uncertainty is no evidence) and MIND-SSC
    (by CENTERS_MARGIN) and mutual information conditional on position (SEARCH_MI_REGIONS per axis: an
    ultrasound's depth attenuation is no misalignment) both rate it above the start (the search minimises
    MIND-SSC on the same grid, so its check only rules out ties; mutual information and the halves are
    the evidence), and, with organ maps, their soft Dice loses at most guard.ORGAN_TOLERANCE; else None,
    with the reason in ``messages``."""
    found, agreement = searched_translation(judge)
    if not np.any(found):
        messages.append(f"A translation search found no better position than the start within about {SEARCH_REACH_MM:g} mm.")
        return None
    if agreement > SEARCH_AGREEMENT_MM:
        messages.append(f"A translation search was not used: the two halves of the fixed image found translations "
                        f"{agreement:.1f} mm apart (more than {SEARCH_AGREEMENT_MM:g} mm).")
        return None
    if np.linalg.norm(found) <= agreement:
        messages.append(f"A translation search was not used: its move ({np.linalg.norm(found):.1f} mm) is no larger than "
                        f"the {agreement:.1f} mm between the translations the two halves of the fixed image found.")
        return None
    zero = torch.zeros(1, 3, *judge.grid.shape, device=judge.fixed.device)
    field = torch.as_tensor(found, dtype=zero.dtype, device=zero.device).view(1, 3, 1, 1, 1).expand_as(zero)
    before, after = judge.score("start", zero, SEARCH_MI_REGIONS), judge.score("search", field, SEARCH_MI_REGIONS)
    if not (after.mind < before.mind * (1.0 - CENTERS_MARGIN) and after.mi < before.mi):
        messages.append(f"A translation search found no position within about {SEARCH_REACH_MM:g} mm that both MIND-SSC "
                        "and mutual information rate better than the start.")
        return None
    if after.organ_dice is not None and after.organ_dice < before.organ_dice - guard.ORGAN_TOLERANCE:
        messages.append("A translation search was not used: the organ outlines overlap less there (soft Dice "
                        f"{before.organ_dice:.3f} -> {after.organ_dice:.3f}).")
        return None
    return found, judge.score("search", field)


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
    first = replace(judged, shift=centers).judge(grid, device)  # the fixed half is shared by every candidate
    judges = {name: first if shift is centers else
              first.with_moving(*replace(judged, shift=shift).moving_on(grid, device))
              for name, shift in candidates.items()}
    scores = {name: judge.score(name, zero) for name, judge in judges.items()}
    default = scores["the foreground centres aligned"]
    agreeing = [name for name, score in scores.items()
                if score.mind < default.mind * (1.0 - CENTERS_MARGIN) and score.mi < default.mi]
    best = min(agreeing, key=lambda name: scores[name].mind) if agreeing else default.stage
    physical = np.allclose(candidates[best].GetOffset(), 0.0, atol=1e-3)  # image centres may coincide already
    where = best if not physical or best == "the physical positions" else f"{best} (here: the physical positions)"
    messages.append(f"Started from {where}" + ("." if best == default.stage else
                                               ": both similarities rate it above the foreground centres."))
    return candidates[best], "physical" if physical else "centers", judges[best]
