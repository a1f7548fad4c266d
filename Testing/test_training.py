"""Training pipeline (training/train.py) end to end on a tiny phantom dataset in the DeepReg layout.

Each of the four configs runs a few steps on shrunken copies of the configs (small grid, coarse
spacing), so the whole module stays fast on a CPU. Also: the loss falls on a toy pair, a 2-process
gloo DistributedDataParallel run keeps ranks in sync, resuming continues the step count, an
exported model loads and registers, and bad configs fail with clear messages.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

yaml = pytest.importorskip("yaml")
torch = pytest.importorskip("torch")

from DeepRegisterLib.models import ModelError, load_model  # noqa: E402
from DeepRegisterLib.nets import build_network  # noqa: E402
from DeepRegisterLib.registration import register  # noqa: E402
from DeepRegisterLib.synthetic import make_phantom_pair  # noqa: E402
from deepregister_training import train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "training" / "configs").glob("*.yaml"))
MRUS = REPO.parent / "shared" / "data" / "mrus_sim"
SEEDS = (1, 2, 3, 4)
BLOB_RADIUS_VOXELS = 2.0


# -- tiny dataset ------------------------------------------------------------------------------
def _blob(reference: sitk.Image, centre: np.ndarray) -> sitk.Image:
    """A float ball of BLOB_RADIUS_VOXELS voxels around a physical point, on ``reference``'s grid."""
    index = np.asarray(reference.TransformPhysicalPointToContinuousIndex(tuple(float(c) for c in centre)))
    zyx = np.indices(reference.GetSize()[::-1]).astype(np.float64)
    distance = np.sqrt(sum((zyx[2 - axis] - index[axis]) ** 2 for axis in range(3)))
    image = sitk.GetImageFromArray((distance <= BLOB_RADIUS_VOXELS).astype(np.float32))
    image.CopyInformation(reference)
    return image


def _labels(gland: sitk.Image, points: np.ndarray) -> sitk.Image:
    """4D (x, y, z, channel) float label image: channel 0 the gland, then one blob per point."""
    channels = [sitk.Cast(gland, sitk.sitkFloat32)] + [_blob(gland, p) for p in points]
    return sitk.JoinSeries(channels)


