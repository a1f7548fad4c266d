"""Benchmark DeepRegister against elastix and ANTs on the same pairs in one run.

    deepregister benchmark --pairs PAIRS.csv --methods deepregister,elastix,ants [--out DIR] [--repeats N]

(elastix and ANTs come with ``pip install .[bench]``: itk-elastix and antspyx.)

PAIRS.csv columns (paths relative to the CSV): name, kind (a group such as "mrus" or
"brain-us-128"), modality ("mono" or "multi"), fixed, moving, and optionally fixed_labels,
moving_labels (integer label maps), fixed_landmarks, moving_landmarks (any landmark file
:func:`~DeepRegisterLib.landmarks.read_landmarks` reads), family (default: the kind), split ("dev"
or "test"; default empty) and fixed_mask, moving_mask (label images on their image's grid, nonzero
= inside; empty = none). Testing/Performance/make_benchmark_pairs.py and
Testing/Performance/make_generalisation_pairs.py (families with dev and test splits) write such
sets; ``--split`` and ``--families`` pick rows.

Masks go to every method: DeepRegister's ``register(..., fixed_mask=, moving_mask=)`` (SimpleITK
UInt8 images on their image's grid; only passed when the pair has them), elastix's fixed and moving
masks (itk.Image[UC, 3]) and ANTs' ``mask`` / ``moving_mask`` (applied at all stages).

Each registration runs in its own worker process (``python -m DeepRegisterLib.tools.benchmark``) with
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

``--timing process`` measures instead what a user waits for: each method as one fresh process from
start to exit, imports and file I/O included, no warm-up: for DeepRegister the command line
``python -m DeepRegisterLib.cli register --fixed F --moving M --out DIR`` (which also writes
warped.nii.gz, saliency.nii.gz, report.json and report.png; masks as ``--fixed-mask`` /
``--moving-mask``), for elastix and ANTs a minimal Python process that imports the tool, reads the
files, registers and writes the transform (elastix: its TransformParameters files; ANTs: its
transform files). Converting those to a displacement field for the measurements happens afterwards
in another, untimed process. Peak memory is then the registering process's own (VmHWM).

``--busy-cores N`` keeps N cores busy with a CPU-burning process (N busy-looping Python processes
in one process group, started before and killed right after every timed registration, never
living longer than the timeout) to show how times degrade when other programs share the CPU.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..imageio import center_alignment, read_image
from ..landmarks import read_landmarks, tre
from ..memory import peak_memory_mb
from ..options import INITIAL_POSITIONS

METHOD_GROUPS = ("deepregister", "elastix", "ants")
DEFAULT_FINETUNE_ITERATIONS = 40  # "+ft" runs of models whose card sets no fine-tuning default
WARM_UP_VOXELS = 32  # side of the synthetic pair each worker registers before the timed run
TIMINGS = ("steady", "process")
COLUMNS = ["pair", "kind", "family", "split", "modality", "voxels", "method", "repeat", "status", "seconds",
           "peak_rss_mb", "landmarks", "tre_median_mm", "tre_mean_mm", "tre_p90_mm", "tre_max_mm", "dice_mean",
           "dice", "folding_percent", "timing", "busy_cores", "busy_cpu_seconds", "error"]


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
    family: str = ""
    split: str = ""
    fixed_mask: Path | None = None
    moving_mask: Path | None = None

    def __post_init__(self) -> None:
        self.family = self.family or self.kind

    @property
    def masks(self) -> tuple[str, str]:
        """The mask paths as worker arguments ("" = none)."""
        return (str(self.fixed_mask) if self.fixed_mask else "", str(self.moving_mask) if self.moving_mask else "")


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
        split = (row.get("split") or "").strip()
        if split not in ("", "dev", "test"):
            raise ValueError(f"{path}: pair {row['name']} has split {split!r}; use dev, test or leave it empty.")
        pair = BenchmarkPair(row["name"], row["kind"], row["modality"], resolve(row["fixed"]), resolve(row["moving"]),
                             *(resolve(row.get(key)) for key in ("fixed_labels", "moving_labels",
                                                                  "fixed_landmarks", "moving_landmarks")),
                             family=(row.get("family") or "").strip(), split=split,
                             fixed_mask=resolve(row.get("fixed_mask")), moving_mask=resolve(row.get("moving_mask")))
        missing = [str(p) for p in (pair.fixed, pair.moving, pair.fixed_labels, pair.moving_labels,
                                    pair.fixed_landmarks, pair.moving_landmarks, pair.fixed_mask, pair.moving_mask)
                   if p is not None and not p.exists()]
        if missing:
            raise ValueError(f"{path}: pair {pair.name} names files that do not exist: {', '.join(missing)}")
        pairs.append(pair)
    return pairs


def expand_methods(groups: list[str], models: list[str] | None, quick: bool, initial: str = "auto") -> list[Method]:
    """The configurations behind ``deepregister``, ``elastix`` and ``ants``.

    ``models``: model names for deepregister (default: every installed model). ``quick``: a few
    iterations everywhere, for smoke tests only. ``initial``: deepregister's start position (named
    in the method when not "auto").
    """
    from ..models import find_model, list_models, read_card

    unknown = [g for g in groups if g not in METHOD_GROUPS]
    if unknown:
        raise ValueError(f"Unknown method(s) {', '.join(unknown)}; use {', '.join(METHOD_GROUPS)}.")
    methods = []
    if "deepregister" in groups:
        start, suffix = ({}, "") if initial == "auto" else ({"initial": initial}, f" ({initial})")
        names = models if models is not None else [card.name for card in list_models()]
        for name in names:
            card = read_card(find_model(name))
            iterations = 5 if quick else (card.finetune_iterations or DEFAULT_FINETUNE_ITERATIONS)
            methods.append(Method(f"deepregister/{name}{suffix}", "deepregister", {"model": name, "iterations": 0, **start}))
            methods.append(Method(f"deepregister/{name}+ft{suffix}", "deepregister",
                                  {"model": name, "iterations": iterations, **start}))
        if not names:
            methods.append(Method(f"deepregister/finetune{suffix}", "deepregister",
                                  {"model": None, "iterations": 5 if quick else 150, **start}))
    if "elastix" in groups:
        methods.append(Method("elastix", "elastix", {"affine_iterations": 16 if quick else 256,
                                                     "bspline_iterations": 16 if quick else 500}))
    if "ants" in groups:
        for kind in ("SyN", "SyNRA"):
            methods.append(Method(f"ants/{kind}", "ants", {"type_of_transform": kind, "quick": quick}))
    return methods


# -- worker side (runs in a fresh process) ------------------------------------------------------
def _run_deepregister(fixed_path: str, moving_path: str, options: dict, out: Path, threads: int,
                      masks: tuple[str, str] = ("", "")) -> tuple[float, Path]:
    import torch

    from ..registration import register

    torch.set_num_threads(threads)
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    # The masks contract: SimpleITK images on their image's grid, nonzero = inside; passed only when
    # the pair has them, so pairs without masks run on any version of register().
    extra: dict = {key: sitk.ReadImage(path, sitk.sitkUInt8)
                   for key, path in zip(("fixed_mask", "moving_mask"), masks) if path}
    if "initial" in options:
        extra["initial"] = options["initial"]
    start = time.perf_counter()
    result = register(fixed, moving, model=options["model"], iterations=options["iterations"], device="cpu", **extra)
    seconds = time.perf_counter() - start
    path = out / "transform.h5"
    sitk.WriteTransform(result.transform, str(path))
    return seconds, path


def _elastix_parameters(itk, options, modality):
    """elastix's parameter maps (this function's source also runs in ``--timing process`` scripts:
    keep it free of anything but ``itk``). ``bspline_iterations`` 0: the affine stage alone."""
    metric = "AdvancedMattesMutualInformation" if modality == "multi" else "AdvancedNormalizedCorrelation"
    parameters = itk.ParameterObject.New()
    affine = parameters.GetDefaultParameterMap("affine", 4)
    affine["Metric"] = [metric]
    # Masks are used as given at every level: erosion per level (elastix's default) left a small
    # mask empty at the coarse levels ("No valid voxels found").
    affine["ErodeMask"] = ["false"]
    affine["MaximumNumberOfIterations"] = [str(options["affine_iterations"])]
    affine["AutomaticTransformInitialization"] = ["true"]
    affine["AutomaticTransformInitializationMethod"] = ["GeometricalCenter"]
    parameters.AddParameterMap(affine)
    if options["bspline_iterations"] > 0:
        bspline = parameters.GetDefaultParameterMap("bspline", 3, 10.0)
        bspline["GridSpacingSchedule"] = ["4", "2", "1"]
        bspline["Metric"] = [metric, "TransformBendingEnergyPenalty"]
        bspline["MaximumNumberOfIterations"] = [str(options["bspline_iterations"])]
        bspline["ErodeMask"] = ["false"]
        parameters.AddParameterMap(bspline)
    return parameters


def _elastix_masks(itk, masks):
    """elastix's mask keyword arguments: unsigned-char images (nonzero = inside)."""
    return {key: itk.imread(path, itk.UC) for key, path in zip(("fixed_mask", "moving_mask"), masks) if path}


