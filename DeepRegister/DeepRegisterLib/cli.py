"""The ``deepregister`` command line: register, evaluate, models, demo.

Exit status: 0 success, 2 bad input (with a one-line reason on stderr), 130 cancelled.
Outputs go to a temporary folder beside ``--out`` and are moved into place only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import SimpleITK as sitk

from .imageio import InputError, center_alignment, read_image
from .landmarks import LandmarkError, Landmarks, check_pairs, read_landmarks, tre, tre_summary
from .memory import peak_memory_mb
from .models import ModelError, default_model, list_models

SAMPLE_DATA = Path(__file__).resolve().parents[2] / "Resources" / "SampleData"


class ProgressBar:
    """A one-line text progress bar with ETA on stderr (silent when stderr is not a terminal
    unless ``always``)."""

    def __init__(self, always: bool = False) -> None:
        self.enabled = always or sys.stderr.isatty()
        self.start = time.perf_counter()
        self.stage = ""

    def __call__(self, stage: str, fraction: float) -> None:
        if not self.enabled:
            return
        if stage != self.stage:
            self.stage, self.start = stage, time.perf_counter()
        elapsed = time.perf_counter() - self.start
        eta = f"ETA {elapsed / fraction - elapsed:4.0f} s" if 0 < fraction < 1 else " " * 8
        filled = int(30 * fraction)
        sys.stderr.write(f"\r{stage:<10} [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} {eta}")
        if stage == "output" and fraction >= 1:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _prepare_out(out: Path, overwrite: bool) -> tuple[Path, list[Path]]:
    """Refuse an existing ``out`` unless ``overwrite``; return a fresh temporary folder beside it
    and the parent folders that had to be created (removed again if the run fails)."""
    if out.exists() and not overwrite:
        raise InputError(f"Output folder {out} already exists; choose another --out or add --overwrite.")
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder.")
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
        raise InputError("Give both --fixed-landmarks and --moving-landmarks, or neither.")
    if fixed_path is None:
        return None
    pair = read_landmarks(fixed_path), read_landmarks(moving_path)
    check_pairs(*pair)
    return pair


def run_registration(fixed_path: str, moving_path: str, out: Path, model: str | None, device: str,
                     iterations: int | None, landmarks: tuple[str | None, str | None], overwrite: bool,
                     align_centers: bool = True, progress: ProgressBar | None = None) -> dict:
    """Register two image files and write transform.h5, warped.nii.gz, saliency.nii.gz, report.json
    and report.png to ``out``; returns the report."""
    from .registration import register
    from .report import write_report_png

    pair = _read_landmark_pair(*landmarks)
    fixed, moving = read_image(fixed_path), read_image(moving_path)
    temporary, created = _prepare_out(out, overwrite)
    published = False
    try:
        result = register(fixed, moving, model=model, device=device, iterations=iterations,
                          progress=progress, align_centers=align_centers)
        start = time.perf_counter()
        sitk.WriteTransform(result.transform, str(temporary / "transform.h5"))
        sitk.WriteImage(result.warped, str(temporary / "warped.nii.gz"), useCompression=True)
        sitk.WriteImage(result.saliency, str(temporary / "saliency.nii.gz"), useCompression=True)
        report = {
            "fixed": str(fixed_path), "moving": str(moving_path), "model": result.model,
            "device": result.device, "iterations": result.iterations, "seconds": result.timings,
            "peak_memory_mb": peak_memory_mb(), "folding_percent": result.folding_percent,
            "messages": result.messages, "transform_direction": "fixed -> moving (ITK, LPS mm)",
        }
        if pair is not None:
            fixed_points, moving_points = pair[0].points, pair[1].points
            after = tre(fixed_points, moving_points, result.transform)
            report["tre_mm"] = {
                "before": tre_summary(tre(fixed_points, moving_points)),
                "after": tre_summary(after),
                "per_landmark_after": [{"label": label, "tre_mm": float(e)} for label, e in zip(pair[0].labels, after)],
            }
            if align_centers:
                report["tre_mm"]["centres_aligned"] = tre_summary(tre(fixed_points, moving_points,
                                                                      center_alignment(fixed, moving)))
        moving_before = sitk.Resample(moving, fixed, center_alignment(fixed, moving) if align_centers
                                      else sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        write_report_png(temporary / "report.png", fixed, moving_before, result.warped, result.saliency,
                         result.displacement_field(), title=_title(report))
        report["seconds"]["write"] = time.perf_counter() - start
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


def _title(report: dict) -> str:
    title = f"DeepRegister - model: {report['model']} - {report['seconds']['total']:.1f} s on {report['device']}"
    if "tre_mm" in report:
        start = "centres_aligned" if "centres_aligned" in report["tre_mm"] else "before"
        title += (f" - median TRE {report['tre_mm'][start]['median']:.1f} ({start.replace('_', ' ')}) -> "
                  f"{report['tre_mm']['after']['median']:.1f} mm")
    return title + f" - folding {report['folding_percent']:.2f} %"


def _summary(report: dict, out: Path) -> str:
    memory = f"peak memory {report['peak_memory_mb']:.0f} MB, " if report["peak_memory_mb"] is not None else ""
    lines = [f"Registered with {report['model']} on {report['device']} in {report['seconds']['total']:.1f} s "
             f"({memory}folding {report['folding_percent']:.3f} %)."]
    lines += report["messages"]
    if "tre_mm" in report:
        tre_mm = report["tre_mm"]
        lines.append(f"Landmark TRE (mm), median / mean / max over {tre_mm['after']['n']} pairs:")
        for stage, name in (("before", "as loaded"), ("centres_aligned", "centres aligned"), ("after", "registered")):
            if stage in tre_mm:
                lines.append(f"  {name:<16} {tre_mm[stage]['median']:6.2f} / {tre_mm[stage]['mean']:6.2f} / "
                             f"{tre_mm[stage]['max']:6.2f}")
    lines.append(f"Outputs in {out}: transform.h5 (fixed->moving), warped.nii.gz, saliency.nii.gz, "
                 "report.json, report.png")
    return "\n".join(lines)


def cmd_register(args: argparse.Namespace) -> int:
    report = run_registration(args.fixed, args.moving, Path(args.out), args.model, args.device, args.iterations,
                              (args.fixed_landmarks, args.moving_landmarks), args.overwrite,
                              not args.no_center_align, ProgressBar())
    print(_summary(report, Path(args.out)))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    data = Path(args.data)
    report = run_registration(str(data / "fixed_us.nii.gz"), str(data / "moving_mr.nii.gz"), Path(args.out),
                              args.model, args.device, args.iterations,
                              (str(data / "fixed_landmarks.fcsv"), str(data / "moving_landmarks.fcsv")),
                              args.overwrite, progress=ProgressBar())
    print("Demo: a simulated ultrasound-like fixed volume and MR-like moving volume with known deformation.")
    print(_summary(report, Path(args.out)))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .metrics import dice_per_label, transform_folding_percent

    try:
        transform = sitk.ReadTransform(args.transform)
    except RuntimeError:
        raise InputError(f"Cannot read transform {args.transform}.") from None
    result: dict = {"transform": args.transform}
    pair = _read_landmark_pair(args.fixed_landmarks, args.moving_landmarks)
    if pair is not None:
        result["tre_mm"] = {"before": tre_summary(tre(pair[0].points, pair[1].points)),
                            "after": tre_summary(tre(pair[0].points, pair[1].points, transform))}
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise InputError("Give both --fixed-labels and --moving-labels, or neither.")
    if args.fixed_labels is not None:
        fixed_label, moving_label = read_image(args.fixed_labels), read_image(args.moving_labels)
        result["dice"] = {"before": dice_per_label(fixed_label, moving_label),
                          "after": dice_per_label(fixed_label, moving_label, transform)}
    if args.reference is not None:
        result["folding_percent"] = transform_folding_percent(transform, read_image(args.reference))
    if len(result) == 1:
        raise InputError("Nothing to evaluate: give landmarks, labels and/or --reference.")
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).write_text(text, encoding="utf-8")
    print(text)
    return 0


def cmd_models(_: argparse.Namespace) -> int:
    cards = list_models()
    if not cards:
        print("No trained models installed. `deepregister register` without --model fine-tunes on the pair alone.")
    default = default_model(cards)
    for card in cards:
        mark = " (default)" if card.name == default else ""
        print(f"{card.name:<12} {card.description}{mark}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from .benchmark import run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepregister", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    def engine_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--model", help="model name (see `deepregister models`) or model folder; "
                                         "default: no network, fine-tuning only")
        sub.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        sub.add_argument("--iterations", type=int, help="fine-tuning steps on this pair "
                                                        "(default: the model card's, 150 without a model)")
        sub.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    register = commands.add_parser("register", help="register a moving volume to a fixed volume")
    register.add_argument("--fixed", required=True, help="fixed image file or DICOM folder")
    register.add_argument("--moving", required=True, help="moving image file or DICOM folder")
    register.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    register.add_argument("--fixed-landmarks", help=".fcsv, .mrk.json or .csv (label,x,y,z LPS or label,r,a,s)")
    register.add_argument("--moving-landmarks", help="same format; pairs are matched by order")
    register.add_argument("--no-center-align", action="store_true",
                          help="trust the images' physical positions (e.g. after a rigid pre-alignment)")
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

    models = commands.add_parser("models", help="list installed models")
    models.set_defaults(func=cmd_models)

    demo = commands.add_parser("demo", help="register the bundled sample pair")
    demo.add_argument("--out", required=True)
    demo.add_argument("--data", default=str(SAMPLE_DATA), help=argparse.SUPPRESS)
    engine_options(demo)
    demo.set_defaults(func=cmd_demo)

    benchmark = commands.add_parser("benchmark", help="accuracy, seconds and memory against elastix and ANTs "
                                                      "(pip install .[bench])")
    from .benchmark import add_arguments

    add_arguments(benchmark)
    benchmark.set_defaults(func=cmd_benchmark)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .registration import RegistrationCancelled

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (InputError, LandmarkError, ModelError) as error:
        print(f"deepregister: error: {error}", file=sys.stderr)
        return 2
    except (RegistrationCancelled, KeyboardInterrupt):
        print("\ndeepregister: cancelled; nothing was written.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
