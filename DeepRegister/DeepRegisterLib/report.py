"""One-page PNG summary of a registration: before/after, alignment, saliency, displacement.

Three orthogonal planes through the centre of the fixed grid are shown in the radiological
convention: axial with the patient's right on the image left and anterior up, coronal with
the patient's right on the left and superior up, sagittal with anterior on the left and
superior up.  Each plane is resampled from the images' physical (LPS) space onto square
display pixels, so oblique grids (non-identity direction) and anisotropic spacing are shown
with their true shape.  Rendering uses matplotlib's Agg canvas explicitly
(:class:`~matplotlib.backends.backend_agg.FigureCanvasAgg` on a
:class:`~matplotlib.figure.Figure`: no pyplot, no global backend switch), so it works headless
and inside 3D Slicer; matplotlib is imported on the first report, not with this module.

Speed (a 128^3 pair, 2 CPU cores): the panels sit at fixed positions (matplotlib's constrained
layout measured every text twice: 0.2 s) and are all drawn into one axes spanning the figure (an
axes per panel built 18 sets of ticks: 0.15 s), and the saliency overlay is blended here into one
RGB image instead of drawn as a second image with per-pixel opacity.
"""

from __future__ import annotations

import math
import os
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.image import AxesImage

_WIDTH_IN = 16.0
_DPI = 100
# Fixed layout (inches): margins, gaps between panels, the header (title: two lines; a warning
# line, empty when there is none; column titles) and the footer (colour bars with labels).
_LEFT_IN, _RIGHT_IN, _GAP_IN = 0.3, 0.08, 0.06
_HEADER_IN, _FOOTER_IN = 1.0, 0.72
_WARNING_COLOR = "#d62728"
_WARNING_CHARACTERS = 125  # one line of the warning at 12 points (bold) across the figure
_MAX_PIXELS = 256  # display samples along the longest side of the physical box
_ARROWS = 16  # quiver arrows along the longest side
_COLUMNS = (
    "fixed",
    "moving (before)",
    "warped moving (after)",
    "checkerboard fixed / warped",
    "joint saliency on fixed",
    "displacement",
)


@dataclass(frozen=True)
class _Plane:
    """A display plane: a one-voxel-thick grid whose index axes are screen right and down."""

    name: str
    reference: sitk.Image
    right: np.ndarray  # LPS direction of increasing column
    down: np.ndarray  # LPS direction of increasing row
    letters: tuple[str, str, str, str]  # patient direction at the left, right, top, bottom


# (name, screen right, screen down, letters) in LPS; the normal completes the frame.
_VIEWS = (
    ("axial", (1, 0, 0), (0, 1, 0), ("R", "L", "A", "P")),
    ("coronal", (1, 0, 0), (0, 0, -1), ("R", "L", "S", "I")),
    ("sagittal", (0, 1, 0), (0, 0, -1), ("A", "P", "S", "I")),
)