def _run_elastix(fixed_path: str, moving_path: str, options: dict, out: Path, threads: int,
                 modality: str, masks: tuple[str, str] = ("", "")) -> tuple[float, Path]:
    import itk

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(threads)
    fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
    extra = _elastix_masks(itk, masks)
    parameters = _elastix_parameters(itk, options, modality)
    start = time.perf_counter()
    _, result = itk.elastix_registration_method(fixed, moving, parameter_object=parameters, log_to_console=False,
                                                **extra)
    seconds = time.perf_counter() - start
    field = itk.transformix_deformation_field(moving, result)
    path = out / "displacement.mha"
    itk.imwrite(field, str(path))
    return seconds, path


def _ants_arguments(options: dict) -> dict:
    """Keyword arguments of ``ants.registration`` besides images, masks and files."""
    # Quick runs (tests) sample the affine metric densely: ANTs' default random 20 % sample made SyN's
    # result on a 48^3 pair swing between 2.8 and 4.0 mm from run to run (dense: 2.8-3.1 mm).
    extra = ({"reg_iterations": [4, 2, 0], "aff_iterations": [20, 10, 0, 0], "aff_random_sampling_rate": 1.0}
             if options["quick"] else {})
    return {"type_of_transform": options["type_of_transform"], **extra}


