"""Landmark files (Slicer .fcsv / .mrk.json, our .csv), pairing and TRE, all in LPS mm."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.landmarks import (
    MARKUPS_SCHEMA,
    LandmarkError,
    Landmarks,
    check_pairs,
    read_landmarks,
    transform_points,
    tre,
    tre_summary,
    write_csv,
    write_fcsv,
    write_mrk_json,
)

RAS_POINTS = np.array([[10.5, -20.25, 30.0], [-1.0, 2.0, -3.0]])
LPS_POINTS = RAS_POINTS * [-1.0, -1.0, 1.0]
FCSV_COLUMNS = "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n"
FCSV_ROWS = (
    "1,10.5,-20.25,30,0,0,0,1,1,1,0,F-1,,vtkMRMLScalarVolumeNode1\n"
    "2,-1,2,-3,0,0,0,1,1,1,0,F-2,,vtkMRMLScalarVolumeNode1\n"
)


def write(tmp_path, name: str, text: str):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def landmarks() -> Landmarks:
    rng = np.random.default_rng(3)
    points = rng.uniform(-150.0, 150.0, size=(4, 3)) + rng.normal(0.0, 1e-7, size=(4, 3))
    return Landmarks(points, ["apex", "base, left", 'urethra "verumontanum"', "seminal vesicle"])


@pytest.mark.parametrize(
    ("writer", "name"),
    [(write_fcsv, "points.fcsv"), (write_mrk_json, "points.mrk.json"), (write_csv, "points.csv")],
)
def test_round_trip(tmp_path, landmarks, writer, name):
    writer(tmp_path / name, landmarks)
    read = read_landmarks(tmp_path / name)
    np.testing.assert_allclose(read.points, landmarks.points, rtol=0.0, atol=1e-6)
    assert read.points.dtype == np.float64 and read.points.shape == (4, 3)
    assert read.labels == landmarks.labels


def test_written_files_follow_slicer_formats(tmp_path, landmarks):
    write_fcsv(tmp_path / "p.fcsv", landmarks)
    lines = (tmp_path / "p.fcsv").read_text().splitlines()
    assert lines[:3] == [
        "# Markups fiducial file version = 4.11",
        "# CoordinateSystem = LPS",
        FCSV_COLUMNS.strip(),
    ]
    assert lines[4].split(",")[11] == '"base'  # quoted CSV field, as Slicer writes it

    write_mrk_json(tmp_path / "p.mrk.json", landmarks)
    document = json.loads((tmp_path / "p.mrk.json").read_text())
    assert document["@schema"] == MARKUPS_SCHEMA
    markup = document["markups"][0]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    point = markup["controlPoints"][0]
    assert point["positionStatus"] == "defined" and len(point["orientation"]) == 9
    assert {"id", "label", "position", "selected", "locked", "visibility"} <= set(point)


def test_slicer5_ras_fcsv_is_flipped_to_lps(tmp_path):
    text = "# Markups fiducial file version = 5.6\n# CoordinateSystem = RAS\n" + FCSV_COLUMNS + FCSV_ROWS
    read = read_landmarks(write(tmp_path, "ras.fcsv", text))
    np.testing.assert_allclose(read.points, LPS_POINTS)
    assert read.labels == ["F-1", "F-2"]


@pytest.mark.parametrize(("header", "expected"), [("0", LPS_POINTS), ("1", RAS_POINTS), ("LPS", RAS_POINTS)])
def test_fcsv_coordinate_system_header(tmp_path, header, expected):
    text = f"# Markups fiducial file version = 4.6\n# CoordinateSystem = {header}\n" + FCSV_COLUMNS + FCSV_ROWS
    np.testing.assert_allclose(read_landmarks(write(tmp_path, "old.fcsv", text)).points, expected)


def test_fcsv_without_coordinate_system_is_ras(tmp_path):
    text = "# Markups fiducial file version = 4.3\n" + FCSV_COLUMNS + FCSV_ROWS
    np.testing.assert_allclose(read_landmarks(write(tmp_path, "p.fcsv", text)).points, LPS_POINTS)


def test_fcsv_columns_are_found_by_name(tmp_path):
    text = "# CoordinateSystem = LPS\n# columns = label,x,y,z,sel,vis\nA,1,2,3,1,1\n,4,5,6,1,1\n"
    read = read_landmarks(write(tmp_path, "slicer3.fcsv", text))
    np.testing.assert_allclose(read.points, [[1, 2, 3], [4, 5, 6]])
    assert read.labels == ["A", "2"]  # an empty label becomes the point number


def markups_json(control_points: list, **markup) -> str:
    markups = [{"type": "Fiducial", **markup, "controlPoints": control_points}]
    return json.dumps({"@schema": MARKUPS_SCHEMA, "markups": markups})


def test_mrk_json_in_ras(tmp_path):
    points = [{"label": f"F-{i + 1}", "position": list(p)} for i, p in enumerate(RAS_POINTS)]
    read = read_landmarks(write(tmp_path, "ras.mrk.json", markups_json(points, coordinateSystem="RAS")))
    np.testing.assert_allclose(read.points, LPS_POINTS)
    assert read.labels == ["F-1", "F-2"]


def test_mrk_json_defaults_to_lps_and_converts_micrometres(tmp_path):
    points = [{"label": "a", "position": [1000.0, -2000.0, 500.0]}]
    read = read_landmarks(write(tmp_path, "p.mrk.json", markups_json(points, coordinateUnits="um")))
    np.testing.assert_allclose(read.points, [[1.0, -2.0, 0.5]])


def test_csv_in_ras_with_any_column_order(tmp_path):
    text = "S, A ,R,Label\n30,-20.25,10.5,apex\n-3,2,-1,base\n\n"
    read = read_landmarks(write(tmp_path, "ras.csv", text))
    np.testing.assert_allclose(read.points, LPS_POINTS)
    assert read.labels == ["apex", "base"]


@pytest.mark.parametrize(
    ("name", "text", "phrases"),
    [
        ("p.txt", "1,2,3\n", [".txt", "unsupported extension", ".fcsv", ".mrk.json", "label,x,y,z"]),
        ("p.fcsv", "# CoordinateSystem = LPS\n" + FCSV_COLUMNS, ["contains no points", "p.fcsv"]),
        (
            "p.fcsv",
            "# CoordinateSystem = LPS\n" + FCSV_COLUMNS + "1,1,abc,3\n",
            ["line 3", "coordinate y", "'abc'", "not a"],
        ),
        ("p.fcsv", "# CoordinateSystem = IJK\n" + FCSV_ROWS, ["'IJK'", "RAS or LPS"]),
        ("p.fcsv", "# CoordinateSystem = LPS\n" + FCSV_COLUMNS + "1,1,2\n", ["line 3", "too few"]),
        ("p.csv", "label,x,y,z\na,1,nan,3\n", ["line 2", "coordinate y", "'nan'", "finite"]),
        ("p.csv", "name,u,v,w\na,1,2,3\n", ["no x,y,z or r,a,s columns", "name,u,v,w"]),
        ("p.csv", "x,y,z,r,a,s\n1,2,3,4,5,6\n", ["both x,y,z and r,a,s"]),
        ("p.csv", "label,x,y,z\n", ["contains no points"]),
        ("p.mrk.json", '{"markups": [', ["not valid JSON", "line 1"]),
        ("p.mrk.json", '{"points": []}', ["no 'markups' list"]),
        (
            "p.mrk.json",
            markups_json([{"label": "F-1", "position": "", "positionStatus": "undefined"}]),
            ["control point 1 ('F-1')", "no position", "undefined"],
        ),
        ("p.mrk.json", markups_json([{"label": "F-1", "position": [1, 2]}]), ["3 numbers"]),
        (
            "p.mrk.json",
            markups_json([{"label": "F-1", "position": [1, 2, 3]}], coordinateUnits="cm"),
            ["'cm'", "mm and um"],
        ),
    ],
)
def test_bad_files_raise_clear_errors(tmp_path, name, text, phrases):
    with pytest.raises(LandmarkError) as error:
        read_landmarks(write(tmp_path, name, text))
    message = str(error.value)
    assert name in message
    for phrase in phrases:
        assert phrase in message


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(LandmarkError, match="was not found"):
        read_landmarks(tmp_path / "absent.fcsv")
    (tmp_path / "folder.csv").mkdir()
    with pytest.raises(LandmarkError, match="is a folder"):
        read_landmarks(tmp_path / "folder.csv")


def test_binary_file_is_rejected(tmp_path):
    (tmp_path / "image.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00")
    with pytest.raises(LandmarkError, match="not a text file"):
        read_landmarks(tmp_path / "image.csv")


def test_check_pairs():
    three = Landmarks(np.zeros((3, 3)), ["a", "b", "c"])
    two = Landmarks(np.zeros((2, 3)), ["a", "b"])
    none = Landmarks(np.zeros((0, 3)), [])
    check_pairs(three, three)
    with pytest.raises(LandmarkError, match=r"3 points but the moving landmarks have 2.*paired by order"):
        check_pairs(three, two)
    with pytest.raises(LandmarkError, match="no landmark pairs"):
        check_pairs(none, none)


def test_tre_with_translation_is_analytic():
    fixed = np.array([[0.0, 0.0, 0.0], [10.0, -5.0, 2.0], [-3.0, 7.0, 1.0]])
    offset = np.array([1.0, 2.0, 2.0])  # |offset| = 3 mm
    residual = np.array([[0.0, 0.0, 0.0], [3.0, 4.0, 0.0], [0.0, 0.0, -2.0]])
    moving = fixed + offset + residual
    transform = sitk.TranslationTransform(3, tuple(offset))
    np.testing.assert_allclose(transform_points(fixed, transform), fixed + offset)
    np.testing.assert_allclose(tre(fixed, moving, transform), [0.0, 5.0, 2.0], atol=1e-12)
    np.testing.assert_allclose(tre(fixed, moving), np.linalg.norm(offset + residual, axis=1))
    with pytest.raises(LandmarkError, match="paired by order"):
        tre(fixed, moving[:2])


def test_tre_summary_is_json_friendly():
    summary = tre_summary(np.array([1.0, 2.0, 3.0, 4.0]))
    expected = {"n": 4, "mean": 2.5, "std": np.sqrt(1.25), "median": 2.5, "p90": 3.7, "max": 4.0}
    assert summary == pytest.approx(expected)
    assert isinstance(summary["n"], int) and all(isinstance(v, float) for k, v in summary.items() if k != "n")
    assert json.loads(json.dumps(summary)) == summary
    with pytest.raises(LandmarkError, match="at least one"):
        tre_summary(np.array([]))
