"""The ``deepregister`` command line: register, evaluate, models, demo, benchmark.

Exit status:

* 0: success.
* 2: bad input: a one-line reason on stderr and nothing written.
* 3: the registration finished with warnings (e.g. its guard kept an earlier stage than the
  fine-tuned one because a later stage made the alignment worse): every output is written, each
  warning is printed to stderr as ``deepregister: WARNING: ...`` and report.json has
  ``"succeeded": false``. Check the result before using it.
* 130: cancelled; nothing written.

This module holds the argument parser and the commands only: ``register`` and ``demo`` run
:func:`DeepRegisterLib.runfiles.run_registration` (outputs go to a temporary folder beside ``--out``
and are moved into place only when complete), which chooses the OpenMP wait policy before torch
loads (:mod:`DeepRegisterLib.cpuload`).

Start-up is kept light: at import this module loads the standard library only; numpy, SimpleITK,
torch and matplotlib are imported by the commands that need them, so ``--help`` answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

from .models import DEFAULT_MODEL as DEFAULT_MODEL_NAME  # models and options load no torch
from .options import DEFAULT_ITERATIONS_WITHOUT_MODEL, INITIAL_POSITIONS
from .options import SIMILARITY_CHOICES as SIMILARITIES
from .progress import ProgressBar  # standard library only
from .resources import sample_data_dir  # standard library only
from .runfiles import input_error, read_landmark_pair, run_registration, summary  # standard library only

SAMPLE_DATA = sample_data_dir()
EXIT_OK, EXIT_BAD_INPUT, EXIT_WARNINGS, EXIT_CANCELLED = 0, 2, 3, 130
MODEL_HELP = (f"model name (see `deepregister models`), model folder, or `none` (no network: fine-tuning on "
              f"the pair alone); default: `{DEFAULT_MODEL_NAME}`, the best general model, when installed, "
              "else the first installed model, else none")
# Errors that mean bad input (exit 2) and cancellation (exit 130): (module, class).
_BAD_INPUT = (("imageio", "InputError"), ("landmarks", "LandmarkError"), ("models", "ModelError"))
_CANCELLED = (("progress", "RegistrationCancelled"),)


def _finish(report: dict, out: Path) -> int:
    """Print the warnings (stderr) and the summary (stdout); the exit status."""
    for warning in report["warnings"]:
        print(f"deepregister: WARNING: {warning}", file=sys.stderr)
    print(summary(report, out))
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
        raise input_error(f"Cannot read transform {args.transform}.") from None
    result: dict = {"transform": args.transform}
    pair = read_landmark_pair(args.fixed_landmarks, args.moving_landmarks)
    if pair is not None:
        result["tre_mm"] = {"before": tre_summary(tre(pair[0].points, pair[1].points)),
                            "after": tre_summary(tre(pair[0].points, pair[1].points, transform))}
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise input_error("Give both --fixed-labels and --moving-labels, or neither.")
    if args.fixed_labels is not None:
        from .metrics import dice_per_label

        fixed_label, moving_label = read_image(args.fixed_labels), read_image(args.moving_labels)
        result["dice"] = {"before": dice_per_label(fixed_label, moving_label),
                          "after": dice_per_label(fixed_label, moving_label, transform)}
    if args.reference is not None:
        from .metrics import transform_folding_percent

        result["folding_percent"] = transform_folding_percent(transform, read_image(args.reference))
    if len(result) == 1:
        raise input_error("Nothing to evaluate: give landmarks, labels and/or --reference.")
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