def _write_centres(fixed_path: str, moving_path: str, out: Path) -> Path:
    """ANTs' initial transform: the image centres aligned (as every method starts)."""
    initial = sitk.AffineTransform(3)
    initial.SetTranslation(center_alignment(read_image(fixed_path), read_image(moving_path)).GetOffset())
    sitk.WriteTransform(initial, str(out / "centres.mat"))
    return out / "centres.mat"


def _run_ants(fixed_path: str, moving_path: str, options: dict, out: Path,
              masks: tuple[str, str] = ("", "")) -> tuple[float, Path]:
    import ants

    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    centres = _write_centres(fixed_path, moving_path, out)
    extra = {key: ants.image_read(path) for key, path in zip(("mask", "moving_mask"), masks) if path}
    if extra:
        extra["mask_all_stages"] = True
    start = time.perf_counter()
    result = ants.registration(fixed, moving, initial_transform=str(centres), outprefix=str(out / "ants_"),
                               **_ants_arguments(options), **extra)
    seconds = time.perf_counter() - start
    composed = ants.apply_transforms(fixed, moving, transformlist=result["fwdtransforms"],
                                     compose=str(out / "composed_"))
    return seconds, Path(composed)


def _register_with(tool: str, fixed: str, moving: str, options: dict, modality: str, out: Path,
                   threads: int, masks: tuple[str, str] = ("", "")) -> tuple[float, Path]:
    if tool == "deepregister":
        return _run_deepregister(fixed, moving, options, out, threads, masks)
    if tool == "elastix":
        return _run_elastix(fixed, moving, options, out, threads, modality, masks)
    return _run_ants(fixed, moving, options, out, masks)


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


