"""Bridge between MRML nodes (RAS) and SimpleITK images and transforms (LPS).

Slicer stores geometry in RAS; ITK files and DeepRegister's engine use LPS. Converting a point
or vector flips the sign of x and y: ``FLIP @ p``. Needs slicer-core (``import slicer``) but no Qt.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

FLIP = np.diag([-1.0, -1.0, 1.0])


def ijk_to_ras(node) -> np.ndarray:
    """The volume node's 4x4 IJK-to-RAS matrix as numpy."""
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def volume_to_sitk(node) -> sitk.Image:
    """A scalar volume node as a SimpleITK image in LPS physical space (voxel values copied)."""
    image_data = node.GetImageData()
    dims = image_data.GetDimensions()
    components = image_data.GetNumberOfScalarComponents()
    array = numpy_support.vtk_to_numpy(image_data.GetPointData().GetScalars())
    array = array.reshape(dims[2], dims[1], dims[0], components) if components > 1 else \
        array.reshape(dims[2], dims[1], dims[0])
    image = sitk.GetImageFromArray(array.copy(), isVector=components > 1)
    matrix = ijk_to_ras(node)
    lps = FLIP @ matrix[:3, :3]
    spacing = np.linalg.norm(lps, axis=0)
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps / spacing).ravel().tolist())
    image.SetOrigin((FLIP @ matrix[:3, 3]).tolist())
    return image


def set_volume_geometry(node, image: sitk.Image) -> None:
    """Set a volume node's IJK-to-RAS from a SimpleITK image's LPS geometry."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = FLIP @ direction * np.asarray(image.GetSpacing())
    matrix[:3, 3] = FLIP @ np.asarray(image.GetOrigin())
    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, matrix[r, c])
    node.SetIJKToRASMatrix(vtk_matrix)


def update_volume_from_sitk(node, image: sitk.Image) -> None:
    """Replace a scalar volume node's voxels and geometry with a 3D SimpleITK image."""
    array = sitk.GetArrayFromImage(image)
    image_data = vtk.vtkImageData()
    image_data.SetDimensions(image.GetSize())
    vtk_array = numpy_support.numpy_to_vtk(array.ravel(), deep=True)
    vtk_array.SetNumberOfComponents(1)
    image_data.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image_data)
    set_volume_geometry(node, image)


def grid_transform_from_field(field: sitk.Image) -> vtk.vtkTransform:
    """A VTK oriented grid transform (RAS) from an LPS displacement-field image (fixed -> moving)."""
    from slicer import vtkOrientedGridTransform

    vectors = sitk.GetArrayFromImage(field).astype(np.float64) @ FLIP.T  # (Z, Y, X, 3) RAS components
    grid = vtk.vtkImageData()
    grid.SetDimensions(field.GetSize())
    grid.SetSpacing(field.GetSpacing())
    grid.SetOrigin((FLIP @ np.asarray(field.GetOrigin())).tolist())
    scalars = numpy_support.numpy_to_vtk(vectors.reshape(-1, 3), deep=True, array_type=vtk.VTK_DOUBLE)
    scalars.SetNumberOfComponents(3)
    grid.GetPointData().SetScalars(scalars)
    direction = FLIP @ np.reshape(field.GetDirection(), (3, 3))
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, direction[r, c])
    transform = vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(matrix)
    transform.SetInterpolationModeToLinear()
    return transform


def markups_points_ras(node) -> np.ndarray:
    """Control point positions (N, 3) in the markups node's own RAS coordinates (not world), so a
    moving landmarks node placed under the registration transform still gives moving-space points."""
    points = np.zeros((node.GetNumberOfControlPoints(), 3))
    for index in range(len(points)):
        node.GetNthControlPointPosition(index, points[index])
    return points


def markups_labels(node) -> list[str]:
    return [node.GetNthControlPointLabel(i) for i in range(node.GetNumberOfControlPoints())]
