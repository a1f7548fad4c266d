"""Do no harm: judge each stage of a registration and keep the last one that helped.

Each stage (the start position, the network's field, the fine-tuned affine, the fine-tuned
deformable field) is scored inside the masks by two similarities that fail differently:
MIND-SSC descriptors compared by SSD (local self-similarity: robust to intensity mappings
and to an empty region's edge) and Mattes mutual information (global histogram). A stage is
kept when it improves MIND clearly (by MIN_MIND_GAIN: on images that say little about the
alignment, both similarities improve a little whatever the field does), or moderately (by
MODERATE_MIND_GAIN) with a plausible field, neither MIND nor MI gets worse, and its field does not
fold. A field is plausible when it changes the volume of almost no judged voxel beyond
MAX_VOLUME_RATIO; fitting noise on images that say little about the alignment shrinks and grows
tissue, and a stage that does so on more than MAX_VOLUME_CHANGE_PERCENT of them is refused whatever
the similarities say. For models with organ segmenters the
overlap of the network's organ maps judges instead of the intensities: on images whose
intensities say little about the organ (MR against TRUS) it is the signal the model was
trained to find.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import spatial
from .losses import grid_regions, mind_loss, mind_ssc, mutual_information_loss, soft_dice
from .spatial import Grid

MAX_FOLDING_PERCENT = 0.1  # a stage whose field folds on more voxels than this is refused
MIND_TOLERANCE = 0.002  # relative MIND increase that makes a stage worse
MI_TOLERANCE = 0.01  # relative MI loss a stage may bring (noise of the histogram estimate)
MIND_DILATION = 2  # voxels of the judge's grid between the descriptor's neighbours
MIND_REACH = 4  # voxels a descriptor sees (dilation + patch): masks are eroded by this for judging
ORGAN_TOLERANCE = 0.01  # soft Dice of the organ maps a stage may lose
MIN_MIND_GAIN = 0.2  # relative MIND decrease that counts as a clear improvement
MODERATE_MIND_GAIN = 0.1  # relative MIND decrease accepted from a plausible field (see MAX_PLAUSIBLE_CHANGE_PERCENT)
MAX_VOLUME_RATIO = 3.0  # a field that shrinks or grows tissue beyond this factor changes its volume implausibly
MAX_PLAUSIBLE_CHANGE_PERCENT = 1.0  # judged voxels with implausible volume change in a plausible field, at most
MAX_VOLUME_CHANGE_PERCENT = 10.0  # a stage whose field changes the volume of more judged voxels implausibly is refused
AFFINE_STAGES = ("affine",)  # stages whose field is affine: no local volume change, so no evidence of plausibility


def erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """1 where ``mask`` (1, 1, Z, Y, X) is above 0.5 within a cube of ``voxels`` around (the grid's
    border counts as inside), else 0; the thresholded mask itself when erosion leaves nothing."""
    inside = (mask > 0.5).to(mask.dtype)
    outside = 1.0 - inside
    for kernel in ((2 * voxels + 1, 1, 1), (1, 2 * voxels + 1, 1), (1, 1, 2 * voxels + 1)):  # a cube is separable
        outside = F.max_pool3d(outside, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    eroded = 1.0 - outside
    return eroded if eroded.any() else inside


@dataclass
class StageScore:
    """A stage's scores (lower is better for both) and its folding percentage."""

    stage: str
    mind: float
    mi: float
    folding_percent: float
    volume_change_percent: float = 0.0  # judged voxels whose volume the field changes by more than MAX_VOLUME_RATIO
    organ_dice: float | None = None  # soft Dice of the fixed and warped moving organ maps, when a model gives them
    accepted: bool = False

    def as_dict(self) -> dict:
        return {"stage": self.stage, "score": self.mind, "mind": self.mind, "mi": self.mi,
                "organ_dice": self.organ_dice, "folding_percent": self.folding_percent,
                "volume_change_percent": self.volume_change_percent, "accepted": self.accepted}


