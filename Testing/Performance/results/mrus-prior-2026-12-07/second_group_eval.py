"""Second held-out group (B): 16 pairs of 13 subjects that network mrus-b (trained on 64 pairs) never saw.
(Rerunning it reports `deepregister_training.evaluate.evaluate_mrus` keys; second-group.json was written by an earlier
evaluate helper of the prior tool with the same figures under tre_per_pair_median_mm, tre_landmark_*_mm.)
Prior fitted on those 64 training pairs (mrus-b's predicted glands; and true glands for reference)."""
import json, sys, tempfile, time
from pathlib import Path
import numpy as np, SimpleITK as sitk, torch
import DeepRegisterLib.registration as R
from DeepRegisterLib.prior import GlandPrior
from deepregister_training import gland_prior as G
from deepregister_training.data import pairs_from_folder, split
from deepregister_training.evaluate import evaluate_mrus
from deepregister_training.studies.gland_prior import errors
from DeepRegisterLib.metrics import dice_per_label
from deepregister_training.studies.gland_prior import prior_transform
MODEL = "/tmp/models_b/mrus-b"
pairs = pairs_from_folder(Path("/work/shared/data/mrus_sim"))
train, held32 = split(pairs, 32, 0)
_, held16 = split(pairs, 16, 0)
A = {p.name for p in held16}
groupB = [p for p in held32 if p.name not in A]
groupA = [p for p in held32 if p.name in A]
print("train", len(train), "B", len(groupB), "A", len(groupA), flush=True)
true_train = [G.true_sample(p) for p in train]
pred_train = [G.predicted_sample(p, MODEL) for p in train]
prior_pred, prior_true = GlandPrior.fit(pred_train), GlandPrior.fit(true_train)
out = {}
for gname, group in (("B", groupB), ("A", groupA)):
    res = {}
    true_g = [G.true_sample(p) for p in group]
    pred_g = [G.predicted_sample(p, MODEL) for p in group]
    def summ(per):
        allv = np.concatenate(per)
        return {"per_pair_median": round(float(np.median([np.median(e) for e in per])), 2),
                "landmark_median": round(float(np.median(allv)), 2), "landmark_mean": round(float(np.mean(allv)), 2)}
    res["prior alone, true glands"] = summ([errors(s, prior_true) for s in true_g])
    res["prior alone, predicted glands"] = summ([errors(s, prior_pred) for s in pred_g])
    dices = [dice_per_label(sitk.ReadImage(str(p.fixed_labels))[:, :, :, 0], sitk.ReadImage(str(p.moving_labels))[:, :, :, 0],
                            prior_transform(s[0], s[1], prior_pred))["label 1"] for p, s in zip(group, pred_g)]
    res["prior alone, predicted glands"]["dice_median"] = round(float(np.median(dices)), 3)
    res["centroid error median (fixed, moving)"] = [round(float(np.median([np.linalg.norm(pg[i] - tg[i]) for pg, tg in zip(pred_g, true_g)])), 2) for i in (0, 1)]
    t = time.perf_counter()
    res["network alone (0 steps)"] = evaluate_mrus(MODEL, 0, group)
    res["network + 100 affine steps (card default)"] = evaluate_mrus(MODEL, 100, group)
    with tempfile.TemporaryDirectory() as scratch:
        folder = G.card_with(MODEL, Path(scratch) / "m", prior_pred, 1.0, {})
        res["prior via register (0 steps)"] = evaluate_mrus(str(folder), 0, group)
        res["prior + 100 anchored steps (anchor 1)"] = evaluate_mrus(str(folder), 100, group)
        orig = R.prior_displacement
        def blended(prior, outputs, grid, messages):
            field = orig(prior, outputs, grid, messages)
            if field is None: return None
            direction = torch.as_tensor(np.reshape(grid.direction, (3, 3)), dtype=field.dtype)
            return 0.5 * field + 0.5 * torch.einsum("ij,bjzyx->bizyx", direction, outputs["displacement"])
        R.prior_displacement = blended
        res["half prior + half network, + 100 anchored steps (one-off)"] = evaluate_mrus(str(folder), 100, group)
        R.prior_displacement = orig
    out[gname] = res
    print(gname, json.dumps(res, indent=1), flush=True)
json.dump(out, open("/tmp/eval_b.json", "w"), indent=1)
