"""The ``deepregister`` command line, run in-process through ``cli.main``.

Bad input must end with exit status 2, a one-line reason on stderr and nothing written: no
``--out`` folder (or an existing one left byte-identical) and no temporary folder left beside
it. Good input must give complete, mutually consistent outputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib import cli, registration
from DeepRegisterLib.imageio import check_volume
from DeepRegisterLib.landmarks import Landmarks, write_csv, write_fcsv, write_mrk_json
from DeepRegisterLib.models import CARD_FILE, DEFAULT_MODEL, WEIGHTS_FILE, ModelCard, default_model, save_model
from DeepRegisterLib.nets import GlobalNet, GlobalToLocal
from DeepRegisterLib.synthetic import PhantomPair, make_phantom_pair

OUTPUT_FILES = {"transform.h5", "warped.nii.gz", "saliency.nii.gz", "report.json", "report.png"}
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
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), "--device", "cpu",
            "--iterations", "4", *extra]


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


def test_non_overlapping_volumes_without_centre_alignment_are_refused(
        data: Data, far_moving: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    refused(capsys, register_argv(data.fixed, far_moving, out, "--no-center-align"), out,
            ["do not overlap", "origins"])


def test_non_overlapping_volumes_are_registered_after_centre_alignment(
        data: Data, far_moving: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "result"
    assert cli.main(register_argv(data.fixed, far_moving, out)) == 0, capsys.readouterr().err
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
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
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES  # old content gone, new content complete
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
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
    argv = register_argv(data.fixed, data.moving, out, "--model", str(models["valid"]))
    argv[argv.index("--iterations") + 1] = "2"
    code = cli.main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert f"Registered with {MODEL_NAME}" in captured.out
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    assert report["model"] == MODEL_NAME
    assert report["iterations"] == 2
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
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert all((out / name).stat().st_size > 0 for name in OUTPUT_FILES)
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert leftovers(out) == []
    assert report["model"] == "none (fine-tuning only)" and report["iterations"] == 4
    assert report["device"] == "cpu"
    assert report["transform_direction"].startswith("fixed -> moving")
    assert report["seconds"]["total"] > 0 and 0.0 <= report["folding_percent"] <= 100.0
    assert "Landmark TRE" in stdout and str(out) in stdout


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


def test_default_model_is_mrus_when_installed_else_the_first() -> None:
    generic, mrus = tiny_card("GlobalNet", {}, "generic"), tiny_card("GlobalNet", {}, DEFAULT_MODEL)
    assert DEFAULT_MODEL == "mrus"
    assert default_model([generic, mrus]) == "mrus"
    assert default_model([generic]) == "generic"
    assert default_model([]) == ""


def test_models_marks_the_shipped_default(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DEEPREGISTER_MODEL_PATH", raising=False)
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines if line.endswith("(default)")] == ["mrus"], lines


def test_models_without_installed_models_prints_a_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path))
    capsys.readouterr()
    assert cli.main(["models"]) == 0
    assert capsys.readouterr().out.strip() != ""


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
