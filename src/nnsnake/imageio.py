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

import os
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
    """``path``, whose ending (one of ``SITK_ENDINGS``, from :func:`_ending_of`) names the ITK reader."""
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
    array = sitk.GetArrayFromImage(image)
    spacing_sitk = list(image.GetSpacing())
    sitk_stuff = {
        "spacing": spacing_sitk,
        "origin": list(image.GetOrigin()),
        "direction": list(image.GetDirection()),
    }
    if array.ndim == 2:
        array = array[None]
        spacing = [999.0 * max(spacing_sitk)] + [abs(s) for s in spacing_sitk[::-1]]
    elif array.ndim == 3:
        spacing = [abs(s) for s in spacing_sitk[::-1]]
    else:
        raise ImageReadError(f"{path}: {array.ndim}D images are not supported (expected 2D or 3D)")
    return array, {"spacing": spacing, "sitk_stuff": sitk_stuff}


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
