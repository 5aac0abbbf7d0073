"""Reading and writing images with their full geometry.

Axis conventions follow nnU-Net v2 so that plans and preprocessed arrays are comparable:

* volumes read through SimpleITK (``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha``, ``.gipl``) come back in numpy
  order ``(z, y, x)`` with the spacing reversed to match; a 2D SimpleITK image becomes ``(1, y, x)`` with a
  dummy slice spacing of ``999 * max(spacing)``;
* natural 2D images (``.png``, ``.bmp``, 2D ``.tif``) come back as ``(1, H, W)`` with spacing
  ``(999, 1, 1)``; RGB(A) files give 3 or 4 channels;
* 3D ``.tif`` stacks read their spacing from a sidecar ``<case>.json`` (``{"spacing": [...]}``), else 1.

``read_images`` stacks one file per channel into ``(C, *spatial)`` float32. The returned ``properties`` dict
holds ``spacing`` (reader axis order) and, for SimpleITK files, ``sitk_stuff`` (spacing, origin, direction in
SimpleITK's own order) which :func:`write_seg` reuses so a prediction lands in the input's exact geometry.
"""

from __future__ import annotations

import functools
import math
import os
import struct
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ImageReadError

# the ITK reader of each ending: naming it skips the factory's trial of every reader (about 0.3 ms of the 2.2 ms
# that reading a small Hippocampus .nii.gz takes: verify reads every training file once, preprocessing again)
SITK_IMAGE_IO = {
    ".nii.gz": "NiftiImageIO",
    ".nii": "NiftiImageIO",
    ".nrrd": "NrrdImageIO",
    ".mha": "MetaImageIO",
    ".gipl": "GiplImageIO",
}
SITK_ENDINGS = tuple(SITK_IMAGE_IO)
NATURAL_2D_ENDINGS = (".png", ".bmp")
TIFF_ENDINGS = (".tif", ".tiff")
SUPPORTED_ENDINGS = SITK_ENDINGS + NATURAL_2D_ENDINGS + TIFF_ENDINGS
LOSSY_ENDINGS = (".jpg", ".jpeg")

NATURAL_2D_SPACING = [999.0, 1.0, 1.0]


def _read_sitk(path: Path, ending: str) -> tuple[np.ndarray, dict[str, Any]]:
    """``path``, whose ending (one of ``SITK_ENDINGS``, from :func:`_ending_of`) names the ITK reader.

    A plain NIfTI-1 file (one scalar per voxel, no intensity scaling) takes :func:`_read_nifti_directly`; every
    other file, and any NIfTI file that path declines, is read by SimpleITK alone. Both give the same array and
    geometry; the direct path also reports ``nonfinite_voxels`` ([NaN, inf] counts), which ITK's NIfTI reader
    hides by reading them as 0.
    """
    direct = _read_nifti_directly(path, ending) if ending in (".nii", ".nii.gz") else None
    array, sitk_stuff, nonfinite = direct if direct is not None else _read_whole_with_sitk(path, ending)
    spacing_sitk = sitk_stuff["spacing"]
    if array.ndim == 2:
        array = array[None]
        spacing = [999.0 * max(spacing_sitk)] + [abs(s) for s in spacing_sitk[::-1]]
    elif array.ndim == 3:
        spacing = [abs(s) for s in spacing_sitk[::-1]]
    else:
        raise ImageReadError(f"{path}: {array.ndim}D images are not supported (expected 2D or 3D)")
    properties: dict[str, Any] = {"spacing": spacing, "sitk_stuff": sitk_stuff}
    if nonfinite is not None:
        properties["nonfinite_voxels"] = nonfinite
    return array, properties


def _geometry(image: Any) -> dict[str, list[float]]:
    """Spacing, origin and direction in SimpleITK's order, of an image or of a reader that read its header."""
    return {
        "spacing": list(image.GetSpacing()),
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }


def _read_whole_with_sitk(path: Path, ending: str) -> tuple[np.ndarray, dict[str, list[float]], None]:
    import SimpleITK as sitk  # here, not at module level: jobs that only plan or split need no image library

    try:
        image = sitk.ReadImage(str(path), imageIO=SITK_IMAGE_IO[ending])
    except RuntimeError as exc:  # SimpleITK raises RuntimeError for corrupt/unknown files
        raise ImageReadError(
            f"{path}: cannot be read by SimpleITK ({str(exc).strip().splitlines()[-1]})"
        ) from exc
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise ImageReadError(
            f"{path}: has {image.GetNumberOfComponentsPerPixel()} components per voxel; store one file per channel "
            "(<case>_0000, <case>_0001, ...)"
        )
    return sitk.GetArrayFromImage(image), _geometry(image), None


