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
    with pytest.raises(ImageReadError, match=r"broken_0000\.nii\.gz: gzip data ends too early"):
        read_file(corrupt)


def _assert_reads_like_sitk(path: Path) -> dict:
    expected = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
    array, properties = read_file(path)
    reference = sitk.GetArrayFromImage(expected)
    if reference.ndim == 2:
        reference = reference[None]  # a 2D image is read as one slice
    assert array[0].dtype == reference.dtype and array[0].shape == reference.shape
    assert np.array_equal(array[0], reference)
    assert array.flags.writeable
    assert properties["sitk_stuff"] == {
        "spacing": list(expected.GetSpacing()),
        "origin": list(expected.GetOrigin()),
        "direction": list(expected.GetDirection()),
    }
    return properties


# voxel types, byte orders and shapes a NIfTI file can have; each is read directly (numpy voxels, ITK header)
NIFTI_CASES = {
    "uint8": (np.uint8, "<", (4, 5, 6)),
    "int8": (np.int8, "<", (4, 5, 6)),
    "uint16": (np.uint16, "<", (4, 5, 6)),
    "int16 big-endian": (np.int16, ">", (4, 5, 6)),
    "uint32": (np.uint32, "<", (4, 5, 6)),
    "int32": (np.int32, "<", (4, 5, 6)),
    "int64": (np.int64, "<", (4, 5, 6)),
    "float32 big-endian": (np.float32, ">", (4, 5, 6)),
    "float64": (np.float64, "<", (4, 5, 6)),
    "2d": (np.float32, "<", (7, 9)),
    "one slice": (np.int16, "<", (7, 9, 1)),
    "4d with one volume": (np.float32, "<", (4, 5, 6, 1)),
}


@pytest.mark.parametrize("ending", [".nii.gz", ".nii"])
@pytest.mark.parametrize("case", sorted(NIFTI_CASES))
def test_nifti_voxels_read_directly_equal_sitk(tmp_path: Path, case: str, ending: str) -> None:
    """The direct NIfTI path (zlib-ng inflates once, ITK reads only the header) gives SimpleITK's array, type and
    geometry, for every scalar type, both byte orders, 2D, one-slice and singleton-4D files, and a rotated,
    shifted affine."""
    import gzip

    import nibabel

    dtype, order, shape = NIFTI_CASES[case]
    voxels = (np.random.default_rng(1).normal(size=shape) * 50).astype(np.dtype(dtype).newbyteorder(order))
    affine = np.array([[0.0, -1.3, 0.0, 12.5], [0.7, 0.0, 0.0, -3.0], [0.0, 0.0, 2.9, 40.0], [0, 0, 0, 1]])
    header = nibabel.Nifti1Header(endianness=order)  # the file's byte order, header included
    header.set_data_dtype(voxels.dtype)
    image = nibabel.Nifti1Image(voxels, affine, header=header)
    path = tmp_path / f"case_0000{ending}"
    nibabel.save(image, path)
    stored = gzip.decompress(path.read_bytes()) if ending == ".nii.gz" else path.read_bytes()
    assert int.from_bytes(stored[:4], "little" if order == "<" else "big") == 348
    properties = _assert_reads_like_sitk(path)
    assert properties["nonfinite_voxels"] == [0, 0]  # the direct path took it


def test_nifti_files_the_direct_path_declines_are_read_by_sitk(tmp_path: Path) -> None:
    """Scaled intensities (ITK returns float) and vector voxels go to SimpleITK, with its result and errors."""
    import nibabel

    voxels = np.arange(120, dtype=np.int16).reshape(4, 5, 6)
    scaled = nibabel.Nifti1Image(voxels, np.eye(4))
    scaled.header.set_slope_inter(2.0, 1.0)
    nibabel.save(scaled, tmp_path / "scaled_0000.nii.gz")
    properties = _assert_reads_like_sitk(tmp_path / "scaled_0000.nii.gz")
    assert "nonfinite_voxels" not in properties
    vector = sitk.GetImageFromArray(np.zeros((4, 5, 6, 3), np.float32), isVector=True)
    sitk.WriteImage(vector, str(tmp_path / "vector_0000.nii.gz"))
    with pytest.raises(ImageReadError, match="3 components per voxel"):
        read_file(tmp_path / "vector_0000.nii.gz")


def test_direct_nifti_read_counts_non_finite_voxels_and_zeroes_them_like_sitk(tmp_path: Path) -> None:
    import nibabel

    voxels = np.ones((4, 5, 6), np.float32)
    voxels[0, 0, :3] = np.nan
    voxels[1, 1, 1] = -np.inf
    path = tmp_path / "case_0000.nii.gz"
    nibabel.save(nibabel.Nifti1Image(voxels, np.eye(4)), path)
    properties = _assert_reads_like_sitk(path)  # ITK reads NaN/inf as 0; so does the direct path
    assert properties["nonfinite_voxels"] == [3, 1]


def test_a_multi_member_gzip_nifti_is_read_whole(tmp_path: Path) -> None:
    """gzip allows several members one after another (concatenated .gz files); all of them are the file."""
    import gzip

    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_image(), str(path))
    content = gzip.decompress(path.read_bytes())
    half = len(content) // 2
    path.write_bytes(gzip.compress(content[:half]) + gzip.compress(content[half:]))
    assert _assert_reads_like_sitk(path)["nonfinite_voxels"] == [0, 0]


def test_damaged_gzip_is_an_error_not_zero_filled_voxels(tmp_path: Path) -> None:
    """ITK reads a truncated .nii.gz without complaint and fills the missing voxels with 0; here it is an error
    naming the file. A plain NIfTI file named .nii.gz (no gzip at all) is read as it is, as ITK does."""
    import gzip

    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_image(), str(path))
    truncated = tmp_path / "truncated_0000.nii.gz"
    truncated.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert (sitk.GetArrayFromImage(sitk.ReadImage(str(truncated))) == 0).any()  # what ITK alone would give
    with pytest.raises(ImageReadError, match=r"truncated_0000\.nii\.gz: gzip data ends too early"):
        read_file(truncated)
    damaged = bytearray(path.read_bytes())
    damaged[-8] ^= 0xFF  # the CRC
    (tmp_path / "damaged_0000.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(ImageReadError, match=r"damaged_0000\.nii\.gz: corrupt gzip data"):
        read_file(tmp_path / "damaged_0000.nii.gz")
    short = gzip.decompress(path.read_bytes())[
        :-40
    ]  # complete gzip data, but fewer voxels than the header says
    for name, content in {"short_0000.nii.gz": gzip.compress(short), "short_0000.nii": short}.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.") + ": holds 1220 bytes of voxels"):
            read_file(tmp_path / name)
    plain = tmp_path / "plain_0000.nii.gz"
    plain.write_bytes(gzip.decompress(path.read_bytes()))
    assert "nonfinite_voxels" not in _assert_reads_like_sitk(plain)


def test_nifti_header_files_are_not_left_behind(tmp_path: Path) -> None:
    from nnsnake.imageio import _scratch_dir

    path = tmp_path / "case_0000.nii.gz"
    sitk.WriteImage(_image(), str(path))
    before = set(Path(_scratch_dir()).glob("nnsnake-header-*"))
    read_file(path)
    assert set(Path(_scratch_dir()).glob("nnsnake-header-*")) == before