class StageJudge:
    """Scores alignments of one pair on one grid.

    ``fixed``, ``moving`` (1, 1, Z, Y, X) in [0, 1] on ``grid`` (the moving image already under
    the start position); ``fixed_mask``, ``moving_mask`` (1, 1, Z, Y, X) in [0, 1] on the same
    grid: where each image holds data (the moving mask moves with the moving image). Both are
    eroded by MIND_REACH voxels (unless that leaves nothing) so no descriptor sees beyond the data:
    an ultrasound fan's edge is no anatomy.
    """

    def __init__(self, fixed: torch.Tensor, moving: torch.Tensor, fixed_mask: torch.Tensor,
                 moving_mask: torch.Tensor, grid: Grid) -> None:
        self.grid, self.fixed, self.organs = grid, fixed, None
        self.fixed_mask = erode(fixed_mask, MIND_REACH)
        self.fixed_descriptors = mind_ssc(fixed, MIND_DILATION)
        self.moving_stack = self._moving_stack(moving, moving_mask)

    @staticmethod
    def _moving_stack(moving: torch.Tensor, moving_mask: torch.Tensor) -> torch.Tensor:
        return torch.cat([mind_ssc(moving, MIND_DILATION), moving, erode(moving_mask, MIND_REACH)], dim=1)

    def with_moving(self, moving: torch.Tensor, moving_mask: torch.Tensor) -> "StageJudge":
        """A judge of the same fixed image (its descriptors and mask reused) against another moving
        image and mask on the same grid (e.g. the moving image under another start position)."""
        judge = copy.copy(self)
        judge.organs, judge.moving_stack = None, self._moving_stack(moving, moving_mask)
        return judge

    def add_organs(self, fixed_organ: torch.Tensor, moving_organ: torch.Tensor) -> None:
        """Judge by the overlap of these organ probability maps (1, 1, Z, Y, X) on the grid instead."""
        self.organs = (fixed_organ, moving_organ)

    @torch.no_grad()
    def score(self, stage: str, displacement: torch.Tensor, regions: int = 1) -> StageScore:
        """Scores of the moving image warped by ``displacement`` (1, 3, Z, Y, X) in mm on the grid, and the
        field's folding and implausible volume change (from one Jacobian determinant); ``regions`` > 1:
        mutual information conditional on position, on a lattice of that many regions per axis
        (:func:`DeepRegisterLib.losses.grid_regions`)."""
        identity = not displacement.any()  # a start position: the moving image as it stands
        warped = self.moving_stack if identity else spatial.warp(self.moving_stack, displacement, self.grid,
                                                                 padding_mode="border")
        descriptors, image, mask = warped[:, :-2], warped[:, -2:-1], warped[:, -1:]
        weight = self.fixed_mask * (mask > 0.5)
        mind = float(mind_loss(self.fixed_descriptors, descriptors, weight))
        lattice = grid_regions(self.grid.shape, regions, device=image.device) if regions > 1 else None
        mi = float(mutual_information_loss(self.fixed, image, weight=weight, regions=lattice))
        folding_percent = volume_change = 0.0
        if not identity:
            determinant = spatial.jacobian_determinant(displacement, self.grid)
            folding_percent = spatial.percent_folded(determinant)
            judged = weight[:, 0] > 0
            extreme = (determinant < 1.0 / MAX_VOLUME_RATIO) | (determinant > MAX_VOLUME_RATIO)
            volume_change = float((extreme & judged).sum() * 100.0 / judged.sum().clamp(min=1))
        organ_dice = None
        if self.organs is not None:
            warped_organ = spatial.warp(self.organs[1], displacement, self.grid)
            organ_dice = float(soft_dice(self.organs[0], warped_organ)[0])
        return StageScore(stage, mind, mi, folding_percent, volume_change, organ_dice)


def verdict(candidate: StageScore, best: StageScore) -> str:
    """Why ``candidate`` cannot replace ``best``, or "" when it can: it must not fold beyond
    MAX_FOLDING_PERCENT nor change the volume of more than MAX_VOLUME_CHANGE_PERCENT of the judged
    voxels by more than MAX_VOLUME_RATIO; with organ maps on both, not lose more than ORGAN_TOLERANCE of
    their soft Dice; else MI must not worsen by MI_TOLERANCE and MIND must fall by MIN_MIND_GAIN
    (relative), or by MODERATE_MIND_GAIN when the field is plausible (at most MAX_PLAUSIBLE_CHANGE_PERCENT
    of the judged voxels change volume beyond MAX_VOLUME_RATIO; an affine stage's field changes no volume
    locally, so it says nothing and an affine stage needs the clear gain)."""
    if candidate.folding_percent > MAX_FOLDING_PERCENT:
        return f"its field folds on {candidate.folding_percent:.2f} % of the voxels"
    if candidate.volume_change_percent > MAX_VOLUME_CHANGE_PERCENT:
        return (f"its field shrinks or grows {candidate.volume_change_percent:.0f} % of the compared tissue more "
                f"than {MAX_VOLUME_RATIO:g}-fold, which tissue does not do")
    if candidate.organ_dice is not None and best.organ_dice is not None:
        if candidate.organ_dice < best.organ_dice - ORGAN_TOLERANCE:
            return f"the organ outlines overlap less (soft Dice {best.organ_dice:.3f} -> {candidate.organ_dice:.3f})"
        return ""
    change = (f"MIND {best.mind:.4f} -> {candidate.mind:.4f}, mutual information {-best.mi:.4f} -> "
              f"{-candidate.mi:.4f}")
    if candidate.mind > best.mind * (1.0 + MIND_TOLERANCE) or candidate.mi > best.mi + MI_TOLERANCE * abs(best.mi):
        return f"it made the alignment worse ({change})"
    gain = 1.0 - candidate.mind / best.mind
    plausible = (candidate.stage not in AFFINE_STAGES  # an affine changes no volume locally: the test says nothing
                 and candidate.volume_change_percent <= MAX_PLAUSIBLE_CHANGE_PERCENT)
    if gain >= MIN_MIND_GAIN or (gain >= MODERATE_MIND_GAIN and plausible):
        return ""
    return f"it did not clearly improve the alignment ({change})"


def choose(scores: list[StageScore]) -> tuple[StageScore, list[str]]:
    """The stage to keep and the warnings to show. The first stage (the start) is always
    acceptable; each later one replaces the kept one when its :func:`verdict` is empty. Warnings
    (why the later stages were refused) only when the kept stage is not the last one."""
    best = scores[0]
    best.accepted = True
    reasons = []
    for candidate in scores[1:]:
        reason = verdict(candidate, best)
        if not reason:
            candidate.accepted, best, reasons = True, candidate, []
            continue
        reasons.append(f"The {candidate.stage} stage was rejected: {reason}.")
    if reasons:
        kept = "the start position (nothing was changed)" if best is scores[0] else f"the {best.stage} stage"
        reasons.append(f"The result is {kept}: check it before relying on it.")
    return best, reasons
