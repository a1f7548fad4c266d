"""Registration quality: Dice per label and folding of a transform (TRE lives in landmarks)."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from . import spatial
from .spatial import Grid


def label_channels(label: sitk.Image) -> dict[str, np.ndarray]:
    """Binary masks (Z, Y, X) per label: channels of a 4D image (DeepReg layout, > 0.5) or the
    non-zero values of an integer 3D label map."""
    if label.GetDimension() == 4:
        return {f"channel {c}": sitk.GetArrayFromImage(label[:, :, :, c]) > 0.5 for c in range(label.GetSize()[3])}
    array = sitk.GetArrayFromImage(label)
    return {f"label {int(v)}": array == v for v in np.unique(array) if v != 0}


def _as_3d_images(label: sitk.Image) -> list[sitk.Image]:
    if label.GetDimension() == 4:
        return [sitk.Cast(label[:, :, :, c], sitk.sitkFloat32) for c in range(label.GetSize()[3])]
    return [label]


def warp_labels(moving_label: sitk.Image, fixed_label: sitk.Image, transform: sitk.Transform) -> sitk.Image:
    """Resample a moving label image onto the fixed label's grid through a fixed->moving transform:
    channels linearly (then thresholded by :func:`label_channels`), label maps by nearest neighbour."""
    reference = _as_3d_images(fixed_label)[0]
    if moving_label.GetDimension() == 4:
        channels = [sitk.Resample(c, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
                    for c in _as_3d_images(moving_label)]
        return sitk.JoinSeries(channels)
    return sitk.Resample(moving_label, reference, transform, sitk.sitkNearestNeighbor, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def dice_per_label(fixed_label: sitk.Image, moving_label: sitk.Image,
                   transform: sitk.Transform | None = None) -> dict[str, float]:
    """Dice between the fixed labels and the moving labels taken through ``transform``
    (identity if None); labels are matched by channel or by value."""
    warped = warp_labels(moving_label, fixed_label, transform or sitk.Transform(3, sitk.sitkIdentity))
    fixed_masks = label_channels(fixed_label)
    moving_masks = label_channels(warped)
    return {name: dice(mask, moving_masks.get(name, np.zeros_like(mask))) for name, mask in fixed_masks.items()}


def transform_folding_percent(transform: sitk.Transform, reference: sitk.Image) -> float:
    """Percentage of ``reference`` voxels where the transform's Jacobian determinant is <= 0."""
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, reference.GetSize(),
                                              reference.GetOrigin(), reference.GetSpacing(),
                                              reference.GetDirection())
    return spatial.folding_percent(spatial.sitk_to_displacement(field), Grid.from_image(field))