# NIfTI-1 header fields read here (byte offset, struct format): the rest is ITK's to interpret
_NIFTI1_SIZEOF_HDR = 348
_NIFTI1_FIELDS = {
    "datatype": (70, "h"),
    "vox_offset": (108, "f"),
    "scl_slope": (112, "f"),
    "scl_inter": (116, "f"),
}
_NIFTI1_SINGLE_FILE_MAGIC = (344, b"n+1\0")
# NIfTI-1 datatype code -> voxel type (the scalar types; complex and RGB files go through ITK)
_NIFTI1_DTYPES = {
    2: "u1",
    4: "i2",
    8: "i4",
    16: "f4",
    64: "f8",
    256: "i1",
    512: "u2",
    768: "u4",
    1024: "i8",
    1280: "u8",
}


_GZIP_MAGIC = b"\x1f\x8b"


def _inflate(path: Path, compressed: bytes) -> bytes | None:
    """A gzip file's content (every member); None when it is not gzip at all (ITK reads such a file as it is).

    Truncated or damaged gzip data raises :class:`ImageReadError`: ITK's reader would fill the missing voxels
    with zeros without a word. zlib-ng inflates 2x (noisy images) to 5x (label maps) faster than Python's zlib.
    """
    from zlib_ng import zlib_ng

    if not compressed.startswith(_GZIP_MAGIC):
        return None
    parts = []
    while compressed:
        inflater = zlib_ng.decompressobj(wbits=31)
        try:
            parts.append(inflater.decompress(compressed))
        except zlib_ng.error as exc:  # type: ignore[misc]  # its stub types error as an instance
            raise ImageReadError(
                f"{path}: corrupt gzip data ({exc}); re-export or replace the file"
            ) from None
        if not inflater.eof:
            raise ImageReadError(
                f"{path}: gzip data ends too early (truncated file); re-export or replace it"
            )
        compressed = inflater.unused_data.lstrip(b"\0")  # members may follow, and padding
    return b"".join(parts)


def _read_nifti_directly(
    path: Path, ending: str
) -> tuple[np.ndarray, dict[str, list[float]], list[int]] | None:
    """A plain NIfTI-1 file read with ITK's geometry and numpy's voxels, or None to let SimpleITK read it.

    ITK reads a ``.nii.gz`` slowly: 3.5 ms for a 250 KB Hippocampus image (1.5 ms of it for the header alone),
    where zlib-ng inflates the whole file in 0.3 ms. Here the file is inflated once, ITK reads only the header
    (copied to a small temporary file, so the geometry is ITK's own, qform/sform rules included) and the voxels
    come straight from the bytes: 1.2 ms. Verify and preprocessing each read every training file.

    Only the simple case is taken: a single-file NIfTI-1 (``n+1``) with one scalar per voxel of the type ITK
    reports and no intensity scaling. Anything else returns None, except damaged gzip data, which raises
    (:func:`_inflate`). Non-finite voxels are counted, then set to 0 as ITK's reader does.
    """
    import SimpleITK as sitk

    if ending == ".nii.gz":
        content = _inflate(path, path.read_bytes())
        if content is None:
            return None
    else:
        with open(path, "rb") as fh:
            content = fh.read(_NIFTI1_SIZEOF_HDR + 4)
    header = _nifti1_header(content)
    if header is None:
        return None
    dtype, vox_offset = header
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NiftiImageIO")
    if ending == ".nii.gz":
        fd, header_file = tempfile.mkstemp(prefix="nnsnake-header-", suffix=".nii", dir=_scratch_dir())
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(content[:vox_offset])
            reader.SetFileName(header_file)
            reader.ReadImageInformation()
        except RuntimeError:
            return None
        finally:
            os.unlink(header_file)
    else:
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            return None
    if reader.GetNumberOfComponents() != 1 or reader.GetPixelID() != _sitk_pixel_ids().get(
        dtype.newbyteorder("=")
    ):
        return None
    shape = tuple(reversed(reader.GetSize()))
    count = math.prod(shape)
    stored = len(content) if ending == ".nii.gz" else path.stat().st_size
    if stored < vox_offset + count * dtype.itemsize:
        raise ImageReadError(
            f"{path}: holds {max(0, stored - vox_offset)} bytes of voxels where its header describes "
            f"{count * dtype.itemsize} (size {list(reader.GetSize())}, {dtype.name}); re-export or replace it"
        )
    if ending == ".nii.gz":
        voxels = np.frombuffer(content, dtype=dtype, count=count, offset=vox_offset)
    else:
        voxels = np.fromfile(path, dtype=dtype, count=count, offset=vox_offset)
    array = voxels.reshape(shape).astype(dtype.newbyteorder("="), copy=True)  # writable, native byte order
    nonfinite = [0, 0]
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        nan, inf = np.isnan(array), np.isinf(array)
        nonfinite = [int(nan.sum()), int(inf.sum())]
        array[nan | inf] = 0
    return array, _geometry(reader), nonfinite


