"""Image reading: a DICOM series folder reads as one 3D volume in physical space."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imageio import InputError, check_volume, read_image


def write_dicom_series(volume: sitk.Image, folder: Path) -> None:
    """Write ``volume`` (int16) as a CT-like DICOM series, one file per slice."""
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = volume.GetDirection()
    orientation = "\\".join(f"{v:.6f}" for v in (direction[0], direction[3], direction[6],
                                                     direction[1], direction[4], direction[7]))
    for z in range(volume.GetDepth()):
        slice_image = volume[:, :, z]
        position = volume.TransformIndexToPhysicalPoint((0, 0, z))
        for tag, value in {"0008|0060": "CT", "0020|000d": "1.2.826.0.1.3680043.2.1125.1",
                           "0020|000e": "1.2.826.0.1.3680043.2.1125.2", "0020|0037": orientation,
                           "0020|0032": "\\".join(f"{v:.6f}" for v in position), "0020|0013": str(z + 1),
                           "0018|0050": f"{volume.GetSpacing()[2]:.6f}",
                           "0008|0018": f"1.2.826.0.1.3680043.2.1125.3.{z + 1}"}.items():
            slice_image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(slice_image)


def test_dicom_folder_reads_as_volume(tmp_path: Path) -> None:
    array = (np.arange(12 * 10 * 8).reshape(8, 10, 12) % 251).astype(np.int16)
    volume = sitk.GetImageFromArray(array)
    volume.SetSpacing((0.8, 0.9, 2.5))
    volume.SetOrigin((-20.0, 15.0, 40.0))
    write_dicom_series(volume, tmp_path)
    loaded = read_image(tmp_path)
    assert loaded.GetSize() == volume.GetSize()
    np.testing.assert_allclose(loaded.GetSpacing(), volume.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(loaded.GetOrigin(), volume.GetOrigin(), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), array)
    assert check_volume(loaded, "fixed").GetPixelID() == sitk.sitkFloat32


def test_folder_without_dicom_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no DICOM series"):
        read_image(tmp_path)
