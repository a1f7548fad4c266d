"""The ``deepregister`` command line, run in-process through ``cli.main``.

Bad input must end with exit status 2, a one-line reason on stderr and nothing written: no
``--out`` folder (or an existing one left byte-identical) and no temporary folder left beside
it. Good input must give complete, mutually consistent outputs; a registration that finishes
with warnings writes them too, but says so loudly and exits with status 3.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib import cli, registration
from DeepRegisterLib.imageio import center_alignment, check_volume
from DeepRegisterLib.landmarks import Landmarks, tre, write_csv, write_fcsv, write_mrk_json
from DeepRegisterLib.models import (CARD_FILE, DEFAULT_MODEL, WEIGHTS_FILE, ModelCard, default_model, list_models,
                                    save_model)
from DeepRegisterLib.nets import GlobalNet, GlobalToLocal
from DeepRegisterLib.synthetic import PhantomPair, make_phantom_pair

OUTPUT_FILES = {"transform.h5", "warped.nii.gz", "saliency.nii.gz", "report.json", "report.png"}
MASK_FILES = {"fixed": "fixed_mask.nii.gz", "moving": "moving_mask.nii.gz"}  # written when a mask was used
MODEL_NAME = "tiny-test"
MODEL_DESCRIPTION = "untrained test network"
MODEL_SIZE = [16, 16, 16]
MODEL_SPACING = [4.0, 4.0, 4.0]


# --------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------

@dataclass
class Data:
    """The phantom pair and the files written from it."""

    pair: PhantomPair
    folder: Path
    fixed: Path
    moving: Path
    fixed_gland: Path
    moving_gland: Path
    fixed_landmarks: Path  # .fcsv
    moving_landmarks: Path  # .mrk.json
    moving_landmarks_short: Path  # .csv with one point fewer
    labels: list[str]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Data:
    folder = tmp_path_factory.mktemp("phantom")
    pair = make_phantom_pair(0, (32, 32, 32), spacing=4.0, ultrasound=False)
    paths = {name: folder / f"{name}.nii.gz" for name in ("fixed", "moving", "fixed_gland", "moving_gland")}
    for name, image in (("fixed", pair.fixed), ("moving", pair.moving), ("fixed_gland", pair.fixed_gland),
                        ("moving_gland", pair.moving_gland)):
        sitk.WriteImage(image, str(paths[name]), useCompression=True)
    labels = [f"L{i + 1}" for i in range(len(pair.fixed_points))]
    fixed_landmarks, moving_landmarks = folder / "fixed.fcsv", folder / "moving.mrk.json"
    short = folder / "moving_short.csv"
    write_fcsv(fixed_landmarks, Landmarks(pair.fixed_points, labels))
    write_mrk_json(moving_landmarks, Landmarks(pair.moving_points, labels))
    write_csv(short, Landmarks(pair.moving_points[:-1], labels[:-1]))
    return Data(pair, folder, paths["fixed"], paths["moving"], paths["fixed_gland"], paths["moving_gland"],
                fixed_landmarks, moving_landmarks, short, labels)


def tiny_card(architecture: str, config: dict, name: str = MODEL_NAME) -> ModelCard:
    return ModelCard(name=name, description=MODEL_DESCRIPTION, architecture=architecture, config=config,
                     input_size=list(MODEL_SIZE), spacing_mm=list(MODEL_SPACING))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders: a valid one (inside a search-path ``library`` folder) and broken ones."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    network = GlobalToLocal(MODEL_SIZE, MODEL_SPACING, global_channels=[4, 8], local_channels=[4, 8])
    valid = save_model(root / "library" / MODEL_NAME, tiny_card("GlobalToLocal", network.config), network)

    corrupt_card = root / "corrupt_card"
    corrupt_card.mkdir()
    (corrupt_card / CARD_FILE).write_text('{"name": "broken", "description": ', encoding="utf-8")
    (corrupt_card / WEIGHTS_FILE).write_bytes((valid / WEIGHTS_FILE).read_bytes())

    corrupt_weights = root / "corrupt_weights"
    corrupt_weights.mkdir()
    (corrupt_weights / CARD_FILE).write_text(tiny_card("GlobalToLocal", network.config, "noisy").to_json(),
                                             encoding="utf-8")
    (corrupt_weights / WEIGHTS_FILE).write_bytes(np.random.default_rng(0).bytes(4096))

    small = GlobalNet(MODEL_SIZE, MODEL_SPACING, channels=[4, 8])
    mismatched = save_model(root / "mismatched", tiny_card("GlobalNet", small.config, "misfit"), small)
    claimed = GlobalNet(MODEL_SIZE, MODEL_SPACING, channels=[8, 16])
    (mismatched / CARD_FILE).write_text(tiny_card("GlobalNet", claimed.config, "misfit").to_json(), encoding="utf-8")
    return {"library": root / "library", "valid": valid, "corrupt_card": corrupt_card,
            "corrupt_weights": corrupt_weights, "mismatched": mismatched}


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def leftovers(out: Path) -> list[str]:
    """Temporary folders of ``out`` left in its parent (``.<name>.*``)."""
    if not out.parent.exists():
        return []
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}"))


def assert_nothing_written(out: Path, before: dict[str, bytes] | None = None) -> None:
    if before is None:
        assert not out.exists(), f"{out} was created: {sorted(p.name for p in out.iterdir())}"
    else:
        assert out.is_dir() and snapshot(out) == before, "the existing output folder was changed"
    assert leftovers(out) == []


def refused(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path, fragments: list[str],
            before: dict[str, bytes] | None = None) -> str:
    """Run ``argv``; assert exit 2, each fragment (case-insensitive) on stderr, nothing written."""
    capsys.readouterr()
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.err.startswith("deepregister: error: "), captured.err
    assert "Traceback" not in captured.err
    for fragment in fragments:
        assert fragment.lower() in captured.err.lower(), (fragment, captured.err)
    assert captured.out == ""
    assert_nothing_written(out, before)
    return captured.err


def register_argv(fixed: Path | str, moving: Path | str, out: Path, *extra: str) -> list[str]:
    """A quick registration without a network (a later ``--model`` in ``extra`` wins)."""
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--device", "cpu",
            "--iterations", "4", "--model", "none", *extra]


def written_files(out: Path, report: dict) -> set[str]:
    """The files in ``out``, checked against report.json's list and the masks it says were used."""
    names = {p.name for p in out.iterdir()}
    assert names == set(report["files"])
    masks = {MASK_FILES[role] for role in MASK_FILES if report[f"{role}_mask"] != "none"}
    assert names == OUTPUT_FILES | masks, (names, masks)
    return names


