"""The ``deepregister`` command line: register, evaluate, models, demo, benchmark.

Exit status:

* 0: success.
* 2: bad input: a one-line reason on stderr and nothing written.
* 3: the registration finished with warnings (e.g. its guard kept an earlier stage than the
  fine-tuned one because a later stage made the alignment worse): every output is written, each
  warning is printed to stderr as ``deepregister: WARNING: ...`` and report.json has
  ``"succeeded": false``. Check the result before using it.
* 130: cancelled; nothing written.

Outputs go to a temporary folder beside ``--out`` and are moved into place only when complete.

Start-up is kept light: at import this module loads the standard library only; numpy, SimpleITK,
torch and matplotlib are imported by the commands that need them, so ``--help`` answers at once.

OpenMP wait policy (``register``, ``demo``): torch's OpenMP threads spin while they wait for each
other by default. On a quiet machine that is the fastest (a 128^3 pair, 2 cores: 2.3-2.9 s of
registration; 4.0-5.4 s with ``OMP_WAIT_POLICY=PASSIVE``), but when other processes keep a core
busy the spinning threads take turns with them: 6.9 s with one core busy (3.7-4.1 s passive), 28-57 s
with more load (4.5-6 s passive). The policy is read once, when torch loads (setting it later has
no effect), so before that the command measures how much CPU other processes use while it reads the
inputs and sets ``OMP_WAIT_POLICY=PASSIVE`` when torch's threads would have to share cores with
them (:func:`choose_openmp_wait_policy`); an ``OMP_WAIT_POLICY`` already set is left alone.
report.json says which policy ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .models import DEFAULT_MODEL as DEFAULT_MODEL_NAME  # models and options load no torch
from .options import DEFAULT_ITERATIONS_WITHOUT_MODEL, INITIAL_POSITIONS
from .options import SIMILARITY_CHOICES as SIMILARITIES
from .progress import ProgressBar  # standard library only
from .resources import sample_data_dir  # standard library only

if TYPE_CHECKING:  # imported where needed: see the module docstring
    import SimpleITK as sitk

    from .landmarks import Landmarks
    from .registration import RegistrationResult

SAMPLE_DATA = sample_data_dir()
EXIT_OK, EXIT_BAD_INPUT, EXIT_WARNINGS, EXIT_CANCELLED = 0, 2, 3, 130
MODEL_HELP = (f"model name (see `deepregister models`), model folder, or `none` (no network: fine-tuning on "
              f"the pair alone); default: `{DEFAULT_MODEL_NAME}`, the best general model, when installed, "
              "else the first installed model, else none")
# Errors that mean bad input (exit 2) and cancellation (exit 130): (module, class).
_BAD_INPUT = (("imageio", "InputError"), ("landmarks", "LandmarkError"), ("models", "ModelError"))
_CANCELLED = (("progress", "RegistrationCancelled"),)


class CpuProbe:
    """CPU time that other processes use, from construction to :meth:`others_cpus`, on the CPUs
    this process may run on (Linux: per-CPU /proc/stat less this process's own time; elsewhere the
    1-minute load average; None where neither exists)."""

    def __init__(self) -> None:
        self.cpus = _usable_cpus()
        self.wall = time.monotonic()
        self.own = _own_cpu_seconds()
        self.busy = _busy_cpu_seconds(self.cpus)

    def others_cpus(self, min_seconds: float = 0.1) -> float | None:
        """CPUs kept busy by other processes since construction, measured over at least
        ``min_seconds`` (waits for the rest)."""
        if self.busy is None:
            try:
                return os.getloadavg()[0]
            except (AttributeError, OSError):
                return None
        time.sleep(max(0.0, self.wall + min_seconds - time.monotonic()))
        busy, own, wall = _busy_cpu_seconds(self.cpus), _own_cpu_seconds(), time.monotonic()
        if busy is None:
            return None
        return max(0.0, ((busy - self.busy) - (own - self.own)) / (wall - self.wall))


def _usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def _busy_cpu_seconds(cpus: set[int]) -> float | None:
    """CPU seconds the processors ``cpus`` spent busy since boot (Linux), or None."""
    try:
        busy = 0
        with open("/proc/stat", encoding="ascii") as handle:
            for line in handle:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                    ticks = [int(value) for value in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy += sum(ticks) - ticks[3] - ticks[4]
        return busy / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None


def choose_openmp_wait_policy(probe: CpuProbe) -> str:
    """Set ``OMP_WAIT_POLICY=PASSIVE`` when other processes keep busy so much of this process's
    CPUs that torch's threads would share cores with them (at least half a core beyond the CPUs
    its threads leave free), unless the variable is set already; see the module docstring.
    Returns the policy that runs, for the report. Effective only before torch is imported."""
    if "torch" in sys.modules:
        return f"{os.environ.get('OMP_WAIT_POLICY') or 'default'} (torch was loaded before this command)"
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY'] or 'default'} (set before the command)"
    others = probe.others_cpus()
    if others is None:
        return "default (spinning)"
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        threads = len(probe.cpus)
    spare = len(probe.cpus) - min(max(threads, 1), len(probe.cpus))
    if others >= spare + 0.5:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        return f"PASSIVE (other processes used {others:.1f} of {len(probe.cpus)} CPUs)"
    return f"default (spinning; other processes used {others:.1f} of {len(probe.cpus)} CPUs)"


def _input_error(message: str) -> Exception:
    from .imageio import InputError

    return InputError(message)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and an ``out`` that is not a folder."""
    if out.exists() and not overwrite:
        raise _input_error(f"Output folder {out} already exists; choose another --out or add --overwrite.")
    if out.exists() and not out.is_dir():
        raise _input_error(f"--out {out} exists and is not a folder.")