def prepare_rendering() -> None:
    """Import matplotlib and draw a small figure with text, an image and a colour bar into memory,
    so the fonts and caches the report needs are loaded (a command line runs this in a worker
    thread while it registers)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.0, 1.0), dpi=_DPI)
    FigureCanvasAgg(figure)
    axis = figure.add_axes((0.0, 0.3, 0.5, 0.7))
    axis.imshow(np.zeros((4, 4)), cmap="gray")
    axis.set_title("x", fontsize=10)
    axis.text(0.5, 0.5, "R", fontsize=9, fontweight="bold")
    axis.quiver([0.0], [0.0], [1.0], [1.0])
    figure.colorbar(ScalarMappable(Normalize(0.0, 1.0), cmap="viridis"), cax=figure.add_axes((0.6, 0.1, 0.3, 0.1)),
                    orientation="horizontal", label="mm")
    figure.text(0.0, 0.0, "x", fontsize=12, fontweight="bold")
    figure.savefig(io.BytesIO(), dpi=_DPI, format="png", pil_kwargs={"compress_level": 1})


def write_report_png(
    path: str | os.PathLike[str],
    fixed: sitk.Image,
    moving: sitk.Image,
    warped: sitk.Image,
    saliency: sitk.Image,
    displacement: sitk.Image,
    title: str = "",
    warning: str = "",
    moving_transform: sitk.Transform | None = None,
) -> None:
    """Write the registration report PNG (1600 px wide) to ``path``.

    ``fixed``, ``warped``, ``saliency`` and ``displacement`` are 3D images covering the fixed grid;
    ``moving`` is the moving image resampled onto it before registration, or, with
    ``moving_transform`` (fixed -> moving), the moving image itself on its own grid, sampled through
    that transform on the planes (NaN, shown black, outside it; its intensity window then comes from
    the whole moving volume); ``warped`` is the moving image after registration; ``saliency`` is the joint
    saliency in [0, 1]; ``displacement`` a 3-component vector image of LPS displacements
    in mm (fixed point p maps to moving point p + u(p)). ``warning`` (e.g. "the guard kept
    the network stage") is drawn in red under the title; the layout does not depend on it.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    if displacement.GetNumberOfComponentsPerPixel() != 3:
        raise ValueError("displacement must be a 3-component vector image (mm)")
    planes = _planes(fixed)
    images = {"fixed": fixed, "moving": moving, "warped": warped, "saliency": saliency}
    transforms = {"moving": moving_transform}
    samples = [{name: _sample(image, plane, transforms.get(name)) for name, image in images.items()} for plane in planes]
    vectors = [_sample(displacement, plane) for plane in planes]
    fixed_window, moving_window = _window(fixed), _window(moving)
    largest = max(float(np.nanmax(np.linalg.norm(v, axis=-1), initial=0.0)) for v in vectors)
    step = max(1, round(max(max(p.reference.GetSize()[:2]) for p in planes) / _ARROWS))
    pixels_per_mm = _arrow_pixels_per_mm(vectors, planes, step)

    columns = len(_COLUMNS)
    width_in = (_WIDTH_IN - _LEFT_IN - _RIGHT_IN - (columns - 1) * _GAP_IN) / columns
    heights = [width_in * min(max(p.reference.GetHeight() / p.reference.GetWidth(), 0.4), 1.5) for p in planes]
    height_in = _HEADER_IN + sum(heights) + (len(planes) - 1) * _GAP_IN + _FOOTER_IN
    figure = Figure(figsize=(_WIDTH_IN, height_in), dpi=_DPI)
    FigureCanvasAgg(figure)
    # One axes over the whole figure, in inches from the top left: every panel is drawn into it
    page = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    page.set_axis_off()
    page.set_xlim(0.0, _WIDTH_IN)
    page.set_ylim(height_in, 0.0)

    gray = {"cmap": "gray", "interpolation": "bilinear"}
    inferno = matplotlib.colormaps["inferno"]
    headings = list(_COLUMNS)
    if pixels_per_mm > 0:
        headings[5] = f"displacement (arrows ×{pixels_per_mm * planes[0].reference.GetSpacing()[0]:.2g})"
    top_in = _HEADER_IN
    for row, (plane, sample, vector) in enumerate(zip(planes, samples, vectors)):
        panels = [_Panel.fit(_LEFT_IN + column * (width_in + _GAP_IN), top_in, width_in, heights[row], sample["fixed"].shape)
                  for column in range(columns)]
        top_in += heights[row] + _GAP_IN
        panels[0].show(page, sample["fixed"], vmin=fixed_window[0], vmax=fixed_window[1], **gray)
        panels[1].show(page, sample["moving"], vmin=moving_window[0], vmax=moving_window[1], **gray)
        panels[2].show(page, sample["warped"], vmin=moving_window[0], vmax=moving_window[1], **gray)
        checkerboard = _checkerboard(sample["fixed"], sample["warped"], fixed_window, moving_window)
        panels[3].show(page, checkerboard, vmin=0.0, vmax=1.0, **gray)
        # Opacity grows with saliency: the anatomy stays visible where the map is low.
        confidence = np.clip(np.nan_to_num(sample["saliency"], nan=0.0), 0.0, 1.0)
        opacity = (0.2 + 0.7 * confidence)[..., None]
        anatomy = np.nan_to_num(_normalise(sample["fixed"], fixed_window), nan=0.0)[..., None]
        panels[4].show(page, anatomy * (1.0 - opacity) + inferno(confidence)[..., :3] * opacity, interpolation="bilinear")
        magnitude = np.linalg.norm(vector, axis=-1)
        moved = panels[5].show(page, magnitude, cmap="viridis", vmin=0.0, vmax=max(largest, 1e-6))
        if pixels_per_mm > 0:
            panels[5].quiver(page, vector, plane, step, pixels_per_mm)
        for panel, heading in zip(panels, headings):
            panel.decorate(page, plane, heading if row == 0 else "")
        page.text(panels[0].left - 0.04, panels[0].top + panels[0].height / 2, plane.name, fontsize=12,
                  rotation=90, ha="right", va="center")

    def box(left_in: float, bottom_in: float, box_width_in: float, box_height_in: float) -> list[float]:
        return [left_in / _WIDTH_IN, bottom_in / height_in, box_width_in / _WIDTH_IN, box_height_in / height_in]

    bar_height_in, bar_bottom_in = 0.14, 0.46
    for column, mappable, label in (
        (4, ScalarMappable(Normalize(0.0, 1.0), "inferno"), "joint saliency (0-1)"),
        (5, moved, "displacement |u| (mm)"),
    ):
        left_in = _LEFT_IN + column * (width_in + _GAP_IN) + 0.05 * width_in
        bar = figure.add_axes(box(left_in, bar_bottom_in, 0.9 * width_in, bar_height_in))
        figure.colorbar(mappable, cax=bar, orientation="horizontal", label=label)
    size = "×".join(str(n) for n in fixed.GetSize())
    voxel = "×".join(f"{s:.2f}" for s in fixed.GetSpacing())
    figure.text(
        0.5, 1.0 - 0.08 / height_in,
        f"{title or 'DeepRegister registration report'}\n"
        f"fixed grid {size} voxels of {voxel} mm; planes through the grid centre; "
        "radiological view (patient right on image left)",
        ha="center", va="top", fontsize=12,
    )
    if warning:
        one_line = textwrap.shorten(warning, width=_WARNING_CHARACTERS, placeholder=" ...")
        figure.text(0.5, 1.0 - 0.5 / height_in, one_line, ha="center", va="top", fontsize=12,
                    fontweight="bold", color=_WARNING_COLOR)
    figure.savefig(path, dpi=_DPI, format="png", pil_kwargs={"compress_level": 1})


def _arrow_pixels_per_mm(vectors: list[np.ndarray], planes: list[_Plane], step: int) -> float:
    """Arrow length per mm of in-plane displacement: the 99th percentile spans 90 % of ``step``
    pixels; 0 when there is no displacement to draw."""
    in_plane = [np.hypot(v @ p.right, v @ p.down).ravel() for v, p in zip(vectors, planes)]
    lengths = np.concatenate(in_plane)
    lengths = lengths[np.isfinite(lengths)]
    longest = float(np.percentile(lengths, 99)) if lengths.size else 0.0
    return 0.9 * step / longest if longest > 1e-6 else 0.0


def _planes(image: sitk.Image) -> list[_Plane]:
    """Display planes through the centre of the image's physical box, square pixels."""
    size = np.array(image.GetSize())
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
            for corner in np.array(np.meshgrid(*[(-0.5, n - 0.5) for n in size])).reshape(3, -1).T
        ]
    )
    centre = corners.mean(axis=0)
    extent = np.ptp(corners, axis=0)
    spacing = max(min(image.GetSpacing()), float(extent.max()) / _MAX_PIXELS)
    planes = []
    for name, right, down, letters in _VIEWS:
        right, down = np.array(right, float), np.array(down, float)
        normal = np.cross(right, down)
        shape = [max(1, math.ceil(float(np.ptp(corners @ a)) / spacing)) for a in (right, down)]
        reference = sitk.Image(shape[0], shape[1], 1, sitk.sitkUInt8)
        reference.SetSpacing((spacing, spacing, spacing))
        reference.SetDirection(tuple(np.column_stack([right, down, normal]).ravel()))
        corner = centre - spacing * ((shape[0] - 1) / 2 * right + (shape[1] - 1) / 2 * down)
        reference.SetOrigin(tuple(corner))
        planes.append(_Plane(name, reference, right, down, letters))
    return planes