def write_dataset(root: Path, seeds: tuple[int, ...] = SEEDS) -> Path:
    folders = {name: root / name for name in ("fixed_images", "moving_images", "fixed_labels", "moving_labels")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        pair = make_phantom_pair(seed, (32, 32, 32), spacing=4.0)
        name = f"obs{seed:03d}.nii.gz"
        sitk.WriteImage(pair.fixed, str(folders["fixed_images"] / name))
        sitk.WriteImage(pair.moving, str(folders["moving_images"] / name))
        sitk.WriteImage(_labels(pair.fixed_gland, pair.fixed_points[:2]), str(folders["fixed_labels"] / name))
        sitk.WriteImage(_labels(pair.moving_gland, pair.moving_points[:2]), str(folders["moving_labels"] / name))
    return root


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny_data"))


def small_config(source: Path, folder: Path, **training: object) -> Path:
    """A copy of ``source`` on a 16^3 grid at 6 mm with small batches; ``training`` overrides."""
    config = yaml.safe_load(source.read_text())
    config["input_size"] = [16, 16, 16]
    config["spacing_mm"] = [6.0, 6.0, 6.0]
    config["data"]["validation_pairs"] = 1
    config["training"].update({"batch_size": 2, "validate_every": 100}, **training)
    config["training"].pop("initialize", None)  # full-size pretrained weights do not fit the small grid
    if "scales_voxels" in config.get("loss", {}):
        config["loss"]["scales_voxels"] = [0, 1, 2, 4]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / source.name
    path.write_text(yaml.safe_dump(config))
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def run_training(config: Path, data: Path, out: Path, *extra: str) -> None:
    assert train.main(["--config", str(config), "--data", str(data), "--out", str(out), *extra]) == 0


def initial_network(config: Path) -> torch.nn.Module:
    """The network ``deepregister_training.train`` starts from for ``config`` (built after seeding with
    training.seed)."""
    settings = yaml.safe_load(config.read_text())
    torch.manual_seed(settings["training"]["seed"])
    return build_network(settings["architecture"], settings["input_size"], settings["spacing_mm"],
                         **settings.get("network", {}))


# -- tests ------------------------------------------------------------------------------------
def test_dataset_layout(tiny_data: Path) -> None:
    labels = sitk.ReadImage(str(tiny_data / "fixed_labels" / "obs001.nii.gz"))
    fixed = sitk.ReadImage(str(tiny_data / "fixed_images" / "obs001.nii.gz"))
    assert labels.GetDimension() == 4 and labels.GetSize() == (*fixed.GetSize(), 3)
    assert np.allclose(labels.GetSpacing()[:3], fixed.GetSpacing())
    assert np.allclose(labels.GetOrigin()[:3], fixed.GetOrigin())
    for channel in range(3):
        assert sitk.GetArrayViewFromImage(labels[:, :, :, channel]).sum() > 0


def test_split_keeps_each_subject_on_one_side(tiny_data: Path, tmp_path: Path) -> None:
    """Pairs sharing a moving volume (the same file, or a perturbed copy as in mrus_sim) are one
    subject: held out together or trained on together, never split."""
    from deepregister_training.data import pairs_from_csv, pairs_from_folder, split, subjects

    root = write_dataset(tmp_path / "data", seeds=(1, 2, 3, 4, 5, 6))
    pairs = pairs_from_folder(root)
    with pytest.warns(UserWarning, match="one subject"):  # the phantom pairs all show one anatomy
        assert len(split(pairs, 2, 0)[1]) == 2
    rng = np.random.default_rng(0)
    for pair in pairs:  # six different volumes
        volume = sitk.ReadImage(str(pair.moving), sitk.sitkFloat32)
        texture = sitk.GetImageFromArray(rng.normal(0, 1, volume.GetSize()[::-1]).astype(np.float32))
        texture.CopyInformation(volume)
        sitk.WriteImage(sitk.SmoothingRecursiveGaussian(texture, 8.0), str(pair.moving))
    moving = sitk.ReadImage(str(root / "moving_images" / "obs001.nii.gz"), sitk.sitkFloat32)
    noise = sitk.GetImageFromArray(rng.normal(0, 0.001, moving.GetSize()[::-1]).astype(np.float32))
    noise.CopyInformation(moving)
    for folder in ("fixed_images", "fixed_labels", "moving_labels"):
        for twin in ("obs101.nii.gz", "obs102.nii.gz"):
            (root / folder / twin).write_bytes((root / folder / "obs002.nii.gz").read_bytes())
    sitk.WriteImage(moving + noise, str(root / "moving_images" / "obs101.nii.gz"))  # obs001's volume, perturbed
    sitk.WriteImage(moving, str(root / "moving_images" / "obs102.nii.gz"))  # obs001's volume, copied
    pairs = pairs_from_folder(root)
    owner = dict(zip((p.name for p in pairs), subjects(pairs)))
    assert owner["obs101"] == owner["obs102"] == owner["obs001"]
    assert len(set(owner.values())) == 6  # the other five pairs are subjects of their own
    for seed in range(8):
        training, held = split(pairs, 2, seed)
        assert len(training) + len(held) == len(pairs) and len(held) >= 2 and training
        held_subjects = {owner[p.name] for p in held}
        assert not held_subjects & {owner[p.name] for p in training}, seed
        if owner["obs001"] not in held_subjects:
            assert len(held) == 2  # singletons: exactly the pairs asked for
    # A CSV's subject column overrides: two different volumes declared one patient stay together.
    table = tmp_path / "pairs.csv"
    table.write_text("fixed,moving,subject\n" + "".join(
        f"data/fixed_images/obs00{i}.nii.gz,data/moving_images/obs00{i}.nii.gz,{'p1' if i < 3 else f'p{i}'}\n"
        for i in range(1, 7)))
    listed = pairs_from_csv(table)
    assert [p.subject for p in listed] == ["p1", "p1", "p3", "p4", "p5", "p6"]
    for seed in range(8):
        training, held = split(listed, 1, seed)
        assert {p.subject for p in held}.isdisjoint({p.subject for p in training})


@pytest.mark.parametrize("source", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_each_config_runs(source: Path, tiny_data: Path, tmp_path: Path) -> None:
    config = small_config(source, tmp_path / "configs")
    run = tmp_path / "run"
    run_training(config, tiny_data, run, "--max-steps", "2")
    losses = [float(row["loss"]) for row in read_csv(run / "train_log.csv")]
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses), losses
    validation = read_csv(run / "validation_log.csv")
    assert [row["step"] for row in validation] == ["2"]
    assert set(validation[0]) == {"step", "tre_median_mm", "dice_median", "folding_percent"}
    assert (run / "last.pt").is_file() and (run / "best.pt").is_file()
    summary = json.loads((run / "run.json").read_text())
    assert summary["steps"] == 2 and summary["resumed_from"] == 0 and summary["world_size"] == 1


def write_pairs_csv(data: Path, names: list[str]) -> Path:
    """A CSV of pairs (paths relative to the CSV's folder), the other supported data layout."""
    path = data / f"pairs_{len(names)}.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["fixed", "moving", "fixed_labels", "moving_labels"])
        for name in names:
            writer.writerow([f"{folder}/{name}.nii.gz" for folder in
                             ("fixed_images", "moving_images", "fixed_labels", "moving_labels")])
    return path


def test_loss_falls_on_toy_pair(tiny_data: Path, tmp_path: Path) -> None:
    # Two pairs from a CSV, one held out: every step sees the same training pair and no random
    # augmentation, so the loss is a deterministic function of the weights. The linear+deformable
    # network (image MSE) reliably roughly halves it in 20 Adam steps at lr 1e-3.
    config = small_config(REPO / "training" / "configs" / "linear_deformable.yaml", tmp_path / "configs",
                          lr=1e-3, batch_size=1, plateau_patience=100000)
    pairs = write_pairs_csv(tiny_data, ["obs001", "obs002"])
    run = tmp_path / "run"
    run_training(config, pairs, run, "--max-steps", "20")
    losses = [float(row["loss"]) for row in read_csv(run / "train_log.csv")]
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert [row["step"] for row in read_csv(run / "validation_log.csv")] == ["20"]


def test_segmenters_learn_the_gland(tiny_data: Path, tmp_path: Path) -> None:
    """The mrus config's first phase trains only the organ segmenters, on the gland labels: their
    Dice against the training pairs' glands rises, and GlobalNet and LocalNet stay untouched."""
    from deepregister_training.data import pairs_from_folder, prepare_pair

    config = small_config(REPO / "training" / "configs" / "mrus_weakly_supervised.yaml", tmp_path / "configs",
                          phases=[{"until": 1000, "train": ["fixed_segmenter", "moving_segmenter"]}],
                          schedule="plateau", augment={})
    card = train.model_card(yaml.safe_load(config.read_text()))
    pairs = [prepare_pair(p, card) for p in pairs_from_folder(tiny_data)]

    def dice(network: torch.nn.Module) -> float:
        with torch.no_grad():
            output = network(torch.stack([p.fixed for p in pairs]), torch.stack([p.moving for p in pairs]))
        values = []
        for side in ("fixed", "moving"):
            found = output[f"{side}_segmentation"] > 0.5
            truth = torch.stack([getattr(p, f"{side}_labels")[:1] for p in pairs]) > 0.5
            values.append(float(2 * (found & truth).sum() / (found.sum() + truth.sum())))
        return min(values)

    run_training(config, tiny_data, tmp_path / "run", "--max-steps", "60")
    trained = initial_network(config)
    trained.load_state_dict(torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"])
    before, after = dice(initial_network(config)), dice(trained)
    assert after > max(0.6, before + 0.2), (before, after)
    for name in ("global_net", "local_net"):
        untouched = getattr(initial_network(config), name).state_dict()
        assert all(torch.equal(value, untouched[key]) for key, value in getattr(trained, name).state_dict().items()), name


def test_augmentation_moves_labels_with_their_images() -> None:
    # A ball that is both image and label (zero at the edges, so the image's border padding and the
    # label's zero padding agree): after augmentation the label must still lie exactly on its image,
    # and the random smooth field (field_mm) must move it beyond what the affine part alone does.
    from DeepRegisterLib.spatial import Grid
    from deepregister_training.objectives import Objective

    grid = Grid.canonical((20, 20, 20), (3.0, 3.0, 3.0))
    zyx = np.indices(grid.shape) - 9.5
    ball = torch.from_numpy((np.sqrt((zyx ** 2).sum(axis=0)) < 5.5).astype(np.float32))[None, None].repeat(2, 1, 1, 1, 1)

    def augmented(**augment: float) -> dict[str, torch.Tensor]:
        config = {"method": "weakly_supervised", "training": {"augment": augment}}
        batch = {"fixed": ball, "moving": ball, "fixed_label": ball, "moving_label": ball}
        return Objective(config, grid, torch.device("cpu"))._augment(dict(batch), np.random.default_rng(7))

    affine = augmented(affine=0.05, translation_mm=3.0)
    both = augmented(affine=0.05, translation_mm=3.0, field_mm=6.0)
    for batch in (affine, both):
        for image in ("fixed", "moving"):
            assert torch.allclose(batch[image], batch[f"{image}_label"], atol=1e-6)
            assert (batch[image] - ball).abs().sum() > 10.0  # it moved
    assert (both["moving"] - affine["moving"]).abs().sum() > 10.0

    field = Objective({"method": "weakly_supervised", "training": {"augment": {"field_mm": 6.0}}}, grid,
                      torch.device("cpu"))._random_field(8, np.random.default_rng(3))
    largest = field.norm(dim=1).flatten(1).max(dim=1).values
    assert field.shape == (8, 3, *grid.shape) and (largest <= 6.0 + 1e-4).all() and largest.max() > 3.0


def test_mrus_references_on_a_known_shift(tiny_data: Path, tmp_path: Path) -> None:
    # Moving = fixed with its content (image and every label) moved 3 voxels along its first axis, same
    # grid: the centres coincide, so after centre alignment every landmark is 3 voxel spacings off,
    # and the gland-centroid offset recovers the shift exactly, as does registering the gland labels.
    from deepregister_training.data import pairs_from_folder
    from deepregister_training.evaluate import mrus_references

    root = tmp_path / "shifted"
    for folder in ("fixed_images", "moving_images", "fixed_labels", "moving_labels"):
        (root / folder).mkdir(parents=True)
    for name in ("obs001.nii.gz", "obs002.nii.gz"):
        for kind in ("images", "labels"):
            image = sitk.ReadImage(str(tiny_data / f"fixed_{kind}" / name))
            moved = sitk.GetImageFromArray(np.roll(sitk.GetArrayFromImage(image), 3, axis=-1), isVector=False)
            moved.CopyInformation(image)
            sitk.WriteImage(image, str(root / f"fixed_{kind}" / name))
            sitk.WriteImage(moved, str(root / f"moving_{kind}" / name))
    report = mrus_references(pairs_from_folder(root))
    assert report["pairs"] == 2 and report["landmarks"] == 4
    assert report["tre_centres_aligned_median_mm"] == pytest.approx(3 * image.GetSpacing()[0], abs=1e-3)
    assert report["tre_gland_centroid_shift_median_mm"] < 1e-3
    for fitted in report["gland_label_registration"].values():
        assert fitted["tre_median_mm"] < 0.25 * image.GetSpacing()[0] and fitted["dice_median"] > 0.95, fitted
    assert all(np.isfinite(v) and v >= 0 for v in report["landmark_contrast_median"].values())
    assert report["other_landmarks"]["landmarks"] == 4  # both landmarks of both pairs, each from the other
    assert report["other_landmarks"]["tre_other_landmarks_translation_median_mm"] < 1e-3
    correlation = report["patch_correlation"]  # same content at the true correspondence
    assert correlation["landmarks"] == 4 and correlation["true_best"] == 4, correlation
    assert correlation["mean_abs_ncc_true"] > 0.99 > max(correlation["mean_abs_ncc_shifted"]), correlation


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(config: Path, data: Path, run: Path, steps: int) -> None:
    """A 2-process gloo torchrun of ``steps`` steps; asserts it succeeds with both ranks in sync."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for _ in range(2):  # the free port is found by bind-and-release: another process may take it first
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                   "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
                   "-m", "deepregister_training.train", "--config", str(config), "--data", str(data),
                   "--max-steps", str(steps), "--out", str(run)]
        completed = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        if "address already in use" not in (completed.stdout + completed.stderr).lower():
            break
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    summary = json.loads((run / "run.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_in_sync"] is True, summary


def test_ddp_two_processes_stay_in_sync(tiny_data: Path, tmp_path: Path) -> None:
    config = small_config(REPO / "training" / "configs" / "linear_deformable.yaml", tmp_path / "configs",
                          batch_size=1)
    run = tmp_path / "run"
    run_two_processes(config, tiny_data, run, steps=2)
    assert [row["step"] for row in read_csv(run / "train_log.csv")] == ["1", "2"]


def test_resume_continues_step_count(tiny_data: Path, tmp_path: Path) -> None:
    config = small_config(REPO / "training" / "configs" / "g2l_jsm_unsupervised.yaml", tmp_path / "configs",
                          validate_every=2)
    run = tmp_path / "run"
    run_training(config, tiny_data, run, "--max-steps", "4")
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["step"] == 4
    run_training(config, tiny_data, run, "--max-steps", "6", "--resume", str(run / "last.pt"))
    steps = [int(row["step"]) for row in read_csv(run / "train_log.csv")]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert [int(row["step"]) for row in read_csv(run / "validation_log.csv")] == [2, 4, 6]
    summary = json.loads((run / "run.json").read_text())
    assert summary["resumed_from"] == 4 and summary["steps"] == 6
    assert torch.load(run / "last.pt", map_location="cpu", weights_only=True)["step"] == 6


def test_clip_grad_norm_bounds_each_step(tiny_data: Path, tmp_path: Path) -> None:
    """With a vanishing clip_grad_norm Adam's steps vanish too (gradients far below its epsilon);
    without it the same two steps move the weights."""
    moved = {}
    for clip in (None, 1e-12):
        extra = {"clip_grad_norm": clip} if clip else {}
        config = small_config(REPO / "training" / "configs" / "linear_deformable.yaml", tmp_path / f"configs{clip}",
                              validate_every=1, **extra)
        run_training(config, tiny_data, tmp_path / f"run{clip}", "--max-steps", "2")
        start = initial_network(config).state_dict()
        end = torch.load(tmp_path / f"run{clip}" / "last.pt", weights_only=True)["model"]
        moved[clip] = max(float((end[k].float() - start[k].float()).abs().max()) for k in start)
    assert moved[None] > 1e-4 and moved[1e-12] < 1e-6, moved


def test_export_loads_and_registers(tiny_data: Path, tmp_path: Path) -> None:
    config = small_config(REPO / "training" / "configs" / "mrus_weakly_supervised.yaml", tmp_path / "configs")
    models = tmp_path / "models"
    run_training(config, tiny_data, tmp_path / "run", "--max-steps", "2", "--export-to", str(models))
    name = yaml.safe_load(config.read_text())["name"]
    folder = models / name
    assert (folder / "model.json").is_file() and (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.pt")) and not list(folder.glob("*.pkl"))
    card, network = load_model(folder)
    assert card.name == name and card.input_size == [16, 16, 16] and not network.training
    assert "tre_median_mm" in card.metrics and math.isfinite(card.metrics["tre_median_mm"])
    assert card.training["steps"] == 2 and card.training["method"] == "weakly_supervised"
    # the config's fine-tuning settings travel into the card (mrus: affine only, pulled by the gland maps)
    assert (card.finetune_iterations, card.finetune_samples, card.finetune_step_mm, card.finetune_organ_weight) == (
        100, 24576, 0.0, 2.0)
    pair = make_phantom_pair(9, (32, 32, 32), spacing=4.0)
    result = register(pair.fixed, pair.moving, model=str(folder), iterations=0, device="cpu")
    assert isinstance(result.transform, sitk.DisplacementFieldTransform)
    assert result.model == name and result.iterations == 0


def _write_config(tmp_path: Path, change) -> Path:
    config = yaml.safe_load((REPO / "training" / "configs" / "linear_deformable.yaml").read_text())
    change(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_initialize_loads_a_pretrained_global_net(tiny_data: Path, tmp_path: Path) -> None:
    stage1 = small_config(REPO / "training" / "configs" / "mrus_global.yaml", tmp_path / "configs")
    run_training(stage1, tiny_data, tmp_path / "stage1", "--max-steps", "3")
    pretrained = torch.load(tmp_path / "stage1" / "best.pt", weights_only=True)["model"]
    channels = yaml.safe_load(stage1.read_text())["network"]["channels"]
    network = build_network("GlobalToLocal", (16, 16, 16), (6.0, 6.0, 6.0), global_channels=channels)
    before = {k: v.clone() for k, v in network.local_net.state_dict().items()}
    fresh = {k: v.clone() for k, v in network.global_net.state_dict().items()}
    assert any(not torch.equal(fresh[k], pretrained[k]) for k in fresh)
    train.initialize(network, {"global_net": str(tmp_path / "stage1" / "best.pt")})
    for key, value in network.global_net.state_dict().items():
        assert torch.equal(value, pretrained[key]), key
    for key, value in network.local_net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_initialize_starts_from_a_shipped_model() -> None:
    card, shipped = load_model("mrus")
    network = build_network(card.architecture, tuple(card.input_size), tuple(card.spacing_mm), **card.config)
    train.initialize(network, {"network": "mrus"})
    for key, value in shipped.state_dict().items():
        assert torch.equal(network.state_dict()[key], value), key
    with pytest.raises(ModelError, match="No model named"):
        train.initialize(network, {"network": "no-such-model"})


@pytest.mark.skipif(not MRUS.is_dir(), reason="needs ../shared/data/mrus_sim")
def test_shipped_mrus_fine_tuning_on_held_out_subjects(tmp_path: Path) -> None:
    """On 4 held-out pairs (MR volumes the model never saw) the card's default fine-tuning (affine;
    MI + the segmenters' gland maps) lowers TRE and raises gland Dice over the network alone; the
    same MI steps without the gland-map term drift away."""
    from deepregister_training.data import pairs_from_folder, split
    from deepregister_training.evaluate import evaluate_mrus

    card, _ = load_model("mrus")
    assert card.finetune_organ_weight > 0 and card.finetune_step_mm == 0.0
    _, held = split(pairs_from_folder(MRUS), 16, 0)
    pairs = held[:4]
    alone = evaluate_mrus("mrus", 0, pairs)
    tuned = evaluate_mrus("mrus", card.finetune_iterations, pairs)
    without = tmp_path / "mrus"
    shutil.copytree(REPO / "Resources" / "Models" / "mrus", without)
    data = json.loads((without / "model.json").read_text())
    (without / "model.json").write_text(json.dumps({**data, "finetune_organ_weight": 0.0}))
    drifted = evaluate_mrus(str(without), card.finetune_iterations, pairs)
    assert tuned["tre_median_mm"] < alone["tre_median_mm"] - 0.5, (alone, tuned)
    assert tuned["dice_median"] > alone["dice_median"] + 0.02, (alone, tuned)
    assert tuned["folding_percent_max"] == 0.0
    assert drifted["tre_median_mm"] > tuned["tre_median_mm"] + 0.5, (tuned, drifted)
    assert drifted["dice_median"] < tuned["dice_median"] - 0.02, (tuned, drifted)


def test_initialize_takes_a_submodule_out_of_a_shipped_model() -> None:
    # A wider local network on top of the shipped mrus global network: only global_net.* is loaded.
    card, shipped = load_model("mrus")
    network = build_network(card.architecture, tuple(card.input_size), tuple(card.spacing_mm),
                            global_channels=card.config["global_channels"], local_channels=[16, 32, 32, 64],
                            segmentation_channels=card.config["segmentation_channels"])
    before = {k: v.clone() for k, v in network.local_net.state_dict().items()}
    train.initialize(network, {"global_net": "mrus"})
    for key, value in shipped.global_net.state_dict().items():
        assert torch.equal(network.global_net.state_dict()[key], value), key
    for key, value in network.local_net.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_unknown_method_is_a_clear_error(tmp_path: Path) -> None:
    path = _write_config(tmp_path, lambda c: c.update(method="supervised_magic"))
    with pytest.raises(ValueError, match="unknown method 'supervised_magic'.*weakly_supervised"):
        train.load_config(path)
    with pytest.raises(ValueError, match="unknown method"):
        train.main(["--config", str(path), "--max-steps", "1", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("key", ["method", "input_size", "training"])
def test_missing_key_is_a_clear_error(key: str, tmp_path: Path) -> None:
    path = _write_config(tmp_path, lambda c: c.pop(key))
    with pytest.raises(ValueError, match=f"lacks '{key}'"):
        train.load_config(path)


def test_ddp_with_reduce_on_plateau_stays_in_sync(tiny_data: Path, tmp_path: Path) -> None:
    """The scheduler steps on the loss averaged over ranks, so learning rates drop at the same step."""
    config = small_config(REPO / "training" / "configs" / "linear_deformable.yaml", tmp_path / "configs",
                          batch_size=1, plateau_patience=0, plateau_factor=0.5)
    run_two_processes(config, tiny_data, tmp_path / "run", steps=8)


def test_cosine_schedule_scales_by_phase_and_decays_to_zero() -> None:
    training = {"lr": 1e-3, "schedule": "cosine", "phases": [{"until": 10, "train": ["local_net"], "lr_scale": 0.1},
                                                              {"until": 100, "train": ["all"]}]}
    assert train.learning_rate(training, 0, 100) == pytest.approx(1e-4)
    assert train.learning_rate(training, 10, 100) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 0.1)))
    assert train.learning_rate(training, 50, 100) == pytest.approx(5e-4)
    assert train.learning_rate(training, 100, 100) == pytest.approx(0.0, abs=1e-12)


def test_schedule_errors_are_clear(tmp_path: Path) -> None:
    path = _write_config(tmp_path, lambda c: c["training"].update(schedule="linear"))
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        train.load_config(path)
    path = _write_config(tmp_path, lambda c: c["training"].update(phases=[{"until": 5, "train": ["all"], "lr_scale": 0.5}]))
    with pytest.raises(ValueError, match="lr_scale needs 'schedule: cosine'"):
        train.load_config(path)


# -- label-smoothed cross-entropy (Hu et al., ISBI 2018) ---------------------------------------
def _ball(grid: "Grid", centre_mm: tuple[float, float, float], radius_mm: float) -> torch.Tensor:
    """(1, 1, Z, Y, X) binary ball on ``grid`` (physical x, y, z centre in mm)."""
    from DeepRegisterLib.spatial import physical_points

    points = physical_points(grid)
    distance = (points - torch.tensor(centre_mm)).norm(dim=-1)
    return (distance <= radius_mm).float()[None, None]


def test_label_smoothing_keeps_the_foreground_and_decays_with_distance() -> None:
    from DeepRegisterLib.spatial import Grid
    from deepregister_training.objectives import smoothed_labels

    grid = Grid.canonical((21, 21, 21), (3.0, 3.0, 3.0))
    ball = _ball(grid, (0.0, 0.0, 0.0), 4.5)  # 3 voxels from the centre along each axis inside
    empty = torch.zeros_like(ball)
    smoothed = smoothed_labels(torch.cat([ball, empty]), grid, sigma_mm=6.0)
    assert torch.equal(smoothed[0][ball[0] > 0], torch.ones(int(ball.sum())))
    assert torch.equal(smoothed[1], empty[0])
    centre = 10  # voxel index of x = 0
    for steps in (1, 2, 4):  # voxels beyond the last foreground voxel (x index 11) along +x
        distance = 3.0 * steps
        expected = math.exp(-distance ** 2 / (2 * 6.0 ** 2))
        assert float(smoothed[0, 0, centre, centre, centre + 1 + steps]) == pytest.approx(expected, rel=1e-5)
    assert float(smoothed[0].min()) < 0.01 and (smoothed[0] >= ball[0]).all()


def test_label_cross_entropy_pulls_labels_that_do_not_overlap() -> None:
    """Two 4 mm blobs 12 mm apart do not overlap: the unsmoothed Dice gives no gradient, the smoothed
    cross-entropy does, towards the translation that aligns them, where it is smallest."""
    from DeepRegisterLib.spatial import Grid, warp
    from deepregister_training.objectives import label_cross_entropy, labels_present, multiscale_dice, smoothed_labels

    grid = Grid.canonical((21, 21, 21), (3.0, 3.0, 3.0))
    fixed, moving = _ball(grid, (0.0, 0.0, 0.0), 4.0), _ball(grid, (12.0, 0.0, 0.0), 4.0)
    fixed_smoothed, moving_smoothed = smoothed_labels(fixed, grid, 6.0), smoothed_labels(moving, grid, 6.0)

    def losses(shift_x: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        translation = torch.tensor([shift_x, 0.0, 0.0], requires_grad=True)
        displacement = translation.view(1, 3, 1, 1, 1).expand(1, 3, *grid.shape)
        cross_entropy = label_cross_entropy(fixed_smoothed, warp(moving_smoothed, displacement, grid))
        dice = multiscale_dice(fixed, warp(moving, displacement, grid), [0], grid.spacing)
        return cross_entropy, dice, translation

    cross_entropy, dice, translation = losses(0.0)
    (dice_gradient,) = torch.autograd.grad(dice, translation)
    (gradient,) = torch.autograd.grad(cross_entropy, translation)
    assert float(dice_gradient.abs().max()) < 1e-6
    assert float(gradient[0]) < -1e-3 and float(gradient[1:].abs().max()) < 0.1 * abs(float(gradient[0]))
    values = {shift: float(losses(shift)[0].detach()) for shift in (0.0, 6.0, 12.0, 18.0)}
    assert values[12.0] < values[6.0] < values[0.0] and values[12.0] < values[18.0], values
    # a label moved off the grid in one image is left out of the mean; none present gives zero
    empty = torch.zeros_like(fixed)
    present = labels_present(torch.cat([fixed, fixed]), torch.cat([moving, empty]))
    assert present.tolist() == [True, False]
    both = label_cross_entropy(torch.cat([fixed_smoothed, fixed_smoothed]), torch.cat([fixed_smoothed, empty]), present)
    assert float(both) == pytest.approx(float(label_cross_entropy(fixed_smoothed, fixed_smoothed)))
    assert float(label_cross_entropy(empty, empty, labels_present(empty, empty))) == 0.0


def test_label_cross_entropy_config_trains(tiny_data: Path, tmp_path: Path) -> None:
    """loss.label: cross_entropy trains GlobalNet + LocalNet (joint_saliency off) on the gland: the
    loss falls over 20 steps on one toy pair; an unknown label loss is a clear error."""
    source = REPO / "training" / "configs" / "mrus_global_local.yaml"
    config = small_config(source, tmp_path / "configs", lr=1e-3, batch_size=1, augment={}, phases=[],
                          schedule="plateau", plateau_patience=100000)
    settings = yaml.safe_load(config.read_text())
    settings["loss"].update(label="cross_entropy", label_smoothing_mm=12.0, gland_weight=1e9, centroid=0.0)
    config.write_text(yaml.safe_dump(settings))
    pairs = write_pairs_csv(tiny_data, ["obs001", "obs002"])
    run = tmp_path / "run"
    run_training(config, pairs, run, "--max-steps", "20")
    losses = [float(row["loss"]) for row in read_csv(run / "train_log.csv")]
    assert all(math.isfinite(v) for v in losses) and np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5]), losses
    settings["loss"]["label"] = "focal"
    config.write_text(yaml.safe_dump(settings))
    with pytest.raises(ValueError, match="Unknown label loss 'focal': use dice or cross_entropy"):
        run_training(config, pairs, tmp_path / "bad", "--max-steps", "1")


def test_gland_prior_recovers_a_known_population_affine() -> None:
    """The least-squares prior: landmarks moved by a known affine about the fixed gland centroid plus the
    centroid shift are predicted exactly; the study's transform and the field register() uses map fixed
    points onto moving ones."""
    from deepregister_training.studies.gland_prior import NONE, errors, mean_offset, prior_transform

    from DeepRegisterLib.prior import GlandPrior
    from DeepRegisterLib.spatial import Grid, physical_points

    rng = np.random.default_rng(3)
    matrix, offset = 0.05 * rng.standard_normal((3, 3)), np.array([1.5, -2.0, 0.7])
    samples = []
    for _ in range(6):
        fixed_centre, moving_centre = rng.normal(0, 10, 3), rng.normal(0, 10, 3)
        fixed = fixed_centre + rng.normal(0, 15, (4, 3))
        moving = fixed + (moving_centre - fixed_centre) + (fixed - fixed_centre) @ matrix.T + offset
        samples.append((fixed_centre, moving_centre, fixed, moving))
    fitted = GlandPrior.fit(samples)
    assert np.allclose(fitted.matrix, matrix, atol=1e-9) and np.allclose(fitted.offset, offset, atol=1e-9)
    assert max(errors(sample, fitted).max() for sample in samples) < 1e-6
    assert max(errors(sample, NONE).max() for sample in samples) > 1.0  # the shift alone misses
    assert np.allclose(mean_offset(samples).matrix, 0.0)
    cf, cm, fixed, moving = samples[0]
    assert np.allclose(prior_transform(cf, cm, fitted).TransformPoint(fixed[1].tolist()), moving[1])
    # the displacement register() starts from, on an oblique grid: fixed voxel + field = the prior's point
    angle = np.radians(20.0)
    direction = (np.cos(angle), -np.sin(angle), 0.0, np.sin(angle), np.cos(angle), 0.0, 0.0, 0.0, 1.0)
    grid = Grid.centered(tuple(cf), (5, 6, 7), (3.0, 2.0, 4.0), direction)
    field = fitted.displacement_on(grid, cf, cm)[0].permute(1, 2, 3, 0).double().numpy().reshape(-1, 3)
    points = physical_points(grid, torch.float64).reshape(-1, 3).numpy()
    expected = np.array([prior_transform(cf, cm, fitted).TransformPoint(p.tolist()) for p in points])
    assert np.allclose(points + field, expected, atol=1e-3)
    again = GlandPrior.from_card(fitted.to_card())  # the card's JSON entry holds it exactly
    assert np.array_equal(again.matrix, fitted.matrix) and np.array_equal(again.offset, fitted.offset)


def test_card_gland_prior_is_checked(tmp_path: Path) -> None:
    """A card's gland_prior must be a 3 x 3 matrix and a 3-value offset of finite numbers."""
    from DeepRegisterLib.models import read_card

    folder = tmp_path / "mrus"
    shutil.copytree(REPO / "Resources" / "Models" / "mrus", folder)
    data = json.loads((folder / "model.json").read_text())
    for bad in ({"matrix": [[1, 0], [0, 1]], "offset_mm": [0, 0, 0]}, {"matrix": [[0] * 3] * 3, "offset_mm": [0, float("nan"), 0]},
                {"matrix": [[0] * 3] * 3}):
        (folder / "model.json").write_text(json.dumps({**data, "gland_prior": bad}))
        with pytest.raises(ModelError, match="gland_prior needs a 3 x 3"):
            read_card(folder)
    (folder / "model.json").write_text(json.dumps({**data, "gland_prior": {"matrix": [[0] * 3] * 3, "offset_mm": [1, 2, True]}}))
    with pytest.raises(ModelError, match="gland_prior needs a 3 x 3"):
        read_card(folder)
    for weight in (-1.0, "strong"):
        (folder / "model.json").write_text(json.dumps({**data, "finetune_anchor_weight": weight}))
        with pytest.raises(ModelError, match="finetune_anchor_weight must be a number >= 0"):
            read_card(folder)
    (folder / "model.json").write_text(json.dumps({**data, "gland_prior": {"matrix": [[0] * 3] * 3, "offset_mm": [1, 2, 3]}}))
    assert read_card(folder).gland_prior["offset_mm"] == [1, 2, 3]


def prior_model(folder: Path, offset: list[float], anchor_weight: float = 0.0) -> Path:
    """A copy of the shipped mrus model whose card carries a gland prior with no matrix and ``offset`` (mm)."""
    shutil.copytree(REPO / "Resources" / "Models" / "mrus", folder)
    data = json.loads((folder / "model.json").read_text())
    prior = {"matrix": [[0.0] * 3] * 3, "offset_mm": offset}
    (folder / "model.json").write_text(json.dumps({**data, "gland_prior": prior, "finetune_anchor_weight": anchor_weight}))
    return folder


@pytest.mark.skipif(not MRUS.is_dir(), reason="needs ../shared/data/mrus_sim")
def test_gland_prior_places_the_moving_image(tmp_path: Path) -> None:
    """With a gland prior on its card, the model's prediction is the prior from the glands its segmenters
    find: the centroid-shift prior maps the fixed gland centroid the network finds onto the moving one (in
    the moving image's physical space, past a start shift of several mm), a prior 3 mm further gives a
    result 3 mm further everywhere, the network's own field is not used, and the messages say so."""
    from deepregister_training.data import pairs_from_folder, split
    from deepregister_training.gland_prior import predicted_glands

    _, held = split(pairs_from_folder(MRUS), 16, 0)
    pair = held[0]
    fixed, moving = sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving))
    results = [register(fixed, moving, model=str(prior_model(tmp_path / f"prior{dx:g}", [dx, 0.0, 0.0])), iterations=0,
                        device="cpu", initial="centers") for dx in (0.0, 3.0)]
    plain = register(fixed, moving, model="mrus", iterations=0, device="cpu", initial="centers")
    assert [r.kept_stage for r in results] == ["network", "network"]
    assert any("gland-anchored motion prior" in m for m in results[0].messages)
    fixed_gland, moving_gland = predicted_glands(pair, "mrus")  # physical, from the same start (centres aligned)
    assert np.linalg.norm(results[0].initial_transform.GetOffset()) > 3.0
    assert np.linalg.norm(np.subtract(results[0].transform.TransformPoint(fixed_gland.tolist()), moving_gland)) < 1.0
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    points = centre + np.random.default_rng(0).uniform(-15, 15, (20, 3))
    mapped = [np.array([r.transform.TransformPoint(p.tolist()) for p in points]) for r in results]
    assert np.allclose(mapped[1] - mapped[0], [3.0, 0.0, 0.0], atol=0.05)
    own = np.array([plain.transform.TransformPoint(p.tolist()) for p in points])
    assert np.abs(own - mapped[0]).max() > 0.5  # the network's own field differs from the centroid shift


