"""Benchmark DeepRegister against elastix and ANTs on the same pairs in one run.

    deepregister benchmark --pairs PAIRS.csv --methods deepregister,elastix,ants [--out DIR] [--repeats N]

(elastix and ANTs come with ``pip install .[bench]``: itk-elastix and antspyx.)

PAIRS.csv columns (paths relative to the CSV): name, kind (a group such as "mrus" or
"brain-us-128"), modality ("mono" or "multi"), fixed, moving, and optionally fixed_labels,
moving_labels (integer label maps) and fixed_landmarks, moving_landmarks (any landmark file
:func:`~DeepRegisterLib.landmarks.read_landmarks` reads). Testing/Performance/make_benchmark_pairs.py
writes such a set.

Each registration runs in its own worker process (``python -m DeepRegisterLib.benchmark``) with
``--threads`` CPU threads, so the peak resident memory it reports is that of the process doing the
work, and the seconds are those of the registration call alone, steady state: no imports or file
reading, and each worker first registers a small synthetic pair with the same tool so one-time
costs (lazy imports and kernel set-up in torch; ITK loading its modules) are not timed. For
each pair and repeat, all methods run one after the other (A B C A B C) so drifting machine speed
hits all of them alike. Each worker writes its fixed -> moving transform to a file; this process
reads it back with SimpleITK and measures TRE, Dice per label and folding the same way for all.

Methods: ``deepregister`` = every installed model, once without and once with its fine-tuning
iterations ("deepregister/NAME" and "deepregister/NAME+ft": the card's default, or 40 when the
card sets none; no model installed: fine-tuning alone); ``elastix`` = affine (4 levels) + B-spline
(3 levels, control grid 40, 20, 10 mm, bending-energy penalty), Mattes mutual information for
multimodal pairs and normalised correlation for monomodal ones. (elastix's default B-spline map,
whose control grid is only 2x coarser at its coarsest level, diverged on the 192 mm field-of-view
size pairs: 17.5 mm TRE from 2.9 at 128^3 with 4 levels, 10.3 mm with 3; 40-20-10 mm: 0.75 mm, and
on a 128 mm brain pair 0.27 mm in 30 s against the default's 0.29 mm in 44 s.)
``ants`` = ANTs SyN and SyNRA (Mattes mutual information). All start from the image centres
aligned, as DeepRegister does.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .imageio import center_alignment, read_image
from .landmarks import read_landmarks, tre
from .memory import peak_memory_mb

METHOD_GROUPS = ("deepregister", "elastix", "ants")
DEFAULT_FINETUNE_ITERATIONS = 40  # "+ft" runs of models whose card sets no fine-tuning default
WARM_UP_VOXELS = 32  # side of the synthetic pair each worker registers before the timed run
COLUMNS = ["pair", "kind", "modality", "voxels", "method", "repeat", "status", "seconds", "peak_rss_mb",
           "landmarks", "tre_median_mm", "tre_mean_mm", "tre_p90_mm", "tre_max_mm", "dice_mean", "dice",
           "folding_percent", "error"]


@dataclass
class BenchmarkPair:
    """One row of the pairs CSV, paths resolved."""

    name: str
    kind: str
    modality: str
    fixed: Path
    moving: Path
    fixed_labels: Path | None
    moving_labels: Path | None
    fixed_landmarks: Path | None
    moving_landmarks: Path | None


@dataclass
class Method:
    """A registration configuration run by the worker: ``tool`` with its ``options``."""

    name: str
    tool: str
    options: dict


def read_pairs(path: str | Path) -> list[BenchmarkPair]:
    """Pairs from a benchmark CSV (file paths made absolute: workers run in their own folder);
    raises ValueError naming what is missing."""
    path = Path(path).resolve()
    with path.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    required = {"name", "kind", "modality", "fixed", "moving"}
    if not rows or not required <= set(rows[0]):
        raise ValueError(f"{path} needs a header with the columns {', '.join(sorted(required))}.")

    def resolve(value: str | None) -> Path | None:
        return (path.parent / value) if value else None

    pairs = []
    for row in rows:
        if row["modality"] not in ("mono", "multi"):
            raise ValueError(f"{path}: pair {row['name']} has modality {row['modality']!r}; use mono or multi.")
        pair = BenchmarkPair(row["name"], row["kind"], row["modality"], resolve(row["fixed"]), resolve(row["moving"]),
                             *(resolve(row.get(key)) for key in ("fixed_labels", "moving_labels",
                                                                  "fixed_landmarks", "moving_landmarks")))
        missing = [str(p) for p in (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels,
                                    pair.fixed_landmarks, pair.moving_landmarks) if p is not None and not p.exists()]
        if missing:
            raise ValueError(f"{path}: pair {pair.name} names files that do not exist: {', '.join(missing)}")
        pairs.append(pair)
    return pairs


def expand_methods(groups: list[str], models: list[str] | None, quick: bool) -> list[Method]:
    """The configurations behind ``deepregister``, ``elastix`` and ``ants``.

    ``models``: model names for deepregister (default: every installed model). ``quick``: a few
    iterations everywhere, for smoke tests only.
    """
    from .models import find_model, list_models, read_card

    unknown = [g for g in groups if g not in METHOD_GROUPS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; use {', '.join(METHOD_GROUPS)}.")
    methods = []
    if "deepregister" in groups:
        names = models if models is not None else [card.name for card in list_models()]
        for name in names:
            card = read_card(find_model(name))
            iterations = 5 if quick else (card.finetune_iterations or DEFAULT_FINETUNE_ITERATIONS)
            methods.append(Method(f"deepregister/{name}", "deepregister", {"model": name, "iterations": 0}))
            methods.append(Method(f"deepregister/{name}+ft", "deepregister", {"model": name, "iterations": iterations}))
        if not names:
            methods.append(Method("deepregister/finetune", "deepregister",
                                  {"model": None, "iterations": 5 if quick else 150}))
    if "elastix" in groups:
        methods.append(Method("elastix", "elastix", {"affine_iterations": 16 if quick else 256,
                                                     "bspline_iterations": 16 if quick else 500}))
    if "ants" in groups:
        for kind in ("SyN", "SyNRA"):
            methods.append(Method(f"ants/{kind}", "ants", {"type_of_transform": kind, "quick": quick}))
    return methods


# -- worker side (runs in a fresh process) ------------------------------------------------------
def _run_deepregister(fixed_path: str, moving_path: str, options: dict, out: Path, threads: int) -> tuple[float, Path]:
    import torch

    from .registration import register

    torch.set_num_threads(threads)
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    start = time.perf_counter()
    result = register(fixed, moving, model=options["model"], iterations=options["iterations"], device="cpu")
    seconds = time.perf_counter() - start
    path = out / "transform.h5"
    sitk.WriteTransform(result.transform, str(path))
    return seconds, path


def _run_elastix(fixed_path: str, moving_path: str, options: dict, out: Path, threads: int,
                 modality: str) -> tuple[float, Path]:
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
    metric = "AdvancedMattesMutualInformation" if modality == "multi" else "AdvancedNormalizedCorrelation"
    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine", 4)
    affine["Metric"] = [metric]
    affine["MaximumNumberOfIterations"] = [str(options["affine_iterations"])]
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    bspline = parameters.GetDefaultParameterMap("bspline", 3, 10.0)
    bspline["GridSpacingSchedule"] = ["4", "2", "1"]
    bspline["Metric"] = [metric, "TransformBendingEnergyPenalty"]
    bspline["MaximumNumberOfIterations"] = [str(options["bspline_iterations"])]
    parameters.AddParameterMap(affine)
    parameters.AddParameterMap(bspline)
    start = time.perf_counter()
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False)
    seconds = time.perf_counter() - start
    field = itk.transformix_deformation_field(moving, result)
    path = out / "displacement.mha"
    itk.imwrite(field, str(path))
    return seconds, path


def _run_ants(fixed_path: str, moving_path: str, options: dict, out: Path) -> tuple[float, Path]:
    import ants

    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    initial = sitk.AffineTransform(3)
    initial.SetTranslation(center_alignment(read_image(fixed_path), read_image(moving_path)).GetOffset())
    sitk.WriteTransform(initial, str(out / "centres.mat"))
    # Quick runs (tests) sample the affine metric densely: ANTs' default random 20 % sample made SyN's
    # result on a 48^3 pair swing between 2.8 and 4.0 mm from run to run (dense: 2.8-3.1 mm).
    extra = ({"reg_iterations": (4, 2, 0), "aff_iterations": (20, 10, 0, 0), "aff_random_sampling_rate": 1.0}
             if options["quick"] else {})
    start = time.perf_counter()
    result = ants.registration(fixed, moving, type_of_transform=options["type_of_transform"],
                               initial_transform=str(out / "centres.mat"), outprefix=str(out / "ants_"), **extra)
    seconds = time.perf_counter() - start
    composed = ants.apply_transforms(fixed, moving, transformlist=result["fwdtransforms"],
                                     compose=str(out / "composed_"))
    return seconds, Path(composed)


def _register_with(tool: str, fixed: str, moving: str, options: dict, modality: str, out: Path,
                   threads: int) -> tuple[float, Path]:
    if tool == "deepregister":
        return _run_deepregister(fixed, moving, options, out, threads)
    if tool == "elastix":
        return _run_elastix(fixed, moving, options, out, threads, modality)
    return _run_ants(fixed, moving, options, out)


def warm_up(tool: str, options: dict, modality: str, out: Path, threads: int) -> None:
    """Register a small synthetic pair with the same tool first, so that one-time costs (lazy
    imports and kernel set-up in torch, ITK's module loading) are not timed."""
    folder = out / "warm-up"
    folder.mkdir()
    for name, centre in (("fixed", WARM_UP_VOXELS / 2), ("moving", WARM_UP_VOXELS / 2 + 1)):
        blob = sitk.GaussianSource(sitk.sitkFloat32, [WARM_UP_VOXELS] * 3, [6.0] * 3, [centre] * 3, 255.0)
        sitk.WriteImage(blob, str(folder / f"{name}.nii.gz"))
    quick = {"deepregister": {**options, "iterations": min(2, options.get("iterations", 0))},
             "elastix": {"affine_iterations": 2, "bspline_iterations": 2},
             "ants": {**options, "quick": True}}[tool]
    _register_with(tool, str(folder / "fixed.nii.gz"), str(folder / "moving.nii.gz"), quick, modality, folder, threads)


def worker(argv: list[str]) -> int:
    """Run one registration: TOOL OPTIONS_JSON FIXED MOVING MODALITY OUT THREADS, after a warm-up
    (:func:`warm_up`); prints a JSON line with the seconds of the registration call, the process's
    peak RSS (MB) and the transform file."""
    tool, options, fixed, moving, modality, out, threads = argv
    options, out, threads = json.loads(options), Path(out), int(threads)
    warm_up(tool, options, modality, out, threads)
    seconds, path = _register_with(tool, fixed, moving, options, modality, out, threads)
    peak = peak_memory_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "transform": str(path)}))
    return 0