def _elastix_field(out: Path, moving_path: str) -> Path:
    """The displacement field (fixed grid, mm) of the TransformParameters files elastix wrote in ``out``."""
    import itk

    parameters = itk.ParameterObject.New()
    for index in range(len(list(out.glob("TransformParameters.*.txt")))):
        single = itk.ParameterObject.New()
        single.ReadParameterFile(str(out / f"TransformParameters.{index}.txt"))
        parameters.AddParameterMap(single.GetParameterMap(0))
    field = itk.transformix_deformation_field(itk.imread(moving_path, itk.F), parameters)
    itk.imwrite(field, str(out / "displacement.mha"))
    return out / "displacement.mha"


def _ants_field(out: Path, fixed_path: str, moving_path: str, transforms: list[str]) -> Path:
    """ANTs' forward transforms composed into one displacement field on the fixed grid."""
    import ants

    fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
    return Path(ants.apply_transforms(fixed, moving, transformlist=transforms, compose=str(out / "composed_")))


def worker(argv: list[str]) -> int:
    """Run one registration: TOOL OPTIONS_JSON FIXED MOVING MODALITY OUT THREADS [FIXED_MASK
    MOVING_MASK] ("" = no mask), after a warm-up (:func:`warm_up`); prints a JSON line with the
    seconds of the registration call, the process's peak RSS (MB) and the transform file.

    ``field elastix OUT MOVING`` / ``field ants OUT FIXED MOVING TRANSFORMS_JSON``: turn what a
    ``--timing process`` run wrote into a displacement field; prints a JSON line with its path."""
    if argv and argv[0] == "field":
        path = (_elastix_field(Path(argv[2]), argv[3]) if argv[1] == "elastix"
                else _ants_field(Path(argv[2]), argv[3], argv[4], json.loads(argv[5])))
        print(json.dumps({"transform": str(path)}))
        return 0
    tool, options, fixed, moving, modality, out, threads, *masks = argv
    options, out, threads = json.loads(options), Path(out), int(threads)
    masks = tuple(masks) if masks else ("", "")
    warm_up(tool, options, modality, out, threads)
    seconds, path = _register_with(tool, fixed, moving, options, modality, out, threads, masks)
    peak = peak_memory_mb()
    print(json.dumps({"seconds": seconds, "peak_rss_mb": peak, "transform": str(path)}))
    return 0


# -- whole-process timing (--timing process) ----------------------------------------------------
_PEAK_SOURCE = '''
def _peak_mb():
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
'''

_ELASTIX_MAIN = '''
import json, sys
import itk
options, fixed_path, moving_path, modality, out, threads = json.loads(sys.argv[1]), *sys.argv[2:7]
masks = sys.argv[7:9]
itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(int(threads))
fixed, moving = itk.imread(fixed_path, itk.F), itk.imread(moving_path, itk.F)
_, result = itk.elastix_registration_method(fixed, moving, parameter_object=_elastix_parameters(itk, options, modality),
                                            log_to_console=False, **_elastix_masks(itk, masks))
for i in range(result.GetNumberOfParameterMaps()):  # one file per map, as elastix's command line writes
    single = itk.ParameterObject.New()
    single.AddParameterMap(result.GetParameterMap(i))
    single.WriteParameterFile(f"{out}/TransformParameters.{i}.txt")
print(json.dumps({"peak_rss_mb": _peak_mb()}))
'''

_ANTS_MAIN = '''
import json, sys
import ants
arguments, fixed_path, moving_path, out, centres = json.loads(sys.argv[1]), *sys.argv[2:6]
fixed, moving = ants.image_read(fixed_path), ants.image_read(moving_path)
masks = {key: ants.image_read(path) for key, path in zip(("mask", "moving_mask"), sys.argv[6:8]) if path}
if masks:
    masks["mask_all_stages"] = True
result = ants.registration(fixed, moving, initial_transform=centres, outprefix=out + "/ants_", **arguments, **masks)
print(json.dumps({"peak_rss_mb": _peak_mb(), "fwdtransforms": result["fwdtransforms"]}))
'''


