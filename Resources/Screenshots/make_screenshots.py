"""Render the README's slice-view screenshots headless with the project's own code.

Usage: OMP_NUM_THREADS=2 .venv/bin/python Resources/Screenshots/make_screenshots.py
Registers the bundled sample pair through the Slicer module's logic on a real MRML scene, shows the
results as the module does (fixed background, moving foreground, joint saliency overlay with legend,
displacement field, landmarks) and captures the Red/Yellow/Green views with Slicer's displayable managers.
"""

from __future__ import annotations

from pathlib import Path

import slicer
import vtk

from DeepRegisterLib import mrml
from DeepRegisterLib.imageio import read_image
from DeepRegisterLib.landmarks import read_landmarks
from DeepRegisterLib.logic import RegistrationLogic
from DeepRegisterLib.sliceviews import SliceViews

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "Resources" / "SampleData"
OUT = ROOT / "Resources" / "Screenshots"


def main() -> None:
    scene = slicer.vtkMRMLScene()
    with SliceViews(scene, size=(420, 420)) as views:
        volumes = {}
        for name, file in (("TRUS", "fixed_us.nii.gz"), ("MR", "moving_mr.nii.gz")):
            volumes[name] = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
            mrml.update_volume_from_sitk(volumes[name], read_image(SAMPLE / file))
        logic = RegistrationLogic(scene)
        result = logic.register(volumes["TRUS"], volumes["MR"], device="cpu")
        markups = {}
        for name, color in (("fixed", (1.0, 0.3, 0.3)), ("moving", (0.2, 0.8, 1.0))):
            node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} landmarks")
            for point in read_landmarks(SAMPLE / f"{name}_landmarks.fcsv").points:
                node.AddControlPoint(vtk.vtkVector3d(*(mrml.FLIP @ point)))
            node.GetDisplayNode().SetSelectedColor(*color)
            markups[name] = node
        markups["moving"].SetAndObserveTransformNodeID(result.transformNode.GetID())
        table = logic.measureTRE(markups["fixed"], markups["moving"], result.transformNode)
        print("TRE (mm):", logic.treStatistics(table))
        views.fitToVolume(volumes["TRUS"])
        views.jumpToPoint(mrml.markups_points_ras(markups["fixed"])[0])
        for mode in ("glyphs", "grid", "contours"):
            logic.showResults(result, saliencyOpacity=0.8, fieldDisplay=mode)
            views.montage(OUT / f"slice-views-{mode}.png")


if __name__ == "__main__":
    main()
