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
    from DeepRegisterLib.tools.benchmark import read_pairs

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


# -- generalisation suite, masks, whole-process timing, busy cores (issue #20 items 6 and 7) ----
def _generalisation_script():
    import sys

    folder = str(REPO / "Testing" / "Performance")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    import make_generalisation_pairs

    return make_generalisation_pairs


def _head_volumes(script, size: int = 64, spacing: float = 2.0):
    """A brain-like stand-in for the MNI152 volumes (tests must not download): ellipsoidal white
    matter inside a folded grey-matter shell inside a head, T1-like intensities in [0, 1]."""
    z, y, x = (np.indices((size,) * 3) - (size - 1) / 2) * spacing
    radius = np.sqrt((x / 55) ** 2 + (y / 60) ** 2 + (z / 50) ** 2)
    folds = 0.06 * np.sin(x / 4.0) * np.sin(y / 5.0) * np.sin(z / 4.5)
    wm = np.clip((0.62 + folds - radius) / 0.05 + 0.5, 0, 1)
    gm = np.clip((1.0 - radius) / 0.05 + 0.5, 0, 1) - wm
    head = np.clip((1.15 - radius) / 0.05 + 0.5, 0, 1)
    t1 = 0.15 * head + 0.35 * gm + 0.45 * wm + 0.04 * np.sin(x / 3.0 + y / 7.0)
    images = []
    for array in (t1, gm, wm):
        image = sitk.GetImageFromArray(np.clip(array, 0, 1).astype(np.float32))
        image.SetSpacing((spacing,) * 3)
        image.SetOrigin((-(size - 1) * spacing / 2,) * 3)
        images.append(image)
    return script.Volumes(*images)


@pytest.fixture(scope="module")
def generated_pairs() -> dict:
    """One dev pair of every family (two for us-fan and aniso: both fan sides and both spacings),
    40^3 at 2 mm on the stand-in head."""
    script = _generalisation_script()
    volumes = _head_volumes(script)
    pairs = {}
    for family in script.FAMILIES:
        for index in ((0, 1) if family in ("us-fan", "aniso") else (0,)):
            pairs[(family, index)] = script.make_pair(volumes, family, "dev", index, size=40, spacing=2.0)
    return {"script": script, "volumes": volumes, "pairs": pairs}


def _field_magnitudes(pair) -> np.ndarray:
    field = sitk.TransformToDisplacementField(pair.transform, sitk.sitkVectorFloat64, pair.fixed.GetSize(),
                                              pair.fixed.GetOrigin(), pair.fixed.GetSpacing(), pair.fixed.GetDirection())
    return np.linalg.norm(sitk.GetArrayFromImage(field), axis=-1)


def test_generalisation_families_have_their_declared_displacements(generated_pairs: dict) -> None:
    script = generated_pairs["script"]
    for (family, index), pair in generated_pairs["pairs"].items():
        spec, truth = script.FAMILIES[family], pair.truth
        assert pair.split == "dev" and pair.seed == script.seed_of(spec, "dev", index)
        assert pair.modality == spec.modality and truth["field"] == spec.field
        low, high = spec.length_scale_mm
        assert all(low <= s <= high for s in truth["length_scale_mm"]), (family, truth["length_scale_mm"])
        magnitudes = _field_magnitudes(pair)
        assert magnitudes.max() <= script.MAX_MM + 1e-3, (family, magnitudes.max())
        assert truth["max_mm"] == pytest.approx(magnitudes.max(), abs=1e-3)
        assert truth["min_jacobian"] > script.MIN_JACOBIAN
        assert len(pair.fixed_points) == len(pair.moving_points) == 20
        # landmarks: the moving points are the fixed points' images under the true transform
        mapped = np.array([pair.transform.TransformPoint(tuple(p)) for p in pair.fixed_points])
        np.testing.assert_allclose(mapped, pair.moving_points, atol=1e-6)
        distances = np.linalg.norm(pair.moving_points - pair.fixed_points, axis=1)
        assert 2.0 <= np.median(distances) <= 8.0, (family, np.median(distances))
        # the true transform scores perfectly on the labels, partial fields of view included
        from DeepRegisterLib.metrics import dice_per_label

        dice = dice_per_label(pair.fixed_labels, pair.moving_labels, pair.transform)
        assert set(dice) == {"label 1", "label 2"} and min(dice.values()) > 0.97, (family, dice)
    # scale families differ by their length scales, as declared
    small, large = (generated_pairs["pairs"][(f, 0)].truth["length_scale_mm"] for f in ("scale-small", "scale-large"))
    assert max(small) <= 16 < 24 <= min(large)