def process_script(tool: str) -> str:
    """The Python source a ``--timing process`` run of elastix or ANTs executes: imports, file
    reading, registration and writing the transform, nothing else."""
    if tool == "elastix":
        functions = "".join(textwrap.dedent(inspect.getsource(f)) + "\n" for f in (_elastix_parameters, _elastix_masks))
        return _PEAK_SOURCE + functions + _ELASTIX_MAIN
    return _PEAK_SOURCE + _ANTS_MAIN


def process_command(pair: BenchmarkPair, method: Method, folder: Path, threads: int) -> list[str]:
    """The command line of one whole-process run (see ``--timing process``)."""
    fixed, moving = str(pair.fixed), str(pair.moving)
    if method.tool == "deepregister":
        command = [sys.executable, "-m", "DeepRegisterLib.cli", "register", "--fixed", fixed, "--moving", moving,
                   "--out", str(folder / "result"), "--device", "cpu",
                   "--iterations", str(method.options["iterations"]), "--model", method.options.get("model") or "none"]
        if "initial" in method.options:
            command += ["--initial", method.options["initial"]]
        for flag, path in zip(("--fixed-mask", "--moving-mask"), pair.masks):
            if path:
                command += [flag, path]
        return command
    if method.tool == "elastix":
        return [sys.executable, "-c", process_script("elastix"), json.dumps(method.options), fixed, moving,
                pair.modality, str(folder), str(threads), *pair.masks]
    centres = _write_centres(fixed, moving, folder)
    return [sys.executable, "-c", process_script("ants"), json.dumps(_ants_arguments(method.options)), fixed, moving,
            str(folder), str(centres), *pair.masks]


def _last_json(text: str) -> dict:
    lines = [line for line in text.strip().splitlines() if line.startswith("{")]
    return json.loads(lines[-1]) if lines else {}


def _failure(done: subprocess.CompletedProcess) -> dict:
    lines = (done.stderr or done.stdout or "").strip().splitlines() or [f"exit status {done.returncode}"]
    return {"status": "failed", "error": lines[-1][:300]}


def run_process(pair: BenchmarkPair, method: Method, folder: Path, threads: int, timeout_s: float,
                busy: int = 0) -> dict:
    """One registration as a whole fresh process, timed from start to exit (with ``busy`` cores
    kept busy meanwhile); then, untimed, its output turned into a transform file."""
    command = process_command(pair, method, folder, threads)
    environment = _worker_environment(threads)
    with BusyCores(busy, timeout_s + 30) as burner:
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=folder,
                                  env=environment)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
        seconds = time.perf_counter() - start
        busy_cpu = burner.cpu_seconds()
    finished = (0, 3) if method.tool == "deepregister" else (0,)  # 3: written, with the guard's warnings
    if done.returncode not in finished:
        return _failure(done)
    if method.tool == "deepregister":
        report = json.loads((folder / "result" / "report.json").read_text())
        return {"status": "ok", "seconds": seconds, "peak_rss_mb": report.get("peak_memory_mb"),
                "busy_cpu_seconds": busy_cpu, "transform": str(folder / "result" / "transform.h5")}
    report = _last_json(done.stdout)
    if method.tool == "ants" and "fwdtransforms" not in report:
        return {"status": "failed", "error": "the ANTs process printed no transforms"}
    field_command = [sys.executable, "-m", "DeepRegisterLib.tools.benchmark", "field", method.tool, str(folder)]
    field_command += ([str(pair.moving)] if method.tool == "elastix"
                      else [str(pair.fixed), str(pair.moving), json.dumps(report["fwdtransforms"])])
    converted = subprocess.run(field_command, capture_output=True, text=True, timeout=timeout_s, cwd=folder,
                               env=environment)
    if converted.returncode != 0:
        return _failure(converted)
    return {"status": "ok", "seconds": seconds, "peak_rss_mb": report.get("peak_rss_mb"),
            "busy_cpu_seconds": busy_cpu, "transform": _last_json(converted.stdout)["transform"]}


