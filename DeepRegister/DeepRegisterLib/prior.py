"""Gland-anchored motion prior (issue #23; Hu et al., MedIA 2012: statistical motion of the gland).

A model whose network segments the organ (the gland) in both images may carry, on its card, a
population affine fitted on its training pairs: a fixed point ``x`` (LPS mm) maps to the moving point

    x + (c_moving - c_fixed) + A (x - c_fixed) + b

where ``c_fixed`` and ``c_moving`` are the centroids of the gland found in each image, and ``A`` (3 x 3)
and ``b`` (mm) are the card's ``gland_prior`` ``matrix`` and ``offset_mm``: how the tissue around the
gland moves on average, relative to the gland. Twelve numbers in the card's JSON: nothing to unpickle.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .spatial import Grid, physical_points

MIN_GLAND_VOXELS = 8  # fewer segmented voxels than this: no centroid, no prior


@dataclass(frozen=True)
class GlandPrior:
    """The card's population affine: ``matrix`` A (3 x 3, unitless), ``offset`` b (3, mm)."""

    matrix: np.ndarray
    offset: np.ndarray

    @classmethod
    def from_card(cls, entry: dict) -> GlandPrior | None:
        """The prior of a card's ``gland_prior`` entry (checked by :func:`DeepRegisterLib.models.read_card`),
        None when the card has none."""
        if not entry:
            return None
        return cls(np.asarray(entry["matrix"], dtype=float), np.asarray(entry["offset_mm"], dtype=float))

    def to_card(self) -> dict:
        return {"matrix": self.matrix.tolist(), "offset_mm": self.offset.tolist()}

    def displacement_on(self, grid: Grid, fixed_centroid: np.ndarray, moving_centroid: np.ndarray,
                        device: torch.device | str = "cpu") -> torch.Tensor:
        """The prior's displacement (1, 3, Z, Y, X) in mm (LPS) at the voxels of ``grid``."""
        points = physical_points(grid, torch.float64, device)  # (Z, Y, X, 3)
        matrix = torch.as_tensor(self.matrix, dtype=torch.float64, device=device)
        shift = torch.as_tensor(moving_centroid - fixed_centroid + self.offset, dtype=torch.float64, device=device)
        centre = torch.as_tensor(fixed_centroid, dtype=torch.float64, device=device)
        field = (points - centre) @ matrix.T + shift
        return field.permute(3, 0, 1, 2)[None].float()

    @staticmethod
    def fit(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> GlandPrior:
        """Least squares over every landmark of ``samples`` (fixed centroid, moving centroid, fixed
        points (N, 3), moving points (N, 3); mm): the A and b whose prior best predicts the moving points."""
        rows = np.concatenate([np.c_[fixed - cf, np.ones(len(fixed))] for cf, cm, fixed, moving in samples])
        targets = np.concatenate([moving - fixed - (cm - cf) for cf, cm, fixed, moving in samples])
        weights = np.linalg.lstsq(rows, targets, rcond=None)[0]  # (4, 3): rows @ weights = residual
        return GlandPrior(weights[:3].T.copy(), weights[3].copy())


def gland_centroid(segmentation: torch.Tensor, grid: Grid) -> np.ndarray | None:
    """Physical centroid (3, mm) of a segmentation (1, 1, Z, Y, X) probability map on ``grid``
    (voxels above 0.5), or None when fewer than MIN_GLAND_VOXELS are."""
    inside = (segmentation[0, 0] > 0.5).reshape(-1).double()
    if float(inside.sum()) < MIN_GLAND_VOXELS:
        return None
    points = physical_points(grid, torch.float64, segmentation.device).reshape(-1, 3)
    return (inside @ points / inside.sum()).cpu().numpy()


def prior_displacement(prior: GlandPrior, outputs: dict[str, torch.Tensor], grid: Grid,
                       messages: list[str]) -> torch.Tensor | None:
    """The prior's displacement (1, 3, Z, Y, X) in mm on the network's ``grid`` from the glands its
    segmenters found ("fixed_segmentation", "moving_segmentation" on ``grid``, the moving one in the
    frame the network saw); None, with a message, when either image shows no gland."""
    if "fixed_segmentation" not in outputs:
        messages.append("The model's card has a gland prior but its network gives no gland maps: its own "
                        "displacement was used.")
        return None
    fixed_centroid = gland_centroid(outputs["fixed_segmentation"], grid)
    moving_centroid = gland_centroid(outputs["moving_segmentation"], grid)
    if fixed_centroid is None or moving_centroid is None:
        messages.append("The network found no gland in one image: its own displacement was used, not the gland prior.")
        return None
    messages.append("The model's gland-anchored motion prior placed the moving image from the glands its "
                    "segmenters found.")
    return prior.displacement_on(grid, fixed_centroid, moving_centroid, outputs["fixed_segmentation"].device)