def _nifti1_header(content: bytes) -> tuple[np.dtype, int] | None:
    """Voxel type (file byte order) and data offset of a single-file NIfTI-1 header without intensity
    scaling; None for anything else."""
    if len(content) < _NIFTI1_SIZEOF_HDR + 4:
        return None
    for order in "<>":
        if struct.unpack_from(f"{order}i", content, 0)[0] == _NIFTI1_SIZEOF_HDR:
            break
    else:
        return None  # NIfTI-2, Analyze or not a header at all
    offset, magic = _NIFTI1_SINGLE_FILE_MAGIC
    if content[offset : offset + len(magic)] != magic:
        return None
    fields = {
        name: struct.unpack_from(order + code, content, at)[0] for name, (at, code) in _NIFTI1_FIELDS.items()
    }
    code = _NIFTI1_DTYPES.get(fields["datatype"])
    slope, inter = fields["scl_slope"], fields["scl_inter"]
    unscaled = (slope in (0.0, 1.0) or math.isnan(slope)) and (inter == 0.0 or math.isnan(inter))
    vox_offset = fields["vox_offset"]
    if code is None or not unscaled or vox_offset != int(vox_offset) or vox_offset < _NIFTI1_SIZEOF_HDR + 4:
        return None
    return np.dtype(order + code), int(vox_offset)


@functools.cache
def _scratch_dir() -> str:
    """Where the NIfTI headers go for ITK: RAM-backed /dev/shm when there is one, else the temporary folder."""
    return "/dev/shm" if os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


@functools.cache
def _sitk_pixel_ids() -> dict[np.dtype, int]:
    """SimpleITK's pixel id of each scalar voxel type (native byte order)."""
    import SimpleITK as sitk

    names = {
        "u1": "sitkUInt8",
        "i1": "sitkInt8",
        "u2": "sitkUInt16",
        "i2": "sitkInt16",
        "u4": "sitkUInt32",
        "i4": "sitkInt32",
        "u8": "sitkUInt64",
        "i8": "sitkInt64",
        "f4": "sitkFloat32",
        "f8": "sitkFloat64",
    }
    return {np.dtype(code): getattr(sitk, name) for code, name in names.items()}


