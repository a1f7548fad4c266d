"""Landmark (fiducial point) files and target registration error (TRE).

Every point this module returns or accepts is in LPS millimetres, the physical space of
ITK and SimpleITK images: x grows towards the patient's Left, y towards Posterior, z
towards Superior.  3D Slicer displays RAS coordinates (Right, Anterior, Superior);
RAS -> LPS flips the sign of x and y.

Files are recognised by their extension:

* ``.fcsv``: 3D Slicer markups fiducial CSV.  The ``# CoordinateSystem`` header (``RAS``,
  ``LPS``, or ``0`` = RAS / ``1`` = LPS in old files) is honoured; a file without it is read
  as RAS, the only system old Slicer versions wrote.  Columns are found by name from the
  ``# columns`` header (Slicer's fixed layout ``id,x,y,z,...,label`` when it is absent).
* ``.mrk.json`` (or ``.json``): 3D Slicer markups JSON.  The control points of the first
  markup are read; ``coordinateSystem`` defaults to LPS and ``coordinateUnits`` to mm, as
  in Slicer's markups schema.
* ``.csv``: DeepRegister's plain format.  A header row, then one row per point.  Columns
  (case-insensitive, any order, others ignored): ``label`` (optional) and either
  ``x,y,z`` (LPS mm) or ``r,a,s`` (RAS mm)::

      label,x,y,z
      apex,12.5,-30.0,104.2
      base,10.1,-28.7,140.9

Fixed and moving landmarks are paired by order: the i-th fixed point corresponds to the
i-th moving point.  A point without a label is labelled with its number (1, 2, ...).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import SimpleITK as sitk

MARKUPS_SCHEMA = (
    "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/"
    "Resources/Schema/markups-schema-v1.0.3.json#"
)
_FCSV_COLUMNS = "id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID"
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
_SYSTEMS = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}
_UNITS_TO_MM = {"mm": 1.0, "um": 1e-3}
_HOW_TO_SAVE = (
    "Save the landmarks from 3D Slicer's Markups module (.fcsv or .mrk.json), or as a CSV "
    "file with a header row and columns label,x,y,z (LPS mm) or label,r,a,s (RAS mm)."
)

# typing.Union, not `str | os.PathLike[str]`: the alias is evaluated at import time and Slicer 5.8
# runs Python 3.9 (Testing/test_packaging.py).
PathLike = Union[str, os.PathLike[str]]
# A reader's result: points and labels as in the file, and the file's system, "RAS" or "LPS".
_Parsed = tuple[list[list[float]], list[str], str]


class LandmarkError(ValueError):
    """A landmark file or landmark pairing that cannot be used; the message says how to fix it."""


@dataclass
class Landmarks:
    """Points (N, 3) in LPS mm, float64, with one label per point."""

    points: np.ndarray
    labels: list[str]

    def __post_init__(self) -> None:
        self.points = np.asarray(self.points, dtype=np.float64)
        if self.points.ndim != 2 or self.points.shape[1] != 3:
            raise ValueError(f"points must have shape (N, 3), got {self.points.shape}")
        if len(self.labels) != len(self.points):
            raise ValueError(f"{len(self.points)} points but {len(self.labels)} labels")
        self.labels = [str(label) for label in self.labels]

    def __len__(self) -> int:
        return len(self.points)


def read_landmarks(path: PathLike) -> Landmarks:
    """Read a .fcsv, .mrk.json (.json) or .csv landmark file; points in LPS mm."""
    name = os.fspath(path)
    lower = name.lower()
    if lower.endswith(".fcsv"):
        reader = _read_fcsv
    elif lower.endswith(".json"):
        reader = _read_mrk_json
    elif lower.endswith(".csv"):
        reader = _read_csv
    else:
        extension = os.path.splitext(name)[1] or "(none)"
        raise LandmarkError(
            f"Landmark file '{name}' has an unsupported extension {extension}. {_HOW_TO_SAVE}"
        )
    points, labels, system = reader(name, _read_text(name))
    if not points:
        raise LandmarkError(
            f"Landmark file '{name}' contains no points. Place the landmarks (3D Slicer "
            "Markups module) and save them again, or add one row per point to the CSV file."
        )
    lps = np.array(points, dtype=np.float64) * (_RAS_TO_LPS if system == "RAS" else 1.0)
    return Landmarks(lps, [label or str(i) for i, label in enumerate(labels, start=1)])


def write_fcsv(path: PathLike, landmarks: Landmarks) -> None:
    """Write a 3D Slicer markups fiducial CSV (version 4.11 header, LPS coordinates)."""
    buffer = io.StringIO()
    buffer.write("# Markups fiducial file version = 4.11\n# CoordinateSystem = LPS\n")
    buffer.write(f"# columns = {_FCSV_COLUMNS}\n")
    writer = csv.writer(buffer, lineterminator="\n")
    for i, (point, label) in enumerate(zip(landmarks.points, landmarks.labels), start=1):
        xyz = [repr(float(v)) for v in point]
        # Orientation is Slicer's angle-axis identity (0, 0, 0, 1); vis, sel, lock = 1, 1, 0.
        writer.writerow([i, *xyz, 0, 0, 0, 1, 1, 1, 0, _one_line(label), "", ""])
    _write_text(path, buffer.getvalue())


def write_mrk_json(path: PathLike, landmarks: Landmarks) -> None:
    """Write a 3D Slicer markups JSON point list (schema v1.0.3, LPS coordinates)."""
    # Slicer's identity orientation (RAS) expressed in LPS, as Slicer writes it.
    orientation = [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0]
    control_points = [
        {
            "id": str(i),
            "label": label,
            "description": "",
            "associatedNodeID": "",
            "position": [float(v) for v in point],
            "orientation": orientation,
            "selected": True,
            "locked": False,
            "visibility": True,
            "positionStatus": "defined",
        }
        for i, (point, label) in enumerate(zip(landmarks.points, landmarks.labels), start=1)
    ]
    document = {
        "@schema": MARKUPS_SCHEMA,
        "markups": [
            {
                "type": "Fiducial",
                "coordinateSystem": "LPS",
                "coordinateUnits": "mm",
                "locked": False,
                "fixedNumberOfControlPoints": False,
                "labelFormat": "%N-%d",
                "lastUsedControlPointNumber": len(control_points),
                "controlPoints": control_points,
            }
        ],
    }
    _write_text(path, json.dumps(document, indent=4, allow_nan=False) + "\n")


def write_csv(path: PathLike, landmarks: Landmarks) -> None:
    """Write DeepRegister's CSV format: header ``label,x,y,z``, LPS mm."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["label", "x", "y", "z"])
    for point, label in zip(landmarks.points, landmarks.labels):
        writer.writerow([_one_line(label), *(repr(float(v)) for v in point)])
    _write_text(path, buffer.getvalue())


