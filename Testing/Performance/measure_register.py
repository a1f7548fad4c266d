"""Seconds per stage and peak memory of `register` on a 128^3 phantom pair (not a test).

Usage: OMP_NUM_THREADS=2 python Testing/Performance/measure_register.py [--iterations N ...]
Each configuration runs in a fresh process so its peak resident memory is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib.synthetic import make_phantom_pair

CHILD = r"""
import json, resource, sys, time
import numpy as np, SimpleITK as sitk, torch
from DeepRegisterLib.landmarks import tre
from DeepRegisterLib.registration import register
from DeepRegisterLib.spatial import Grid
iterations, folder = int(sys.argv[1]), sys.argv[2]
fixed, moving = sitk.ReadImage(folder + "/fixed.nii.gz"), sitk.ReadImage(folder + "/moving.nii.gz")
points = np.load(folder + "/points.npy")
shift = Grid.from_image(moving).center - Grid.from_image(fixed).center
before = np.median(tre(points[0], points[1], sitk.TranslationTransform(3, shift.tolist())))
start = time.perf_counter()
result = register(fixed, moving, iterations=iterations, device="cpu")
wall = time.perf_counter() - start
after = np.median(tre(points[0], points[1], result.transform))
print(json.dumps({"iterations": iterations, "pair": folder.rsplit("/", 1)[-1], "threads": torch.get_num_threads(),
                  "seconds": {k: round(v, 2) for k, v in result.timings.items()}, "wall": round(wall, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                  "median_tre_mm": [round(float(before), 2), round(float(after), 2)],
                  "folding_percent": round(result.folding_percent, 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, nargs="+", default=[0, 150])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        for name, ultrasound in (("monomodal", False), ("ultrasound-like", True)):
            pair = make_phantom_pair(21, (128, 128, 128), spacing=1.0, max_mm=10.0, ultrasound=ultrasound)
            folder = Path(root) / name
            folder.mkdir()
            sitk.WriteImage(pair.fixed, str(folder / "fixed.nii.gz"))
            sitk.WriteImage(pair.moving, str(folder / "moving.nii.gz"))
            np.save(folder / "points.npy", np.stack([pair.fixed_points, pair.moving_points]))
            for iterations in args.iterations:
                output = subprocess.run([sys.executable, "-c", CHILD, str(iterations), str(folder)], check=True,
                                        capture_output=True, text=True).stdout
                print(json.dumps(json.loads(output.strip().splitlines()[-1])), flush=True)


if __name__ == "__main__":
    main()
