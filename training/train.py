"""Train a DeepRegister network from a YAML config; export the best checkpoint as a model.

    python -m deepregister_training.train --config training/configs/NAME.yaml [--max-steps N] [--out DIR]
                             [--resume CKPT] [--data FOLDER_OR_CSV] [--export-to MODELS_DIR]
    torchrun --nproc_per_node N -m deepregister_training.train --config ...   # DistributedDataParallel

Methods (config ``method``): ``weakly_supervised`` (labels are loss targets, never inputs),
``unsupervised`` (image similarity, joint-saliency design), ``synthetic_supervised`` (RegNet:
known synthetic fields) and ``linear_deformable`` (Christodoulidis et al.). See training/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml

from DeepRegisterLib.progress import ProgressBar
from DeepRegisterLib.models import WEIGHTS_FILE, ModelCard, find_model, read_weights, save_model
from DeepRegisterLib.nets import build_network
from DeepRegisterLib.spatial import Grid, folding_percent, warp

from . import objectives
from .data import PairFiles, PreparedPair, pairs_from_csv, pairs_from_folder, prepare_pair, split

REPO = Path(__file__).resolve().parents[1]


def load_config(path: str | Path) -> dict:
    """Read a YAML config; relative data paths are relative to the repository root."""
    with open(path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    for key in ("name", "method", "architecture", "input_size", "spacing_mm", "data", "training"):
        if key not in config:
            raise ValueError(f"Config {path} lacks '{key}'.")
    if config["method"] not in objectives.METHODS:
        raise ValueError(f"Config {path}: unknown method '{config['method']}'; use one of {', '.join(objectives.METHODS)}.")
    schedule = config["training"].get("schedule", "plateau")
    if schedule not in ("plateau", "cosine"):
        raise ValueError(f"Config {path}: unknown schedule '{schedule}'; use plateau or cosine.")
    if schedule == "plateau" and any("lr_scale" in phase for phase in config["training"].get("phases", [])):
        raise ValueError(f"Config {path}: a phase's lr_scale needs 'schedule: cosine'.")
    return config


def model_card(config: dict) -> ModelCard:
    return ModelCard(name=config["name"], description=config.get("description", ""),
                     architecture=config["architecture"], config=config.get("network", {}),
                     input_size=list(config["input_size"]), spacing_mm=list(config["spacing_mm"]),
                     modality=config.get("modality", {"fixed": "any", "moving": "any"}),
                     intensity_percentiles=list(config.get("intensity_percentiles", [1.0, 99.0])),
                     finetune_metric=config.get("finetune_metric", "mi"),
                     finetune_iterations=int(config.get("finetune_iterations", 0)),
                     finetune_step_mm=float(config.get("finetune_step_mm", ModelCard.finetune_step_mm)),
                     finetune_samples=int(config.get("finetune_samples", ModelCard.finetune_samples)),
                     finetune_organ_weight=float(config.get("finetune_organ_weight", ModelCard.finetune_organ_weight)))


def _resolve(path: str) -> Path:
    return Path(path) if Path(path).is_absolute() or Path(path).exists() else REPO / path


def load_pairs(config: dict, data_override: str | None) -> tuple[list[PreparedPair], list[PreparedPair]]:
    """Training and held-out pairs, prepared on the model grid.

    ``data.source``: pairs (DeepReg folder or CSV), split by ``validation_pairs``; ``data.images`` and
    ``data.validation_images``: single volumes (for synthetic deformations), added to each side.
    """
    data = config["data"]
    source = _resolve(data_override or data["source"])
    files = pairs_from_csv(source) if source.suffix == ".csv" else pairs_from_folder(source)
    held_out = int(data.get("validation_pairs", max(1, len(files) // 6)))
    train_files, val_files = split(files, min(held_out, len(files) - 1), int(data.get("seed", 0)))
    if not data_override:
        train_files += [PairFiles(Path(p).name, _resolve(p), _resolve(p)) for p in data.get("images", [])]
        val_files += [PairFiles(Path(p).name, _resolve(p), _resolve(p)) for p in data.get("validation_images", [])]
    if config["method"] == "weakly_supervised":
        unlabelled = [f.name for f in train_files + val_files if f.fixed_labels is None or f.moving_labels is None]
        if unlabelled:
            raise ValueError(f"weakly_supervised training needs fixed and moving labels; missing for {unlabelled[:5]}.")
    card = model_card(config)
    return [prepare_pair(f, card) for f in train_files], [prepare_pair(f, card) for f in val_files]


def pretrained_state(source: str) -> dict[str, torch.Tensor]:
    """Weights from a training checkpoint (``.pt``, read with ``weights_only``) or from a shipped
    model (its name, folder or ``.safetensors`` file; :func:`read_weights`); no code is ever unpickled."""
    if source.endswith(".safetensors"):
        return read_weights(_resolve(source), source)
    if not source.endswith(".pt"):
        return read_weights(find_model(source) / WEIGHTS_FILE, source)
    state = torch.load(_resolve(source), map_location="cpu", weights_only=True)
    return state.get("model", state)


def initialize(network: torch.nn.Module, sources: dict[str, str]) -> None:
    """Load pretrained weights into submodules: ``{submodule: source}`` (e.g. a GlobalNet run's
    best.pt into ``global_net``; ``network: mrus`` starts the whole network from the shipped model;
    ``global_net: mrus`` takes that submodule's weights out of a whole network's); see :func:`pretrained_state`."""
    for name, source in sources.items():
        state = pretrained_state(str(source))
        prefix = f"{name}."
        if name != "network" and any(key.startswith(prefix) for key in state):  # a whole network's weights
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        network.get_submodule("" if name == "network" else name).load_state_dict(state)


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device); initialises the process group under torchrun (gloo on CPU, nccl on GPU)."""
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        return 0, 1, device
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), device