def test_generalisation_masks_anisotropy_and_overlap(generated_pairs: dict) -> None:
    pairs, script = generated_pairs["pairs"], generated_pairs["script"]
    for index, side in ((0, "fixed"), (1, "moving")):
        pair = pairs[("us-fan", index)]
        mask = pair.fixed_mask if side == "fixed" else pair.moving_mask
        image = pair.fixed if side == "fixed" else pair.moving
        assert (pair.moving_mask if side == "fixed" else pair.fixed_mask) is None
        inside = sitk.GetArrayFromImage(mask) > 0
        empty = 1 - inside.mean()
        assert 0.5 <= empty <= 0.7 and empty == pytest.approx(pair.truth["empty_fraction"], abs=1e-9)
        assert pair.truth["fan_side"] == side and mask.GetSize() == image.GetSize()
        assert mask.GetOrigin() == image.GetOrigin() and mask.GetSpacing() == image.GetSpacing()
        values = sitk.GetArrayFromImage(image)
        assert np.all(values[~inside] == 0) and np.count_nonzero(values[inside]) > 0.9 * inside.sum()
    for index, relative in enumerate(script.ANISO_SPACINGS):
        pair = pairs[("aniso", index)]
        assert pair.fixed.GetSpacing() == pytest.approx([2.0 * s for s in relative])
        assert pair.moving.GetSpacing() == pytest.approx((2.0, 2.0, 2.0))
        assert pair.fixed.GetSize()[2] == round(80 / (2.0 * relative[2]))
    pair = pairs[("overlap", 0)]
    fixed_extent = np.array(pair.fixed.GetSize()) * pair.fixed.GetSpacing()
    moving_extent = np.array(pair.moving.GetSize()) * pair.moving.GetSpacing()
    assert sorted(moving_extent / fixed_extent)[1:] == [1.0, 1.0]
    assert 0.45 <= min(moving_extent / fixed_extent) <= 0.75
    assert 0.5 <= pair.truth["overlap_fraction"] <= 0.7
    # fixed seeds: the same pair again is the same, voxel for voxel
    again = script.make_pair(generated_pairs["volumes"], "us-fan", "dev", 1, size=40, spacing=2.0)
    for a, b in ((again.moving, pairs[("us-fan", 1)].moving), (again.moving_mask, pairs[("us-fan", 1)].moving_mask)):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))


def test_pairs_csv_round_trips_families_splits_and_masks(generated_pairs: dict, tmp_path: Path) -> None:
    from DeepRegisterLib.tools.benchmark import read_pairs, select_pairs

    script = generated_pairs["script"]
    path = script.generate(generated_pairs["volumes"], tmp_path / "pairs", ["us-fan", "bias"], dev=2, test=1,
                           size=32, spacing=2.0, log=lambda *_: None)
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0])[:9] == script.FIELDS and {"family", "split", "fixed_mask", "moving_mask"} <= set(rows[0])
    pairs = read_pairs(path)
    assert [(p.family, p.split) for p in pairs] == [("us-fan", "dev")] * 2 + [("us-fan", "test"), ("bias", "dev"),
                                                                              ("bias", "dev"), ("bias", "test")]
    fan = [p for p in pairs if p.family == "us-fan"]
    assert [p.fixed_mask is not None for p in fan] == [True, False, True]
    assert [p.moving_mask is not None for p in fan] == [False, True, False]
    assert all(p.fixed_mask is None or p.fixed_mask.is_absolute() and p.fixed_mask.exists() for p in pairs)
    assert all(p.fixed_mask is None and p.moving_mask is None for p in pairs if p.family == "bias")
    assert [p.name for p in select_pairs(pairs, "test", None)] == [p.name for p in pairs if p.split == "test"]
    assert len(select_pairs(pairs, "dev", ["bias"])) == 2
    assert len({p.name for p in pairs}) == 6 and fan[0].name == "us-fan-dev-10700"
    # an old CSV without the new columns still reads: family = kind, no split, no masks
    (tmp_path / "old.csv").write_text(f"name,kind,modality,fixed,moving\na,brain,mono,{fan[0].fixed},{fan[0].moving}\n")
    [old] = read_pairs(tmp_path / "old.csv")
    assert (old.family, old.split, old.fixed_mask, old.moving_mask) == ("brain", "", None, None)
    (tmp_path / "bad.csv").write_text(f"name,kind,modality,fixed,moving,split\na,b,mono,{fan[0].fixed},{fan[0].moving},x\n")
    with pytest.raises(ValueError, match="split"):
        read_pairs(tmp_path / "bad.csv")


