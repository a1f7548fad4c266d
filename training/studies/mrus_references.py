"""What the simulated MR/TRUS pairs allow without a model: the ``--kind mrus-references`` study of
``python -m deepregister_training.evaluate`` (:func:`mrus_references`) and its probes (:func:`blob_contrast`,
:func:`patch_correlations`, :func:`gland_label_registration`).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib.imageio import center_alignment
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.metrics import dice_per_label

from ..data import PairFiles
from ..evaluate import centroids


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
