"""Write the benchmark pairs and their pairs.csv (fixed seeds: the same files on every machine).

    python Testing/Performance/make_benchmark_pairs.py --out benchmark-pairs [--mrus-pairs 16]
        [--brain-pairs 5] [--no-sizes]      # e.g. mrus only: --brain-pairs 0 --no-sizes
    deepregister benchmark --pairs benchmark-pairs/pairs.csv --out benchmark-output

Kinds of pairs:

* ``mrus``: the held-out mrus_sim pairs of the `mrus` model's training split (config seed 0, 16
  pairs, never trained on), as they are: TRUS fixed, MR moving; the gland (channel 0) as label 1;
  landmarks = centroids of the landmark blobs (channels 1..), the TRE of Hu et al.
* ``brain-mono-128`` and ``brain-us-128``: the MNI152 T1 (held out from the `generic` training)
  at 1 mm, 128^3 around its centre, through a smooth synthetic field (median 3 mm inside the brain;
  seeds 300..); the moving image unchanged (monomodal, noise only) or ultrasound-like remapped;
  labels 1 = grey matter, 2 = white matter (MNI152 probability maps > 0.5); 20 landmarks in the brain.
* ``size-64``, ``size-128``, ``size-192``: one ultrasound-like brain pair each on the same 192 mm field
  of view at 3, 1.5 and 1 mm, to show how time and memory grow with the number of voxels.

Families the engine was not tuned on, with dev and test splits and masks: make_generalisation_pairs.py.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib.landmarks import Landmarks, write_fcsv
from DeepRegisterLib.spatial import Grid
from DeepRegisterLib.synthetic import deformed_pair
from deepregister_training.data import pairs_from_folder, split
from deepregister_training.evaluate import centroids
from deepregister_training.public_volumes import fetch

REPO = Path(__file__).resolve().parents[2]
FIELDS = ["name", "kind", "modality", "fixed", "moving", "fixed_labels", "moving_labels",
          "fixed_landmarks", "moving_landmarks"]


def _write_points(path: Path, points: np.ndarray) -> None:
    write_fcsv(path, Landmarks(np.asarray(points, dtype=float), [f"L{i + 1}" for i in range(len(points))]))


def mrus_rows(data: Path, out: Path, count: int, held_out: int = 16, seed: int = 0) -> list[dict]:
    """The first ``count`` held-out mrus_sim pairs (split of the mrus config), converted."""
    _, pairs = split(pairs_from_folder(data), held_out, seed)
    rows = []
    for pair in pairs[:count]:
        folder = out / "mrus" / pair.name
        folder.mkdir(parents=True, exist_ok=True)
        row = {"name": f"mrus-{pair.name}", "kind": "mrus", "modality": "multi"}
        for side, image, labels in (("fixed", pair.fixed, pair.fixed_labels), ("moving", pair.moving, pair.moving_labels)):
            sitk.WriteImage(sitk.ReadImage(str(image)), str(folder / f"{side}.nii.gz"), useCompression=True)
            channels = sitk.ReadImage(str(labels))
            gland = sitk.Cast(channels[:, :, :, 0] > 0.5, sitk.sitkUInt8)
            sitk.WriteImage(gland, str(folder / f"{side}_labels.nii.gz"), useCompression=True)
            _write_points(folder / f"{side}_landmarks.fcsv", centroids(channels))
            row.update({side: f"mrus/{pair.name}/{side}.nii.gz", f"{side}_labels": f"mrus/{pair.name}/{side}_labels.nii.gz",
                        f"{side}_landmarks": f"mrus/{pair.name}/{side}_landmarks.fcsv"})
        rows.append(row)
    return rows


def brain_labels(gm: sitk.Image, wm: sitk.Image) -> sitk.Image:
    """Label map on the MNI152 grid: 1 = grey matter, 2 = white matter (probability > 0.5).

    Probability maps stored on a 0-255 scale (nilearn's MNI152 files) are divided by 255 first: a
    threshold of 0.5 on the raw values made label 1 "any grey matter", 3 (GM and WM both > 0.2 %)
    most of the brain, and 2 almost nothing (before 2026-12-07)."""
    def probability(image: sitk.Image) -> sitk.Image:
        image = sitk.Cast(image, sitk.sitkFloat32)
        return image / 255.0 if sitk.GetArrayViewFromImage(image).max() > 1.0 else image

    return sitk.Cast(probability(gm) > 0.5, sitk.sitkUInt8) + 2 * sitk.Cast(probability(wm) > 0.5, sitk.sitkUInt8)


def synthetic_rows(volume: sitk.Image, labels: sitk.Image, out: Path, specs: list[tuple[str, int, float, bool, int]]) -> list[dict]:
    """Synthetic pairs: (kind, voxels per side, spacing mm, ultrasound-like, seed) each, centred on the volume."""
    rows = []
    centre = Grid.from_image(volume).center
    for kind, size, spacing, ultrasound, seed in specs:
        name = f"{kind}-{seed}"
        folder = out / kind / str(seed)
        folder.mkdir(parents=True, exist_ok=True)
        grid = Grid.centered(centre, (size,) * 3, (spacing,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1))
        pair = deformed_pair(volume, grid, np.random.default_rng(seed), 3.0, ultrasound, labels)
        row = {"name": name, "kind": kind, "modality": "multi" if ultrasound else "mono"}
        for side, image, label, points in (("fixed", pair.fixed, pair.fixed_labels, pair.fixed_points),
                                           ("moving", pair.moving, pair.moving_labels, pair.moving_points)):
            sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), str(folder / f"{side}.nii.gz"), useCompression=True)
            sitk.WriteImage(label, str(folder / f"{side}_labels.nii.gz"), useCompression=True)
            _write_points(folder / f"{side}_landmarks.fcsv", points)
            row.update({side: f"{kind}/{seed}/{side}.nii.gz", f"{side}_labels": f"{kind}/{seed}/{side}_labels.nii.gz",
                        f"{side}_landmarks": f"{kind}/{seed}/{side}_landmarks.fcsv"})
        rows.append(row)
    return rows


def default_specs(brain_pairs: int, sizes: bool = True) -> list[tuple[str, int, float, bool, int]]:
    specs = [("brain-mono-128", 128, 1.0, False, 300 + i) for i in range(brain_pairs)]
    specs += [("brain-us-128", 128, 1.0, True, 400 + i) for i in range(brain_pairs)]
    specs += [(f"size-{n}", n, 192.0 / n, True, 500) for n in (64, 128, 192)] if sizes else []
    return specs


def write_pairs_csv(rows: list[dict], out: Path, fields: list[str] = FIELDS) -> Path:
    path = out / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmark-pairs"))
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "mrus_sim")
    parser.add_argument("--mrus-pairs", type=int, default=16, help="held-out mrus_sim pairs (at most 16)")
    parser.add_argument("--brain-pairs", type=int, default=5, help="pairs per synthetic brain kind")
    parser.add_argument("--no-sizes", action="store_true", help="leave out the size-64/128/192 pairs")
    args = parser.parse_args()
    t1, gm, wm = (sitk.ReadImage(str(path), sitk.sitkFloat32) for path in fetch())
    rows = mrus_rows(args.data, args.out, args.mrus_pairs)
    rows += synthetic_rows(t1 / 255.0, brain_labels(gm, wm), args.out,
                           default_specs(args.brain_pairs, sizes=not args.no_sizes))
    print(write_pairs_csv(rows, args.out))


if __name__ == "__main__":
    main()