# -- other programs sharing the CPU (--busy-cores) ----------------------------------------------
_BURN = '''
import os, sys, time
count, seconds = int(sys.argv[1]), float(sys.argv[2])
end = time.monotonic() + seconds
for _ in range(count - 1):
    if os.fork() == 0:
        break
watched = os.getppid()  # the benchmark for the first process, the first process for the others
x = 1
while time.monotonic() < end and os.getppid() == watched:
    for _ in range(20000):
        x = (x * 1103515245 + 12345) & 0x7FFFFFFF
'''


def group_pids(group: int) -> list[int]:
    """The live (not zombie) processes of process group ``group`` (Linux /proc; [] elsewhere)."""
    pids = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == group and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class BusyCores:
    """Keeps ``cores`` CPU cores busy while the ``with`` block runs: one process group of ``cores``
    busy-looping Python processes, started on entry and killed (SIGKILL to that group) on exit;
    each also exits by itself after ``seconds`` or when the process that started it is gone.
    ``cores`` 0: nothing is started."""

    def __init__(self, cores: int, seconds: float = 3600.0) -> None:
        self.cores, self.seconds = cores, seconds
        self.process: subprocess.Popen | None = None
        self._last_cpu: dict[int, float] = {}

    def __enter__(self) -> "BusyCores":
        if self.cores > 0:
            self.process = subprocess.Popen([sys.executable, "-c", _BURN, str(self.cores), str(self.seconds)],
                                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            stderr=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 10.0  # until all of them have forked
            while len(self.pids()) < self.cores and time.monotonic() < deadline and self.process.poll() is None:
                time.sleep(0.01)
        return self

    def pids(self) -> list[int]:
        """The burning processes still alive."""
        return group_pids(self.process.pid) if self.process is not None else []

    def cpu_seconds(self) -> float:
        """CPU seconds the burning processes have used so far (those alive now)."""
        for pid in self.pids():
            self._last_cpu[pid] = _cpu_seconds(pid)
        return float(sum(self._last_cpu.values()))

    def __exit__(self, *exc) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        deadline = time.monotonic() + 10.0  # a killed process on a loaded machine may take a while to go
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.01)


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
    from ..metrics import dice_per_label, transform_folding_percent

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


def run_one(pair: BenchmarkPair, method: Method, threads: int, timeout_s: float, timing: str = "steady",
            busy: int = 0) -> dict:
    """One registration in a fresh worker process, measured; failures become a row with the error.

    ``timing`` "steady": the registration call alone after a warm-up in the worker; "process": the
    whole process (:func:`run_process`). ``busy``: cores kept busy meanwhile (:class:`BusyCores`)."""
    with tempfile.TemporaryDirectory(prefix="deepregister-bench-") as folder:
        if timing == "process":
            report = run_process(pair, method, Path(folder), threads, timeout_s, busy)
            if report["status"] != "ok":
                return report
        else:
            command = [sys.executable, "-m", "DeepRegisterLib.tools.benchmark", method.tool, json.dumps(method.options),
                       str(pair.fixed), str(pair.moving), pair.modality, folder, str(threads), *pair.masks]
            # The burner runs through the worker's warm-up too, so the timed call starts under load.
            with BusyCores(busy, timeout_s + 30) as burner:
                try:
                    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=folder,
                                          env=_worker_environment(threads))
                except subprocess.TimeoutExpired:
                    return {"status": "failed", "error": f"timed out after {timeout_s:.0f} s"}
                busy_cpu = burner.cpu_seconds()
            if done.returncode != 0:
                return _failure(done)
            report = {**_last_json(done.stdout), "busy_cpu_seconds": busy_cpu}
        transform = read_transform(Path(report["transform"]))
        return {"status": "ok", "seconds": report["seconds"], "peak_rss_mb": report["peak_rss_mb"],
                "busy_cpu_seconds": report["busy_cpu_seconds"] if busy else None, **measure(pair, transform)}