def _ball_and_ring(folder: Path) -> tuple[list[str], np.ndarray]:
    """A 40^3 pair (2 mm) whose ball moves +4 mm in x and whose surrounding ring moves -6 mm: no
    affine transform explains both, so an affine registration follows whichever the masks keep."""
    n, spacing = 40, 2.0
    z, y, x = (np.indices((n,) * 3) - (n - 1) / 2) * spacing

    def image(array: np.ndarray, pixel=sitk.sitkFloat32) -> sitk.Image:
        result = sitk.GetImageFromArray(array.astype(np.float32))
        result.SetSpacing((spacing,) * 3)
        result.SetOrigin((-(n - 1) * spacing / 2,) * 3)
        return sitk.Cast(result, pixel)

    def scene(ball: float, ring: float) -> sitk.Image:
        r_ball, r_ring = np.sqrt((x - ball) ** 2 + y ** 2 + z ** 2), np.sqrt((x - ring) ** 2 + y ** 2 + z ** 2)
        return sitk.SmoothingRecursiveGaussian(image(200.0 * (r_ball < 8) + 120.0 * ((r_ring > 16) & (r_ring < 22))), 1.5)

    files = [str(folder / name) for name in ("fixed.nii.gz", "moving.nii.gz", "fixed_mask.nii.gz", "moving_mask.nii.gz")]
    sitk.WriteImage(scene(0, 0), files[0])
    sitk.WriteImage(scene(4, -6), files[1])
    sitk.WriteImage(image(np.sqrt(x ** 2 + y ** 2 + z ** 2) < 12, sitk.sitkUInt8), files[2])  # the fixed ball
    ring = np.sqrt((x + 6) ** 2 + y ** 2 + z ** 2)
    sitk.WriteImage(image((ring < 13) | (ring > 25), sitk.sitkUInt8), files[3])  # all but the moving ring
    return files, np.array([[0.0, 0, 0], [4, 0, 0], [0, 4, 0], [0, 0, 4], [-4, 0, 0]])


def test_elastix_registers_inside_the_masks_it_is_given(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Through the worker's command line (TOOL OPTIONS FIXED MOVING MODALITY OUT THREADS FIXED_MASK
    MOVING_MASK): without masks elastix's affine stage follows the larger ring (~10 mm off at the
    ball); a fixed mask on the ball, or a moving mask without the ring, brings the ball within 3 mm."""
    import json

    from DeepRegisterLib.tools.benchmark import read_transform, worker

    (fixed, moving, fixed_mask, moving_mask), points = _ball_and_ring(tmp_path)
    options = json.dumps({"affine_iterations": 64, "bspline_iterations": 0})
    errors = {}
    for name, masks in (("none", ["", ""]), ("fixed", [fixed_mask, ""]), ("moving", ["", moving_mask])):
        out = tmp_path / name
        out.mkdir()
        assert worker(["elastix", options, fixed, moving, "mono", str(out), "1", *masks]) == 0
        report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        errors[name] = np.median(tre(points, points + [4.0, 0, 0], read_transform(Path(report["transform"]))))
    assert errors["none"] > 7.0, errors
    assert errors["fixed"] < 3.0 and errors["moving"] < 3.5, errors


def test_masks_reach_every_method_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_one hands the pair's masks to the worker; --timing process puts them on each tool's
    command line (DeepRegister's CLI as --fixed-mask / --moving-mask)."""
    import json
    import subprocess

    from DeepRegisterLib.tools import benchmark

    (fixed, moving, fixed_mask, _), _ = _ball_and_ring(tmp_path)
    pair = benchmark.BenchmarkPair("p", "k", "mono", Path(fixed), Path(moving), None, None, None, None,
                                   fixed_mask=Path(fixed_mask))
    identity = tmp_path / "identity.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3), str(identity))
    commands = []

    def fake_run(command, **kwargs):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0, json.dumps({"seconds": 1.0, "peak_rss_mb": 100.0,
                                                                   "transform": str(identity)}) + "\n", "")

    monkeypatch.setattr(benchmark.subprocess, "run", fake_run)
    method = benchmark.Method("elastix", "elastix", {"affine_iterations": 1, "bspline_iterations": 0})
    row = benchmark.run_one(pair, method, 1, 60)
    assert row["status"] == "ok" and commands[0][-2:] == [fixed_mask, ""]
    deepregister = benchmark.Method("deepregister/x", "deepregister", {"model": None, "iterations": 3})
    command = benchmark.process_command(pair, deepregister, tmp_path, 1)
    assert command[1:4] == ["-m", "DeepRegisterLib.cli", "register"]
    assert command[command.index("--fixed-mask") + 1] == fixed_mask and "--moving-mask" not in command
    assert command[command.index("--iterations") + 1] == "3" and command[command.index("--model") + 1] == "none"
    assert "--initial" not in command
    physical = benchmark.expand_methods(["deepregister"], ["generic"], quick=True, initial="physical")
    assert [m.name for m in physical] == ["deepregister/generic (physical)", "deepregister/generic+ft (physical)"]
    assert all(m.options["initial"] == "physical" for m in physical)
    started = benchmark.process_command(pair, physical[1], tmp_path, 1)
    assert started[started.index("--initial") + 1] == "physical"
    # a DeepRegister process that wrote its outputs with the guard's warnings (exit 3) is a result, not a failure
    (tmp_path / "result").mkdir()
    (tmp_path / "result" / "report.json").write_text(json.dumps({"peak_memory_mb": 50.0}))
    monkeypatch.setattr(benchmark.subprocess, "run",
                        lambda command, **kwargs: subprocess.CompletedProcess(command, 3, "", "WARNING: kept start"))
    assert benchmark.run_process(pair, deepregister, tmp_path, 1, 60)["status"] == "ok"
    assert benchmark.run_process(pair, method, tmp_path, 1, 60)["status"] == "failed"  # elastix: 3 is an error
    elastix = benchmark.process_command(pair, method, tmp_path, 1)
    assert elastix[1] == "-c" and "elastix_registration_method" in elastix[2] and elastix[-2:] == [fixed_mask, ""]
    compile(elastix[2], "elastix-process", "exec")
    ants = benchmark.process_command(pair, benchmark.Method("ants/SyN", "ants", {"type_of_transform": "SyN",
                                                                                  "quick": True}), tmp_path, 1)
    assert ants[-2:] == [fixed_mask, ""] and (tmp_path / "centres.mat").exists()
    compile(ants[2], "ants-process", "exec")


