"""Training objectives of the four seed methods: how a batch is drawn and what loss it gives.

All work on the canonical model grid (tensors (B, C, Z, Y, X), displacements in mm).
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegisterLib.losses import bending_energy, lncc_loss, mutual_information_loss, soft_dice
from DeepRegisterLib.filters import gaussian_smooth
from DeepRegisterLib.spatial import Grid, affine_displacement, sample, warp
from DeepRegisterLib.synthetic import multi_frequency_field, ultrasound_remap

from .data import PreparedPair, label_centroids

METHODS = ("weakly_supervised", "unsupervised", "synthetic_supervised", "linear_deformable")
LABEL_LOSSES = ("dice", "cross_entropy")
_TINY = 1e-12  # log guard; written out because autocast refuses torch's binary_cross_entropy


def charbonnier(x: torch.Tensor, epsilon: float = 1e-3) -> torch.Tensor:
    """rho(x) = sqrt(x^2 + eps^2), the robust penalty of the joint-saliency reference."""
    return torch.sqrt(x * x + epsilon * epsilon)


def image_gradients(volume: torch.Tensor, spacing: tuple[float, float, float]) -> list[torch.Tensor]:
    """Forward differences along x, y, z in intensity per mm, cropped to a common shape."""
    x = (volume[..., 1:] - volume[..., :-1])[:, :, :-1, :-1, :] / spacing[0]
    y = (volume[..., 1:, :] - volume[..., :-1, :])[:, :, :-1, :, :-1] / spacing[1]
    z = (volume[:, :, 1:] - volume[:, :, :-1])[:, :, :, :-1, :-1] / spacing[2]
    return [x, y, z]


def similarity(kind: str, fixed: torch.Tensor, warped: torch.Tensor, spacing: tuple[float, float, float]) -> torch.Tensor:
    """Image dissimilarity: "charbonnier" (intensity + 20 x gradient-magnitude terms, the reference's
    unsupervised loss), "lncc", "mi" or "mse"."""
    if kind == "lncc":
        return lncc_loss(fixed, warped)
    if kind == "mi":
        return sum(mutual_information_loss(f, w) for f, w in zip(fixed, warped)) / len(fixed)
    if kind == "mse":
        return ((fixed - warped) ** 2).mean()
    if kind == "charbonnier":
        magnitude = lambda v: torch.sqrt(sum(g * g for g in image_gradients(v, spacing)) + 1e-8)
        return charbonnier(fixed - warped).mean() + 20.0 * charbonnier(magnitude(fixed) - magnitude(warped)).mean()
    raise ValueError(f"Unknown similarity '{kind}': use charbonnier, lncc, mi or mse.")


def multiscale_dice(fixed: torch.Tensor, warped: torch.Tensor, scales_voxels: list[float],
                    spacing: tuple[float, float, float]) -> torch.Tensor:
    """1 - soft Dice averaged over Gaussian smoothing scales (voxels; 0 = unsmoothed), per Hu et al."""
    losses = []
    for scale in scales_voxels:
        a = gaussian_smooth(fixed, scale * min(spacing), spacing) if scale else fixed
        b = gaussian_smooth(warped, scale * min(spacing), spacing) if scale else warped
        losses.append(1.0 - soft_dice(a, b).mean())
    return sum(losses) / len(losses)


def binary_cross_entropy(probability: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Voxelwise -[t log p + (1 - t) log(1 - p)] of a probability map against a target in [0, 1]."""
    return -(target * torch.log(probability + _TINY) + (1 - target) * torch.log(1 - probability + _TINY))


