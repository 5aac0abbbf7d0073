"""Reading through SimpleITK with the reader named by the file ending equals SimpleITK's own choice of reader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsnake.errors import ImageReadError
from nnsnake.imageio import SITK_IMAGE_IO, read_file


def _image() -> sitk.Image:
    array = np.random.default_rng(0).normal(size=(5, 7, 9)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 1.3, 2.9))
    image.SetOrigin((10.0, -4.0, 2.5))
    image.SetDirection((0.0, 1.0, 0.0, -1.0, 0.0, 0.0, 0.0, 0.0, 1.0))
    return image


def test_every_named_reader_is_registered() -> None:
    registered = set(sitk.ImageFileReader().GetRegisteredImageIOs())
    assert set(SITK_IMAGE_IO.values()) <= registered


@pytest.mark.parametrize("ending", sorted(SITK_IMAGE_IO))
def test_named_reader_reads_what_sitk_reads(tmp_path: Path, ending: str) -> None:
    path = tmp_path / f"case_0000{ending}"
    sitk.WriteImage(_image(), str(path))
    expected = sitk.ReadImage(str(path))  # SimpleITK's factory picks the reader
    array, properties = read_file(path)
    assert np.array_equal(array[0], sitk.GetArrayFromImage(expected))
    assert properties["sitk_stuff"] == {
        "spacing": list(expected.GetSpacing()),
        "origin": list(expected.GetOrigin()),
        "direction": list(expected.GetDirection()),
    }
    assert properties["spacing"] == pytest.approx([2.9, 1.3, 0.7])


def test_a_file_whose_content_does_not_match_its_ending_is_named(tmp_path: Path) -> None:
    nifti = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_image(), str(nifti))
    misnamed = tmp_path / "case_0000.nrrd"
    misnamed.write_bytes(nifti.read_bytes())
    with pytest.raises(ImageReadError, match=r"case_0000\.nrrd: cannot be read by SimpleITK"):
        read_file(misnamed)
    corrupt = tmp_path / "broken_0000.nii.gz"
    corrupt.write_bytes(nifti.read_bytes()[:100])
    with pytest.raises(ImageReadError, match=r"broken_0000\.nii\.gz: cannot be read by SimpleITK"):
        read_file(corrupt)