def _prepare_out(out: Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """Check ``out`` (:func:`_check_out`); return a fresh temporary folder beside it and the
    parent folders that had to be created (removed again if the run fails)."""
    _check_out(out, overwrite)
    created = [parent for parent in reversed(out.absolute().parents) if not parent.exists()]
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent)), created


def _publish(temporary: Path, out: Path) -> None:
    """Move a completed output folder into place, replacing an old one only at the very end."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
        os.replace(out, old / out.name)
        os.replace(temporary, out)
        shutil.rmtree(old)
    else:
        os.replace(temporary, out)


def _read_landmark_pair(fixed_path: str | None, moving_path: str | None) -> tuple[Landmarks, Landmarks] | None:
    if (fixed_path is None) != (moving_path is None):
        raise _input_error("Give both --fixed-landmarks and --moving-landmarks, or neither.")
    if fixed_path is None:
        return None
    from .landmarks import check_pairs, read_landmarks

    pair = read_landmarks(fixed_path), read_landmarks(moving_path)
    check_pairs(*pair)
    return pair


def _read_mask(path: str | None, option: str) -> sitk.Image | None:
    """A label image given with ``option`` (nonzero = inside), or None; InputError when unreadable."""
    if path is None:
        return None
    from .imageio import InputError, read_image

    try:
        return read_image(path)
    except InputError as error:
        raise InputError(f"{option}: {error}") from None


def _finite(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and non-finite floats (NaN, inf) as None, so
    report.json stays valid JSON."""
    if getattr(value, "shape", None) == () and hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value


def _mask_source(given: bool, used: sitk.Image | None) -> str:
    return "given" if given else ("detected" if used is not None else "none")


def _write_image(image: sitk.Image, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path), useCompression=True)


def _start_rendering() -> Future:
    """Load matplotlib and the report's fonts in a worker thread (:func:`report.prepare_rendering`):
    it runs while the registration holds the CPUs in PyTorch's kernels, not after it."""
    from .report import prepare_rendering

    done: Future = Future()

    def run() -> None:
        try:
            done.set_result(prepare_rendering())
        except Exception as error:  # re-raised where the report is drawn
            done.set_exception(error)

    threading.Thread(target=run, name="report-fonts", daemon=True).start()  # daemon: never delays an exit
    return done