def segmentation_loss(probability: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """1 - soft Dice + binary cross-entropy of a predicted organ probability against its label
    (both (B, 1, Z, Y, X) in [0, 1]); cross-entropy keeps the gradient alive where Dice alone
    lets a fresh network collapse to an empty map."""
    return 1.0 - soft_dice(probability, label).mean() + binary_cross_entropy(probability, label).mean()


def smoothed_labels(labels: torch.Tensor, grid: Grid, sigma_mm: float) -> torch.Tensor:
    """Hu et al.'s label smoothing (ISBI 2018) of labels (B, 1, Z, Y, X) in [0, 1] on ``grid``: the
    foreground (>= 0.5) keeps its one-hot probability 1, the background gets a spatially smoothed
    probability exp(-d^2 / (2 sigma^2)) of its Euclidean distance d (mm) to the foreground (soft
    values of a resampled label's edge are kept where larger). Empty labels stay zero. No gradient."""
    smoothed = labels.detach().clone()
    for item in range(labels.shape[0]):
        mask = (labels[item, 0] >= 0.5).cpu().numpy().astype(np.uint8)
        if not mask.any():
            continue
        image = sitk.GetImageFromArray(mask)
        image.SetSpacing(grid.spacing)
        distance = sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(
            image, insideIsPositive=False, squaredDistance=False, useImageSpacing=True)).clip(min=0.0)
        decay = torch.from_numpy(np.exp(-distance ** 2 / (2.0 * sigma_mm ** 2))).to(labels)
        smoothed[item, 0] = torch.maximum(smoothed[item, 0], decay)
    return smoothed


def label_cross_entropy(fixed: torch.Tensor, warped: torch.Tensor, present: torch.Tensor | None = None) -> torch.Tensor:
    """Cross-entropy of the warped moving label against the fixed label, both smoothed by
    :func:`smoothed_labels` ((B, 1, Z, Y, X) in [0, 1]). Each item's sum over voxels is divided by
    the mean mass of its two maps, so that every label weighs the same however large it is (a 4 mm
    landmark as much as the gland), as Hu et al. normalise their smoothed maps; then the mean over
    the items marked ``present`` ((B,) bool, default all: the caller leaves out labels that
    augmentation moved off the grid in either image; zero when none is). The warped map is clamped
    to [1e-6, 1 - 1e-6]: interpolation may overshoot 1 by a rounding error, and a voxel the other
    map does not reach costs at most -log(1e-6) = 13.8."""
    dims = tuple(range(1, fixed.dim()))
    cross_entropy = binary_cross_entropy(warped.clamp(1e-6, 1.0 - 1e-6), fixed).sum(dim=dims)
    mass = (fixed.sum(dim=dims) + warped.sum(dim=dims)) / 2.0
    present = torch.ones_like(mass, dtype=torch.bool) if present is None else present
    if not present.any():
        return cross_entropy.sum() * 0.0
    return (cross_entropy[present] / mass[present].clamp_min(1e-6)).mean()


def labels_present(*labels: torch.Tensor) -> torch.Tensor:
    """(B,) bool: items whose label (B, 1, Z, Y, X) has a voxel >= 0.5 in every one of ``labels``."""
    return torch.stack([(label >= 0.5).flatten(1).any(dim=1) for label in labels]).all(dim=0)


def centroid_errors(fixed_labels: torch.Tensor, moving_labels: torch.Tensor, displacement: torch.Tensor,
                    grid: Grid) -> torch.Tensor:
    """Per label, the distance (mm) between the moving label's centroid and the fixed label's
    centroid mapped by ``displacement``: labels (B, C, Z, Y, X), displacement (B, 3, Z, Y, X) mm
    -> (B, C); NaN where a label is empty on either side (no gradient flows from those)."""
    fixed_centres = torch.stack([label_centroids(labels, grid) for labels in fixed_labels])
    moving_centres = torch.stack([label_centroids(labels, grid) for labels in moving_labels])
    points = fixed_centres.nan_to_num().view(fixed_centres.shape[0], -1, 1, 1, 3)
    mapped = fixed_centres + sample(displacement, points, grid, padding_mode="border")[:, :, :, 0, 0].transpose(1, 2)
    difference = mapped - moving_centres
    valid = difference.isfinite().all(dim=2)
    distances = difference.where(valid[..., None], torch.zeros_like(difference)).norm(dim=2)
    return distances.where(valid, torch.full_like(distances, float("nan")))


def centroid_distance(fixed_label: torch.Tensor, moving_label: torch.Tensor, displacement: torch.Tensor,
                      grid: Grid) -> torch.Tensor:
    """Mean :func:`centroid_errors` over the batch (labels (B, 1, Z, Y, X)); labels empty on either
    side are skipped. The landmark TRE of validation, as a loss."""
    errors = centroid_errors(fixed_label, moving_label, displacement, grid)
    valid = errors.isfinite()
    if not valid.any():
        return displacement.new_zeros(())
    return errors[valid].mean()