def _read_natural_2d(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img.load()
            array = np.asarray(img)
    except (OSError, UnidentifiedImageError) as exc:
        raise ImageReadError(f"{path}: cannot be read as an image ({exc})") from exc
    if array.ndim == 3:
        if array.shape[-1] not in (3, 4):
            raise ImageReadError(f"{path}: expected a grey, RGB or RGBA image, got shape {array.shape}")
        array = np.moveaxis(array, -1, 0)[:, None]
    elif array.ndim == 2:
        array = array[None, None]
    else:
        raise ImageReadError(f"{path}: unexpected image shape {array.shape}")
    return array, {"spacing": list(NATURAL_2D_SPACING)}


def _read_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import json

    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as exc:  # tifffile raises many exception types for broken files
        raise ImageReadError(f"{path}: cannot be read as TIFF ({exc})") from exc
    if array.ndim == 2:
        return array[None, None], {"spacing": list(NATURAL_2D_SPACING)}
    if array.ndim == 3:
        case_name = path.name[: -len(_ending_of(path))]
        # channel files are <case>_XXXX.tif; the sidecar belongs to the case
        stem = (
            case_name[:-5]
            if len(case_name) > 5 and case_name[-5] == "_" and case_name[-4:].isdigit()
            else case_name
        )
        sidecar = path.with_name(stem + ".json")
        spacing = [1.0, 1.0, 1.0]
        if sidecar.exists():
            spacing = [float(s) for s in json.loads(sidecar.read_text())["spacing"]]
        return array[None], {"spacing": spacing}
    raise ImageReadError(f"{path}: unexpected TIFF shape {array.shape}")


def _ending_of(path: Path) -> str:
    name = path.name.lower()
    for ending in SUPPORTED_ENDINGS + LOSSY_ENDINGS:
        if name.endswith(ending):
            return ending
    return path.suffix.lower()


def read_file(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read one file as ``(channels, *spatial)`` (channels is 1 except for RGB(A) images) plus properties."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file does not exist")
    ending = _ending_of(path)
    if ending in SITK_ENDINGS:
        array, props = _read_sitk(path, ending)
        return array[None], props
    if ending in NATURAL_2D_ENDINGS:
        return _read_natural_2d(path)
    if ending in TIFF_ENDINGS:
        return _read_tiff(path)
    raise ImageReadError(
        f"{path}: file ending {ending!r} is not supported; use one of {', '.join(SUPPORTED_ENDINGS)}"
    )


def read_images(paths: Sequence[str | os.PathLike]) -> tuple[np.ndarray, dict[str, Any]]:
    """Read the channel files of one case into a float32 ``(C, *spatial)`` array.

    All channels must share shape and spacing; otherwise an :class:`ImageReadError` names the files.
    """
    if not paths:
        raise ImageReadError("no image files given")
    arrays, props_list = [], []
    for p in paths:
        array, props = read_file(p)
        arrays.append(array)
        props_list.append(props)
    first = arrays[0]
    for p, a, pr in zip(paths[1:], arrays[1:], props_list[1:], strict=True):
        if a.shape[1:] != first.shape[1:]:
            raise ImageReadError(
                f"{p}: shape {list(a.shape[1:])} differs from {paths[0]} {list(first.shape[1:])}; all channels "
                "of a case must have the same shape"
            )
        if not np.allclose(pr["spacing"], props_list[0]["spacing"]):
            raise ImageReadError(
                f"{p}: spacing {pr['spacing']} differs from {paths[0]} {props_list[0]['spacing']}; all channels "
                "of a case must have the same spacing"
            )
    data = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
    return data, props_list[0]


def read_seg(path: str | os.PathLike) -> tuple[np.ndarray, dict[str, Any]]:
    """Read a label map as ``(1, *spatial)`` in its stored dtype, plus properties."""
    array, props = read_file(path)
    if array.shape[0] != 1:
        raise ImageReadError(f"{path}: a segmentation must have one channel, found {array.shape[0]}")
    return array, props


def seg_dtype(max_label: int) -> type:
    return np.uint8 if max_label < 255 else np.uint16


def write_seg(seg: np.ndarray, path: str | os.PathLike, properties: dict[str, Any]) -> None:
    """Write a label map (spatial array in reader axis order) with the geometry recorded in ``properties``.

    The file is written under a temporary name and renamed, so readers never see half a file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ending = _ending_of(path)
    seg = np.asarray(seg)
    seg = seg.astype(seg_dtype(int(seg.max()) if seg.size else 0), copy=False)
    tmp = path.with_name(f".{path.name}.tmp{ending}")
    try:
        if ending in SITK_ENDINGS:
            import SimpleITK as sitk

            stuff = properties.get("sitk_stuff")
            if seg.ndim == 3 and seg.shape[0] == 1 and stuff is not None and len(stuff["spacing"]) == 2:
                seg = seg[0]
            image = sitk.GetImageFromArray(seg)
            if stuff is not None:
                image.SetSpacing(stuff["spacing"])
                image.SetOrigin(stuff["origin"])
                image.SetDirection(stuff["direction"])
            else:
                image.SetSpacing([float(s) for s in properties["spacing"][::-1]])
            sitk.WriteImage(image, str(tmp), True)
        elif ending in NATURAL_2D_ENDINGS or (ending in TIFF_ENDINGS and seg.ndim == 3 and seg.shape[0] == 1):
            from PIL import Image

            plane = seg[0] if seg.ndim == 3 else seg
            Image.fromarray(plane).save(tmp, format="PNG" if ending == ".png" else None)
        elif ending in TIFF_ENDINGS:
            import tifffile

            tifffile.imwrite(tmp, seg)
        else:
            raise ImageReadError(f"{path}: cannot write file ending {ending!r}")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def reader_name(file_ending: str) -> str:
    """nnU-Net's name for the reader class of a file ending (recorded in plans.json for comparison)."""
    ending = file_ending.lower()
    if ending in NATURAL_2D_ENDINGS:
        return "NaturalImage2DIO"
    if ending in TIFF_ENDINGS:
        return "Tiff3DIO"
    return "SimpleITKIO"
