"""Pair datasets for training: DeepReg/label-reg folder layout or a CSV of pairs.

Each pair is prepared exactly as :func:`DeepRegisterLib.registration.register` prepares its
inputs (model grid centred on the fixed image, moving image shifted so the centres coincide,
percentile intensity window), so a trained network sees at inference what it saw in training.
Labels follow the images: 4D (x, y, z, channel) images, channel 0 the gland, others landmarks.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegisterLib.imageio import center_alignment, check_volume, read_image
from DeepRegisterLib.models import ModelCard
from DeepRegisterLib.preprocess import PairInputs, model_grid
from DeepRegisterLib.spatial import Grid

FOLDERS = ("fixed_images", "moving_images", "fixed_labels", "moving_labels")


@dataclass
class PairFiles:
    """Paths of one pair; labels may be None; ``subject`` names the patient when known (CSV column)."""

    name: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None
    subject: str | None = None


@dataclass
class PreparedPair:
    """One pair on the model grid: images (1, Z, Y, X) in [0, 1], labels (C, Z, Y, X) in [0, 1]."""

    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None
    moving_labels: torch.Tensor | None
    grid: Grid


def pairs_from_folder(root: str | Path) -> list[PairFiles]:
    """Pairs in the label-reg/DeepReg layout: same file name in fixed_images, moving_images and,
    when present, fixed_labels and moving_labels."""
    root = Path(root)
    if not (root / "fixed_images").is_dir() or not (root / "moving_images").is_dir():
        raise ValueError(f"{root} needs fixed_images/ and moving_images/ folders.")
    pairs = []
    for fixed in sorted(p for p in (root / "fixed_images").iterdir() if not p.name.startswith(".")):
        labels = [root / folder / fixed.name for folder in FOLDERS[2:]]
        pairs.append(PairFiles(fixed.name.split(".")[0], fixed, root / "moving_images" / fixed.name,
                               *(path if path.exists() else None for path in labels)))
    return pairs


def pairs_from_csv(path: str | Path) -> list[PairFiles]:
    """Pairs from a CSV with columns fixed, moving and optionally fixed_labels, moving_labels
    (paths relative to the CSV's folder) and subject (the patient: :func:`split` keeps a subject's
    pairs on one side)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise ValueError(f"{path} needs a header with at least the columns fixed,moving.")

    def resolve(value: str | None) -> Path | None:
        return (path.parent / value) if value else None

    return [PairFiles(Path(row["fixed"]).name.split(".")[0], resolve(row["fixed"]), resolve(row["moving"]),
                      resolve(row.get("fixed_labels")), resolve(row.get("moving_labels")), row.get("subject") or None)
            for row in rows]


def _labels_on_grid(path: Path | None, grid: Grid, transform: sitk.Transform) -> torch.Tensor | None:
    if path is None:
        return None
    labels = read_image(path)
    channels = [labels[:, :, :, c] for c in range(labels.GetSize()[3])] if labels.GetDimension() == 4 else [labels]
    reference = grid.reference_image()
    resampled = [sitk.GetArrayFromImage(sitk.Resample(sitk.Cast(c, sitk.sitkFloat32), reference, transform,
                                                      sitk.sitkLinear, 0.0)) for c in channels]
    return torch.from_numpy(np.stack(resampled).astype(np.float32))


def prepare_pair(files: PairFiles, card: ModelCard) -> PreparedPair:
    """Read a pair and resample it onto the card's model grid, as registration does."""
    fixed = check_volume(read_image(files.fixed), "fixed")
    moving = check_volume(read_image(files.moving), "moving")
    grid = model_grid(fixed, card)
    inputs = PairInputs.prepare(fixed, moving, card, center_alignment(fixed, moving))
    fixed_t, moving_t = (t[0] for t in inputs.on(grid, torch.device("cpu")))
    return PreparedPair(files.name, fixed_t, moving_t, _labels_on_grid(files.fixed_labels, grid, sitk.Transform()),
                        _labels_on_grid(files.moving_labels, grid, inputs.shift), grid)


def _fingerprint(path: Path) -> tuple[tuple, np.ndarray]:
    """(size, spacing) and the standardised intensities of an image on a subgrid of <= ~32^3 voxels."""
    image = read_image(path)
    stride = max(1, -(-max(image.GetSize()) // 32))
    values = sitk.GetArrayViewFromImage(image)[::stride, ::stride, ::stride].astype(np.float32).ravel()
    key = (image.GetSize(), tuple(round(s, 4) for s in image.GetSpacing()))
    return key, (values - values.mean()) / max(float(values.std()), 1e-6)


def subjects(pairs: list[PairFiles], same: float = 0.99) -> list[str]:
    """The subject (patient) of each pair: its ``subject`` where given; otherwise pairs whose moving
    images are one volume, i.e. the same file, or the same grid with normalised correlation >=
    ``same`` (a perturbed copy: mrus_sim's 96 pairs share 66 MR volumes), count as one subject."""
    names: list[str] = []
    seen: list[tuple[tuple, np.ndarray, str]] = []
    by_path: dict[Path, str] = {}
    for pair in pairs:
        if pair.subject:
            names.append(pair.subject)
            continue
        path = pair.moving.resolve()
        if path not in by_path:
            key, values = _fingerprint(path)
            match = next((name for k, v, name in seen if k == key and float(v @ values) / len(v) >= same), None)
            by_path[path] = match or pair.name
            seen.append((key, values, by_path[path]))
        names.append(by_path[path])
    return names


def split(pairs: list[PairFiles], validation: int, seed: int) -> tuple[list[PairFiles], list[PairFiles]]:
    """A fixed random split by subject (:func:`subjects`): whole subjects are held out (never
    trained on) until at least ``validation`` pairs are, the rest are for training. With one pair
    per subject this is a random choice of ``validation`` pairs; with a single subject, too (warned)."""
    owner = subjects(pairs)
    if len(set(owner)) < 2:
        warnings.warn(f"All {len(pairs)} pairs are one subject: held-out pairs share it with training pairs.")
        owner = [pair.name for pair in pairs]
    names = list(dict.fromkeys(owner))
    held: set[str] = set()
    for index in np.random.default_rng(seed).permutation(len(names)):
        if sum(o in held for o in owner) >= validation or len(held) == len(names) - 1:
            break
        held.add(names[int(index)])
    return [p for p, o in zip(pairs, owner) if o not in held], [p for p, o in zip(pairs, owner) if o in held]


def label_centroids(labels: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Physical centroids (C, 3) in mm of label channels (C, Z, Y, X) on ``grid`` (NaN when empty)."""
    from DeepRegisterLib.spatial import physical_points

    points = physical_points(grid).reshape(-1, 3)
    weights = labels.reshape(labels.shape[0], -1)
    total = weights.sum(dim=1, keepdim=True)
    return (weights @ points) / total.where(total > 0, torch.full_like(total, float("nan")))