class Objective:
    """Draws batches and computes the loss of one method from its config."""

    def __init__(self, config: dict, grid: Grid, device: torch.device) -> None:
        self.method = config["method"]
        self.loss_config = config.get("loss", {})
        self.augment = config["training"].get("augment", {})
        self.grid, self.device = grid, device
        self.label_loss = self.loss_config.get("label", "dice")
        if self.label_loss not in LABEL_LOSSES:
            raise ValueError(f"Unknown label loss '{self.label_loss}': use {' or '.join(LABEL_LOSSES)}.")

    # -- batches ---------------------------------------------------------------------------
    def batch(self, pairs: list[PreparedPair], size: int, rng: np.random.Generator) -> dict[str, torch.Tensor]:
        chosen = [pairs[i] for i in rng.integers(0, len(pairs), size)]
        if self.method == "synthetic_supervised":
            return self._synthetic(chosen, rng)
        fixed = torch.stack([p.fixed for p in chosen])
        moving = torch.stack([p.moving for p in chosen])
        batch = {"fixed": fixed, "moving": moving}
        if self.method == "weakly_supervised":
            labels = []
            for pair in chosen:
                count = pair.fixed_labels.shape[0]
                weights = np.r_[float(self.loss_config.get("gland_weight", 2.0)), np.ones(count - 1)]
                channel = int(rng.choice(count, p=weights / weights.sum()))
                labels.append((pair.fixed_labels[channel:channel + 1], pair.moving_labels[channel:channel + 1]))
            batch["fixed_label"] = torch.stack([f for f, _ in labels])
            batch["moving_label"] = torch.stack([m for _, m in labels])
            if self.loss_config.get("segmentation", 0.0):  # the organ (channel 0) of every pair
                batch["fixed_organ"] = torch.stack([p.fixed_labels[:1] for p in chosen])
                batch["moving_organ"] = torch.stack([p.moving_labels[:1] for p in chosen])
        batch = self._augment(batch, rng)
        if self.method == "weakly_supervised" and self.label_loss == "cross_entropy":
            sigma = float(self.loss_config.get("label_smoothing_mm", 6.0))
            for side in ("fixed", "moving"):  # after augmentation: the maps follow the labels' final place
                batch[f"{side}_smoothed"] = smoothed_labels(batch[f"{side}_label"], self.grid, sigma)
        return {key: value.to(self.device) for key, value in batch.items()}

    def _random_affine(self, size: int, rng: np.random.Generator) -> torch.Tensor:
        scale = float(self.augment.get("affine", 0.0))
        shift = float(self.augment.get("translation_mm", 0.0))
        theta = torch.eye(3, 4).repeat(size, 1, 1)
        theta[:, :, :3] += torch.as_tensor(rng.uniform(-scale, scale, (size, 3, 3)), dtype=torch.float32)
        theta[:, :, 3] += torch.as_tensor(rng.uniform(-shift, shift, (size, 3)), dtype=torch.float32)
        return theta

    def _random_field(self, size: int, rng: np.random.Generator) -> torch.Tensor:
        """(size, 3, Z, Y, X) mm: per item, a :func:`multi_frequency_field` whose largest magnitude
        is drawn uniformly from [0, ``field_mm``]."""
        limit = float(self.augment.get("field_mm", 0.0))
        return torch.cat([multi_frequency_field(self.grid, float(rng.uniform(0.0, limit)), rng) for _ in range(size)])

    def _augment(self, batch: dict[str, torch.Tensor], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """Per image, a random affine plus a random smooth field (one warp; its labels follow) and
        random gamma/contrast/noise."""
        size = batch["fixed"].shape[0]
        for image in ("fixed", "moving"):
            fields = [affine_displacement(self._random_affine(size, rng), self.grid)] \
                if self.augment.get("affine", 0.0) or self.augment.get("translation_mm", 0.0) else []
            if self.augment.get("field_mm", 0.0):
                fields.append(self._random_field(size, rng))
            if fields:
                field = sum(fields)
                batch[image] = warp(batch[image], field, self.grid, padding_mode="border")
                for label in (f"{image}_label", f"{image}_organ"):
                    if label in batch:
                        batch[label] = warp(batch[label], field, self.grid)
            if self.augment.get("intensity", False):
                gamma = torch.as_tensor(np.exp(rng.uniform(-0.3, 0.3, (size, 1, 1, 1, 1))), dtype=torch.float32)
                noise = torch.as_tensor(rng.normal(0, 0.02, batch[image].shape), dtype=torch.float32)
                batch[image] = (batch[image].clamp(0, 1) ** gamma + noise).clamp(0, 1)
        return batch

    def _synthetic(self, chosen: list[PreparedPair], rng: np.random.Generator) -> dict[str, torch.Tensor]:
        """RegNet regime: moving = an image, fixed = the image through a known smooth field (random
        peaks at three spatial frequencies, median magnitude drawn from ``median_mm``) plus noise;
        the moving image is given an ultrasound-like appearance with probability ``ultrasound``."""
        images, fields = [], []
        low, high = self.loss_config.get("median_mm", [0.5, 4.0])
        for pair in chosen:
            images.append(pair.fixed if rng.random() < 0.5 else pair.moving)
            # Dense peaks (about one per Gaussian volume of the finest scale), so every region moves;
            # scaled to a random median displacement magnitude.
            peaks = int(np.prod(self.grid.size) * (min(self.grid.spacing) / 12.0) ** 3) + 60
            field = multi_frequency_field(self.grid, 1.0, rng, peaks=peaks)[0]
            fields.append(field * (float(rng.uniform(low, high)) / float(field.norm(dim=0).median())))
        moving, field = torch.stack(images), torch.stack(fields)
        mask = moving > 0.1  # the anatomy, before any remapping
        fixed = warp(moving, field, self.grid, padding_mode="border")
        fixed = (fixed + torch.as_tensor(rng.normal(0, 0.02, fixed.shape), dtype=torch.float32)).clamp(0, 1)
        for index in range(len(moving)):
            if rng.random() < float(self.loss_config.get("ultrasound", 0.5)):
                moving[index, 0] = torch.from_numpy(ultrasound_remap(moving[index, 0].numpy(), rng,
                                                                     float(rng.uniform(0, math.pi))))
        return {key: value.to(self.device) for key, value in
                {"fixed": fixed, "moving": moving, "field": field, "mask": mask}.items()}

    # -- losses ----------------------------------------------------------------------------
    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        output = model(batch["fixed"], batch["moving"])
        displacement = output["displacement"].float()
        spacing = self.grid.spacing
        bending = float(self.loss_config.get("bending", 0.0)) * bending_energy(displacement, spacing)
        if self.method == "weakly_supervised":
            if self.label_loss == "cross_entropy":
                label = label_cross_entropy(batch["fixed_smoothed"], warp(batch["moving_smoothed"], displacement, self.grid),
                                            labels_present(batch["fixed_label"], batch["moving_label"]))
            else:
                warped = warp(batch["moving_label"], displacement, self.grid)
                label = multiscale_dice(batch["fixed_label"], warped,
                                        self.loss_config.get("scales_voxels", [0, 1, 2, 4, 8, 16]), spacing)
            centroid = float(self.loss_config.get("centroid", 0.0))
            distance = centroid_distance(batch["fixed_label"], batch["moving_label"], displacement, self.grid) \
                if centroid else 0.0
            loss = label + centroid * distance + bending
            if "fixed_organ" in batch and "fixed_segmentation" in output:
                loss = loss + float(self.loss_config["segmentation"]) * (
                    segmentation_loss(output["fixed_segmentation"].float(), batch["fixed_organ"])
                    + segmentation_loss(output["moving_segmentation"].float(), batch["moving_organ"]))
            return loss
        if self.method == "synthetic_supervised":
            return (displacement - batch["field"]).norm(dim=1).mean() + bending
        warped = warp(batch["moving"], displacement, self.grid, padding_mode="border")
        dissimilarity = similarity(self.loss_config.get("similarity", "charbonnier"), batch["fixed"], warped, spacing)
        if self.method == "unsupervised":
            smoothness = sum(charbonnier(g).mean() for g in image_gradients(displacement, spacing))
            return dissimilarity + float(self.loss_config.get("smoothness", 1.0)) * smoothness + bending
        eye = torch.eye(3, 4, device=displacement.device)
        alpha, beta = float(self.loss_config.get("alpha", 1e-6)), float(self.loss_config.get("beta", 1e-6))
        return (dissimilarity + alpha * (output["theta"].float() - eye).abs().sum()
                + beta * (output["gradients"].float() - 1.0).abs().sum())


def build(config: dict, grid: Grid, device: torch.device) -> Objective:
    return Objective(config, grid, device)
