"""Evaluate a model end to end through ``register()`` on pairs it never trained on.

    python -m deepregister_training.evaluate --model PATH --kind mrus     [--iterations 0 50] [--json OUT]
    python -m deepregister_training.evaluate --model PATH --kind generic  [--iterations 0 40] [--median-mm 3]
        [--pairs 4] [--json OUT]
    python -m deepregister_training.evaluate --kind mrus-references                            [--json OUT]
    (mrus kinds: [--split held-out|training] [--max-pairs N])

``mrus``: the held-out mrus_sim pairs of the training split (config seed and size), centres
aligned first; median landmark-centroid TRE, median gland Dice, folding. ``generic``: the
held-out MNI152 T1 (128^3 at 1 mm around its centre) through smooth synthetic fields (median
displacement 3 mm inside the brain, or ``--median-mm``), monomodal and with an ultrasound-like moving image; median TRE at
landmarks inside the brain, seconds per pair. ``mrus-references``: what the held-out mrus pairs
allow without a model (:func:`deepregister_training.studies.mrus_references.mrus_references`; the
research probes behind it, blob contrast, patch correlations and label registration, live in
``deepregister_training.studies``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

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
    (LPS mm), each channel thresholded at 0.5 (:func:`deepregister_training.data.label_centroids` on its grid)."""
    masks = torch.from_numpy(sitk.GetArrayFromImage(labels)[channels] > 0.5).float()
    return label_centroids(masks, Grid.from_image(labels[:, :, :, 0])).double().numpy()


def __getattr__(name: str):
    """``deepregister_training.evaluate.mrus_references`` (its former home), loaded from
    ``deepregister_training.studies`` on use."""
    if name == "mrus_references":
        from .studies.mrus_references import mrus_references

        return mrus_references
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def evaluate_mrus(model: str, iterations: int, pairs: list[PairFiles]) -> dict:
    errors, per_pair, dices, folds, seconds = [], [], [], [], []
    for pair in pairs:
        fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
        fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
        start = time.perf_counter()
        result = register(fixed, moving, model=model, iterations=iterations, device="cpu")
        seconds.append(time.perf_counter() - start)
        pair_errors = tre(centroids(fixed_labels), centroids(moving_labels), result.transform)
        errors += pair_errors.tolist()
        per_pair.append(float(np.median(pair_errors)))
        dices.append(dice_per_label(fixed_labels[:, :, :, 0], moving_labels[:, :, :, 0], result.transform)["label 1"])
        folds.append(result.folding_percent)
    return {"pairs": len(pairs), "landmarks": len(errors), "tre_median_mm": float(np.median(errors)),
            "tre_mean_mm": float(np.mean(errors)), "tre_per_pair_median_mm": float(np.median(per_pair)),
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
        from .studies.mrus_references import mrus_references

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