def check_pairs(fixed: Landmarks, moving: Landmarks) -> None:
    """Raise :class:`LandmarkError` unless both sets have the same, non-zero number of points."""
    if len(fixed) == 0 or len(moving) == 0:
        raise LandmarkError(
            f"There are no landmark pairs to compare (fixed: {len(fixed)} points, moving: "
            f"{len(moving)} points). Place at least one landmark in each image."
        )
    if len(fixed) != len(moving):
        raise LandmarkError(
            f"The fixed landmarks have {len(fixed)} points but the moving landmarks have "
            f"{len(moving)}. Landmarks are paired by order (1st fixed with 1st moving, and so "
            "on), so both files must list the same anatomical points in the same order."
        )


def transform_points(points_lps: np.ndarray, transform: sitk.Transform) -> np.ndarray:
    """Apply ``transform.TransformPoint`` (fixed -> moving) to each LPS point; returns (N, 3)."""
    points = _as_points(points_lps)
    mapped = [transform.TransformPoint(tuple(float(v) for v in p)) for p in points]
    return np.array(mapped, dtype=np.float64).reshape(-1, 3)


def tre(
    fixed_points: np.ndarray, moving_points: np.ndarray, transform: sitk.Transform | None = None
) -> np.ndarray:
    """Distances (mm) from ``transform(fixed_i)`` (or ``fixed_i``) to ``moving_i``, shape (N,)."""
    fixed, moving = _as_points(fixed_points), _as_points(moving_points)
    if fixed.shape != moving.shape:
        raise LandmarkError(
            f"{len(fixed)} fixed points but {len(moving)} moving points; landmarks are "
            "paired by order, so both sets need the same number of points."
        )
    if transform is not None:
        fixed = transform_points(fixed, transform)
    return np.linalg.norm(fixed - moving, axis=1)