# -- orchestration ------------------------------------------------------------------------------
def _worker_environment(threads: int) -> dict[str, str]:
    environment = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        environment[key] = str(threads)
    return environment


def read_transform(path: Path) -> sitk.Transform:
    """A worker's transform: an ITK transform file, or a displacement field image (fixed grid, mm)."""
    if path.suffix in (".h5", ".tfm", ".txt", ".mat"):
        return sitk.ReadTransform(str(path))
    field = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkVectorFloat64)
    return sitk.DisplacementFieldTransform(field)


def measure(pair: BenchmarkPair, transform: sitk.Transform) -> dict:
    """TRE statistics (mm), Dice per label and folding (% of fixed voxels) of a fixed -> moving transform."""
    # Imported here: metrics needs torch, which elastix and ANTs workers must not load (their memory).
    from .metrics import dice_per_label, transform_folding_percent

    fixed = sitk.ReadImage(str(pair.fixed))
    row: dict = {"folding_percent": transform_folding_percent(transform, fixed)}
    if pair.fixed_landmarks and pair.moving_landmarks:
        errors = tre(read_landmarks(pair.fixed_landmarks).points, read_landmarks(pair.moving_landmarks).points,
                     transform)
        row.update(landmarks=len(errors), tre_median_mm=float(np.median(errors)), tre_mean_mm=float(np.mean(errors)),
                   tre_p90_mm=float(np.percentile(errors, 90)), tre_max_mm=float(np.max(errors)))
    if pair.fixed_labels and pair.moving_labels:
        dice = dice_per_label(read_image(pair.fixed_labels), read_image(pair.moving_labels), transform)
        row.update(dice_mean=float(np.mean(list(dice.values()))),
                   dice=";".join(f"{name}={value:.4f}" for name, value in dice.items()))
    return row