def run_benchmark(pairs: list[BenchmarkPair], methods: list[Method], repeats: int, threads: int,
                  timeout_s: float, log=print, timing: str = "steady", busy: int = 0) -> list[dict]:
    """Every method on every pair, ``repeats`` times, interleaved; one row per run plus one
    "centres aligned" row per pair."""
    rows = []
    for pair in pairs:
        size = sitk.ImageFileReader()
        size.SetFileName(str(pair.fixed))
        size.ReadImageInformation()
        common = {"pair": pair.name, "kind": pair.kind, "family": pair.family, "split": pair.split,
                  "modality": pair.modality, "voxels": int(np.prod(size.GetSize())), "timing": timing,
                  "busy_cores": busy}
        rows.append({**common, "method": "centres aligned", "repeat": 0, **initial_row(pair)})
        for repeat in range(repeats):
            for method in methods:
                row = {**common, "method": method.name, "repeat": repeat,
                       **run_one(pair, method, threads, timeout_s, timing, busy)}
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
    parser.add_argument("--pairs", required=True, help="CSV of pairs (see Testing/Performance/make_benchmark_pairs.py "
                                                       "and make_generalisation_pairs.py)")
    parser.add_argument("--methods", default="deepregister,elastix,ants",
                        help="comma-separated: deepregister, elastix, ants (default: all three)")
    parser.add_argument("--models", help="comma-separated DeepRegister models (default: every installed model)")
    parser.add_argument("--out", default="benchmark-output", help="output folder (default benchmark-output)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per pair and method; seconds are the median")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads per registration (default 2)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before a run counts as failed")
    parser.add_argument("--quick", action="store_true", help="a few iterations per method: smoke tests only")
    parser.add_argument("--split", choices=["dev", "test"], help="only the pairs of this split (column split)")
    parser.add_argument("--families", help="comma-separated: only the pairs of these families (column family, "
                                           "default: the kind)")
    parser.add_argument("--tuned-on", default="",
                        help="comma-separated families whose dev pairs settings were chosen on, for the report "
                             "(default: none)")
    parser.add_argument("--initial", choices=INITIAL_POSITIONS, default="auto",
                        help="DeepRegister's start position (register --initial); default auto")
    parser.add_argument("--timing", choices=TIMINGS, default="steady",
                        help="steady: the registration call alone after a warm-up (default); process: each "
                             "method as a whole fresh process, imports and file I/O included")
    parser.add_argument("--busy-cores", type=int, default=0,
                        help="keep this many cores busy with another process during every timed run (default 0)")


def select_pairs(pairs: list[BenchmarkPair], split: str | None, families: list[str] | None) -> list[BenchmarkPair]:
    """The pairs of ``split`` (None: all) and ``families`` (None: all)."""
    return [p for p in pairs if (split is None or p.split == split) and (families is None or p.family in families)]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark described by parsed arguments and write CSV, Markdown and plots to ``--out``."""
    from .benchmark_report import write_report  # matplotlib: not needed in the workers

    try:
        families = [f.strip() for f in args.families.split(",") if f.strip()] if args.families else None
        pairs = select_pairs(read_pairs(args.pairs), args.split, families)
        if not pairs:
            raise ValueError(f"{args.pairs} has no pairs with split {args.split or 'any'} and families "
                             f"{', '.join(families) if families else 'any'}.")
        methods = expand_methods([m.strip() for m in args.methods.split(",") if m.strip()],
                                 [m.strip() for m in args.models.split(",")] if args.models else None, args.quick,
                                 args.initial)
    except (ValueError, LookupError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.threads < 1 or args.busy_cores < 0:
        print("error: --repeats and --threads must be at least 1, --busy-cores at least 0.", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(pairs)} pairs x {len(methods)} methods x {args.repeats} repeats, {args.threads} threads each, "
          f"timing {args.timing}, {args.busy_cores} busy cores")
    rows = run_benchmark(pairs, methods, args.repeats, args.threads, args.timeout, timing=args.timing,
                         busy=args.busy_cores)
    write_csv(rows, out / "measurements.csv")
    tuned_on = [f.strip() for f in args.tuned_on.split(",") if f.strip()]
    write_report(rows, out, threads=args.threads, repeats=args.repeats, timing=args.timing,
                 busy_cores=args.busy_cores, tuned_on=tuned_on)
    print(f"Wrote {out / 'measurements.csv'}, {out / 'report.md'} and plots in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(worker(sys.argv[1:]))
