"""Evaluate a model end to end through ``register()`` on pairs it never trained on.

    python -m training.evaluate --model PATH --kind mrus     [--iterations 0 50] [--json OUT]
    python -m training.evaluate --model PATH --kind generic  [--iterations 0 40] [--json OUT]
    python -m training.evaluate --kind mrus-references                            [--json OUT]

``mrus``: the held-out mrus_sim pairs of the training split (config seed and size), centres
aligned first; median landmark-centroid TRE, median gland Dice, folding. ``generic``: the
held-out MNI152 T1 (128^3 at 1 mm around its centre) through smooth synthetic fields (median
displacement 3 mm inside the brain), monomodal and with an ultrasound-like moving image; median TRE at
landmarks inside the brain, seconds per pair. ``mrus-references``: what the held-out mrus pairs
allow without a model (:func:`mrus_references`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegisterLib.imageio import center_alignment
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.metrics import dice_per_label
from DeepRegisterLib.registration import register
from DeepRegisterLib.spatial import Grid
from DeepRegisterLib.synthetic import DeformedPair, deformed_pair

from .data import label_centroids, pairs_from_folder, split
from .public_volumes import fetch

REPO = Path(__file__).resolve().parents[1]


def centroids(labels: sitk.Image, channels: slice = slice(1, None)) -> np.ndarray:
    """Physical centroids (C', 3) of ``channels`` (default the landmarks 1..) of a 4D label image
    (LPS mm), each channel thresholded at 0.5 (:func:`training.data.label_centroids` on its grid)."""
    masks = torch.from_numpy(sitk.GetArrayFromImage(labels)[channels] > 0.5).float()
    return label_centroids(masks, Grid.from_image(labels[:, :, :, 0])).double().numpy()


def blob_contrast(image: np.ndarray, blob: np.ndarray, gland: np.ndarray) -> float:
    """|mean inside ``blob`` - mean in a 3-voxel shell around it| / intensity std inside ``gland``
    (boolean (Z, Y, X) masks on ``image``'s grid): how visible a labelled structure is."""
    mask = sitk.GetImageFromArray(blob.astype(np.uint8))
    shell = sitk.GetArrayFromImage(sitk.BinaryDilate(mask, [3, 3, 3])).astype(bool) & ~blob
    return float(abs(image[blob].mean() - image[shell].mean()) / max(image[gland].std(), 1e-6))


def mrus_references(data: Path, held_out: int, seed: int) -> dict:
    """What the held-out pairs allow without a model: landmark TRE (mm) after aligning the image
    centres (where registration starts) and after translating by the gland-centroid offset (the
    gland's own position, known exactly); and the landmarks' visibility (:func:`blob_contrast`) in
    each image, against the same blobs shifted by up to 6 voxels (seeded), i.e. no structure."""
    _, pairs = split(pairs_from_folder(data), held_out, seed)
    rng = np.random.default_rng(0)
    centred, gland_shift, contrast = [], [], {"fixed": [], "moving": [], "fixed shifted": [], "moving shifted": []}
    for pair in pairs:
        fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
        fixed_points, moving_points = centroids(fixed_labels), centroids(moving_labels)
        centred += tre(fixed_points, moving_points, center_alignment(sitk.ReadImage(str(pair.fixed)),
                                                                     sitk.ReadImage(str(pair.moving)))).tolist()
        offset = centroids(moving_labels, slice(0, 1))[0] - centroids(fixed_labels, slice(0, 1))[0]
        gland_shift += tre(fixed_points, moving_points, sitk.TranslationTransform(3, offset.tolist())).tolist()
        for side, path, labels in (("fixed", pair.fixed, fixed_labels), ("moving", pair.moving, moving_labels)):
            image = sitk.GetArrayFromImage(sitk.ReadImage(str(path), sitk.sitkFloat32))
            masks = sitk.GetArrayFromImage(labels) > 0.5  # (C, Z, Y, X)
            for channel in range(1, masks.shape[0]):
                blob = masks[channel]
                if blob.any():
                    contrast[side].append(blob_contrast(image, blob, masks[0]))
                    shifted = np.roll(blob, tuple(int(v) for v in rng.integers(-6, 7, 3)), axis=(0, 1, 2))
                    contrast[f"{side} shifted"].append(blob_contrast(image, shifted, masks[0]))
    finite = lambda values: [v for v in values if np.isfinite(v)]
    return {"pairs": len(pairs), "landmarks": len(finite(centred)),
            "tre_centres_aligned_median_mm": float(np.median(finite(centred))),
            "tre_gland_centroid_shift_median_mm": float(np.median(finite(gland_shift))),
            "landmark_contrast_median": {side: float(np.median(v)) for side, v in contrast.items()}}


def evaluate_mrus(model: str, iterations: int, data: Path, held_out: int, seed: int) -> dict:
    _, pairs = split(pairs_from_folder(data), held_out, seed)
    errors, dices, folds, seconds = [], [], [], []
    for pair in pairs:
        fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
        fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
        start = time.perf_counter()
        result = register(fixed, moving, model=model, iterations=iterations, device="cpu")
        seconds.append(time.perf_counter() - start)
        errors += tre(centroids(fixed_labels), centroids(moving_labels), result.transform).tolist()
        dices.append(dice_per_label(fixed_labels[:, :, :, 0], moving_labels[:, :, :, 0], result.transform)["label 1"])
        folds.append(result.folding_percent)
    return {"pairs": len(pairs), "landmarks": len(errors), "tre_median_mm": float(np.median(errors)),
            "dice_median": float(np.median(dices)), "folding_percent_max": float(np.max(folds)),
            "seconds_median": float(np.median(seconds))}


def brain_volume(size: int = 128, spacing_mm: float = 1.0) -> tuple[sitk.Image, Grid]:
    """The MNI152 T1 (intensities / 255, about [0, 1]) and a ``size``^3 grid around its centre."""
    t1 = sitk.ReadImage(str(fetch()[0]), sitk.sitkFloat32) / 255.0
    grid = Grid.centered(Grid.from_image(t1).center, (size,) * 3, (spacing_mm,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
    return t1, grid


def synthetic_brain_pair(seed: int, ultrasound: bool) -> DeformedPair:
    """MNI152 T1 (128^3 at 1 mm) as moving; fixed = moving through a smooth field (median 3 mm)."""
    volume, grid = brain_volume()
    return deformed_pair(volume, grid, np.random.default_rng(seed), 3.0, ultrasound)


def evaluate_generic(model: str, iterations: int, pairs: int = 4) -> dict:
    results = {}
    for name, ultrasound in (("monomodal", False), ("ultrasound-like", True)):
        errors, before, seconds, folds = [], [], [], []
        for seed in range(pairs):
            pair = synthetic_brain_pair(100 + seed, ultrasound)
            start = time.perf_counter()
            result = register(pair.fixed, pair.moving, model=model, iterations=iterations, device="cpu")
            seconds.append(time.perf_counter() - start)
            before += tre(pair.fixed_points, pair.moving_points).tolist()
            errors += tre(pair.fixed_points, pair.moving_points, result.transform).tolist()
            folds.append(result.folding_percent)
        results[name] = {"pairs": pairs, "tre_before_median_mm": float(np.median(before)),
                         "tre_median_mm": float(np.median(errors)), "seconds_median": float(np.median(seconds)),
                         "folding_percent_max": float(np.max(folds))}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model name or folder; omit for fine-tuning alone")
    parser.add_argument("--kind", choices=["mrus", "generic", "mrus-references"], required=True)
    parser.add_argument("--iterations", type=int, nargs="+", default=[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrus_sim")
    parser.add_argument("--validation-pairs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.kind == "mrus-references":
        report = mrus_references(args.data, args.validation_pairs, args.seed)
        print(json.dumps(report), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    report = {}
    for iterations in args.iterations:
        if args.kind == "mrus":
            report[iterations] = evaluate_mrus(args.model, iterations, args.data, args.validation_pairs, args.seed)
        else:
            report[iterations] = evaluate_generic(args.model, iterations)
        print(json.dumps({"iterations": iterations, **report[iterations]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