def tre_summary(errors: np.ndarray) -> dict[str, float | int]:
    """Mean, std (population), median, 90th percentile and max (mm) and count ``n`` of TREs."""
    values = np.asarray(errors, dtype=np.float64).ravel()
    if values.size == 0:
        raise LandmarkError("No landmark errors to summarise: at least one pair is needed.")
    return {
        "n": int(values.size),
        "mean": float(values.mean()),
        "std": float(values.std()),
        "median": float(np.median(values)),
        "p90": float(np.percentile(values, 90)),
        "max": float(values.max()),
    }


def _as_points(points: np.ndarray) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {array.shape}")
    return array


def _one_line(label: str) -> str:
    """Slicer reads .fcsv line by line: a label must not contain line breaks."""
    return " ".join(label.splitlines())


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig") as stream:
            return stream.read()
    except FileNotFoundError:
        raise LandmarkError(
            f"Landmark file '{path}' was not found. Check the folder and the file name."
        ) from None
    except IsADirectoryError:
        raise LandmarkError(f"Landmark path '{path}' is a folder, not a file.") from None
    except UnicodeDecodeError:
        raise LandmarkError(f"Landmark file '{path}' is not a text file. {_HOW_TO_SAVE}") from None
    except OSError as error:
        raise LandmarkError(
            f"Landmark file '{path}' could not be read ({error.strerror or error}). Check "
            "that it exists and that you are allowed to read it."
        ) from None


def _write_text(path: PathLike, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="") as stream:
        stream.write(text)


def _coordinate(path: str, where: str, axis: str, value: object) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = None
    if number is None or not math.isfinite(number):
        raise LandmarkError(
            f"Landmark file '{path}', {where}: coordinate {axis} is {value!r}, which is not a "
            "finite number. Correct or delete this point and save the file again."
        )
    return number


def _system(path: str, value: str) -> str:
    system = _SYSTEMS.get(value.strip().upper())
    if system is None:
        raise LandmarkError(
            f"Landmark file '{path}' uses coordinate system {value.strip()!r}, which is not "
            "supported (expected RAS or LPS). Save the landmarks again from 3D Slicer."
        )
    return system


def _read_fcsv(path: str, text: str) -> _Parsed:
    system = "RAS"
    columns = ["id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label"]
    rows: list[tuple[int, list[str]]] = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if line.startswith("#"):
            key, separator, value = line[1:].partition("=")
            key = key.strip().lower()
            if separator and key == "coordinatesystem":
                system = _system(path, value)
            elif separator and key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
        elif line.strip():
            rows.append((line_number, next(csv.reader([line]))))
    missing = [axis for axis in "xyz" if axis not in columns]
    if missing:
        raise LandmarkError(
            f"Landmark file '{path}': the '# columns' header has no {', '.join(missing)} "
            "column. Save the landmarks again from 3D Slicer."
        )
    index = [columns.index(axis) for axis in "xyz"]
    label_index = columns.index("label") if "label" in columns else None
    points, labels = [], []
    for line_number, fields in rows:
        if len(fields) <= max(index):
            raise LandmarkError(
                f"Landmark file '{path}', line {line_number}: {len(fields)} values, too few "
                f"for the columns '{','.join(columns)}'. Correct or delete this line."
            )
        where = f"line {line_number}"
        points.append([_coordinate(path, where, a, fields[i]) for a, i in zip("xyz", index)])
        has_label = label_index is not None and label_index < len(fields)
        labels.append(fields[label_index].strip() if has_label else "")
    return points, labels, system


