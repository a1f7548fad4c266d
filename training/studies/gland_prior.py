"""A gland-anchored motion prior on the simulated MR/TRUS pairs (issue #23, first measurement).

The prior predicts each moving landmark from its fixed position and the two gland centroids:
``moving = fixed + (c_moving - c_fixed) + A (fixed - c_fixed) + b`` (LPS mm), ``A`` (3x3) and ``b``
fitted by least squares on the landmarks of training subjects only. Three variants are reported:
the centroid shift alone, plus the mean residual ``b``, plus the full affine. Gland centroids come
from the true labels or from the ``mrus`` network's segmentations (probability > 0.5) of each image.

    python -m deepregister_training.studies.gland_prior [--data ../shared/data/mrus_sim] [--json out.json]

Reported: medians of per-pair median TRE, the median and mean over all landmarks, the gland Dice of the
prior's affine, and leave-one-subject-out fits over all pairs (true glands) for comparison with the
figures quoted in issue #23.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegisterLib.imageio import center_alignment
from DeepRegisterLib.metrics import dice_per_label
from DeepRegisterLib.models import load_model
from DeepRegisterLib.preprocess import PairInputs, model_grid
from DeepRegisterLib.spatial import physical_points

from ..data import PairFiles, pairs_from_folder, split, subjects
from ..evaluate import centroids

VARIANTS = ("shift", "offset", "affine")


def pair_points(pair: PairFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """True gland centroids (fixed, moving) and the landmark centroids present in both labels."""
    fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
    fixed_points, moving_points = centroids(fixed_labels), centroids(moving_labels)
    both = np.isfinite(fixed_points).all(axis=1) & np.isfinite(moving_points).all(axis=1)
    return (centroids(fixed_labels, slice(0, 1))[0], centroids(moving_labels, slice(0, 1))[0],
            fixed_points[both], moving_points[both])


def predicted_glands(pair: PairFiles, model: str = "mrus") -> tuple[np.ndarray, np.ndarray]:
    """Gland centroids (fixed, moving; LPS mm) of the network's segmentations (> 0.5), from the card's start
    (image centres aligned): the network sees the moving image under that shift, so it is added back."""
    card, network = load_model(model, torch.device("cpu"))
    fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
    shift = center_alignment(fixed, moving)
    grid = model_grid(fixed, card)
    with torch.no_grad():
        outputs = network.register_pair(*PairInputs.prepare(fixed, moving, card, shift, None, None).on(grid, torch.device("cpu")))
    points = physical_points(grid).reshape(-1, 3).double()
    found = []
    for side in ("fixed", "moving"):
        weight = (outputs[f"{side}_segmentation"][0, 0] > 0.5).double().reshape(-1)
        found.append((weight @ points / weight.sum()).numpy())
    return found[0], found[1] + np.asarray(shift.GetOffset())


def fit(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Least-squares (4, 3) ``W``: residual = [fixed - c_fixed, 1] @ W over every landmark of ``samples``."""
    rows = [np.r_[p - cf, 1.0] for cf, cm, fixed, moving in samples for p in fixed]
    targets = [q - p - (cm - cf) for cf, cm, fixed, moving in samples for p, q in zip(fixed, moving)]
    return np.linalg.lstsq(np.asarray(rows), np.asarray(targets), rcond=None)[0]


def mean_offset(samples: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """``W`` of the mean residual alone (zero matrix part)."""
    weights = np.zeros((4, 3))
    weights[3] = np.mean([q - p - (cm - cf) for cf, cm, fixed, moving in samples for p, q in zip(fixed, moving)], axis=0)
    return weights


def prior_transform(cf: np.ndarray, cm: np.ndarray, weights: np.ndarray) -> sitk.AffineTransform:
    """The prior as a fixed -> moving affine transform: x -> x + (cm - cf) + [x - cf, 1] @ W."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.eye(3) + weights[:3].T).ravel().tolist())
    transform.SetTranslation((cm - cf + weights[3] - weights[:3].T @ cf).tolist())
    return transform


def errors(sample: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray], weights: np.ndarray) -> np.ndarray:
    cf, cm, fixed, moving = sample
    transform = prior_transform(cf, cm, weights)
    return np.array([np.linalg.norm(np.asarray(transform.TransformPoint(p.tolist())) - q) for p, q in zip(fixed, moving)])


def summary(per_pair: list[np.ndarray]) -> dict:
    everything = np.concatenate(per_pair)
    return {"per_pair_median_mm": round(float(np.median([np.median(e) for e in per_pair])), 2),
            "landmark_median_mm": round(float(np.median(everything)), 2), "landmark_mean_mm": round(float(everything.mean()), 2)}


def run(data: Path) -> dict:
    pairs = pairs_from_folder(data)
    train, held = split(pairs, 16, 0)
    true_train, true_held = [pair_points(p) for p in train], [pair_points(p) for p in held]
    glands_train, glands_held = [predicted_glands(p) for p in train], [predicted_glands(p) for p in held]
    with_predicted = lambda samples, glands: [(g[0], g[1], s[2], s[3]) for s, g in zip(samples, glands)]  # noqa: E731
    results: dict = {"train_pairs": len(train), "held_out_pairs": len(held)}
    gland_error = np.array([[np.linalg.norm(g[0] - s[0]), np.linalg.norm(g[1] - s[1])] for s, g in zip(true_held, glands_held)])
    results["predicted_gland_centroid_error_mm"] = {"fixed_median": round(float(np.median(gland_error[:, 0])), 2),
                                                    "moving_median": round(float(np.median(gland_error[:, 1])), 2)}
    for name, fitted_on, evaluated_on in (("true glands", true_train, true_held),
                                          ("predicted glands", with_predicted(true_train, glands_train),
                                           with_predicted(true_held, glands_held))):
        weights = {"shift": np.zeros((4, 3)), "offset": mean_offset(fitted_on), "affine": fit(fitted_on)}
        results[name] = {variant: summary([errors(s, weights[variant]) for s in evaluated_on]) for variant in VARIANTS}
        dices = []
        for pair, sample in zip(held, evaluated_on):
            fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
            transform = prior_transform(sample[0], sample[1], weights["affine"])
            dices.append(dice_per_label(fixed_labels[:, :, :, 0], moving_labels[:, :, :, 0], transform)["label 1"])
        results[name]["affine"]["gland_dice_median"] = round(float(np.median(dices)), 3)
    owner = subjects(pairs)
    everyone = [pair_points(p) for p in pairs]
    loso = [errors(sample, fit([s for s, o in zip(everyone, owner) if o != owner[i]]))
            for i, sample in enumerate(everyone)]
    results["leave_one_subject_out_all_pairs_true_glands_affine"] = summary(loso)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/mrus_sim")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = run(Path(args.data))
    text = json.dumps(results, indent=2)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