def test_busy_cores_starts_and_stops_its_processes() -> None:
    import os
    import time

    from DeepRegisterLib.tools.benchmark import BusyCores

    with BusyCores(2, seconds=60) as busy:
        pids = busy.pids()
        assert len(pids) == 2 and busy.process.pid in pids
        time.sleep(0.6)
        assert busy.cpu_seconds() > 0.1  # they do burn CPU (two cores shared with others: a low bar)
    assert busy.process.poll() is not None and busy.pids() == []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in pids):
        time.sleep(0.05)  # the forked one is reaped by init
    assert not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    with BusyCores(0) as idle:
        assert idle.process is None and idle.pids() == [] and idle.cpu_seconds() == 0.0


def test_report_has_per_family_split_tables() -> None:
    from DeepRegisterLib.tools.benchmark_report import split_tables

    rows = []
    for split in ("dev", "test"):
        for family, index in (("us-fan", 0), ("us-fan", 1), ("bias", 0)):
            pair = f"{family}-{split}-{index}"
            for method, seconds, tre_mm in (("centres aligned", 0.0, 4.0), ("elastix", 30.0, 1.0),
                                            ("deepregister/generic+ft", 2.0 + index, 0.5 + index)):
                rows.append({"pair": pair, "kind": family, "family": family, "split": split, "method": method,
                             "status": "ok", "seconds": seconds, "tre_median_mm": tre_mm, "dice_mean": 0.9,
                             "folding_percent": 0.0, "voxels": 1000})
    rows.append({"pair": "old", "kind": "brain", "method": "elastix", "status": "ok", "seconds": 1.0,
                 "folding_percent": 0.0, "voxels": 1})  # no split: not in these tables
    lines = split_tables(rows)
    assert any("tuned on none of these families (us-fan, bias)" in line for line in lines)
    headings = [line for line in lines if line.startswith("### ")]
    assert headings == ["### test split", "### dev split"]
    table = [line for line in lines if line.startswith("| us-fan | deepregister")]
    assert len(table) == 2
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[2:] == ["2", "1.00", "0.900", "0.000", "2.50", "12.0"]  # medians over the 2 pairs; 30 / 2.5
    assert not any(line.startswith("| brain") for line in lines)
    tuned = split_tables(rows, tuned_on=["bias"])
    assert any(line.startswith("| bias * | elastix") for line in tuned)
    assert any("tuned on the dev pairs of: bias" in line for line in tuned)
    assert split_tables([r for r in rows if not r.get("split")]) == []