def write_like(reference: sitk.Image, array: np.ndarray, path: Path) -> Path:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    sitk.WriteImage(image, str(path))
    return path


# --------------------------------------------------------------------------------------------
# 1. Images that cannot be registered
# --------------------------------------------------------------------------------------------

def _image_2d(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "slice.nii.gz"
    sitk.WriteImage(pair.fixed[:, :, 10], str(path))
    return path


def _image_4d(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "series.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([pair.moving, pair.moving]), str(path))
    return path


def _image_vector(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "vector.nii.gz"
    sitk.WriteImage(sitk.Compose(pair.fixed, pair.fixed, pair.fixed), str(path))
    return path


def _image_constant(pair: PhantomPair, folder: Path) -> Path:
    return write_like(pair.fixed, np.full(sitk.GetArrayViewFromImage(pair.fixed).shape, 7.0, np.float32),
                      folder / "constant.nii.gz")


def _image_with(value: float) -> Callable[[PhantomPair, Path], Path]:
    def make(pair: PhantomPair, folder: Path) -> Path:
        array = sitk.GetArrayFromImage(pair.moving)
        array[5, 6, 7] = value
        # NRRD keeps non-finite floats; ITK's NIfTI reader (nifticlib) silently replaces them with 0.
        return write_like(pair.moving, array, folder / "bad_value.nrrd")
    return make


def _image_thin(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "thin.nii.gz"
    sitk.WriteImage(pair.fixed[:, :, 10:13], str(path))
    return path


def _unreadable(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "garbage.nii.gz"
    path.write_bytes(np.random.default_rng(1).bytes(2048))
    return path


def _missing(pair: PhantomPair, folder: Path) -> Path:
    return folder / "no_such_image.nii.gz"


def _empty_folder(pair: PhantomPair, folder: Path) -> Path:
    path = folder / "not_dicom"
    path.mkdir()
    (path / "notes.txt").write_text("no DICOM here\n", encoding="utf-8")
    return path


BAD_IMAGES = [
    # (id, maker, role it is given as, message fragments)
    ("2d", _image_2d, "fixed", ["fixed image is a 2D image", "3D"]),
    ("4d", _image_4d, "moving", ["moving image is a 4D image", "time series"]),
    ("vector", _image_vector, "fixed", ["fixed image has 3 components"]),
    ("constant", _image_constant, "fixed", ["constant", "7.0"]),
    ("nan", _image_with(math.nan), "moving", ["moving image contains NaN or infinite"]),
    ("inf", _image_with(math.inf), "moving", ["moving image contains NaN or infinite"]),
    ("thin", _image_thin, "fixed", ["at least 4 voxels"]),
    ("unreadable", _unreadable, "fixed", ["Cannot read image", "garbage.nii.gz"]),
    ("missing", _missing, "moving", ["no_such_image.nii.gz does not exist"]),
    ("no-dicom-folder", _empty_folder, "fixed", ["holds no DICOM series"]),
]


@pytest.mark.parametrize("maker, role, fragments", [case[1:] for case in BAD_IMAGES],
                         ids=[case[0] for case in BAD_IMAGES])
def test_bad_image_is_refused_and_nothing_written(
        data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        maker: Callable[[PhantomPair, Path], Path], role: str, fragments: list[str]) -> None:
    bad = maker(data.pair, tmp_path)
    fixed, moving = (bad, data.moving) if role == "fixed" else (data.fixed, bad)
    out = tmp_path / "result"
    refused(capsys, register_argv(fixed, moving, out), out, fragments)


def test_single_time_point_4d_image_is_accepted_as_3d(data: Data, tmp_path: Path) -> None:
    image = sitk.JoinSeries([data.pair.moving])
    assert image.GetDimension() == 4 and image.GetSize()[3] == 1
    checked = check_volume(image, "moving")
    assert checked.GetDimension() == 3 and checked.GetSize() == data.pair.moving.GetSize()
    assert checked.GetPixelID() == sitk.sitkFloat32


def test_negative_iterations_are_refused(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    argv = register_argv(data.fixed, data.moving, out)
    argv[argv.index("--iterations") + 1] = "-3"
    refused(capsys, argv, out, ["iterations cannot be negative"])


# --------------------------------------------------------------------------------------------
# 2. Volumes that do not overlap in physical space
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def far_moving(data: Data) -> Path:
    moving = sitk.Image(data.pair.moving)
    moving.SetOrigin((np.asarray(moving.GetOrigin()) + [1000.0, 0.0, 0.0]).tolist())
    path = data.folder / "moving_far.nii.gz"
    sitk.WriteImage(moving, str(path))
    return path


def test_non_overlapping_volumes_at_their_physical_positions_are_refused(
        data: Data, far_moving: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, far_moving, out, "--initial", "physical"), out,
            ["do not overlap", "origins"])


def test_no_center_align_is_gone(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(register_argv(data.fixed, data.moving, out, "--no-center-align"))
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-center-align" in capsys.readouterr().err
    assert_nothing_written(out)


def test_non_overlapping_volumes_are_registered_after_centre_alignment(
        data: Data, far_moving: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    assert cli.main(register_argv(data.fixed, far_moving, out)) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["initial"] == "centers"  # "auto" saw that the physical positions do not overlap
    written_files(out, report)
    # The centre shift (about 1000 mm along x) is part of the written transform.
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    fixed = data.pair.fixed
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    shift = np.asarray(transform.TransformPoint(centre)) - np.asarray(centre)
    assert 980.0 < shift[0] < 1040.0, shift
    warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    assert warped.std() > 1.0  # the moving anatomy was found, not just background
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------
# 3. Landmarks
# --------------------------------------------------------------------------------------------

def test_landmark_count_mismatch_names_both_counts(data: Data, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    n = len(data.labels)
    refused(capsys, register_argv(data.fixed, data.moving, out, "--fixed-landmarks", str(data.fixed_landmarks),
                                  "--moving-landmarks", str(data.moving_landmarks_short)),
            out, [f"fixed landmarks have {n} points", f"moving landmarks have {n - 1}"])


def test_only_fixed_landmarks_is_refused(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--fixed-landmarks", str(data.fixed_landmarks)),
            out, ["--fixed-landmarks and --moving-landmarks"])


@pytest.mark.parametrize("name, content, fragment", [
    ("binary.fcsv", bytes(range(256)) * 4, "not a text file"),
    ("broken.mrk.json", b'{"markups": [', "not valid JSON"),
    ("missing.csv", None, "was not found"),
], ids=["binary-fcsv", "broken-json", "missing-csv"])
def test_unreadable_landmark_file_is_refused(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             name: str, content: bytes | None, fragment: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--fixed-landmarks", str(data.fixed_landmarks),
                                  "--moving-landmarks", str(path)), out, [fragment, name])


# --------------------------------------------------------------------------------------------
# 4. An existing --out folder
# --------------------------------------------------------------------------------------------

def _existing_out(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    out = tmp_path / "result"
    (out / "sub").mkdir(parents=True)
    (out / "keep.txt").write_text("earlier results\n", encoding="utf-8")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01\x02")
    return out, snapshot(out)


def test_existing_out_is_refused_without_overwrite(data: Data, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out, before = _existing_out(tmp_path)
    refused(capsys, register_argv(data.fixed, data.moving, out), out, ["already exists", "--overwrite"], before)


def test_failed_overwrite_leaves_existing_out_untouched(data: Data, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out, before = _existing_out(tmp_path)
    constant = _image_constant(data.pair, tmp_path)
    refused(capsys, register_argv(constant, data.moving, out, "--overwrite"), out, ["constant"], before)
    refused(capsys, register_argv(data.fixed, data.moving, out, "--overwrite", "--model", "no-such-model"),
            out, ["no-such-model"], before)


def test_out_that_is_a_file_is_refused_even_with_overwrite(data: Data, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    out.write_text("not a folder\n", encoding="utf-8")
    capsys.readouterr()
    assert cli.main(register_argv(data.fixed, data.moving, out, "--overwrite")) == 2
    assert "not a folder" in capsys.readouterr().err
    assert out.read_text(encoding="utf-8") == "not a folder\n"
    assert leftovers(out) == []


def test_overwrite_replaces_existing_out_with_complete_output(data: Data, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    out, _ = _existing_out(tmp_path)
    assert cli.main(register_argv(data.fixed, data.moving, out, "--overwrite")) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    written_files(out, report)  # old content gone, new content complete
    assert report["iterations"] == 4 and report["device"] == "cpu"
    assert "tre_mm" not in report
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------
# 5. A GPU that is not there
# --------------------------------------------------------------------------------------------

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_refused(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    argv = register_argv(data.fixed, data.moving, out)
    argv[argv.index("--device") + 1] = "cuda"
    refused(capsys, argv, out, ["GPU", "cuda", "cpu"])


def test_failed_run_removes_the_parent_folders_it_created(data: Data, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "new" / "sub" / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--model", str(tmp_path / "no-such-model")), out,
            ["no-such-model"])
    assert not (tmp_path / "new").exists()


# --------------------------------------------------------------------------------------------
# 6. Models
# --------------------------------------------------------------------------------------------

def test_unknown_model_name_lists_known_models(data: Data, models: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(models["library"]))
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--model", "no-such-model"), out,
            ["no-such-model", "Known models", MODEL_NAME])


@pytest.mark.parametrize("which, fragments", [
    ("corrupt_card", ["corrupt", CARD_FILE]),
    ("corrupt_weights", ["corrupt", WEIGHTS_FILE, "noisy"]),
    ("mismatched", ["do not fit", "misfit"]),
])
def test_broken_model_folder_is_refused(data: Data, models: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str], which: str,
                                        fragments: list[str]) -> None:
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--model", str(models[which])), out, fragments)


def test_exported_model_registers_a_pair(data: Data, models: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    argv = register_argv(data.fixed, data.moving, out, "--model", str(models["valid"]), "--fixed-landmarks",
                         str(data.fixed_landmarks), "--moving-landmarks", str(data.moving_landmarks))
    argv[argv.index("--iterations") + 1] = "2"
    code = cli.main(argv)
    captured = capsys.readouterr()
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    written_files(out, report)
    assert report["model"] == MODEL_NAME
    assert report["iterations"] == 2
    assert [stage["stage"] for stage in report["stages"]] == ["start", "network", "affine", "deformable"]
    # an untrained network and 2 fine-tuning steps: whatever the guard keeps, it is not worse than the start,
    # and the exit status and report agree with what it kept
    kept = [stage for stage in report["stages"] if stage["stage"] == report["kept_stage"]][0]
    assert kept["accepted"] and report["tre_mm"]["after"]["median"] <= report["tre_mm"]["start"]["median"]
    assert (code == 0) == report["succeeded"] == (report["kept_stage"] == "deformable"), captured.err
    assert code in (0, 3) and (code == 0 or "rejected" in captured.err)
    assert leftovers(out) == []


# --------------------------------------------------------------------------------------------
# 7. A successful run and its outputs
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def registered(data: Data, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, str]:
    """One CLI registration with landmarks (fixed .fcsv, moving .mrk.json): (out, report, stdout)."""
    out = tmp_path_factory.mktemp("run") / "result"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli.main(register_argv(data.fixed, data.moving, out, "--fixed-landmarks", str(data.fixed_landmarks),
                                      "--moving-landmarks", str(data.moving_landmarks)))
    assert code == 0
    return out, json.loads((out / "report.json").read_text(encoding="utf-8")), stdout.getvalue()


def test_successful_run_writes_every_output(registered: tuple[Path, dict, str]) -> None:
    out, report, stdout = registered
    names = written_files(out, report)
    assert all((out / name).stat().st_size > 0 for name in names)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(out) == []
    assert report["model"] == "none (fine-tuning only)" and report["iterations"] == 4
    assert report["device"] == "cpu"
    assert report["transform_direction"].startswith("fixed -> moving")
    assert report["seconds"]["total"] > 0 and 0.0 <= report["folding_percent"] <= 100.0
    assert "Landmark TRE" in stdout and str(out) in stdout
    # The engine's account of the run.
    assert report["succeeded"] is True and report["warnings"] == []
    assert stdout.startswith("Registered with none (fine-tuning only) on cpu")
    assert report["similarity"] in ("mi", "mind", "lncc") and report["initial"] in ("centers", "physical")
    assert report["fixed_mask"] in ("detected", "none") and report["moving_mask"] in ("detected", "none")
    stages = [stage["stage"] for stage in report["stages"]]
    assert stages[0] == "start" and report["kept_stage"] in stages
    assert all(isinstance(stage["score"], float) and isinstance(stage["accepted"], bool) for stage in report["stages"])
    assert report["min_jacobian"] > 0.0


def test_transform_maps_fixed_landmarks_with_reported_errors(data: Data,
                                                             registered: tuple[Path, dict, str]) -> None:
    out, report, _ = registered
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in data.pair.fixed_points])
    errors = np.linalg.norm(mapped - data.pair.moving_points, axis=1)
    per_landmark = report["tre_mm"]["per_landmark_after"]
    assert [entry["label"] for entry in per_landmark] == data.labels
    np.testing.assert_allclose([entry["tre_mm"] for entry in per_landmark], errors, rtol=0, atol=1e-6)
    after = report["tre_mm"]["after"]
    assert after["n"] == len(data.labels)
    assert after["median"] == pytest.approx(float(np.median(errors)), abs=1e-6)
    assert after["max"] == pytest.approx(float(errors.max()), abs=1e-6)
    before = np.linalg.norm(data.pair.fixed_points - data.pair.moving_points, axis=1)
    assert report["tre_mm"]["before"]["mean"] == pytest.approx(float(before.mean()), abs=1e-6)
    # "start": through the engine's start position, here the image centres aligned (no masks).
    assert (report["initial"], report["fixed_mask"], report["moving_mask"]) == ("centers", "none", "none")
    start = tre(data.pair.fixed_points, data.pair.moving_points, center_alignment(data.pair.fixed, data.pair.moving))
    assert report["tre_mm"]["start"]["median"] == pytest.approx(float(np.median(start)), abs=1e-6)
    assert report["tre_mm"]["start"]["median"] < report["tre_mm"]["before"]["median"]
    # The transform is not the identity: it carries at least the centre shift (tens of mm here).
    assert report["tre_mm"]["before"]["median"] > 20.0
    assert after["median"] < report["tre_mm"]["before"]["median"]


def _assert_on_grid(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-5)


def test_saliency_and_warped_are_on_the_fixed_grid(data: Data, registered: tuple[Path, dict, str]) -> None:
    out, _, _ = registered
    fixed = sitk.ReadImage(str(data.fixed))
    saliency = sitk.ReadImage(str(out / "saliency.nii.gz"))
    warped = sitk.ReadImage(str(out / "warped.nii.gz"))
    for image in (saliency, warped):
        _assert_on_grid(image, fixed)
        assert image.GetNumberOfComponentsPerPixel() == 1
    values = sitk.GetArrayFromImage(saliency)
    assert np.isfinite(values).all()
    assert values.min() >= 0.0 and values.max() <= 1.0 and values.std() > 1e-3
    # warped.nii.gz is the moving image resampled through transform.h5.
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    expected = sitk.Resample(sitk.ReadImage(str(data.moving)), fixed, transform, sitk.sitkLinear, 0.0,
                             sitk.sitkFloat32)
    np.testing.assert_allclose(sitk.GetArrayFromImage(warped), sitk.GetArrayFromImage(expected), atol=1e-3)


# --------------------------------------------------------------------------------------------
# 8. evaluate
# --------------------------------------------------------------------------------------------

def test_evaluate_reports_tre_and_dice(data: Data, registered: tuple[Path, dict, str], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    out, report, _ = registered
    json_path = tmp_path / "evaluation.json"
    capsys.readouterr()
    code = cli.main(["evaluate", "--transform", str(out / "transform.h5"),
                     "--fixed-landmarks", str(data.fixed_landmarks), "--moving-landmarks", str(data.moving_landmarks),
                     "--fixed-labels", str(data.fixed_gland), "--moving-labels", str(data.moving_gland),
                     "--reference", str(data.fixed), "--json", str(json_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert json.loads(json_path.read_text(encoding="utf-8")) == result
    assert result["tre_mm"]["after"]["median"] == pytest.approx(report["tre_mm"]["after"]["median"], abs=1e-9)
    assert result["tre_mm"]["before"] == pytest.approx(report["tre_mm"]["before"])
    assert set(result["dice"]) == {"before", "after"}
    assert set(result["dice"]["after"]) == {"label 1"} == set(result["dice"]["before"])
    assert 0.0 <= result["dice"]["before"]["label 1"] < result["dice"]["after"]["label 1"] <= 1.0
    assert 0.0 <= result["folding_percent"] <= 100.0


def test_evaluate_with_nothing_to_evaluate_is_refused(registered: tuple[Path, dict, str],
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out, _, _ = registered
    capsys.readouterr()
    assert cli.main(["evaluate", "--transform", str(out / "transform.h5")]) == 2
    captured = capsys.readouterr()
    assert "Nothing to evaluate" in captured.err and captured.out == ""


def test_evaluate_unreadable_transform_is_refused(data: Data, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "transform.h5"
    path.write_bytes(b"not an HDF5 file")
    capsys.readouterr()
    assert cli.main(["evaluate", "--transform", str(path), "--fixed-landmarks", str(data.fixed_landmarks),
                     "--moving-landmarks", str(data.moving_landmarks)]) == 2
    assert "Cannot read transform" in capsys.readouterr().err


def test_evaluate_with_only_fixed_labels_is_refused(data: Data, registered: tuple[Path, dict, str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out, _, _ = registered
    capsys.readouterr()
    assert cli.main(["evaluate", "--transform", str(out / "transform.h5"),
                     "--fixed-labels", str(data.fixed_gland)]) == 2
    assert "--fixed-labels and --moving-labels" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# 9. models
# --------------------------------------------------------------------------------------------

def test_models_lists_installed_models(models: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(models["library"]))
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.split()[0] == MODEL_NAME and MODEL_DESCRIPTION in line for line in lines if line.strip()), lines


def test_default_model_is_generic_when_installed_else_the_first() -> None:
    generic, mrus = tiny_card("GlobalNet", {}, DEFAULT_MODEL), tiny_card("GlobalNet", {}, "mrus")
    assert DEFAULT_MODEL == "generic"
    assert default_model([mrus, generic]) == "generic"
    assert default_model([mrus]) == "mrus"
    assert default_model([]) == ""


def test_models_marks_the_shipped_default_and_names_none(capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPREGISTER_MODEL_PATH", raising=False)
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines if line.endswith("(default)")] == [DEFAULT_MODEL], lines
    assert any(line.split()[0] == "none" and "fine-tuning on the pair alone" in line for line in lines), lines
    assert f"without --model uses {DEFAULT_MODEL}; --model none fine-tunes on the pair alone" in lines[-1]


def test_register_help_names_the_same_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.DEFAULT_MODEL_NAME == DEFAULT_MODEL  # --help names it without importing torch
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["register", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert f"default: `{DEFAULT_MODEL}`, the best general model" in text
    assert "`none` (no network: fine-tuning on the pair alone)" in text
    for option in ("--fixed-mask", "--moving-mask", "--no-detect-fov", "--similarity {auto,mi,mind,lncc}",
                   "--initial {auto,centers,physical}", "3 finished with warnings"):
        assert option in text, option
    assert "--no-center-align" not in text


def test_models_without_installed_models_says_fine_tuning_is_the_default(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from DeepRegisterLib import models

    monkeypatch.setattr(models, "model_search_path", lambda: [tmp_path])
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[0] == "none" and lines[0].endswith("(default)"), lines
    assert "No trained models installed" in lines[-1] and "fine-tunes on the pair alone" in lines[-1]


def test_register_without_model_uses_the_default_model(data: Data, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """No --model: the model `deepregister models` marks (here a tiny network installed under the
    default's name, which shadows the shipped one); --model none: no network."""
    network = GlobalNet(MODEL_SIZE, MODEL_SPACING, channels=[4, 8])
    library = tmp_path / "library"
    save_model(library / DEFAULT_MODEL, tiny_card("GlobalNet", network.config, DEFAULT_MODEL), network)
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(library))
    assert default_model(list_models()) == DEFAULT_MODEL
    argv = register_argv(data.fixed, data.moving, tmp_path / "default")
    del argv[argv.index("--model"):argv.index("--model") + 2]
    capsys.readouterr()
    assert cli.main(argv) == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "default" / "report.json").read_text(encoding="utf-8"))
    assert report["model"] == DEFAULT_MODEL
    assert capsys.readouterr().out.startswith(f"Registered with {DEFAULT_MODEL} on cpu")
    assert cli.main(register_argv(data.fixed, data.moving, tmp_path / "none", "--model", "none")) == 0
    report = json.loads((tmp_path / "none" / "report.json").read_text(encoding="utf-8"))
    assert report["model"] == "none (fine-tuning only)"


# --------------------------------------------------------------------------------------------
# 10. Cancellation
# --------------------------------------------------------------------------------------------

def test_progress_callback_cancels_registration(data: Data) -> None:
    calls: list[tuple[str, float]] = []

    def progress(stage: str, fraction: float) -> bool:
        calls.append((stage, fraction))
        return not (stage == "finetune" and fraction > 0.2)

    with pytest.raises(registration.RegistrationCancelled):
        registration.register(data.pair.fixed, data.pair.moving, device="cpu", iterations=20, progress=progress)
    finetune = [f for stage, f in calls if stage == "finetune"]
    assert finetune and finetune[-1] > 0.2 and max(finetune[:-1]) <= 0.2  # stopped at the first refusal
    assert "output" not in {stage for stage, _ in calls}


def test_cancelled_cli_run_exits_130_and_writes_nothing(data: Data, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    class Cancelling:
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __call__(self, stage: str, fraction: float) -> bool:
            return stage != "finetune"

    monkeypatch.setattr(cli, "ProgressBar", Cancelling)
    out = tmp_path / "result"
    capsys.readouterr()
    assert cli.main(register_argv(data.fixed, data.moving, out)) == 130
    assert "cancelled" in capsys.readouterr().err
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------
# 11. Masks and the ultrasound field of view
# --------------------------------------------------------------------------------------------

def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def _cube_mask(reference: sitk.Image, corner: str, path: Path) -> Path:
    """A mask of the 6-voxel cube in the first (``low``) or last (``high``) corner of the grid."""
    array = np.zeros(_array(reference).shape, np.uint8)
    if corner == "low":
        array[:6, :6, :6] = 1
    else:
        array[-6:, -6:, -6:] = 1
    return write_like(reference, array, path)


def _bad_mask_wrong_grid(data: Data, folder: Path) -> tuple[str, Path]:
    return "--fixed-mask", data.moving_gland  # a moving-grid label given as the fixed mask


def _bad_mask_empty(data: Data, folder: Path) -> tuple[str, Path]:
    return "--fixed-mask", write_like(data.pair.fixed, np.zeros(_array(data.pair.fixed).shape, np.uint8),
                                      folder / "empty.nii.gz")


def _bad_mask_2d(data: Data, folder: Path) -> tuple[str, Path]:
    path = folder / "mask_2d.nii.gz"
    sitk.WriteImage(sitk.Cast(data.pair.moving_gland[:, :, 10] > 0, sitk.sitkUInt8), str(path))
    return "--moving-mask", path


def _bad_mask_unreadable(data: Data, folder: Path) -> tuple[str, Path]:
    path = folder / "mask_garbage.nrrd"
    path.write_bytes(np.random.default_rng(2).bytes(1024))
    return "--moving-mask", path


def _bad_mask_missing(data: Data, folder: Path) -> tuple[str, Path]:
    return "--fixed-mask", folder / "no_such_mask.nii.gz"


BAD_MASKS = [
    ("wrong-grid", _bad_mask_wrong_grid, ["fixed mask is not on the fixed image's grid", "Resample"]),
    ("empty", _bad_mask_empty, ["fixed mask is empty"]),
    ("2d", _bad_mask_2d, ["moving mask must be a 3D label image"]),
    ("unreadable", _bad_mask_unreadable, ["--moving-mask", "Cannot read image", "mask_garbage.nrrd"]),
    ("missing", _bad_mask_missing, ["--fixed-mask", "no_such_mask.nii.gz does not exist"]),
]


@pytest.mark.parametrize("maker, fragments", [case[1:] for case in BAD_MASKS], ids=[case[0] for case in BAD_MASKS])
def test_bad_mask_is_refused_and_nothing_written(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                 maker: Callable[[Data, Path], tuple[str, Path]],
                                                 fragments: list[str]) -> None:
    option, path = maker(data, tmp_path)
    out = tmp_path / "new" / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, option, str(path)), out, fragments)
    assert not (tmp_path / "new").exists()


def test_masks_that_do_not_overlap_are_refused(data: Data, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    fixed_mask = _cube_mask(data.pair.fixed, "low", tmp_path / "fixed_corner.nii.gz")
    moving_mask = _cube_mask(data.pair.moving, "high", tmp_path / "moving_corner.nii.gz")
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, data.moving, out, "--fixed-mask", str(fixed_mask), "--moving-mask",
                                  str(moving_mask), "--initial", "physical"), out, ["masks do not overlap"])


def test_given_masks_are_used_reported_and_written(data: Data, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    argv = register_argv(data.fixed, data.moving, out, "--fixed-mask", str(data.fixed_gland),
                         "--moving-mask", str(data.moving_gland))
    assert cli.main(argv) in (0, 3), capsys.readouterr().err  # 4 steps from the glands' centres: maybe no clear gain
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["fixed_mask"], report["moving_mask"]) == ("given", "given")
    written_files(out, report)
    for role, given in (("fixed", data.fixed_gland), ("moving", data.moving_gland)):
        written = sitk.ReadImage(str(out / MASK_FILES[role]))
        np.testing.assert_array_equal(_array(written), (_array(sitk.ReadImage(str(given))) != 0).astype(np.uint8))
    assert "fixed mask given, moving mask given" in capsys.readouterr().out


@pytest.fixture(scope="module")
def cropped_fixed(data: Data) -> Path:
    """The fixed image with a third of its volume blanked from one side, as an ultrasound view's
    empty surroundings."""
    array = _array(data.pair.fixed)
    array[:, :, : array.shape[2] // 3] = 0.0
    return write_like(data.pair.fixed, array, data.folder / "fixed_cropped.nii.gz")


def test_field_of_view_is_detected_unless_switched_off(data: Data, cropped_fixed: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "detected"
    assert cli.main(register_argv(cropped_fixed, data.moving, out)) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["fixed_mask"] == "detected"
    assert "fixed_mask.nii.gz" in written_files(out, report)
    mask = _array(sitk.ReadImage(str(out / "fixed_mask.nii.gz")))
    third = mask.shape[2] // 3
    assert not mask[:, :, :third].any() and mask[:, :, third + 3:].mean() > 0.5  # the blank part is outside
    assert any("field of view was detected" in message for message in report["messages"])

    out = tmp_path / "not_detected"
    assert cli.main(register_argv(cropped_fixed, data.moving, out, "--no-detect-fov")) == 0, capsys.readouterr().err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["fixed_mask"], report["moving_mask"]) == ("none", "none")
    assert not {"fixed_mask.nii.gz", "moving_mask.nii.gz"} & written_files(out, report)


# --------------------------------------------------------------------------------------------
# 12. Similarity and start position
# --------------------------------------------------------------------------------------------

def test_similarity_and_physical_start_are_used_and_reported(data: Data, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    argv = register_argv(data.fixed, data.moving, out, "--similarity", "lncc", "--initial", "physical",
                         "--fixed-landmarks", str(data.fixed_landmarks),
                         "--moving-landmarks", str(data.moving_landmarks))
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code in (0, 3), captured.err
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert (report["similarity"], report["initial"]) == ("lncc", "physical")
    assert report["tre_mm"]["start"] == report["tre_mm"]["before"]  # physical: the start is the images as loaded
    assert "similarity lncc, start: physical positions" in captured.out


def test_unknown_similarity_is_refused_by_argparse(data: Data, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    with pytest.raises(SystemExit) as exit_info:
        cli.main(register_argv(data.fixed, data.moving, out, "--similarity", "ssd"))
    assert exit_info.value.code == 2
    assert "invalid choice: 'ssd'" in capsys.readouterr().err
    assert_nothing_written(out)


# --------------------------------------------------------------------------------------------
# 13. A registration that finishes with warnings
# --------------------------------------------------------------------------------------------

WARNINGS = ["The deformable stage was rejected: it made the alignment worse.",
            "The result is the affine stage: check it before relying on it."]


def test_warnings_are_loud_written_and_exit_3(data: Data, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's guard kept an earlier stage (simulated here on a real result): every output is
    written, each warning goes to stderr, the summary does not claim success, exit status 3."""
    real_register = registration.register

    def register_with_warnings(*args: object, **kwargs: object) -> registration.RegistrationResult:
        result = real_register(*args, **kwargs)
        result.warnings.extend(WARNINGS)
        result.kept_stage = "affine"
        return result

    monkeypatch.setattr(registration, "register", register_with_warnings)
    out = tmp_path / "result"
    capsys.readouterr()
    code = cli.main(register_argv(data.fixed, data.moving, out))
    captured = capsys.readouterr()
    assert code == 3, captured.err
    assert [line for line in captured.err.splitlines() if line.startswith("deepregister: WARNING: ")] == \
        [f"deepregister: WARNING: {warning}" for warning in WARNINGS]
    assert "Registered" not in captured.out
    assert captured.out.startswith("Registration finished with warnings and kept the affine stage")
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["succeeded"] is False and report["warnings"] == WARNINGS and report["kept_stage"] == "affine"
    written_files(out, report)
    assert leftovers(out) == []
    # report.png's header carries the warning in red.
    import matplotlib.image

    header = matplotlib.image.imread(str(out / "report.png"))[:80, :, :3]
    red = (header[..., 0] > 0.6) & (header[..., 1] < 0.4) & (header[..., 2] < 0.4)
    assert red.sum() > 200


def test_a_plain_success_has_no_red_warning(registered: tuple[Path, dict, str]) -> None:
    import matplotlib.image

    out, report, _ = registered
    header = matplotlib.image.imread(str(out / "report.png"))[:80, :, :3]
    red = (header[..., 0] > 0.6) & (header[..., 1] < 0.4) & (header[..., 2] < 0.4)
    assert report["succeeded"] and red.sum() == 0


# --------------------------------------------------------------------------------------------
# 14. Start-up: light imports, OpenMP wait policy
# --------------------------------------------------------------------------------------------

_PROBE = """
import sys
from DeepRegisterLib import cli
try:
    cli.main(sys.argv[1:])
except SystemExit:
    pass
heavy = ("torch", "matplotlib", "SimpleITK", "numpy", "DeepRegisterLib.tools.benchmark",
         "DeepRegisterLib.tools.sliceviews",
         "DeepRegisterLib.registration", "DeepRegisterLib.report")
print("HEAVY", ",".join(name for name in heavy if name in sys.modules))
"""


@pytest.mark.parametrize("argv", [["--help"], ["register", "--help"], ["demo", "--help"]],
                         ids=["help", "register-help", "demo-help"])
def test_help_imports_nothing_heavy(argv: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                          check=True)
    assert "usage: deepregister" in done.stdout
    assert done.stdout.splitlines()[-1] == "HEAVY ", done.stdout.splitlines()[-1]


def test_benchmark_help_still_lists_its_options() -> None:
    done = subprocess.run([sys.executable, "-m", "DeepRegisterLib.cli", "benchmark", "--help"], capture_output=True,
                          text=True, timeout=120, check=True)
    assert "--pairs" in done.stdout and "--methods" in done.stdout


_POLICY = """
import os, subprocess, sys, time
from DeepRegisterLib import cpuload
busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(int(sys.argv[1]))]
try:
    time.sleep(0.2)  # the spinning processes have started
    probe = cpuload.CpuProbe()
    time.sleep(0.4)  # as if reading the inputs
    print("POLICY", cpuload.choose_openmp_wait_policy(probe))
    print("ENV", os.environ.get("OMP_WAIT_POLICY"))
finally:
    for process in busy:
        process.kill()
"""


def _policy(busy: int, env: dict[str, str]) -> tuple[str, str]:
    import os

    environment = {key: value for key, value in os.environ.items() if key not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    environment.update(env)
    done = subprocess.run([sys.executable, "-c", _POLICY, str(busy)], capture_output=True, text=True,
                          env=environment, timeout=120, check=True)
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    return lines["POLICY"], lines["ENV"]


def test_openmp_threads_wait_passively_when_other_processes_keep_the_cpus_busy() -> None:
    """Decided before torch is imported: a process spinning on a core while the inputs are read
    means torch's threads would share cores with it."""
    policy, env = _policy(busy=1, env={})
    assert policy.startswith("PASSIVE (other processes used") and env == "PASSIVE", policy


def test_a_given_openmp_wait_policy_is_left_alone() -> None:
    policy, env = _policy(busy=1, env={"OMP_WAIT_POLICY": "ACTIVE"})
    assert policy == "ACTIVE (set before the command)" and env == "ACTIVE"


def test_report_says_which_openmp_wait_policy_ran(registered: tuple[Path, dict, str]) -> None:
    _, report, _ = registered
    assert report["openmp_wait_policy"].endswith("(torch was loaded before this command)")  # in-process run


def test_console_run_flushes_everything_before_it_ends(data: Data, tmp_path: Path) -> None:
    """As the console script (no argv given to main), the process ends itself once torch was
    loaded: its stdout, stderr, exit status and files must be complete all the same."""
    out = tmp_path / "result"
    done = subprocess.run([sys.executable, "-m", "DeepRegisterLib.cli",
                           *register_argv(data.fixed, data.moving, out, "--fixed-landmarks", str(data.fixed_landmarks),
                                          "--moving-landmarks", str(data.moving_landmarks))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("Registered with none (fine-tuning only)")
    assert f"Outputs in {out}: " in done.stdout.splitlines()[-1]
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    written_files(out, report)
    assert sitk.ReadTransform(str(out / "transform.h5")) is not None

    out = tmp_path / "refused"
    done = subprocess.run([sys.executable, "-m", "DeepRegisterLib.cli",
                           *register_argv(data.fixed, data.moving, out, "--fixed-mask", str(data.moving_gland))],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert done.stderr.startswith("deepregister: error: The fixed mask is not on the fixed image's grid")
    assert done.stdout == ""
    assert_nothing_written(out)
