"""Masks: which voxels of an image hold data worth comparing.

A mask is a SimpleITK UInt8 image on the same grid as its image, 1 inside, 0 outside. The
user may give one (any label image; nonzero = inside); for ultrasound, whose field of view
(a fan or cone) is surrounded by empty voxels, :func:`detect_field_of_view` finds it.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from .imageio import InputError, image_center
from .spatial import Grid

MIN_EMPTY_FRACTION = 0.1  # an empty border region smaller than this is not taken for a field of view
FOV_MARGIN_MM = 2.0  # the detected field of view is eroded by this much: its edge is no anatomy


def check_mask(mask: sitk.Image, image: sitk.Image, role: str) -> sitk.Image:
    """``mask`` as UInt8 0/1 on ``image``'s grid; InputError when it is not a 3D scalar image on the
    same grid (size, spacing, origin, direction) or holds no voxel inside."""
    if mask.GetDimension() == 4 and mask.GetSize()[3] == 1:
        mask = mask[:, :, :, 0]
    if mask.GetDimension() != 3 or mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"The {role} mask must be a 3D label image (one value per voxel).")
    mine, theirs = Grid.from_image(mask), Grid.from_image(image)
    tolerance = 1e-4 * max(theirs.spacing)
    same = (mine.size == theirs.size and np.allclose(mine.spacing, theirs.spacing, atol=tolerance)
            and np.allclose(mine.origin, theirs.origin, atol=tolerance)
            and np.allclose(mine.direction, theirs.direction, atol=1e-6))
    if not same:
        raise InputError(f"The {role} mask is not on the {role} image's grid (mask {mine.size} voxels of "
                         f"{tuple(round(s, 4) for s in mine.spacing)} mm at {tuple(round(o, 2) for o in mine.origin)}; "
                         f"image {theirs.size} of {tuple(round(s, 4) for s in theirs.spacing)} mm at "
                         f"{tuple(round(o, 2) for o in theirs.origin)}). Resample it onto the {role} image first.")
    array = sitk.GetArrayViewFromImage(mask)
    if not np.isfinite(array).all():
        raise InputError(f"The {role} mask contains NaN or infinite values.")
    binary = (array != 0).astype(np.uint8)
    if not binary.any():
        raise InputError(f"The {role} mask is empty (no nonzero voxel): nothing would be compared.")
    result = sitk.GetImageFromArray(binary)
    result.CopyInformation(image)
    return result


def detect_field_of_view(image: sitk.Image) -> sitk.Image | None:
    """The region of an image that holds data, when the rest is a constant value connected to
    the volume border (an ultrasound fan or cone, a cropped or padded scan); None when that
    constant region is less than MIN_EMPTY_FRACTION of the volume. The region found is eroded by
    FOV_MARGIN_MM so its edge is not compared."""
    array = sitk.GetArrayViewFromImage(image)
    border = np.concatenate([array[[0, -1]].ravel(), array[:, [0, -1]].ravel(), array[:, :, [0, -1]].ravel()])
    values, counts = np.unique(border, return_counts=True)
    background = values[np.argmax(counts)]
    constant = sitk.GetImageFromArray((array == background).astype(np.uint8))
    constant.CopyInformation(image)
    components = sitk.GetArrayFromImage(sitk.ConnectedComponent(constant, True))
    touching = np.unique(np.concatenate([components[[0, -1]].ravel(), components[:, [0, -1]].ravel(),
                                         components[:, :, [0, -1]].ravel()]))
    empty = np.isin(components, touching[touching > 0])
    if empty.mean() < MIN_EMPTY_FRACTION:
        return None
    inside = sitk.GetImageFromArray((~empty).astype(np.uint8))
    inside.CopyInformation(image)
    radius = [max(0, int(round(FOV_MARGIN_MM / s))) for s in image.GetSpacing()]
    if any(radius):
        inside = sitk.BinaryErode(inside, radius, sitk.sitkBall, 0, 1, False)
    if not sitk.GetArrayViewFromImage(inside).any():
        return None
    return inside


def foreground_center(image: sitk.Image, mask: sitk.Image | None) -> np.ndarray:
    """Physical centre (mm, LPS) of the mask's voxels, or of the image when there is no mask."""
    if mask is None:
        return image_center(image)
    inside = sitk.GetArrayViewFromImage(mask) > 0
    count = np.count_nonzero(inside)
    index = [float(np.arange(inside.shape[axis]) @ inside.sum(axis=tuple(a for a in range(3) if a != axis))) / count
             for axis in (2, 1, 0)]  # x, y, z: the mean index, from each axis's projection
    return np.asarray(image.TransformContinuousIndexToPhysicalPoint(index))


def resolve_masks(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None,
                  moving_mask: sitk.Image | None, detect_fov: bool, messages: list[str]
                  ) -> tuple[sitk.Image | None, sitk.Image | None]:
    """The masks registration uses: the given ones (checked), else the detected fields of view
    when ``detect_fov``; each detection is reported in ``messages``."""
    masks = []
    for role, image, mask in (("fixed", fixed, fixed_mask), ("moving", moving, moving_mask)):
        if mask is not None:
            masks.append(check_mask(mask, image, role))
            continue
        found = detect_field_of_view(image) if detect_fov else None
        if found is not None:
            fraction = float(sitk.GetArrayViewFromImage(found).mean())
            messages.append(f"The {role} image's field of view was detected ({fraction:.0%} of its volume) "
                            "and used as its mask.")
        masks.append(found)
    return masks[0], masks[1]