def _write_outputs(folder: Path, result: RegistrationResult, fixed: sitk.Image, moving: sitk.Image,
                   report: dict, warm_up: Future | None = None) -> list[str]:
    """Write transform.h5, warped.nii.gz, saliency.nii.gz, the masks used (fixed_mask.nii.gz,
    moving_mask.nii.gz) and report.png to ``folder``; return the file names in order.

    The volumes are written by worker threads (SimpleITK releases the GIL while it compresses and
    writes) while this thread draws report.png, once ``warm_up`` (see :func:`_start_rendering`) is done."""
    import SimpleITK as sitk

    files: list[str] = []
    with ThreadPoolExecutor(max_workers=3) as pool:
        jobs: list[Future] = []

        def submit(name: str, function: Any, *args: Any) -> None:
            files.append(name)
            jobs.append(pool.submit(function, *args))

        submit("transform.h5", sitk.WriteTransform, result.transform, str(folder / "transform.h5"))
        submit("warped.nii.gz", _write_image, result.warped, folder / "warped.nii.gz")
        submit("saliency.nii.gz", _write_image, result.saliency, folder / "saliency.nii.gz")
        for role, mask in (("fixed", result.fixed_mask), ("moving", result.moving_mask)):
            if mask is not None:
                submit(f"{role}_mask.nii.gz", _write_image, mask, folder / f"{role}_mask.nii.gz")
        try:
            from .report import write_report_png

            if warm_up is not None:
                warm_up.result()

            moving_before = sitk.Resample(moving, fixed, result.initial_transform, sitk.sitkLinear, 0.0,
                                          sitk.sitkFloat32)
            write_report_png(folder / "report.png", fixed, moving_before, result.warped, result.saliency,
                             result.displacement_field(), title=_title(report), warning=_warning_line(report))
            files.append("report.png")
        finally:
            for job in jobs:
                job.result()  # re-raises a writer's error
    return files