def parameter_groups(network: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """Parameters by top-level submodule name (e.g. global_net, local_net), for phased training."""
    groups: dict[str, list[torch.nn.Parameter]] = {}
    for name, parameter in network.named_parameters():
        groups.setdefault(name.split(".")[0], []).append(parameter)
    return groups


def trained_groups(config: dict, step: int, groups: list[str]) -> set[str]:
    """Parameter groups updated at ``step``: phases such as "global, then local, then joint"."""
    for phase in config["training"].get("phases", []):
        if step < int(phase["until"]):
            return set(groups) if "all" in phase["train"] else set(phase["train"]) & set(groups)
    return set(groups)


def learning_rate(training: dict, step: int, steps: int) -> float:
    """The learning rate at ``step`` under ``schedule: cosine``: ``lr`` x the phase's ``lr_scale`` x
    a cosine decay from 1 at step 0 to 0 at ``steps``; a pure function of the step, so resuming is exact."""
    scale = 1.0
    for phase in training.get("phases", []):
        if step < int(phase["until"]):
            scale = float(phase.get("lr_scale", 1.0))
            break
    return float(training.get("lr", 1e-3)) * scale * 0.5 * (1.0 + math.cos(math.pi * step / steps))


@torch.no_grad()
def validate(network: torch.nn.Module, pairs: list[PreparedPair], grid: Grid, device: torch.device,
             objective: objectives.Objective) -> dict:
    """Median target error (mm), median gland Dice, mean folding (%) over held-out pairs.

    Target error: landmark-centroid TRE for labelled pairs; for the synthetic-supervised method,
    the endpoint error of a fixed (seeded) synthetic field at the voxels inside the anatomy.
    """
    network.eval()
    errors, dices, folds = [], [], []
    for index, pair in enumerate(pairs):
        if objective.method == "synthetic_supervised":
            batch = objective.batch([pair], 1, np.random.default_rng(1234 + index))
            displacement = network(batch["fixed"], batch["moving"])["displacement"].float()
            inside = batch["mask"][0, 0]
            errors += (displacement - batch["field"]).norm(dim=1)[0][inside].cpu().tolist()
            folds.append(folding_percent(displacement.cpu(), grid))
            continue
        displacement = network.register_pair(pair.fixed[None].to(device), pair.moving[None].to(device))["displacement"].float().cpu()
        folds.append(folding_percent(displacement, grid))
        if pair.fixed_labels is None:
            continue
        warped = warp(pair.moving_labels[None], displacement, grid)[0]
        fixed_gland, warped_gland = pair.fixed_labels[0] > 0.5, warped[0] > 0.5
        dices.append(float(2 * (fixed_gland & warped_gland).sum() / max(int(fixed_gland.sum() + warped_gland.sum()), 1)))
        distances = objectives.centroid_errors(pair.fixed_labels[None, 1:], pair.moving_labels[None, 1:],
                                               displacement, grid)[0]
        errors += [e for e in distances.tolist() if np.isfinite(e)]
    network.train()
    return {"tre_median_mm": float(np.median(errors)) if errors else float("nan"),
            "dice_median": float(np.median(dices)) if dices else float("nan"),
            "folding_percent": float(np.mean(folds)) if folds else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--max-steps", type=int, help="stop after this many steps (overrides the config)")
    parser.add_argument("--out", help="run folder (default runs/<name>)")
    parser.add_argument("--resume", help="checkpoint to continue from")
    parser.add_argument("--data", help="data folder (DeepReg layout) or CSV, overriding the config")
    parser.add_argument("--export-to", help="models folder for the best checkpoint (default: do not export)")
    args = parser.parse_args(argv)

    config = load_config(args.config)
    rank, world, device = setup_distributed()
    training = config["training"]
    seed = int(training.get("seed", 0))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + rank)
    steps = int(args.max_steps if args.max_steps is not None else training["steps"])
    out = Path(args.out or REPO / "runs" / config["name"])
    out.mkdir(parents=True, exist_ok=True)

    train_pairs, val_pairs = load_pairs(config, args.data)
    size, spacing = tuple(config["input_size"]), tuple(float(s) for s in config["spacing_mm"])
    grid = Grid.canonical(size, spacing)
    network = build_network(config["architecture"], size, spacing, **config.get("network", {})).to(device)
    initialize(network, training.get("initialize", {}))
    groups = parameter_groups(network)
    optimizer = torch.optim.Adam([{"params": params, "name": name} for name, params in groups.items()],
                                 lr=float(training.get("lr", 1e-3)))
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=float(training.get("plateau_factor", 0.9)),
                                                         patience=int(training.get("plateau_patience", 50)))
    start, best = 0, float("inf")
    if args.resume:
        state = torch.load(args.resume, map_location="cpu", weights_only=True)
        network.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        plateau.load_state_dict(state["plateau"])
        start, best = int(state["step"]), float(state["best"])
        rng = np.random.default_rng([seed + rank, start])
    model = network
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(network, device_ids=[device.index] if device.type == "cuda" else None)
    objective = objectives.build(config, grid, device)
    progress = ProgressBar(always=rank == 0)
    log_path, val_path = out / "train_log.csv", out / "validation_log.csv"
    if rank == 0:
        restart_logs([log_path, val_path], ["step,loss,seconds", "step,tre_median_mm,dice_median,folding_percent"],
                     start)
    begin = time.perf_counter()
    cosine = training.get("schedule", "plateau") == "cosine"
    for step in range(start, steps):
        if cosine:
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(training, step, steps)
        batch = objective.batch(train_pairs, int(training.get("batch_size", 4)), rng)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = objective.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        active = trained_groups(config, step, list(groups))
        for name, params in groups.items():
            if name not in active:
                for parameter in params:
                    parameter.grad = None  # Adam leaves parameters without gradients untouched
        if "clip_grad_norm" in training:  # one bad batch cannot throw the weights far
            torch.nn.utils.clip_grad_norm_(network.parameters(), float(training["clip_grad_norm"]))
        optimizer.step()
        if not cosine:
            plateau.step(mean_over_ranks(loss.detach(), world))
        if rank == 0:
            with log_path.open("a") as handle:
                handle.write(f"{step + 1},{float(loss.detach()):.6f},{time.perf_counter() - begin:.2f}\n")
            progress("train", (step + 1 - start) / max(steps - start, 1))
        last = step + 1 == steps
        if rank == 0 and ((step + 1) % int(training.get("validate_every", 200)) == 0 or last):
            metrics = validate(network, val_pairs, grid, device, objective)
            with val_path.open("a") as handle:
                handle.write(f"{step + 1},{metrics['tre_median_mm']:.4f},{metrics['dice_median']:.4f},"
                             f"{metrics['folding_percent']:.4f}\n")
            score = metrics["tre_median_mm"] if np.isfinite(metrics["tre_median_mm"]) else float(loss.detach())
            state = {"model": network.state_dict(), "optimizer": optimizer.state_dict(),
                     "plateau": plateau.state_dict(), "step": step + 1, "best": min(best, score)}
            torch.save(state, out / "last.pt")
            if score < best:
                best = score
                torch.save(state, out / "best.pt")
                (out / "best_metrics.json").write_text(json.dumps({"step": step + 1, **metrics}, indent=2))
    in_sync = ranks_in_sync(network, world)
    if rank == 0:
        summary = {"config": str(args.config), "steps": steps, "resumed_from": start, "world_size": world,
                   "device": str(device), "seconds": round(time.perf_counter() - begin, 2), "ranks_in_sync": in_sync}
        (out / "run.json").write_text(json.dumps(summary, indent=2))
        print(f"\nTrained {steps - start} steps in {time.perf_counter() - begin:.0f} s; logs and checkpoints in {out}")
        if args.export_to:
            folder = export(config, out, Path(args.export_to), device, time.perf_counter() - begin)
            print(f"Exported the best checkpoint to {folder}")
    if world > 1:
        dist.barrier()  # no rank tears the group down while another still works (gloo aborts then)
        # DDP's reducer holds the process group: free both while the interpreter is fully alive, or
        # gloo's threads may meet a half-finalised interpreter at exit ("terminate called ...").
        del model
        gc.collect()
        dist.destroy_process_group()
    return 0


