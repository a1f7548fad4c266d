"""Draws Resources/Icons/DeepRegister.png (128 x 128): a fixed and a moving volume, a warped grid
between them and a bright saliency spot. Run: python Resources/Icons/make_icon.py"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Polygon  # noqa: E402

SIZE = 128
OUT = Path(__file__).with_name("DeepRegister.png")


def volume(ax, x, y, size, depth, face, side, top, edge):
    """A cube in oblique projection with its front face at (x, y)."""
    d = depth
    ax.add_patch(Polygon([(x, y + size), (x + d, y + size + d), (x + size + d, y + size + d), (x + size, y + size)],
                         closed=True, facecolor=top, edgecolor=edge, linewidth=2.2, joinstyle="round"))
    ax.add_patch(Polygon([(x + size, y), (x + size + d, y + d), (x + size + d, y + size + d), (x + size, y + size)],
                         closed=True, facecolor=side, edgecolor=edge, linewidth=2.2, joinstyle="round"))
    ax.add_patch(FancyBboxPatch((x, y), size, size, boxstyle="square,pad=0", facecolor=face, edgecolor=edge,
                                linewidth=2.2))


def warp(u, v):
    """A smooth displacement of the unit square (what a deformable registration produces)."""
    return (u + 0.07 * np.sin(np.pi * v) * np.sin(np.pi * u * 1.2),
            v + 0.07 * np.sin(np.pi * u) * np.cos(np.pi * (v - 0.3)))


def main() -> None:
    fig = plt.figure(figsize=(1, 1), dpi=SIZE)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 128)
    ax.set_ylim(0, 128)
    ax.axis("off")
    fig.patch.set_alpha(0.0)

    # Moving volume (MR, warm) behind, fixed volume (ultrasound, cool) in front, overlapping.
    volume(ax, 40, 41, 62, 18, "#f4a259", "#d9803a", "#f8c58f", "#7a3d0c")
    volume(ax, 6, 6, 66, 18, (0.26, 0.60, 0.82, 0.80), (0.16, 0.45, 0.66, 0.85), (0.48, 0.76, 0.92, 0.85),
           "#0b3954")

    # Warped grid on the front face: where the moving image lands after registration.
    x0, y0, s = 6, 6, 66
    t = np.linspace(0, 1, 60)
    for k in np.linspace(0, 1, 6):
        for u, v in ((t, np.full_like(t, k)), (np.full_like(t, k), t)):
            wu, wv = warp(u, v)
            ax.plot(x0 + s * wu, y0 + s * wv, color="white", linewidth=1.3, alpha=0.95, solid_capstyle="round")

    # Joint-saliency hot spot (inferno colours) where both images show matching structure.
    yy, xx = np.mgrid[0:1:64j, 0:1:64j]
    spot = np.exp(-(((xx - 0.62) / 0.2) ** 2 + ((yy - 0.42) / 0.16) ** 2))
    rgba = plt.get_cmap("inferno")(spot)
    rgba[..., 3] = np.clip(spot * 1.1, 0, 0.9)
    ax.imshow(rgba, extent=(x0, x0 + s, y0, y0 + s), origin="lower", interpolation="bilinear", zorder=3)

    fig.savefig(OUT, dpi=SIZE, transparent=True)
    plt.close(fig)


if __name__ == "__main__":
    main()
