"""Do no harm: judge each stage of a registration and keep the last one that helped.

Each stage (the start position, the network's field, the fine-tuned affine, the fine-tuned
deformable field) is scored inside the masks by two similarities that fail differently:
MIND-SSC descriptors compared by SSD (local self-similarity: robust to intensity mappings
and to an empty region's edge) and Mattes mutual information (global histogram). A stage is
kept unless MIND or MI gets worse, or its field folds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import spatial
from .losses import mind_loss, mind_ssc, mutual_information_loss
from .spatial import Grid

MAX_FOLDING_PERCENT = 0.1  # a stage whose field folds on more voxels than this is refused
MIND_TOLERANCE = 0.002  # relative MIND increase that makes a stage worse
MI_TOLERANCE = 0.01  # relative MI loss a stage may bring (noise of the histogram estimate)
MIND_DILATION = 2  # voxels of the judge's grid between the descriptor's neighbours
MIND_REACH = 4  # voxels a descriptor sees (dilation + patch): masks are eroded by this for judging


def erode(mask: torch.Tensor, voxels: int) -> torch.Tensor:
    """1 where ``mask`` (1, 1, Z, Y, X) is above 0.5 within a cube of ``voxels`` around (the grid's
    border counts as inside), else 0; the thresholded mask itself when erosion leaves nothing."""
    inside = (mask > 0.5).to(mask.dtype)
    eroded = 1.0 - F.max_pool3d(1.0 - inside, 2 * voxels + 1, stride=1, padding=voxels)
    return eroded if eroded.any() else inside


@dataclass
class StageScore:
    """A stage's scores (lower is better for both) and its folding percentage."""

    stage: str
    mind: float
    mi: float
    folding_percent: float
    accepted: bool = False

    def as_dict(self) -> dict:
        return {"stage": self.stage, "score": self.mind, "mind": self.mind, "mi": self.mi,
                "folding_percent": self.folding_percent, "accepted": self.accepted}


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
        self.grid, self.fixed = grid, fixed
        self.fixed_mask = erode(fixed_mask, MIND_REACH)
        self.fixed_descriptors = mind_ssc(fixed, MIND_DILATION)
        self.moving_stack = torch.cat([mind_ssc(moving, MIND_DILATION), moving, erode(moving_mask, MIND_REACH)], dim=1)

    @torch.no_grad()
    def score(self, stage: str, displacement: torch.Tensor, folding_percent: float) -> StageScore:
        """Scores of the moving image warped by ``displacement`` (1, 3, Z, Y, X) in mm on the grid."""
        warped = spatial.warp(self.moving_stack, displacement, self.grid, padding_mode="border")
        descriptors, image, mask = warped[:, :-2], warped[:, -2:-1], warped[:, -1:]
        weight = self.fixed_mask * (mask > 0.5)
        mind = float(mind_loss(self.fixed_descriptors, descriptors, weight))
        mi = float(mutual_information_loss(self.fixed, image, weight=weight))
        return StageScore(stage, mind, mi, folding_percent)


def worse(candidate: StageScore, best: StageScore) -> bool:
    """Whether ``candidate`` is a worse alignment than ``best``: folding beyond MAX_FOLDING_PERCENT,
    MIND higher by more than MIND_TOLERANCE or MI worse by more than MI_TOLERANCE (relative)."""
    return (candidate.folding_percent > MAX_FOLDING_PERCENT
            or candidate.mind > best.mind * (1.0 + MIND_TOLERANCE)
            or candidate.mi > best.mi + MI_TOLERANCE * abs(best.mi))


def choose(scores: list[StageScore]) -> tuple[StageScore, list[str]]:
    """The stage to keep and the warnings to show. The first stage (the start) is always
    acceptable; each later one replaces the kept one unless it is :func:`worse`. Warnings (why the
    later stages were refused) only when the kept stage is not the last one."""
    best = scores[0]
    best.accepted = True
    reasons = []
    for candidate in scores[1:]:
        if not worse(candidate, best):
            candidate.accepted, best, reasons = True, candidate, []
            continue
        if candidate.folding_percent > MAX_FOLDING_PERCENT:
            reason = f"its field folds on {candidate.folding_percent:.2f} % of the voxels"
        else:
            reason = (f"it made the alignment worse (MIND {best.mind:.4f} -> {candidate.mind:.4f}, "
                      f"mutual information {-best.mi:.4f} -> {-candidate.mi:.4f})")
        reasons.append(f"The {candidate.stage} stage was rejected: {reason}.")
    if reasons:
        kept = "the start position (nothing was changed)" if best is scores[0] else f"the {best.stage} stage"
        reasons.append(f"The result is {kept}: check it before relying on it.")
    return best, reasons
