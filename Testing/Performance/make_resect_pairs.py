"""Write benchmark pairs from one real MR / intra-operative ultrasound case of the RESECT dataset
(Xiao et al., Medical Physics 2017: brain, pre-resection 3D ultrasound, MNI .tag landmarks).

    python Testing/Performance/make_resect_pairs.py --us Case24-US-before.nii.gz --mr Case24-T1.nii.gz \
        --tag Case24-MRI-beforeUS.tag --case Case24 --out benchmark-pairs-resect [--dev 6] [--test 6]
    deepregister benchmark --pairs benchmark-pairs-resect/pairs.csv --split test --out benchmark-output-resect

The ultrasound is the fixed image, the MR the moving one, each on its own grid as given (an MR already
resliced into the ultrasound's space works as well). Families (column ``family``):

* ``resect``: the pair as loaded, aligned by the navigation system (split ``test``).
* ``resect-moved``: the same pair with the MR moved by a known rigid transform (3-6 degrees about a
  random axis through a random point near the ultrasound's centre: each coordinate of its offset normal
  with a standard deviation of U(0, 30) mm / sqrt(3); then 3-6 mm), written into
  the MR's header (origin and direction: no resampling) and applied to its landmarks: what a
  registration must recover when the navigation is off by a few millimetres. The MR is also cropped
  by up to a quarter of its extent on each side (keeping every landmark 3 mm inside), so that the
  centres of the two boxes say nothing about the motion. Seeds 0.. for ``dev``,
  100.. for ``test``.

The landmarks come from the .tag file (MINC world = RAS; first volume the MR, second the
ultrasound) and are written as Slicer .fcsv files in LPS. The ultrasound's field of view as
``deepregister`` detects it is written as the fixed mask, so elastix and ANTs get the same mask.
RESECT is not redistributed here: point the script at your copy.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib.landmarks import Landmarks, write_fcsv
from DeepRegisterLib.masks import detect_field_of_view

COLUMNS = ["name", "kind", "modality", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_landmarks",
           "moving_landmarks", "family", "split", "fixed_mask", "moving_mask", "truth"]
DEGREES, MILLIMETRES, PIVOT_MM = (3.0, 6.0), (3.0, 6.0), 30.0
CROP_FRACTION, CROP_MARGIN_MM = 0.25, 3.0


def read_tag(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(MR points, ultrasound points), (N, 3) each in LPS mm, from an MNI .tag file of two volumes."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if "Points" not in text or "=" not in text.split("Points", 1)[1]:
        raise ValueError(f"{path}: not an MNI .tag file (no 'Points =' section).")
    body = text.split("Points", 1)[1].split("=", 1)[1]
    rows = [re.findall(r"[-+0-9.eE]+", line) for line in body.replace(";", "\n").splitlines()]
    values = np.array([[float(v) for v in row[:6]] for row in rows if len(row) >= 6])
    if values.size == 0:
        raise ValueError(f"{path}: no point pairs (six coordinates per line after 'Points =').")
    ras_to_lps = np.array([-1.0, -1.0, 1.0])
    return values[:, :3] * ras_to_lps, values[:, 3:6] * ras_to_lps


def rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Rotation matrix about the unit vector ``axis`` (Rodrigues)."""
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1.0 - np.cos(angle)) * k @ k


