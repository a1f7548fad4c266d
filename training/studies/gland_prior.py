"""A gland-anchored motion prior on the simulated MR/TRUS pairs (issue #23, first measurement).

The prior (:mod:`DeepRegisterLib.prior`) predicts each moving landmark from its fixed position and the
two gland centroids: ``moving = fixed + (c_moving - c_fixed) + A (fixed - c_fixed) + b`` (LPS mm), ``A``
(3x3) and ``b`` fitted by least squares on the landmarks of training subjects only
(:mod:`deepregister_training.gland_prior` fits and stores the one the model uses). Three variants are reported:
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

from DeepRegisterLib.metrics import dice_per_label
from DeepRegisterLib.prior import GlandPrior

from ..data import pairs_from_folder, split, subjects
from ..gland_prior import Sample, predicted_glands, true_sample

VARIANTS = ("shift", "offset", "affine")
NONE = GlandPrior(np.zeros((3, 3)), np.zeros(3))


def mean_offset(samples: list[Sample]) -> GlandPrior:
    """The mean residual alone (zero matrix part)."""
    return GlandPrior(np.zeros((3, 3)), np.mean(np.concatenate([moving - fixed - (cm - cf) for cf, cm, fixed, moving in samples]), axis=0))


def prior_transform(cf: np.ndarray, cm: np.ndarray, prior: GlandPrior) -> sitk.AffineTransform:
    """The prior as a fixed -> moving affine transform: x -> x + (cm - cf) + A (x - cf) + b."""
    transform = sitk.AffineTransform(3)
    transform.SetMatrix((np.eye(3) + prior.matrix).ravel().tolist())
    transform.SetTranslation((cm - cf + prior.offset - prior.matrix @ cf).tolist())
    return transform


def errors(sample: Sample, prior: GlandPrior) -> np.ndarray:
    cf, cm, fixed, moving = sample
    transform = prior_transform(cf, cm, prior)
    return np.array([np.linalg.norm(np.asarray(transform.TransformPoint(p.tolist())) - q) for p, q in zip(fixed, moving)])


def summary(per_pair: list[np.ndarray]) -> dict:
    everything = np.concatenate(per_pair)
    return {"per_pair_median_mm": round(float(np.median([np.median(e) for e in per_pair])), 2),
            "landmark_median_mm": round(float(np.median(everything)), 2), "landmark_mean_mm": round(float(everything.mean()), 2)}


def run(data: Path) -> dict:
    pairs = pairs_from_folder(data)
    train, held = split(pairs, 16, 0)
    true_train, true_held = [true_sample(p) for p in train], [true_sample(p) for p in held]
    glands_train, glands_held = [predicted_glands(p, "mrus") for p in train], [predicted_glands(p, "mrus") for p in held]
    with_predicted = lambda samples, glands: [(g[0], g[1], s[2], s[3]) for s, g in zip(samples, glands)]  # noqa: E731
    results: dict = {"train_pairs": len(train), "held_out_pairs": len(held)}
    gland_error = np.array([[np.linalg.norm(g[0] - s[0]), np.linalg.norm(g[1] - s[1])] for s, g in zip(true_held, glands_held)])
    results["predicted_gland_centroid_error_mm"] = {"fixed_median": round(float(np.median(gland_error[:, 0])), 2),
                                                    "moving_median": round(float(np.median(gland_error[:, 1])), 2)}
    for name, fitted_on, evaluated_on in (("true glands", true_train, true_held),
                                          ("predicted glands", with_predicted(true_train, glands_train),
                                           with_predicted(true_held, glands_held))):
        weights = {"shift": NONE, "offset": mean_offset(fitted_on), "affine": GlandPrior.fit(fitted_on)}
        results[name] = {variant: summary([errors(s, weights[variant]) for s in evaluated_on]) for variant in VARIANTS}
        dices = []
        for pair, sample in zip(held, evaluated_on):
            fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
            transform = prior_transform(sample[0], sample[1], weights["affine"])
            dices.append(dice_per_label(fixed_labels[:, :, :, 0], moving_labels[:, :, :, 0], transform)["label 1"])
        results[name]["affine"]["gland_dice_median"] = round(float(np.median(dices)), 3)
    owner = subjects(pairs)
    everyone = [true_sample(p) for p in pairs]
    loso = [errors(sample, GlandPrior.fit([s for s, o in zip(everyone, owner) if o != owner[i]]))
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
