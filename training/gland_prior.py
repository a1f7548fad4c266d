"""Fit a model's gland-anchored motion prior (:mod:`DeepRegisterLib.prior`) on its training pairs.

The gland centroids come from the model's own segmenters (what ``register()`` has at inference), the
landmark pairs from the labels (channels 1..); ``A`` and ``b`` are least squares over every landmark of
the training subjects, never of the held-out ones (the same subject split as training and
``deepregister_training.evaluate``).

    python -m deepregister_training.gland_prior --model mrus [--out models/mrus-prior]   # fit (and write a model with it)
    python -m deepregister_training.gland_prior --model mrus --dev --iterations 0 100 --anchor 0 1 4

``--dev`` chooses settings without the held-out pairs: the training subjects are split in two folds;
the prior fitted on one fold is used by ``register()`` on the other fold's pairs, for each number of
fine-tuning steps and anchor weight (the card's ``finetune_anchor_weight``).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from DeepRegisterLib.imageio import center_alignment
from DeepRegisterLib.models import CARD_FILE, find_model, load_model, read_card
from DeepRegisterLib.preprocess import PairInputs, model_grid
from DeepRegisterLib.prior import GlandPrior, gland_centroid

from .data import PairFiles, pairs_from_folder, split, subjects
from .evaluate import centroids, evaluate_mrus

REPO = Path(__file__).resolve().parents[1]
Sample = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # fixed centroid, moving centroid, fixed, moving points


def true_sample(pair: PairFiles) -> Sample:
    """True gland centroids (fixed, moving) and the landmark centroids present in both label images."""
    fixed_labels, moving_labels = sitk.ReadImage(str(pair.fixed_labels)), sitk.ReadImage(str(pair.moving_labels))
    fixed_points, moving_points = centroids(fixed_labels), centroids(moving_labels)
    both = np.isfinite(fixed_points).all(axis=1) & np.isfinite(moving_points).all(axis=1)
    return (centroids(fixed_labels, slice(0, 1))[0], centroids(moving_labels, slice(0, 1))[0],
            fixed_points[both], moving_points[both])


@functools.lru_cache(maxsize=2)
def _loaded(model: str) -> tuple:
    return load_model(model, torch.device("cpu"))


def predicted_glands(pair: PairFiles, model: str) -> tuple[np.ndarray, np.ndarray]:
    """Gland centroids (fixed, moving; LPS mm) of the network's segmentations (> 0.5), from the image
    centres aligned: the network sees the moving image under that shift, so it is added back."""
    card, network = _loaded(model)
    fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
    shift = center_alignment(fixed, moving)
    grid = model_grid(fixed, card)
    with torch.no_grad():
        outputs = network.register_pair(*PairInputs.prepare(fixed, moving, card, shift, None, None).on(grid, torch.device("cpu")))
    fixed_centroid = gland_centroid(outputs["fixed_segmentation"], grid)
    moving_centroid = gland_centroid(outputs["moving_segmentation"], grid)
    if fixed_centroid is None or moving_centroid is None:
        raise ValueError(f"{pair.name}: the model found no gland in one image")
    return fixed_centroid, moving_centroid + np.asarray(shift.GetOffset())


def predicted_sample(pair: PairFiles, model: str) -> Sample:
    """:func:`true_sample` with the gland centroids the model's segmenters find."""
    _, _, fixed_points, moving_points = true_sample(pair)
    return (*predicted_glands(pair, model), fixed_points, moving_points)


def card_with(model: str, folder: Path, prior: GlandPrior, anchor_weight: float, fitted_on: dict,
              name: str | None = None) -> Path:
    """A copy of ``model`` in the new ``folder`` whose card carries ``prior`` and ``anchor_weight``
    (and ``name``, when given); FileExistsError when ``folder`` exists."""
    shutil.copytree(find_model(model), folder)
    card = read_card(folder)
    card.gland_prior = {**prior.to_card(), "fitted_on": fitted_on}
    card.finetune_anchor_weight = anchor_weight
    card.name = name or card.name
    (folder / CARD_FILE).write_text(card.to_json(), encoding="utf-8")
    return folder


def dev(model: str, train: list[PairFiles], iterations: list[int], anchors: list[float]) -> dict:
    """Two folds of training subjects: fit on one, register the other's pairs (see the module docstring)."""
    owner = subjects(train)
    names = list(dict.fromkeys(owner))
    fold = [names.index(o) % 2 for o in owner]
    samples = [predicted_sample(pair, model) for pair in train]
    results: dict = {}
    with tempfile.TemporaryDirectory() as scratch:
        for steps in iterations:
            for anchor in anchors if steps > 0 else [0.0]:
                key = f"iterations {steps}, anchor {anchor:g}"
                per_fold = []
                for held in (0, 1):
                    prior = GlandPrior.fit([s for s, f in zip(samples, fold) if f != held])
                    folder = card_with(model, Path(scratch) / f"model-{steps}-{anchor:g}-{held}", prior, anchor,
                                       {"dev_fold": held})
                    per_fold.append(evaluate_mrus(str(folder), steps, [p for p, f in zip(train, fold) if f == held]))
                results[key] = per_fold
                print(key, json.dumps(per_fold), flush=True)
        results["without prior"] = {str(steps): evaluate_mrus(model, steps, train) for steps in iterations}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="mrus", help="model name or folder (needs gland segmenters)")
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrus_sim")
    parser.add_argument("--validation-pairs", type=int, default=16, help="the held-out split, as in training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write a copy of the model, with the prior fitted on all its training "
                        "pairs, to this new folder (e.g. a folder of $DEEPREGISTER_MODEL_PATH)")
    parser.add_argument("--name", help="--out: the new model's name (default: <model>-prior)")
    parser.add_argument("--dev", action="store_true", help="choose settings on two folds of training subjects")
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 100])
    parser.add_argument("--anchor", type=float, nargs="+", default=[0.0], help="--dev: anchor weights to compare")
    parser.add_argument("--anchor-weight", type=float, default=1.0,
                        help="--out: the card's finetune_anchor_weight (1: the best of 0, 1, 4, 16 on mrus's dev folds)")
    args = parser.parse_args(argv)
    if args.out and args.out.exists():
        raise SystemExit(f"{args.out} exists: choose a new folder for the model with its prior.")
    train, held = split(pairs_from_folder(args.data), args.validation_pairs, args.seed)
    if args.dev:
        print(json.dumps(dev(args.model, train, args.iterations, args.anchor), indent=2))
        return
    prior = GlandPrior.fit([predicted_sample(pair, args.model) for pair in train])
    fitted_on = {"pairs": len(train), "subjects": len(set(subjects(train))), "held_out_pairs": len(held),
                 "glands": "this model's segmentations (> 0.5), image centres aligned", "split_seed": args.seed}
    print(json.dumps({**prior.to_card(), "fitted_on": fitted_on}, indent=2))
    if args.out:
        name = args.name or f"{read_card(find_model(args.model)).name}-prior"
        card_with(args.model, args.out, prior, args.anchor_weight, fitted_on, name)
        print(f"Wrote model '{name}' with the prior and finetune_anchor_weight {args.anchor_weight:g} to {args.out}")


if __name__ == "__main__":
    main()
