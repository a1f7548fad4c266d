"""Registration report PNG: written, sized, not blank, sensitive to its inputs, oriented."""

from __future__ import annotations

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib import report

SIZE = (40, 36, 30)  # x, y, z
SPACING = (1.0, 1.2, 2.0)
ORIGIN = (-15.0, 10.0, -20.0)


def rotation_z(degrees: float) -> tuple[float, ...]:
    a = np.radians(degrees)
    return (np.cos(a), -np.sin(a), 0.0, np.sin(a), np.cos(a), 0.0, 0.0, 0.0, 1.0)


DIRECTION = rotation_z(30.0)


def on_grid(array: np.ndarray, vector: bool = False) -> sitk.Image:
    """A (Z, Y, X[, 3]) array as an image on the oblique, anisotropic test grid."""
    image = sitk.GetImageFromArray(array.astype(np.float32), isVector=vector)
    image.SetSpacing(SPACING)
    image.SetOrigin(ORIGIN)
    image.SetDirection(DIRECTION)
    return image


def physical_points() -> np.ndarray:
    """LPS positions (Z, Y, X, 3) of the test grid's voxels."""
    z, y, x = np.meshgrid(*[np.arange(n) for n in SIZE[::-1]], indexing="ij")
    index = np.stack([x, y, z], axis=-1) * np.asarray(SPACING)
    return index @ np.reshape(DIRECTION, (3, 3)).T + np.asarray(ORIGIN)


def grid_centre() -> np.ndarray:
    matrix = np.reshape(DIRECTION, (3, 3)) * np.asarray(SPACING)
    return matrix @ ((np.asarray(SIZE) - 1) / 2.0) + np.asarray(ORIGIN)


def blob(points: np.ndarray, centre: np.ndarray, radius: float) -> np.ndarray:
    return np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2.0 * radius**2))


def synthetic_pair(seed: int = 0) -> dict[str, sitk.Image]:
    """Fixed, moving (before), warped (after), saliency and displacement on one grid."""
    rng = np.random.default_rng(seed)
    points = physical_points()
    centre = grid_centre()
    shift = np.array([3.0, -2.0, 4.0])

    def anatomy(offset: np.ndarray) -> np.ndarray:
        """Two blobs seen through a shift (mm) of the sampling points."""
        moved = points + offset
        return 100.0 * (blob(moved, centre, 12.0) + 0.6 * blob(moved, centre + (6.0, -4.0, 8.0), 4.0))

    fixed = anatomy(np.zeros(3))
    displacement = np.broadcast_to(shift, points.shape) * (0.5 + 0.5 * blob(points, centre, 15.0))[..., None]
    return {
        "fixed": on_grid(fixed + rng.normal(0.0, 2.0, fixed.shape)),
        "moving": on_grid(anatomy(shift) + rng.normal(0.0, 2.0, fixed.shape)),
        "warped": on_grid(anatomy(shift / 4.0) + rng.normal(0.0, 2.0, fixed.shape)),
        "saliency": on_grid(blob(points, centre + (4.0, 0.0, 0.0), 6.0)),
        "displacement": on_grid(displacement, vector=True),
    }


def render(path, images: dict[str, sitk.Image], title: str = "synthetic test") -> np.ndarray:
    report.write_report_png(path, title=title, **images)
    return matplotlib.image.imread(str(path))[..., :3]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> np.ndarray:
    return render(tmp_path_factory.mktemp("report") / "baseline.png", synthetic_pair())


