"""Smoke run of `deepregister benchmark` with DeepRegister, elastix and ANTs on tiny pairs.

One held-out mrus_sim pair and one 48^3 synthetic pair (phantom anatomy through a known smooth
field), a few iterations per method: every cell of the table is filled, every transform written
by a worker process reads back in SimpleITK, and the reference row equals an independent
computation. Needs the ``bench`` extra (itk-elastix, antspyx).
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.cli import main
from DeepRegisterLib.landmarks import read_landmarks, tre
from DeepRegisterLib.models import load_model
from DeepRegisterLib.spatial import Grid
from DeepRegisterLib.synthetic import make_phantom_pair

pytest.importorskip("itk")
pytest.importorskip("ants")

REPO = Path(__file__).resolve().parents[1]
MRUS = REPO.parent / "shared" / "data" / "mrus_sim"


def _pairs_script():
    spec = importlib.util.spec_from_file_location("make_benchmark_pairs",
                                                  REPO / "Testing" / "Performance" / "make_benchmark_pairs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("bench")
    script = _pairs_script()
    phantom = make_phantom_pair(3, (48, 48, 48), spacing=2.0, ultrasound=False)
    volume = phantom.moving / 255.0
    rows = script.mrus_rows(MRUS, folder / "pairs", 1) if MRUS.is_dir() else []
    rows += script.synthetic_rows(volume, phantom.moving_gland, folder / "pairs", [("tiny-us", 48, 2.0, True, 11)])
    pairs = script.write_pairs_csv(rows, folder / "pairs")
    out = folder / "out"
    assert main(["benchmark", "--pairs", str(pairs), "--methods", "deepregister,elastix,ants", "--quick",
                 "--out", str(out), "--timeout", "600"]) == 0
    return pairs, out


def test_every_cell_is_filled(benchmark_run: tuple[Path, Path]) -> None:
    pairs, out = benchmark_run
    with (out / "measurements.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    methods = {row["method"] for row in rows}
    assert {"centres aligned", "elastix", "ants/SyN", "ants/SyNRA"} <= methods
    assert any(m.startswith("deepregister/") for m in methods)
    with pairs.open(newline="") as handle:
        names = [row["name"] for row in csv.DictReader(handle)]
    assert len(rows) == len(names) * len(methods)
    for row in rows:
        assert row["status"] == "ok", row
        for column in ("seconds", "tre_median_mm", "tre_p90_mm", "dice_mean", "folding_percent"):
            assert np.isfinite(float(row[column])), (row["method"], column)
        if row["method"] != "centres aligned":
            assert float(row["seconds"]) > 0 and float(row["peak_rss_mb"]) > 50
    table = [line for line in (out / "report.md").read_text().splitlines() if line.startswith("| ")][1:]
    assert len(table) == len({(row["kind"], row["method"]) for row in rows})
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")]
        numeric = cells[3:9] + cells[10:] if "centres aligned" not in line else cells[3:7]
        assert "-" not in numeric, line
    for name in ("tre.png", "seconds.png", "scaling.png"):
        assert (out / name).stat().st_size > 10_000


def test_reference_row_matches_an_independent_computation(benchmark_run: tuple[Path, Path]) -> None:
    pairs, out = benchmark_run
    with pairs.open(newline="") as handle:
        pair = [row for row in csv.DictReader(handle) if row["kind"] == "tiny-us"][0]
    fixed = sitk.ReadImage(str(pairs.parent / pair["fixed"]))
    moving = sitk.ReadImage(str(pairs.parent / pair["moving"]))
    shift = Grid.from_image(moving).center - Grid.from_image(fixed).center
    expected = np.median(tre(read_landmarks(pairs.parent / pair["fixed_landmarks"]).points,
                             read_landmarks(pairs.parent / pair["moving_landmarks"]).points,
                             sitk.TranslationTransform(3, shift.tolist())))
    with (out / "measurements.csv").open(newline="") as handle:
        rows = [r for r in csv.DictReader(handle) if r["pair"] == pair["name"]]
    reference = [r for r in rows if r["method"] == "centres aligned"][0]
    assert float(reference["tre_median_mm"]) == pytest.approx(expected, abs=1e-3)
    # The classical methods' fields, written by their own processes and read back here, register
    # (a field read in the wrong direction or on the wrong grid would end far above the start, near
    # twice the deformation). SyN with mutual information is weak on ultrasound-like pairs and its
    # threaded metric is not deterministic (3.9 -> 2.8-3.85 mm between runs here with its quick
    # settings; see ../shared/notes/baselines.md), so it only has to end below the start.
    for method, bound in (("elastix", 0.8), ("ants/SyN", 1.0)):
        row = [r for r in rows if r["method"] == method][0]
        assert float(row["tre_median_mm"]) < bound * expected, (method, row["tre_median_mm"], expected)


def test_bad_pairs_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "pairs.csv"
    path.write_text("name,fixed\nx,a.nii.gz\n")
    assert main(["benchmark", "--pairs", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "needs a header" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    path.write_text("name,kind,modality,fixed,moving\nx,k,multi,missing.nii.gz,missing.nii.gz\n")
    assert main(["benchmark", "--pairs", str(path), "--methods", "elastix,foo"]) == 2
    assert "do not exist" in capsys.readouterr().err


def test_relative_pairs_csv_gives_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers run in their own temporary folder, so pair files must not stay relative to the caller's."""
    from DeepRegisterLib.benchmark import read_pairs

    (tmp_path / "pairs" / "a").mkdir(parents=True)
    for name in ("fixed.nii.gz", "moving.nii.gz"):
        (tmp_path / "pairs" / "a" / name).write_bytes(b"")
    (tmp_path / "pairs" / "pairs.csv").write_text("name,kind,modality,fixed,moving\na,k,mono,a/fixed.nii.gz,a/moving.nii.gz\n")
    monkeypatch.chdir(tmp_path)
    [pair] = read_pairs("pairs/pairs.csv")
    assert pair.fixed.is_absolute() and pair.fixed == tmp_path / "pairs" / "a" / "fixed.nii.gz"
    assert pair.moving.is_absolute() and pair.fixed_landmarks is None


def test_network_measurement_reports_every_variant_against_fp32() -> None:
    """measure_network.py (the GPU figures' script) on the CPU with a small pair: every variant has a
    latency, a throughput per batch size and its difference from fp32; fp32 differs from itself by 0."""
    spec = importlib.util.spec_from_file_location("measure_network",
                                                  REPO / "Testing" / "Performance" / "measure_network.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--device", "cpu", "--models", "mrus", "--batches", "1,2", "--repeats", "2",
                          "--variants", "fp32,channels_last", "--size", "64"])
    result = report["models"]["mrus"]
    assert result["grid_voxels"] == [24, 32, 22]
    for name, row in result["variants"].items():
        assert row["latency_ms"] > 0 and set(row["pairs_per_second"]) == {"1", "2"}
        assert all(value > 0 for value in row["pairs_per_second"].values())
        assert row["max_difference_from_fp32_mm"] < (1e-6 if name == "fp32" else 1e-3)
    default = str(load_model("mrus")[0].finetune_iterations)
    assert set(result["register_seconds"]) == {"0", default} and result["register_seconds"][default]["finetune"] > 0