@pytest.mark.skipif(not MRUS.is_dir(), reason="needs ../shared/data/mrus_sim")
def test_anchor_keeps_fine_tuning_near_the_prediction(tmp_path: Path) -> None:
    """The card's finetune_anchor_weight reaches fine-tuning: a strong anchor keeps the affine steps within
    0.2 mm of the prediction where the same steps without it move the result by more than 0.5 mm."""
    from deepregister_training.data import pairs_from_folder, split

    _, held = split(pairs_from_folder(MRUS), 16, 0)
    fixed, moving = sitk.ReadImage(str(held[0].fixed)), sitk.ReadImage(str(held[0].moving))
    centre = np.asarray(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    points = centre + np.random.default_rng(1).uniform(-15, 15, (20, 3))

    def moved(result) -> np.ndarray:
        return np.array([result.transform.TransformPoint(p.tolist()) for p in points])

    start = moved(register(fixed, moving, model=str(prior_model(tmp_path / "start", [0.0] * 3)), iterations=0, device="cpu"))
    free, anchored = (register(fixed, moving, model=str(prior_model(tmp_path / f"a{w:g}", [0.0] * 3, w)), iterations=30,
                               device="cpu") for w in (0.0, 1e4))
    assert free.kept_stage == "affine" and anchored.kept_stage in ("affine", "network")
    assert np.linalg.norm(moved(free) - start, axis=1).max() > 0.5
    assert np.linalg.norm(moved(anchored) - start, axis=1).max() < 0.2


def test_anchor_counts_the_affine_correction_over_a_gland_sized_ball() -> None:
    """The anchor term: mean squared displacement of the affine correction over a 20 mm ball, per 25 mm^2."""
    from DeepRegisterLib.finetune import ANCHOR_RADIUS_MM, ANCHOR_SCALE_MM, PairDeformation
    from DeepRegisterLib.spatial import Grid

    deformation = PairDeformation(Grid.centered((0.0, 0.0, 0.0), (8, 8, 8), (2.0, 2.0, 2.0), (1, 0, 0, 0, 1, 0, 0, 0, 1)), ())
    assert float(deformation.affine_departure().detach()) == 0.0
    with torch.no_grad():
        deformation.translation.copy_(torch.tensor([3.0, 4.0, 0.0]))
    assert float(deformation.affine_departure().detach()) == pytest.approx(25.0 / ANCHOR_SCALE_MM ** 2)
    with torch.no_grad():
        deformation.translation.zero_()
        deformation.matrix.copy_(0.1 * torch.eye(3))
    # E|M x|^2 over a uniform ball of radius R is |M|_F^2 R^2 / 5; Monte Carlo check
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200000, 3))
    x *= (ANCHOR_RADIUS_MM * rng.uniform(size=(200000, 1)) ** (1 / 3)) / np.linalg.norm(x, axis=1, keepdims=True)
    sampled = np.mean(np.sum((x @ (0.1 * np.eye(3)).T) ** 2, axis=1)) / ANCHOR_SCALE_MM ** 2
    assert float(deformation.affine_departure().detach()) == pytest.approx(sampled, rel=0.02)