def _sample(image: sitk.Image, plane: _Plane, transform: sitk.Transform | None = None) -> np.ndarray:
    """Linear samples of ``image`` at the plane's points mapped by ``transform`` (default: identity),
    (rows, columns[, components]); NaN outside."""
    vector = image.GetNumberOfComponentsPerPixel() > 1
    pixel = sitk.sitkVectorFloat32 if vector else sitk.sitkFloat32
    resampled = sitk.Resample(
        image, plane.reference, transform or sitk.Transform(), sitk.sitkLinear, math.nan, pixel
    )
    return sitk.GetArrayFromImage(resampled)[0].astype(np.float64)


def _window(image: sitk.Image) -> tuple[float, float]:
    """1st-99th percentile intensity window (of a regular subsample of about 2^18 voxels)."""
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, round((array.size / 2**18) ** (1 / 3)))
    low, high = (float(v) for v in np.percentile(array[::step, ::step, ::step], (1, 99)))
    return low, (high if high > low else low + 1.0)


def _checkerboard(
    fixed: np.ndarray,
    warped: np.ndarray,
    fixed_window: tuple[float, float],
    moving_window: tuple[float, float],
) -> np.ndarray:
    """Alternating squares of the windowed fixed and warped images (8 along the long side)."""
    tile = max(2, round(max(fixed.shape) / 8))
    rows, columns = np.indices(fixed.shape)
    take_fixed = (rows // tile + columns // tile) % 2 == 0
    return np.where(take_fixed, _normalise(fixed, fixed_window), _normalise(warped, moving_window))


def _normalise(values: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    return np.clip((values - window[0]) / (window[1] - window[0]), 0.0, 1.0)


@dataclass(frozen=True)
class _Panel:
    """Where one plane image is drawn on the page (inches from the figure's top left): the image's
    own aspect ratio, centred in its box."""

    left: float
    top: float
    width: float
    height: float
    inch_per_pixel: float

    @classmethod
    def fit(cls, left: float, top: float, width: float, height: float, shape: tuple[int, ...]) -> _Panel:
        rows, columns = shape[:2]
        scale = min(width / columns, height / rows)
        return cls(left + (width - columns * scale) / 2, top + (height - rows * scale) / 2,
                   columns * scale, rows * scale, scale)

    def show(self, page: Axes, image: np.ndarray, **style: object) -> AxesImage:
        """Draw ``image`` (rows, columns[, RGB]) framed, on a black background (NaN shows it)."""
        from matplotlib.patches import Rectangle

        corner = (self.left, self.top)
        page.add_patch(Rectangle(corner, self.width, self.height, facecolor="black", edgecolor="none", zorder=-1))
        page.add_patch(Rectangle(corner, self.width, self.height, fill=False, edgecolor="black", linewidth=0.8, zorder=3))
        return page.imshow(image, extent=(self.left, self.left + self.width, self.top + self.height, self.top),
                           aspect="auto", **style)

    def quiver(self, page: Axes, displacement: np.ndarray, plane: _Plane, step: int, pixels_per_mm: float) -> None:
        """In-plane displacement arrows every ``step`` pixels (rows and columns grow down, right), clipped
        to the panel."""
        from matplotlib.patches import Rectangle

        height, width = displacement.shape[:2]
        rows, columns = np.mgrid[step // 2 : height : step, step // 2 : width : step]
        vectors = displacement[rows, columns]
        u, v = vectors @ plane.right * pixels_per_mm, vectors @ plane.down * pixels_per_mm
        keep = np.isfinite(u) & np.isfinite(v)
        x = self.left + (columns[keep] + 0.5) * self.inch_per_pixel
        y = self.top + (rows[keep] + 0.5) * self.inch_per_pixel
        arrows = page.quiver(x, y, u[keep] * self.inch_per_pixel, v[keep] * self.inch_per_pixel, angles="xy",
                             scale_units="xy", scale=1.0, pivot="mid", color="white", width=0.006 * self.width / _WIDTH_IN)
        arrows.set_clip_path(Rectangle((self.left, self.top), self.width, self.height, transform=page.transData))

    def decorate(self, page: Axes, plane: _Plane, title: str) -> None:
        """A title above the image (may be empty) and the patient orientation letters inside it."""
        page.text(self.left + self.width / 2, self.top - 0.06, title, fontsize=10, ha="center", va="bottom")
        style = {"color": "yellow", "fontsize": 8, "fontweight": "bold"}
        left, right, top, bottom = plane.letters
        middle_x, middle_y = self.left + self.width / 2, self.top + self.height / 2
        page.text(self.left + 0.02 * self.width, middle_y, left, ha="left", va="center", **style)
        page.text(self.left + 0.98 * self.width, middle_y, right, ha="right", va="center", **style)
        page.text(middle_x, self.top + 0.02 * self.height, top, ha="center", va="top", **style)
        page.text(middle_x, self.top + 0.98 * self.height, bottom, ha="center", va="bottom", **style)
