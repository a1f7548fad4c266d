"""What a person sees: real Slicer slice views rendered offscreen after showResults.

The PNGs are kept in Testing/Artifacts/ (the README's screenshots come from the same code).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import slicer

from DeepRegisterLib import mrml
from DeepRegisterLib.imageio import read_image
from DeepRegisterLib.landmarks import read_landmarks
from DeepRegisterLib.logic import RegistrationLogic
from DeepRegisterLib.tools.sliceviews import SliceViews
from test_logic import add_fiducials, add_volume

SAMPLE = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
ARTIFACTS = Path(__file__).resolve().parent / "Artifacts"


@pytest.fixture(scope="module")
def shown():
    scene = slicer.vtkMRMLScene()
    views = SliceViews(scene, size=(400, 400))
    fixed = add_volume(scene, read_image(SAMPLE / "fixed_us.nii.gz"), "TRUS")
    moving = add_volume(scene, read_image(SAMPLE / "moving_mr.nii.gz"), "MR")
    logic = RegistrationLogic(scene)
    result = logic.register(fixed, moving, iterations=60, device="cpu")
    add_fiducials(scene, read_landmarks(SAMPLE / "fixed_landmarks.fcsv").points, "F")
    moving_landmarks = add_fiducials(scene, read_landmarks(SAMPLE / "moving_landmarks.fcsv").points, "M")
    moving_landmarks.SetAndObserveTransformNodeID(result.transformNode.GetID())
    moving_landmarks.GetDisplayNode().SetSelectedColor(0.2, 0.8, 1.0)
    logic.showResults(result, saliencyOpacity=0.8, fieldDisplay="glyphs")
    views.fitToVolume(fixed)
    target = mrml.FLIP @ read_landmarks(SAMPLE / "fixed_landmarks.fcsv").points[0]
    views.jumpToPoint(target)
    ARTIFACTS.mkdir(exist_ok=True)
    yield scene, views, logic, result, target
    views.close()


def changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(int) - b.astype(int)).sum(axis=-1) > 30


def test_saliency_overlay_is_drawn_in_inferno_colours(shown) -> None:
    scene, views, logic, result, _ = shown
    with_overlay = views.render("Red")
    views.capture("Red", ARTIFACTS / "overlay_saliency_glyphs_Red.png")
    logic.setSaliencyOpacity(0.0)
    without = views.render("Red")
    logic.setSaliencyOpacity(0.8)
    difference = changed(with_overlay, without)
    assert difference.mean() > 0.05
    # colour (inferno purple to yellow) over a grey image: the overlay pixels are strongly chromatic
    chroma = lambda pixels: (pixels.max(axis=-1).astype(int) - pixels.min(axis=-1)).mean()
    assert chroma(with_overlay[difference]) > 30 and chroma(without[difference]) < 15


def test_field_glyphs_are_drawn_and_switch_off(shown) -> None:
    scene, views, logic, result, _ = shown
    glyphs = views.render("Yellow")
    logic.setFieldDisplay(result.transformNode, "grid", result.fixedVolumeNode)
    grid = views.render("Yellow")
    views.capture("Yellow", ARTIFACTS / "overlay_field_grid_Yellow.png")
    logic.setFieldDisplay(result.transformNode, "off")
    off = views.render("Yellow")
    logic.setFieldDisplay(result.transformNode, "glyphs", result.fixedVolumeNode)
    assert changed(glyphs, off).mean() > 0.02 and changed(grid, off).mean() > 0.02
    assert changed(glyphs, grid).mean() > 0.02


def test_landmarks_and_colour_legend_are_drawn(shown) -> None:
    scene, views, logic, result, target = shown
    image = views.render("Red")
    row, col = (int(round(v)) for v in views.rasToPixel("Red", target))
    patch = image[max(row - 6, 0):row + 7, max(col - 6, 0):col + 7].reshape(-1, 3).astype(int)
    # fixed landmarks are red, registered moving ones light blue: both sit on the target
    assert ((patch[:, 0] > 150) & (patch[:, 1] < 120)).any() or ((patch[:, 2] > 180) & (patch[:, 0] < 120)).any()
    legend_node = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(result.saliencyNode)
    legend_node.SetVisibility(False)
    no_legend = views.render("Red")
    legend_node.SetVisibility(True)
    legend = changed(image, no_legend)
    assert legend.mean() > 0.005 and legend[:, 200:].sum() > 5 * legend[:, :200].sum()  # on the right
    views.captureAll(ARTIFACTS, "overlay_")