def _read_mrk_json(path: str, text: str) -> _Parsed:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise LandmarkError(
            f"Landmark file '{path}' is not valid JSON (line {error.lineno}, column "
            f"{error.colno}: {error.msg}). Save the markups again from 3D Slicer."
        ) from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list) or not markups or not isinstance(markups[0], dict):
        raise LandmarkError(
            f"Landmark file '{path}' has no 'markups' list, so it is not a 3D Slicer markups "
            f"file. {_HOW_TO_SAVE}"
        )
    markup = markups[0]
    system = _system(path, str(markup.get("coordinateSystem", "LPS")))
    units = markup.get("coordinateUnits", "mm")
    units = units[0] if isinstance(units, list) and units else units
    if units not in _UNITS_TO_MM:
        raise LandmarkError(
            f"Landmark file '{path}' uses coordinate units {units!r}; only mm and um are "
            "supported."
        )
    points, labels = [], []
    for number, item in enumerate(markup.get("controlPoints") or [], start=1):
        control_point = item if isinstance(item, dict) else {}
        label = str(control_point.get("label", ""))
        where = f"control point {number} ('{label}')"
        position = control_point.get("position")
        status = control_point.get("positionStatus", "defined")
        if status != "defined" or position in (None, ""):
            raise LandmarkError(
                f"Landmark file '{path}', {where} has no position (status '{status}'). Place "
                "this point in 3D Slicer or delete it, then save the markups again."
            )
        if not isinstance(position, list) or len(position) != 3:
            raise LandmarkError(
                f"Landmark file '{path}', {where}: the position must be 3 numbers, got "
                f"{position!r}."
            )
        scale = _UNITS_TO_MM[units]
        points.append([scale * _coordinate(path, where, a, v) for a, v in zip("xyz", position)])
        labels.append(label.strip())
    return points, labels, system


def _read_csv(path: str, text: str) -> _Parsed:
    reader = csv.reader(io.StringIO(text))
    header = next((row for row in reader if any(cell.strip() for cell in row)), [])
    names = [cell.strip().lower() for cell in header]
    has_xyz, has_ras = set("xyz") <= set(names), set("ras") <= set(names)
    if has_xyz == has_ras:
        problem = "has both x,y,z and r,a,s columns" if has_xyz else "has no x,y,z or r,a,s columns"
        raise LandmarkError(
            f"Landmark file '{path}' {problem} (header: {','.join(header) or 'empty'}). The "
            "first row must name the columns: label,x,y,z for LPS mm or label,r,a,s for RAS mm."
        )
    axes = "xyz" if has_xyz else "ras"
    index = [names.index(axis) for axis in axes]
    label_index = names.index("label") if "label" in names else None
    points, labels = [], []
    for fields in reader:
        if not any(cell.strip() for cell in fields):
            continue
        where = f"line {reader.line_num}"
        if len(fields) <= max(index):
            raise LandmarkError(
                f"Landmark file '{path}', {where}: {len(fields)} values but the header has "
                f"{len(names)} columns. Correct or delete this line."
            )
        points.append([_coordinate(path, where, a, fields[i]) for a, i in zip(axes, index)])
        has_label = label_index is not None and label_index < len(fields)
        labels.append(fields[label_index].strip() if has_label else "")
    return points, labels, "LPS" if has_xyz else "RAS"