@pytest.mark.skipif(not MRUS.is_dir(), reason="needs ../shared/data/mrus_sim")
def test_gland_prior_tool_writes_a_new_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``deepregister_training.gland_prior --out`` fits on the training pairs and writes a copy of the model
    with the prior under a new name; it never writes over an existing folder."""
    from deepregister_training import gland_prior

    from DeepRegisterLib.models import read_card

    out = tmp_path / "mrus-prior"
    gland_prior.main(["--model", "mrus", "--data", str(MRUS), "--validation-pairs", "88", "--out", str(out)])
    card = read_card(out)
    assert card.name == "mrus-prior" and card.finetune_anchor_weight == 1.0
    assert np.asarray(card.gland_prior["matrix"]).shape == (3, 3) and card.gland_prior["fitted_on"]["pairs"] >= 4
    assert (out / "model.safetensors").read_bytes() == (REPO / "Resources" / "Models" / "mrus" / "model.safetensors").read_bytes()
    assert read_card(REPO / "Resources" / "Models" / "mrus").gland_prior == {}  # the shipped card is untouched
    before = (out / "model.json").read_text()
    with pytest.raises(SystemExit, match="exists"):
        gland_prior.main(["--model", "mrus", "--data", str(MRUS), "--out", str(out)])
    assert (out / "model.json").read_text() == before
