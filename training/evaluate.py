"""Evaluate a model end to end through ``register()`` on pairs it never trained on.

    python -m training.evaluate --model PATH --kind mrus     [--iterations 0 50] [--json OUT]
    python -m training.evaluate --model PATH --kind generic  [--iterations 0 40] [--median-mm 3] [--pairs 4] [--json OUT]
    python -m training.evaluate --kind mrus-references                            [--json OUT]
    (mrus kinds: [--split held-out|training] [--max-pairs N])

``mrus``: the held-out mrus_sim pairs of the training split (config seed and size), centres
aligned first; median landmark-centroid TRE, median gland Dice, folding. ``generic``: the
held-out MNI152 T1 (128^3 at 1 mm around its centre) through smooth synthetic fields (median
displacement 3 mm inside the brain, or ``--median-mm``), monomodal and with an ultrasound-like moving image; median TRE at
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

from .data import PairFiles, label_centroids, pairs_from_folder, split, subjects
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


def patch(image: sitk.Image, centre: np.ndarray, half_width_mm: float = 6.0, step_mm: float = 1.5) -> np.ndarray:
    """Intensities (flat) of ``image`` on an axis-aligned cube of side 2 ``half_width_mm`` around
    the physical point ``centre`` (linear interpolation, zero outside)."""
    count = int(round(2 * half_width_mm / step_mm)) + 1
    reference = sitk.Image([count] * 3, sitk.sitkFloat32)
    reference.SetSpacing([step_mm] * 3)
    reference.SetOrigin((np.asarray(centre, dtype=float) - half_width_mm).tolist())
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0)).ravel()


def patch_correlations(fixed: sitk.Image, moving: sitk.Image, fixed_points: np.ndarray, moving_points: np.ndarray,
                       shift_mm: float = 4.0) -> np.ndarray:
    """(N, 7) |normalised correlation| of the moving patch at each moving point with the fixed patch
    at its fixed point (column 0) and at that point moved by +-``shift_mm`` along x, y, z (1-6):
    whether the images show the correspondence locally."""
    def correlation(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a - a.mean(), b - b.mean()
        norm = float(np.sqrt((a * a).sum() * (b * b).sum()))
        return abs(float((a * b).sum())) / norm if norm > 0 else 0.0  # a flat patch shows nothing

    offsets = np.vstack([np.zeros(3), shift_mm * np.eye(3), -shift_mm * np.eye(3)])
    rows = []
    for fixed_point, moving_point in zip(fixed_points, moving_points):
        reference = patch(moving, moving_point) if np.isfinite([*fixed_point, *moving_point]).all() else None
        if reference is None or reference.std() == 0:
            continue
        rows.append([correlation(reference, patch(fixed, fixed_point + offset)) for offset in offsets])
    return np.asarray(rows).reshape(-1, len(offsets))


def gland_label_registration(fixed_labels: sitk.Image, moving_labels: sitk.Image, initial: sitk.Transform
                             ) -> dict[str, sitk.Transform]:
    """Fixed -> moving transforms fitted to the gland LABELS themselves (channel 0, smoothed by
    sigma 2 mm, mean squares, SimpleITK): "affine", then "affine + B-spline" (4^3 mesh, L-BFGS-B)
    on top of it. What aligning the visible organ exactly would give; no image is used."""
    fixed = sitk.SmoothingRecursiveGaussian(sitk.Cast(fixed_labels[:, :, :, 0], sitk.sitkFloat32), 2.0)
    moving = sitk.SmoothingRecursiveGaussian(sitk.Cast(moving_labels[:, :, :, 0], sitk.sitkFloat32), 2.0)

    def mean_squares() -> sitk.ImageRegistrationMethod:
        method = sitk.ImageRegistrationMethod()
        method.SetMetricAsMeanSquares()
        method.SetInterpolator(sitk.sitkLinear)
        return method

    affine = sitk.AffineTransform(3)
    center = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    affine.SetCenter(center)
    affine.SetTranslation((np.asarray(initial.TransformPoint(center)) - center).tolist())  # starts at ``initial``
    method = mean_squares()
    method.SetOptimizerAsRegularStepGradientDescent(1.0, 1e-3, 100)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel([2, 1])
    method.SetSmoothingSigmasPerLevel([1, 0])
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, moving)
    bspline = sitk.BSplineTransformInitializer(fixed, [4, 4, 4])
    method = mean_squares()
    method.SetOptimizerAsLBFGSB(1e-5, 50)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    return {"affine": affine, "affine + B-spline": sitk.CompositeTransform([affine, bspline])}


def mrus_references(pairs: list[PairFiles]) -> dict:
    """What the pairs allow without a model: landmark TRE (mm) after aligning the image centres
    (where registration starts), after translating by the gland-centroid offset and after
    :func:`gland_label_registration` (the gland's own position and shape, known exactly), with
    the gland Dice of the latter; and the landmarks' visibility (:func:`blob_contrast`) in each
    image, against the same blobs shifted by up to 6 voxels (seeded), i.e. no structure.

    How consistently a pair's landmarks move: in pairs with two or more landmarks, the error of
    predicting each landmark by the mean TRUE displacement of the pair's other landmarks (knowledge
    no registration has), next to the gland-centroid offset on the same landmarks. Where landmarks
    followed one smooth deformation the former would be the smaller. And whether the images show
    the landmarks' correspondence locally (:func:`patch_correlations`)."""
    rng = np.random.default_rng(0)
    centred, gland_shift, contrast = [], [], {"fixed": [], "moving": [], "fixed shifted": [], "moving shifted": []}
    fitted: dict[str, list[float]] = {}
    fitted_dice: dict[str, list[float]] = {}
    from_others, from_gland, correlations = [], [], []
    for pair in pairs:
        fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
        fixed_points, moving_points = centroids(fixed_labels), centroids(moving_labels)
        fixed, moving = (sitk.ReadImage(str(path), sitk.sitkFloat32) for path in (pair.fixed, pair.moving))
        centres = center_alignment(fixed, moving)
        centred += tre(fixed_points, moving_points, centres).tolist()
        offset = centroids(moving_labels, slice(0, 1))[0] - centroids(fixed_labels, slice(0, 1))[0]
        gland_shift += tre(fixed_points, moving_points, sitk.TranslationTransform(3, offset.tolist())).tolist()
        displacements = moving_points - fixed_points
        displacements = displacements[np.isfinite(displacements).all(axis=1)]
        for index in range(len(displacements) if len(displacements) > 1 else 0):
            others = np.delete(displacements, index, axis=0).mean(axis=0)
            from_others.append(float(np.linalg.norm(displacements[index] - others)))
            from_gland.append(float(np.linalg.norm(displacements[index] - offset)))
        for name, transform in gland_label_registration(fixed_labels, moving_labels, centres).items():
            fitted.setdefault(name, []).extend(tre(fixed_points, moving_points, transform).tolist())
            fitted_dice.setdefault(name, []).append(
                dice_per_label(fixed_labels[:, :, :, 0], moving_labels[:, :, :, 0], transform)["label 1"])
        correlations.append(patch_correlations(fixed, moving, fixed_points, moving_points))
        for side, volume, labels in (("fixed", fixed, fixed_labels), ("moving", moving, moving_labels)):
            image = sitk.GetArrayFromImage(volume)
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
            "gland_label_registration": {name: {"tre_median_mm": float(np.median(finite(errors))),
                                                "dice_median": float(np.median(fitted_dice[name]))}
                                         for name, errors in fitted.items()},
            "landmark_contrast_median": {side: float(np.median(v)) for side, v in contrast.items()},
            "other_landmarks": {"landmarks": len(from_others),
                                "tre_other_landmarks_translation_median_mm": float(np.median(from_others)),
                                "tre_gland_centroid_shift_median_mm": float(np.median(from_gland))}
            if from_others else None,
            "patch_correlation": patch_correlation_summary(np.vstack(correlations))}