def initial_row(pair: BenchmarkPair) -> dict:
    """The "centres aligned" reference row: every method's starting point."""
    shift = center_alignment(sitk.ReadImage(str(pair.fixed)), sitk.ReadImage(str(pair.moving)))
    return {"status": "ok", "seconds": 0.0, **measure(pair, shift)}


def run_one(pair: BenchmarkPair, method: Method, threads: int, timeout_s: float) -> dict:
    """One registration in a fresh worker process, measured; failures become a row with the error."""
    with tempfile.TemporaryDirectory(prefix="deepregister-bench-") as folder:
        command = [sys.executable, "-m", "DeepRegisterLib.benchmark", method.tool, json.dumps(method.options),
                   str(pair.fixed), str(pair.moving), pair.modality, folder, str(threads)]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=folder,
                                  env=_worker_environment(threads))
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
            return {"status": "failed", "error": lines[-1][:300]}
        report = json.loads(done.stdout.strip().splitlines()[-1])
        transform = read_transform(Path(report["transform"]))
        return {"status": "ok", "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
                **measure(pair, transform)}


def run_benchmark(pairs: list[BenchmarkPair], methods: list[Method], repeats: int, threads: int,
                  timeout_s: float, log=print) -> list[dict]:
    """Every method on every pair, ``repeats`` times, interleaved; one row per run plus one
    "centres aligned" row per pair."""
    rows = []
    for pair in pairs:
        size = sitk.ImageFileReader()
        size.SetFileName(str(pair.fixed))
        size.ReadImageInformation()
        common = {"pair": pair.name, "kind": pair.kind, "modality": pair.modality,
                  "voxels": int(np.prod(size.GetSize()))}
        rows.append({**common, "method": "centres aligned", "repeat": 0, **initial_row(pair)})
        for repeat in range(repeats):
            for method in methods:
                row = {**common, "method": method.name, "repeat": repeat, **run_one(pair, method, threads, timeout_s)}
                rows.append(row)
                log(f"{pair.name:>18} {method.name:<28} {row['status']:<6} "
                    + (f"{row['seconds']:7.2f} s  TRE {row.get('tre_median_mm', float('nan')):.2f} mm"
                       if row["status"] == "ok" else row.get("error", "")))
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.4f}" if isinstance(value, float) else value) for key, value in row.items()})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, help="CSV of pairs (see Testing/Performance/make_benchmark_pairs.py)")
    parser.add_argument("--methods", default="deepregister,elastix,ants",
                        help="comma-separated: deepregister, elastix, ants (default: all three)")
    parser.add_argument("--models", help="comma-separated DeepRegister models (default: every installed model)")
    parser.add_argument("--out", default="benchmark-output", help="output folder (default benchmark-output)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per pair and method; seconds are the median")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per registration (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run counts as failed")
    parser.add_argument("--quick", action="store_true", help="a few iterations per method: smoke tests only")


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed arguments and write CSV, Markdown and plots to ``--out``."""
    from .benchmark_report import write_report  # matplotlib: not needed in the workers

    try:
        pairs = read_pairs(args.pairs)
        methods = expand_methods([m.strip() for m in args.methods.split(",") if m.strip()],
                                 [m.strip() for m in args.models.split(",")] if args.models else None, args.quick)
    except (ValueError, LookupError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.threads < 1:
        print("error: --repeats and --threads must be at least 1.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(pairs)} pairs x {len(methods)} methods x {args.repeats} repeats, {args.threads} threads each")
    rows = run_benchmark(pairs, methods, args.repeats, args.threads, args.timeout)
    write_csv(rows, out / "measurements.csv")
    write_report(rows, out, threads=args.threads, repeats=args.repeats)
    print(f"Wrote {out / 'measurements.csv'}, {out / 'report.md'} and plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1:]))