def moved(image: sitk.Image, points: np.ndarray, centre: np.ndarray, seed: int
          ) -> tuple[sitk.Image, np.ndarray, dict]:
    """``image`` (cropped, see :func:`_cropped`) and ``points`` moved by the rigid transform of ``seed``,
    written into the image's origin and direction (no resampling)."""
    rng = np.random.default_rng(seed)
    matrix = rotation(rng.normal(size=3), rng.uniform(*DEGREES))
    pivot = centre + rng.normal(size=3) / np.sqrt(3.0) * rng.uniform(0.0, PIVOT_MM)
    shift = rng.normal(size=3)
    shift *= rng.uniform(*MILLIMETRES) / np.linalg.norm(shift)

    def move(p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, float) - pivot) @ matrix.T + pivot + shift

    result = _cropped(image, points, rng)
    result.SetOrigin(move(np.asarray(result.GetOrigin())).tolist())
    result.SetDirection((matrix @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    truth = {"seed": seed, "rotation": matrix.tolist(), "pivot_mm": pivot.tolist(), "shift_mm": shift.tolist()}
    return result, move(points), truth


def _cropped(image: sitk.Image, points: np.ndarray, rng: np.random.Generator) -> sitk.Image:
    """``image`` less a random slab of up to CROP_FRACTION of its extent on each side (never one
    that takes a landmark within CROP_MARGIN_MM of the edge): a box that does not share the
    ultrasound's centre, as a scanner's would not."""
    index = np.array([image.TransformPhysicalPointToContinuousIndex(p.tolist()) for p in points])
    margin = CROP_MARGIN_MM / np.asarray(image.GetSpacing())
    size = np.asarray(image.GetSize())
    low = np.minimum(rng.uniform(0, CROP_FRACTION, 3) * size, np.maximum(0, index.min(0) - margin)).astype(int)
    high = np.minimum(rng.uniform(0, CROP_FRACTION, 3) * size, np.maximum(0, size - 1 - index.max(0) - margin)).astype(int)
    return sitk.Crop(image, low.tolist(), high.tolist())


def _values(image: sitk.Image, points: np.ndarray) -> np.ndarray:
    """``image`` at the voxels nearest to physical ``points``."""
    return np.array([image.GetPixel(image.TransformPhysicalPointToIndex(p.tolist())) for p in points])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--us", required=True, help="the ultrasound volume (fixed)")
    parser.add_argument("--mr", required=True, help="the MR volume (moving)")
    parser.add_argument("--tag", required=True, help="the MNI .tag landmarks (MR first, ultrasound second)")
    parser.add_argument("--case", default="case", help="name prefix of the pairs")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dev", type=int, default=6)
    parser.add_argument("--test", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    us, mr = sitk.ReadImage(args.us, sitk.sitkFloat32), sitk.ReadImage(args.mr, sitk.sitkFloat32)
    mr_points, us_points = read_tag(Path(args.tag))
    mask = detect_field_of_view(us)
    centre = np.asarray(us.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in us.GetSize()]))
    shared = out / args.case
    shared.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(us, str(shared / "fixed.nii.gz"), useCompression=True)
    labels = [f"L{i}" for i in range(1, len(us_points) + 1)]
    write_fcsv(shared / "fixed_landmarks.fcsv", Landmarks(us_points, labels))
    if mask is not None:
        sitk.WriteImage(mask, str(shared / "fixed_mask.nii.gz"), useCompression=True)
    cases = [("resect", "test", None)] + [("resect-moved", "dev", s) for s in range(args.dev)] + \
            [("resect-moved", "test", 100 + s) for s in range(args.test)]
    rows = []
    for family, split, seed in cases:
        name = f"{args.case}-{family}" + ("" if seed is None else f"-{split}-{seed}")
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        image, points, truth = (mr, mr_points, {"seed": None}) if seed is None else moved(mr, mr_points, centre, seed)
        if not np.allclose(_values(image, points), _values(mr, mr_points), rtol=0.0, atol=0.0):
            raise RuntimeError(f"{name}: the moved MR does not show the same anatomy at the moved landmarks.")
        sitk.WriteImage(image, str(folder / "moving.nii.gz"), useCompression=True)
        write_fcsv(folder / "moving_landmarks.fcsv", Landmarks(points, labels))
        (folder / "truth.json").write_text(json.dumps(truth, indent=1), encoding="utf-8")
        rows.append({"name": name, "kind": family, "modality": "multi", "fixed": f"{args.case}/fixed.nii.gz",
                     "moving": f"{name}/moving.nii.gz", "fixed_labels": "", "moving_labels": "",
                     "fixed_landmarks": f"{args.case}/fixed_landmarks.fcsv", "moving_landmarks": f"{name}/moving_landmarks.fcsv",
                     "family": family, "split": split, "fixed_mask": f"{args.case}/fixed_mask.nii.gz" if mask is not None else "",
                     "moving_mask": "", "truth": f"{name}/truth.json"})
    with (out / "pairs.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    print(f"{len(rows)} pairs in {out / 'pairs.csv'}")


if __name__ == "__main__":
    main()