def patch_correlation_summary(correlations: np.ndarray) -> dict:
    """Mean |NCC| at the true correspondence and at the shifted places; how often the true one is best."""
    return {"landmarks": len(correlations), "mean_abs_ncc_true": float(correlations[:, 0].mean()),
            "mean_abs_ncc_shifted": [float(v) for v in correlations[:, 1:].mean(axis=0)],
            "true_best": int((correlations[:, 0] >= correlations.max(axis=1)).sum()),
            "true_best_by_chance": len(correlations) / correlations.shape[1]}


def evaluate_mrus(model: str, iterations: int, pairs: list[PairFiles]) -> dict:
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


def synthetic_brain_pair(seed: int, ultrasound: bool, median_mm: float = 3.0) -> DeformedPair:
    """MNI152 T1 (128^3 at 1 mm) as moving; fixed = moving through a smooth field (``median_mm``
    median displacement inside the brain)."""
    volume, grid = brain_volume()
    return deformed_pair(volume, grid, np.random.default_rng(seed), median_mm, ultrasound)


def evaluate_generic(model: str, iterations: int, pairs: int = 4, median_mm: float = 3.0) -> dict:
    results = {}
    for name, ultrasound in (("monomodal", False), ("ultrasound-like", True)):
        errors, before, seconds, folds = [], [], [], []
        for seed in range(pairs):
            pair = synthetic_brain_pair(100 + seed, ultrasound, median_mm)
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
    parser.add_argument("--split", choices=["held-out", "training"], default="held-out",
                        help="mrus kinds: the held-out pairs (default) or the training pairs")
    parser.add_argument("--max-pairs", type=int, help="mrus kinds: only the first N pairs of the split")
    parser.add_argument("--median-mm", type=float, default=3.0,
                        help="generic: median displacement of the synthetic fields inside the brain (mm)")
    parser.add_argument("--pairs", type=int, default=4, help="generic: pairs per kind (monomodal, ultrasound-like)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pairs: list[PairFiles] = []
    if args.kind != "generic":
        training_pairs, held_out_pairs = split(pairs_from_folder(args.data), args.validation_pairs, args.seed)
        pairs = (held_out_pairs if args.split == "held-out" else training_pairs)[:args.max_pairs]
        subject_count = len(set(subjects(pairs)))  # once: it reads every moving image
    if args.kind == "mrus-references":
        report = {**mrus_references(pairs), "subjects": subject_count}
        print(json.dumps(report), flush=True)
        if args.json:
            args.json.write_text(json.dumps(report, indent=2))
        return
    report = {}
    for iterations in args.iterations:
        if args.kind == "mrus":
            report[iterations] = {**evaluate_mrus(args.model, iterations, pairs), "subjects": subject_count}
        else:
            report[iterations] = evaluate_generic(args.model, iterations, args.pairs, args.median_mm)
        print(json.dumps({"iterations": iterations, **report[iterations]}), flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
