"""Reading and checking images and writing transforms, with SimpleITK.

Everything read here stays in physical space (LPS mm, with spacing, origin and direction).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk


class InputError(ValueError):
    """An input image or file cannot be registered; the message says why and what to do."""


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read any image SimpleITK reads; a folder is read as a DICOM series (the largest one)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path} does not exist.")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            series = reader.GetGDCMSeriesIDs(str(path))
            if not series:
                raise InputError(f"Folder {path} holds no DICOM series.")
            files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
            reader.SetFileNames(files)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        message = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown format"
        raise InputError(f"Cannot read image {path}: {message}") from None


def check_volume(image: sitk.Image, role: str) -> sitk.Image:
    """Check that ``image`` is a registrable 3D scalar volume; return it as float32.

    ``role`` ("fixed", "moving") names the image in error messages.
    """
    dimension = image.GetDimension()
    if dimension == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
        dimension = 3
    if dimension != 3:
        kind = "a 2D image" if dimension == 2 else f"a {dimension}D image (e.g. a time series)"
        raise InputError(f"The {role} image is {kind}; DeepRegister registers single 3D volumes. "
                         "Extract one 3D volume first.")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {role} image has {image.GetNumberOfComponentsPerPixel()} components per voxel "
                         "(colour or vector data); convert it to a single-component scalar volume.")
    if min(image.GetSize()) < 4:
        raise InputError(f"The {role} image is {image.GetSize()} voxels: it needs at least 4 voxels "
                         "along each axis to be a 3D volume.")
    array = sitk.GetArrayViewFromImage(image)
    if not np.isfinite(array).all():
        raise InputError(f"The {role} image contains NaN or infinite voxel values; fix or mask them first.")
    if array.min() == array.max():
        raise InputError(f"The {role} image is empty or constant (every voxel is {array.min()}); "
                         "there is nothing to register.")
    spacing = np.asarray(image.GetSpacing())
    if not (np.all(spacing > 0) and abs(np.linalg.det(np.reshape(image.GetDirection(), (3, 3)))) > 1e-6):
        raise InputError(f"The {role} image has invalid geometry (spacing {tuple(spacing)} or a singular "
                         "direction matrix).")
    return sitk.Cast(image, sitk.sitkFloat32)


def image_center(image: sitk.Image) -> np.ndarray:
    """Physical position (mm, LPS) of the image's centre (the centre of its voxel-centre box)."""
    index_to_physical = np.reshape(image.GetDirection(), (3, 3)) * np.asarray(image.GetSpacing())
    return np.asarray(image.GetOrigin()) + index_to_physical @ ((np.asarray(image.GetSize()) - 1) / 2.0)


def center_alignment(fixed: sitk.Image, moving: sitk.Image) -> sitk.TranslationTransform:
    """The fixed->moving translation that makes the two image centres coincide (mm, LPS)."""
    return sitk.TranslationTransform(3, (image_center(moving) - image_center(fixed)).tolist())


def physical_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned physical bounding box (min, max corners, mm) of the image's voxel centres."""
    size = np.asarray(image.GetSize()) - 1
    corners = [image.TransformContinuousIndexToPhysicalPoint((size * np.array(c)).tolist())
               for c in np.ndindex(2, 2, 2)]
    corners = np.asarray(corners)
    return corners.min(axis=0), corners.max(axis=0)


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> None:
    """Write a transform (.h5, .tfm, ...) that ITK, SimpleITK and Slicer read."""
    sitk.WriteTransform(transform, str(path))
