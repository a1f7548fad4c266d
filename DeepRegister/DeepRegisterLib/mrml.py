"""Bridge between MRML nodes (RAS) and SimpleITK images and transforms (LPS).

Slicer stores geometry in RAS; ITK files and DeepRegister's engine use LPS. Converting a point
or vector flips the sign of x and y: ``FLIP @ p``. Needs slicer-core (``import slicer``) but no Qt.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

FLIP = np.diag([-1.0, -1.0, 1.0])


class LogicError(ValueError):
    """Input the MRML logic (logic.py, display.py) cannot work with; the message is meant for the person
    at the console."""


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


def table_rows(table_node) -> list[list[str]]:
    """A table node as CSV rows (a header of column names, then values; NaN as an empty cell)."""
    table = table_node.GetTable() if table_node.IsA("vtkMRMLTableNode") else None
    if table is None or table.GetNumberOfColumns() == 0:
        raise LogicError(f"'{table_node.GetName()}' is not a TRE table; measure the TRE first.")
    columns = [table.GetColumn(index) for index in range(table.GetNumberOfColumns())]
    rows = [[column.GetName() for column in columns]]
    for row in range(table.GetNumberOfRows()):
        cells = []
        for column in columns:
            if column.IsA("vtkDataArray"):
                value = float(column.GetTuple1(row))
                cells.append("" if math.isnan(value) else repr(value))
            else:
                cells.append(str(column.GetValue(row)))
        rows.append(cells)
    return rows


def vtk_matrix(matrix: np.ndarray) -> vtk.vtkMatrix4x4:
    result = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            result.SetElement(r, c, float(matrix[r, c]))
    return result


def linear_transform_to_ras(transform: sitk.Transform | None, tolerance_mm: float = 1e-4) -> np.ndarray | None:
    """The 4x4 RAS matrix of a linear SimpleITK (LPS) transform, None when it is not linear (or None).

    The matrix is measured by mapping points, so any linear SimpleITK transform (translation,
    Euler, affine, composite of these) works; a non-linear one is detected at test points."""
    if transform is None:
        return None
    scale = 100.0  # mm: well conditioned for the translation and the matrix columns
    probes = np.vstack([np.zeros(3), scale * np.eye(3)])
    mapped = np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in probes])
    offset = mapped[0]
    linear = (mapped[1:] - offset).T / scale
    for point in np.array([[37.0, -52.0, 81.0], [-140.0, 95.0, -23.0], [260.0, 310.0, -190.0]]):
        if np.linalg.norm(np.asarray(transform.TransformPoint(tuple(point))) - (linear @ point + offset)) > tolerance_mm:
            return None
    ras = np.eye(4)
    ras[:3, :3] = FLIP @ linear @ FLIP
    ras[:3, 3] = FLIP @ offset
    return ras


def _reference_geometry(volume_node):
    """An oriented image (no voxels) with the volume's extent and IJK-to-RAS matrix."""
    from slicer import vtkOrientedImageData

    reference = vtkOrientedImageData()
    reference.SetExtent(volume_node.GetImageData().GetExtent())
    reference.SetGeometryFromImageToWorldMatrix(vtk_matrix(ijk_to_ras(volume_node)))
    return reference


def _transform_between(source_node, target_node):
    """The transform from ``source_node``'s coordinates to ``target_node``'s (None when they share
    their parent transform), as Slicer's Segmentations module computes it."""
    from slicer import vtkMRMLTransformNode

    source_parent, target_parent = source_node.GetParentTransformNode(), target_node.GetParentTransformNode()
    if source_parent is target_parent:
        return None
    transform = vtk.vtkGeneralTransform()
    vtkMRMLTransformNode.GetTransformBetweenNodes(source_parent, target_parent, transform)
    return transform


def mask_on_volume_grid(mask_node, volume_node) -> tuple[np.ndarray, bool]:
    """A mask node as a (Z, Y, X) uint8 0/1 array on the volume node's voxel grid, and whether it had to
    be resampled (nearest neighbour, in physical space, across parent transforms) to get there.

    ``mask_node``: a label map or scalar volume (nonzero = inside) or a segmentation (the union of all its
    segments, exported through its binary labelmap representation). Raises ValueError when the mask
    cannot be read (no image data, no segments, several components)."""
    from slicer import (vtkOrientedImageData, vtkOrientedImageDataResample, vtkSegmentation,
                        vtkSegmentationConverter, vtkSlicerSegmentationsModuleLogic)

    reference = _reference_geometry(volume_node)
    output = vtkOrientedImageData()
    if mask_node.IsA("vtkMRMLSegmentationNode"):
        segmentation = mask_node.GetSegmentation()
        if segmentation is None or segmentation.GetNumberOfSegments() == 0:
            raise ValueError(f"the segmentation '{mask_node.GetName()}' has no segments")
        if not segmentation.CreateRepresentation(vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()):
            raise ValueError(f"the segmentation '{mask_node.GetName()}' cannot be converted to a binary labelmap")
        # All segments (empty ID list), merged into one label image on the volume's geometry; the
        # transforms between the segmentation and the volume are followed.
        vtkSlicerSegmentationsModuleLogic.GenerateMergedLabelmapInReferenceGeometry(
            mask_node, volume_node, vtk.vtkStringArray(), vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, output)
        resampled = True
    else:
        image_data = mask_node.GetImageData() if mask_node.IsA("vtkMRMLScalarVolumeNode") else None
        if image_data is None or image_data.GetPointData().GetScalars() is None:
            raise ValueError(f"'{mask_node.GetName()}' holds no image data")
        if image_data.GetNumberOfScalarComponents() != 1:
            raise ValueError(f"'{mask_node.GetName()}' is a colour or vector volume, not a label map")
        mask = vtkOrientedImageData()
        mask.ShallowCopy(image_data)
        mask.SetGeometryFromImageToWorldMatrix(vtk_matrix(ijk_to_ras(mask_node)))
        transform = _transform_between(mask_node, volume_node)
        resampled = transform is not None or not (vtkOrientedImageDataResample.DoGeometriesMatch(mask, reference)
                                                  and vtkOrientedImageDataResample.DoExtentsMatch(mask, reference))
        if not vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(
                mask, reference, output, False, False, transform):
            raise ValueError(f"'{mask_node.GetName()}' could not be resampled onto the volume's grid")
    if tuple(output.GetExtent()) != tuple(reference.GetExtent()) or output.GetPointData().GetScalars() is None:
        raise ValueError(f"'{mask_node.GetName()}' could not be brought onto the volume's grid")
    dims = output.GetDimensions()
    array = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    return (array != 0).astype(np.uint8), resampled
