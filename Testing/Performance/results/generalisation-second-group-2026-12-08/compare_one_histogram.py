"""Per pair of a pairs CSV: TRE (median over landmarks, mm) and kept stage with one MI histogram (finetune.MI_REGIONS = 1)
and with the shipped regions. Usage: python compare_one_histogram.py PAIRS_FOLDER CSV_NAME (2026-12-08, commit 6ae8422)."""
import csv, sys
from pathlib import Path
import numpy as np, SimpleITK as sitk
from DeepRegisterLib import finetune
from DeepRegisterLib.registration import register
from DeepRegisterLib.landmarks import read_landmarks, tre
root = Path(sys.argv[1]); shipped = finetune.MI_REGIONS
for r in csv.DictReader(open(root / sys.argv[2])):
    f = sitk.ReadImage(str(root / r["fixed"])); m = sitk.ReadImage(str(root / r["moving"]))
    fm = sitk.ReadImage(str(root / r["fixed_mask"])) if r["fixed_mask"] else None
    mm = sitk.ReadImage(str(root / r["moving_mask"])) if r["moving_mask"] else None
    fp = read_landmarks(str(root / r["fixed_landmarks"])).points; mp = read_landmarks(str(root / r["moving_landmarks"])).points
    out = []
    for n in (1, shipped):
        finetune.MI_REGIONS = n
        res = register(f, m, model="generic", device="cpu", fixed_mask=fm, moving_mask=mm)
        out.append(f"{np.median(tre(fp, mp, res.transform)):.2f} {res.kept_stage[:4]}")
    print(r["name"], f"start {np.median(tre(fp, mp, res.initial_transform)):.2f}", "| one histogram", out[0], "| regions", out[1], flush=True)