def column_difference(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Mean absolute difference of each pixel column, below the title lines."""
    assert first.shape == second.shape
    return np.abs(first[80:] - second[80:]).mean(axis=(0, 2))


def test_report_png_is_written_sized_and_not_blank(baseline):
    height, width = baseline.shape[:2]
    assert width == 1600
    assert 600 <= height <= 1400
    assert baseline.std() > 0.1


def test_saliency_changes_only_the_saliency_column(tmp_path, baseline):
    images = synthetic_pair()
    images["saliency"] = on_grid(1.0 - sitk.GetArrayFromImage(images["saliency"]))
    difference = column_difference(baseline, render(tmp_path / "saliency.png", images))
    width = baseline.shape[1]
    assert difference[int(width * 4 / 6) + 10 : int(width * 5 / 6) - 10].mean() > 0.02
    assert difference[10 : int(width * 4 / 6) - 10].max() == 0.0


def test_title_is_drawn(tmp_path, baseline):
    other = render(tmp_path / "title.png", synthetic_pair(), title="a different title")
    assert np.abs(other[:40] - baseline[:40]).mean() > 1e-3
    assert column_difference(baseline, other).max() == 0.0


def test_zero_displacement_is_allowed(tmp_path):
    images = synthetic_pair()
    images["displacement"] = on_grid(np.zeros((*SIZE[::-1], 3)), vector=True)
    assert render(tmp_path / "zero.png", images).std() > 0.1


def test_rejects_scalar_displacement(tmp_path):
    images = synthetic_pair()
    images["displacement"] = images["saliency"]
    with pytest.raises(ValueError, match="3-component"):
        report.write_report_png(str(tmp_path / "bad.png"), **images)


@pytest.mark.parametrize("plane_name", ["axial", "coronal", "sagittal"])
def test_radiological_orientation(plane_name):
    """A point right (-x), anterior (-y) and superior (+z) of the centre is drawn left and up:
    axial and coronal show the patient's right on the left, sagittal shows anterior on the
    left; coronal and sagittal show superior at the top, axial anterior at the top."""
    points = physical_points()
    marker = grid_centre() + np.array([-6.0, -6.0, 6.0])
    image = on_grid(blob(points, marker, 2.5))
    plane = next(p for p in report._planes(image) if p.name == plane_name)
    values = np.nan_to_num(report._sample(image, plane), nan=0.0)
    row, column = np.unravel_index(np.argmax(values), values.shape)
    assert column < (values.shape[1] - 1) / 2
    assert row < (values.shape[0] - 1) / 2
    # Square display pixels through the grid centre: the marker lands 6 mm from the centre.
    spacing = plane.reference.GetSpacing()[0]
    assert abs(abs(column - (values.shape[1] - 1) / 2) * spacing - 6.0) <= 1.5 * spacing
    assert abs(abs(row - (values.shape[0] - 1) / 2) * spacing - 6.0) <= 1.5 * spacing


def test_warning_is_drawn_in_red_in_the_header_only(tmp_path, baseline):
    warned = render(tmp_path / "warning.png", synthetic_pair())
    assert warned.shape == baseline.shape and np.array_equal(warned, baseline)  # no warning: the same figure
    images = synthetic_pair()
    report.write_report_png(tmp_path / "warned.png", title="synthetic test",
                            warning="WARNING: kept the network stage " + "and more " * 40, **images)
    warned = matplotlib.image.imread(str(tmp_path / "warned.png"))[..., :3]
    assert warned.shape == baseline.shape  # the layout does not depend on the warning
    assert column_difference(baseline, warned).max() == 0.0  # panels untouched
    changed = np.abs(warned[:80] - baseline[:80]).max(axis=2) > 0.1
    red = (warned[:80, :, 0] > 0.6) & (warned[:80, :, 1] < 0.4) & (warned[:80, :, 2] < 0.4)
    assert red.sum() > 200 and red[changed].mean() > 0.3
    # Shortened to one line: it stays inside the figure's width.
    columns = np.flatnonzero(red.any(axis=0))
    assert columns.min() > 0 and columns.max() < warned.shape[1] - 1


def test_moving_image_sampled_through_the_start_transform_looks_as_resampled(tmp_path, baseline):
    images = synthetic_pair()
    offset = (7.0, -5.0, 3.0)  # the raw moving image lies this far away; the start transform brings it back
    raw = sitk.Image(images["moving"])
    raw.SetOrigin(tuple(np.asarray(raw.GetOrigin()) + offset))
    through = render(tmp_path / "through.png", {**images, "moving": raw}, title="synthetic test")
    assert column_difference(through, baseline).max() > 0.05  # without the transform the moving panel differs
    report.write_report_png(tmp_path / "start.png", title="synthetic test", moving_transform=sitk.TranslationTransform(3, offset),
                            **{**images, "moving": raw})
    start = matplotlib.image.imread(str(tmp_path / "start.png"))[..., :3]
    assert column_difference(start, baseline).max() < 0.01
