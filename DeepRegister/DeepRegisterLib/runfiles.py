"""Runs one registration from image files into an output folder: reads the inputs, registers them
and writes transform.h5, warped.nii.gz, saliency.nii.gz, the masks used, report.json and report.png,
with the summary that the ``deepregister`` command prints.

Outputs go to a temporary folder beside the output folder and are moved into place only when
complete; a run that fails or is cancelled leaves nothing behind.

Start-up is kept light: at import this module loads the standard library only (numpy, SimpleITK,
torch and matplotlib are imported when a registration runs).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cpuload import CpuProbe, choose_openmp_wait_policy  # standard library only

if TYPE_CHECKING:  # imported where needed: see the module docstring
    import SimpleITK as sitk

    from .landmarks import Landmarks
    from .progress import ProgressBar
    from .registration import RegistrationResult



def input_error(message: str) -> Exception:
    from .imageio import InputError

    return InputError(message)


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and an ``out`` that is not a folder."""
    if out.exists() and not overwrite:
        raise input_error(f"Output folder {out} already exists; choose another --out or add --overwrite.")
    if out.exists() and not out.is_dir():
        raise input_error(f"--out {out} exists and is not a folder.")


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


def read_landmark_pair(fixed_path: str | None, moving_path: str | None) -> tuple[Landmarks, Landmarks] | None:
    if (fixed_path is None) != (moving_path is None):
        raise input_error("Give both --fixed-landmarks and --moving-landmarks, or neither.")
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

            write_report_png(folder / "report.png", fixed, moving, result.warped, result.saliency,
                             result.displacement_field(), title=_title(report), warning=_warning_line(report),
                             moving_transform=result.initial_transform)
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
    pair = read_landmark_pair(*landmarks)
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


def summary(report: dict, out: Path) -> str:
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