def run_registration(fixed_path: str, moving_path: str, out: Path, model: str | None, device: str,
                     iterations: int | None, landmarks: tuple[str | None, str | None], overwrite: bool,
                     progress: ProgressBar | None = None, *, similarity: str = "auto", initial: str = "auto",
                     masks: tuple[str | None, str | None] = (None, None), detect_fov: bool = True) -> dict:
    """Register two image files and write transform.h5, warped.nii.gz, saliency.nii.gz, the masks
    used, report.json and report.png to ``out``; returns the report.

    ``model``: a name or folder, "none" (no network: fine-tuning alone), or None for the default
    (:func:`DeepRegisterLib.models.default_model`). ``masks``: the fixed and moving mask files.
    """
    begin = time.perf_counter()
    probe = CpuProbe()
    _check_out(out, overwrite)  # before the slow imports: answer at once
    pair = _read_landmark_pair(*landmarks)
    from .imageio import read_image

    fixed, moving = read_image(fixed_path), read_image(moving_path)
    fixed_mask, moving_mask = _read_mask(masks[0], "--fixed-mask"), _read_mask(masks[1], "--moving-mask")
    read_seconds = time.perf_counter() - begin
    wait_policy = choose_openmp_wait_policy(probe)  # before torch is imported (by models or registration)
    if model is None:
        from .models import default_model, list_models

        model = default_model(list_models()) or None
    elif model.lower() == "none":
        model = None
    from .registration import register

    temporary, created = _prepare_out(out, overwrite)
    published = False
    warm_up = _start_rendering()
    try:
        result = register(fixed, moving, model=model, device=device, iterations=iterations, progress=progress,
                          similarity=similarity, initial=initial, fixed_mask=fixed_mask, moving_mask=moving_mask,
                          detect_fov=detect_fov)
        start = time.perf_counter()
        report: dict[str, Any] = {
            "fixed": str(fixed_path), "moving": str(moving_path), "model": result.model,
            "device": result.device, "iterations": result.iterations, "similarity": result.similarity,
            "initial": result.initial, "fixed_mask": _mask_source(masks[0] is not None, result.fixed_mask),
            "moving_mask": _mask_source(masks[1] is not None, result.moving_mask),
            "succeeded": result.succeeded, "warnings": list(result.warnings), "kept_stage": result.kept_stage,
            "stages": result.stages, "seconds": {"read": read_seconds, **result.timings},
            "peak_memory_mb": None, "folding_percent": result.folding_percent,
            "min_jacobian": result.min_jacobian, "messages": result.messages,
            "transform_direction": "fixed -> moving (ITK, LPS mm)", "openmp_wait_policy": wait_policy,
        }
        if pair is not None:
            from .landmarks import tre, tre_summary

            fixed_points, moving_points = pair[0].points, pair[1].points
            after = tre(fixed_points, moving_points, result.transform)
            report["tre_mm"] = {
                "before": tre_summary(tre(fixed_points, moving_points)),
                "start": tre_summary(tre(fixed_points, moving_points, result.initial_transform)),
                "after": tre_summary(after),
                "per_landmark_after": [{"label": label, "tre_mm": float(e)} for label, e in zip(pair[0].labels, after)],
            }
        report["files"] = _write_outputs(temporary, result, fixed, moving, report, warm_up) + ["report.json"]
        from .memory import peak_memory_mb

        report["peak_memory_mb"] = peak_memory_mb()
        report["seconds"]["write"] = time.perf_counter() - start
        report["seconds"]["command"] = time.perf_counter() - begin  # from reading the inputs to here
        report = _finite(report)
        (temporary / "report.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        _publish(temporary, out)
        published = True
        return report
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
        if not published:
            for folder in reversed(created):
                if folder.is_dir() and not any(folder.iterdir()):
                    folder.rmdir()


_START_NAMES = {"centers": "centres aligned", "physical": "physical positions"}


def _title(report: dict) -> str:
    title = (f"DeepRegister - model: {report['model']} - similarity {report['similarity']} - "
             f"{report['seconds']['total']:.1f} s on {report['device']}")
    if "tre_mm" in report:
        title += (f" - median TRE {report['tre_mm']['start']['median']:.1f} (start) -> "
                  f"{report['tre_mm']['after']['median']:.1f} mm")
    return title + f" - folding {report['folding_percent']:.2f} %"


def _warning_line(report: dict) -> str:
    """The report figure's warning line: empty for a plain success."""
    if report["succeeded"]:
        return ""
    first = report["warnings"][0] if report["warnings"] else ""
    more = f" (+{len(report['warnings']) - 1} more in report.json)" if len(report["warnings"]) > 1 else ""
    return f"WARNING: not a plain success, kept the {report['kept_stage']} stage. {first}{more}"


def _summary(report: dict, out: Path) -> str:
    details = [f"similarity {report['similarity']}",
               f"start: {_START_NAMES.get(report['initial'], report['initial'])}"]
    details += [f"{role} mask {report[f'{role}_mask']}" for role in ("fixed", "moving")
                if report[f"{role}_mask"] != "none"]
    if report["peak_memory_mb"] is not None:
        details.append(f"peak memory {report['peak_memory_mb']:.0f} MB")
    details.append(f"folding {report['folding_percent']:.3f} %")
    run = f"{report['model']} on {report['device']} in {report['seconds']['total']:.1f} s ({', '.join(details)})"
    if report["succeeded"]:
        lines = [f"Registered with {run}."]
    else:
        lines = [f"Registration finished with warnings and kept the {report['kept_stage']} stage: {run}. "
                 "Check the result before using it (warnings on stderr and in report.json)."]
    lines += report["messages"]
    if "tre_mm" in report:
        tre_mm = report["tre_mm"]
        lines.append(f"Landmark TRE (mm), median / mean / max over {tre_mm['after']['n']} pairs:")
        start = f"start ({_START_NAMES.get(report['initial'], report['initial'])})"
        for stage, name in (("before", "as loaded"), ("start", start), ("after", "registered")):
            lines.append(f"  {name:<30} {tre_mm[stage]['median']:6.2f} / {tre_mm[stage]['mean']:6.2f} / "
                         f"{tre_mm[stage]['max']:6.2f}")
    files = [name + (" (fixed->moving)" if name == "transform.h5" else "") for name in report["files"]]
    lines.append(f"Outputs in {out}: {', '.join(files)}")
    return "\n".join(lines)


def _finish(report: dict, out: Path) -> int:
    """Print the warnings (stderr) and the summary (stdout); the exit status."""
    for warning in report["warnings"]:
        print(f"deepregister: WARNING: {warning}", file=sys.stderr)
    print(_summary(report, out))
    return EXIT_OK if report["succeeded"] else EXIT_WARNINGS


def cmd_register(args: argparse.Namespace) -> int:
    report = run_registration(args.fixed, args.moving, Path(args.out), args.model, args.device, args.iterations,
                              (args.fixed_landmarks, args.moving_landmarks), args.overwrite, ProgressBar(),
                              similarity=args.similarity, initial=args.initial,
                              masks=(args.fixed_mask, args.moving_mask), detect_fov=not args.no_detect_fov)
    return _finish(report, Path(args.out))


def cmd_demo(args: argparse.Namespace) -> int:
    data = Path(args.data)
    report = run_registration(str(data / "fixed_us.nii.gz"), str(data / "moving_mr.nii.gz"), Path(args.out),
                              args.model, args.device, args.iterations,
                              (str(data / "fixed_landmarks.fcsv"), str(data / "moving_landmarks.fcsv")),
                              args.overwrite, ProgressBar(), similarity=args.similarity, initial=args.initial,
                              detect_fov=not args.no_detect_fov)
    print("Demo: a simulated ultrasound-like fixed volume and MR-like moving volume with known deformation.")
    return _finish(report, Path(args.out))


def cmd_evaluate(args: argparse.Namespace) -> int:
    import SimpleITK as sitk

    from .imageio import read_image
    from .landmarks import tre, tre_summary

    try:
        transform = sitk.ReadTransform(args.transform)
    except RuntimeError:
        raise _input_error(f"Cannot read transform {args.transform}.") from None
    result: dict = {"transform": args.transform}
    pair = _read_landmark_pair(args.fixed_landmarks, args.moving_landmarks)
    if pair is not None:
        result["tre_mm"] = {"before": tre_summary(tre(pair[0].points, pair[1].points)),
                            "after": tre_summary(tre(pair[0].points, pair[1].points, transform))}
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise _input_error("Give both --fixed-labels and --moving-labels, or neither.")
    if args.fixed_labels is not None:
        from .metrics import dice_per_label

        fixed_label, moving_label = read_image(args.fixed_labels), read_image(args.moving_labels)
        result["dice"] = {"before": dice_per_label(fixed_label, moving_label),
                          "after": dice_per_label(fixed_label, moving_label, transform)}
    if args.reference is not None:
        from .metrics import transform_folding_percent

        result["folding_percent"] = transform_folding_percent(transform, read_image(args.reference))
    if len(result) == 1:
        raise _input_error("Nothing to evaluate: give landmarks, labels and/or --reference.")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(text)
    return EXIT_OK


def cmd_models(_: argparse.Namespace) -> int:
    from .models import default_model, list_models

    cards = list_models()
    default = default_model(cards)
    for card in cards:
        mark = " (default)" if card.name == default else ""
        print(f"{card.name:<12} {card.description}{mark}")
    print(f"{'none':<12} No network: fine-tuning on the pair alone (--model none)" + ("" if cards else " (default)"))
    if default:
        print(f"`deepregister register` without --model uses {default}; --model none fine-tunes on the pair alone.")
    else:
        print("No trained models installed: `deepregister register` fine-tunes on the pair alone (--model none).")
    return EXIT_OK


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .tools.benchmark import run

    return run(args)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser. Given the command line ``argv``, the benchmark's options (which import
    numpy and SimpleITK) are added only when the command is ``benchmark``."""
    parser = argparse.ArgumentParser(prog="deepregister", description="One-shot deep-learning 3D registration: "
                                     "register, evaluate, models, demo, benchmark.",
                                     epilog="Exit status: 0 success, 2 bad input, 3 finished with warnings "
                                            "(outputs written; check them), 130 cancelled.")
    commands = parser.add_subparsers(dest="command", required=True)

    def engine_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", help=MODEL_HELP)
        sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sub.add_argument("--iterations", type=int, help="fine-tuning steps on this pair (default: the model card's, "
                                                        f"{DEFAULT_ITERATIONS_WITHOUT_MODEL} without a model)")
        sub.add_argument("--similarity", default="auto", choices=SIMILARITIES,
                         help="fine-tuning similarity: mutual information, MIND-SSC or local normalised "
                              "cross-correlation (default auto: the model card's)")
        sub.add_argument("--initial", default="auto", choices=INITIAL_POSITIONS,
                         help="start position: centers (align the centres of the masked foregrounds), "
                              "physical (trust the images' physical positions, e.g. after a rigid "
                              "pre-alignment) or auto (physical when the foregrounds already overlap well, "
                              "else centers; the default)")
        sub.add_argument("--no-detect-fov", action="store_true",
                         help="do not look for an ultrasound field of view (the empty or constant region "
                              "connected to the border) to mask an image given without a mask")
        sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    register = commands.add_parser("register", help="register a moving volume to a fixed volume",
                                   epilog="Exit status: 0 success, 2 bad input (nothing written), 3 finished "
                                          "with warnings (outputs written; check them), 130 cancelled.")
    register.add_argument("--fixed", required=True, help="fixed image file or DICOM folder")
    register.add_argument("--moving", required=True, help="moving image file or DICOM folder")
    register.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    register.add_argument("--fixed-landmarks", help=".fcsv, .mrk.json or .csv (label,x,y,z LPS or label,r,a,s)")
    register.add_argument("--moving-landmarks", help="same format; pairs are matched by order")
    register.add_argument("--fixed-mask", help="label image on the fixed image's grid, nonzero where it holds "
                                               "data to compare (any format SimpleITK reads)")
    register.add_argument("--moving-mask", help="the same on the moving image's grid")
    engine_options(register)
    register.set_defaults(func=cmd_register)

    evaluate = commands.add_parser("evaluate", help="TRE, Dice per label and folding of a transform")
    evaluate.add_argument("--transform", required=True, help="fixed->moving transform file (e.g. transform.h5)")
    evaluate.add_argument("--fixed-landmarks")
    evaluate.add_argument("--moving-landmarks")
    evaluate.add_argument("--fixed-labels", help="label map or 4D channel image on the fixed grid")
    evaluate.add_argument("--moving-labels")
    evaluate.add_argument("--reference", help="image whose grid the folding percentage is measured on")
    evaluate.add_argument("--json", help="also write the result to this file")
    evaluate.set_defaults(func=cmd_evaluate)

    models = commands.add_parser("models", help="list installed models and the default one")
    models.set_defaults(func=cmd_models)

    demo = commands.add_parser("demo", help="register the bundled sample pair")
    demo.add_argument("--out", required=True)
    demo.add_argument("--data", default=str(SAMPLE_DATA), help=argparse.SUPPRESS)
    engine_options(demo)
    demo.set_defaults(func=cmd_demo)

    benchmark = commands.add_parser("benchmark", help="accuracy, seconds and memory against elastix and ANTs "
                                                      "(pip install .[bench])")
    if argv is None or (len(argv) > 0 and argv[0] == "benchmark"):
        from .tools.benchmark import add_arguments

        add_arguments(benchmark)
    benchmark.set_defaults(func=cmd_benchmark)
    return parser


def _loaded_classes(names: tuple[tuple[str, str], ...]) -> tuple[type, ...]:
    """The named error classes of this package's modules that are loaded (an error cannot have
    been raised by a module that was never imported, so nothing is imported here)."""
    modules = (sys.modules.get(f"{__package__}.{module}") for module, _ in names)
    return tuple(getattr(module, name) for module, (_, name) in zip(modules, names) if module is not None)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); the exit status.

    Without ``argv`` (the ``deepregister`` console script, ``python -m DeepRegisterLib.cli``) a
    command that loaded torch ends the process itself once stdout and stderr are flushed (every
    output file is closed and in place by then): Python's orderly teardown of torch and matplotlib
    took another 1.0-1.4 s on two busy CPU cores, after the work was done.
    """
    console = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    code = _run(args)
    if console and "torch" in sys.modules:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("\ndeepregister: cancelled; nothing was written.", file=sys.stderr)
        return EXIT_CANCELLED
    except Exception as error:
        if isinstance(error, _loaded_classes(_BAD_INPUT)):
            print(f"deepregister: error: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        if isinstance(error, _loaded_classes(_CANCELLED)):
            print("\ndeepregister: cancelled; nothing was written.", file=sys.stderr)
            return EXIT_CANCELLED
        raise


if __name__ == "__main__":
    sys.exit(main())