def mean_over_ranks(value: torch.Tensor, world: int) -> float:
    """The value averaged over all ranks, so schedulers step identically everywhere."""
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return float(value)


def restart_logs(paths: list[Path], headers: list[str], start: int) -> None:
    """Write missing headers; on resume drop rows logged after the checkpoint's step."""
    for path, header in zip(paths, headers):
        rows = path.read_text().splitlines()[1:] if path.exists() else []
        kept = [row for row in rows if int(row.split(",")[0]) <= start]
        path.write_text("\n".join([header, *kept]) + "\n")


def ranks_in_sync(network: torch.nn.Module, world: int) -> bool:
    """Whether every rank ends with the same weights (always true on one process)."""
    if world == 1:
        return True
    checksum = torch.stack([p.detach().double().sum() for p in network.parameters()]).cpu()
    gathered = [torch.zeros_like(checksum) for _ in range(world)]
    dist.all_gather(gathered, checksum)
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def export(config: dict, run: Path, models: Path, device: torch.device, seconds: float) -> Path:
    """Write the best checkpoint of ``run`` as a model folder (weights + card with its measured metrics)."""
    state = torch.load(run / "best.pt", map_location="cpu", weights_only=True)
    size, spacing = tuple(config["input_size"]), tuple(float(s) for s in config["spacing_mm"])
    network = build_network(config["architecture"], size, spacing, **config.get("network", {}))
    network.load_state_dict(state["model"])
    card = model_card(config)
    card.training = {"method": config["method"], "data": config.get("data_description", str(config["data"])),
                     "steps": int(state["step"]), "device": str(device), "seconds": round(seconds, 1),
                     "config": config}
    card.metrics = json.loads((run / "best_metrics.json").read_text())
    return save_model(models / config["name"], card, network)


if __name__ == "__main__":
    raise SystemExit(main())
