"""Preprocessing of raw cases for one configuration, and the on-disk store of preprocessed cases (docs/method.md §4).

Per case, in nnU-Net's order: read (float32) → transpose (``transpose_forward``) → crop to the nonzero
bounding box → normalise per channel (before resampling, so the nonzero mask still fits) → resample data
(order 3) and segmentation (order 1 per label) to the configuration's spacing → sample class locations for
foreground oversampling. The arrays equal nnunetv2 2.8.1's (see tests/test_preprocessing.py); the speed comes
from :mod:`nnsnake.resampling`.

Store (one folder per configuration, four files per case, chosen by measurement, see benchmarks/preprocess.py;
``preprocessing.store`` picks the arrays' format):

* ``blosc2`` (default): ``<case>.b2nd`` / ``<case>_seg.b2nd``, Blosc2 NDArrays compressed with LZ4HC (shuffle
  or not, whichever a central sample compresses better), one channel per block, blocks and chunks shaped after
  the configuration's patch so a random patch decompresses little beyond itself. Disk at or below nnunetv2's
  (the same arrays and codec, int8 segmentations instead of int16), patch reads at least as fast (opened files
  are cached), training iterations as fast as ``.npy`` (the loader keeps decompressed cases in memory);
* ``npy``: ``<case>.npy`` data float32 ``(C, *spatial)``, plain ``.npy`` so training memory-maps it: a random
  patch is a strided copy out of the page cache, with no decompression: 2-4x the reads of Blosc2 at 1.5x
  (Hippocampus) to 8x (BraTS, whose constant non-zero background Blosc2 compresses away) the disk; for small
  datasets on fast disks;
* ``<case>_seg.npy`` (or ``.b2nd``): segmentation int8 (int16 when labels exceed 127) ``(1, *spatial)``, -1 outside the
  nonzero mask;
* ``<case>_locations.npy``: int32 ``(N, n_spatial)`` voxel coordinates of all classes, concatenated;
* ``<case>.json``: properties (spacing, geometry, crop box, shapes), the row ranges of each class in the
  locations file and the classes' order, and the case's input signature. Written last: a case is complete only when its JSON exists.

Every file is written under a temporary name and renamed; a case about to be rewritten loses its JSON first,
so a killed job never leaves a case that looks complete but is not. A case whose signature (input files'
path, size and mtime, and every plan entry that affects the result) is unchanged is not recomputed.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import math
import mmap
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import as_completed
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import jsonio
from .cropping import crop_to_nonzero
from .errors import PreprocessingError
from .imageio import read_images, read_seg
from .labels import LabelModel
from .normalization import normalize
from .parallel import process_pool, processes_argument
from .planning import configuration_entry
from .resampling import compute_new_shape, resample_data_or_seg_to_shape

log = logging.getLogger(__name__)

STORES = ("npy", "blosc2")
DEFAULT_STORE = "blosc2"
STORE_FORMATS = {"npy": "nnsnake-npy-1", "blosc2": "nnsnake-blosc2-1"}
STORE_FORMAT = STORE_FORMATS["npy"]
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
CLASS_LOCATIONS_SEED = 1234
MIN_LOCATIONS_PER_CLASS = 10000
MIN_LOCATIONS_FRACTION = 0.01

DATA_SUFFIX = ".npy"
SEG_SUFFIX = "_seg.npy"
ARRAY_SUFFIXES = {"npy": (DATA_SUFFIX, SEG_SUFFIX), "blosc2": (".b2nd", "_seg.b2nd")}
LOCATIONS_SUFFIX = "_locations.npy"
PROPERTIES_SUFFIX = ".json"
# with mmap requested, smaller files are read whole: one read() from the page cache beats mapping the file
# and faulting its pages in (measured 4x faster for Hippocampus-sized cases)
MMAP_MIN_BYTES = 4 * 2**20
# Blosc2 layout (measured in benchmarks/preprocess.py): LZ4HC level 5 decompresses as fast as LZ4 and compresses
# better; blocks (the unit a read decompresses) about a patch edge but at most 128 KiB, chunks a few blocks, at
# most 6 MiB and 1.5 patch edges, so a random patch touches few chunks and decompresses little beyond itself
BLOSC2_BLOCK_BYTES = 128 * 2**10
BLOSC2_CHUNK_BYTES = 6 * 2**20
BLOSC2_CHUNK_PATCH_FACTOR = 1.5
BLOSC2_CODEC = "LZ4HC"
BLOSC2_CLEVEL = 5

ClassKey = int | tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------------
# plans


def _resampling_kwargs(config: Mapping[str, Any], what: str) -> dict[str, Any]:
    name = config.get(f"resampling_fn_{what}", RESAMPLING_FUNCTION)
    if name != RESAMPLING_FUNCTION:
        raise PreprocessingError(
            f"resampling_fn_{what} {name!r} is not supported; nnsnake implements {RESAMPLING_FUNCTION!r} "
            "(the nnU-Net default); re-plan or edit the plans"
        )
    defaults = {"data": {"order": 3}, "seg": {"order": 1}, "probabilities": {"order": 1}}[what]
    kwargs = {
        "order_z": 0,
        "force_separate_z": None,
        **defaults,
        **config.get(f"resampling_fn_{what}_kwargs", {}),
    }
    kwargs.pop("is_seg", None)
    return kwargs


def _target_spacing(config: Mapping[str, Any], original_spacing: Sequence[float]) -> list[float]:
    """The 3D target spacing; a 2d configuration keeps the original spacing of axis 0 (slices stay as they are)."""
    spacing = [float(s) for s in config["spacing"]]
    if len(spacing) < len(original_spacing):
        spacing = [float(original_spacing[0]), *spacing]
    return spacing


# ---------------------------------------------------------------------------------------------------------------
# labels and class locations


def sample_class_locations(
    seg: np.ndarray, keys: Sequence[ClassKey], seed: int = CLASS_LOCATIONS_SEED
) -> dict[ClassKey, np.ndarray]:
    """Random voxel coordinates per class for foreground oversampling, drawn exactly as nnunetv2 draws them.

    ``seg`` is spatial. For each key, ``max(min(10000, n), ceil(0.01 n))`` of its ``n`` voxels are drawn without
    replacement by one ``RandomState(seed)`` shared by all keys in order; the voxels of a key are enumerated
    label by label (in the key's order), each in C order. Returns int32 arrays ``(N, seg.ndim)`` (empty if
    the class is absent).
    """
    rng = np.random.RandomState(seed)
    wanted = sorted({label for key in keys for label in (key if isinstance(key, tuple) else (key,))})
    # one pass over the volume: flat indices (C order) of every wanted voxel, then split by label
    if wanted and wanted[0] > 0:
        flat = np.flatnonzero(seg >= wanted[0])
    else:
        flat = np.flatnonzero(np.isin(seg, wanted))
    values = seg.reshape(-1)[flat]
    coordinates: dict[int, np.ndarray] = {}
    locations: dict[ClassKey, np.ndarray] = {}
    for key in keys:
        labels = key if isinstance(key, tuple) else (key,)
        for label in labels:
            if label not in coordinates:
                coordinates[label] = flat[values == label]
        parts = [coordinates[label] for label in labels if len(coordinates[label])]
        total = sum(len(p) for p in parts)
        if total == 0:
            locations[key] = np.zeros((0, seg.ndim), dtype=np.int32)
            continue
        n = max(min(MIN_LOCATIONS_PER_CLASS, total), int(np.ceil(total * MIN_LOCATIONS_FRACTION)))
        picked = rng.choice(total, n, replace=False)
        pool = parts[0] if len(parts) == 1 else np.concatenate(parts)
        locations[key] = np.stack(np.unravel_index(pool[picked], seg.shape), axis=1).astype(np.int32)
    return locations


def _key_to_text(key: ClassKey) -> str:
    """``"1"`` for a label, ``"1,2"`` for a region; a one-label region keeps a trailing comma (``"4,"``) so it
    reads back as the tuple nnU-Net uses for list entries such as BraTS' enhancing tumour ``[4]``."""
    if isinstance(key, tuple):
        return ",".join(str(k) for k in key) + ("," if len(key) == 1 else "")
    return str(key)


def _key_from_text(text: str) -> ClassKey:
    if "," not in text:
        return int(text)
    return tuple(int(p) for p in text.split(",") if p)


# ---------------------------------------------------------------------------------------------------------------
# one case


def _signed_labels(seg: np.ndarray) -> np.ndarray:
    """Labels as a signed integer array (room for -1 outside the mask), whatever the file stored."""
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)) or not np.array_equal(seg, np.round(seg)):
            raise PreprocessingError("segmentation holds non-integer values")
    hi = float(seg.max()) if seg.size else 0.0
    return seg.astype(np.int16 if hi < np.iinfo(np.int16).max else np.int32)


def preprocess_arrays(
    data: np.ndarray,
    seg: np.ndarray | None,
    properties: dict[str, Any],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    class_locations: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Preprocess arrays already read (reader axis order): the body of :func:`preprocess_case`.

    ``dataset_json`` is read only for the label model's class location keys (with ``class_locations``).
    """
    config = dict(configuration_entry(plans, configuration))
    has_seg = seg is not None
    data = np.asarray(data, dtype=np.float32)
    if seg is not None:
        if tuple(seg.shape[1:]) != tuple(data.shape[1:]):
            raise PreprocessingError(
                f"image shape {list(data.shape[1:])} and segmentation shape {list(seg.shape[1:])} differ; "
                "run the verify rule"
            )
        seg = _signed_labels(seg)
    transpose = [int(a) for a in plans["transpose_forward"]]
    data = data.transpose([0, *[a + 1 for a in transpose]])
    if seg is not None:
        seg = seg.transpose([0, *[a + 1 for a in transpose]])
    original_spacing = [float(properties["spacing"][a]) for a in transpose]
    properties = dict(properties)
    properties["shape_before_cropping"] = list(data.shape[1:])
    data, seg, bbox = crop_to_nonzero(data, seg)
    data = np.ascontiguousarray(data)
    properties["bbox_used_for_cropping"] = [[int(lo), int(hi)] for lo, hi in bbox]
    properties["shape_after_cropping_and_before_resampling"] = list(data.shape[1:])

    target_spacing = _target_spacing(config, original_spacing)
    new_shape = compute_new_shape(data.shape[1:], original_spacing, target_spacing)
    data = normalize(
        data,
        seg,
        config["normalization_schemes"],
        config["use_mask_for_norm"],
        plans.get("foreground_intensity_properties_per_channel"),
    )
    data = resample_data_or_seg_to_shape(
        data, new_shape, original_spacing, target_spacing, is_seg=False, **_resampling_kwargs(config, "data")
    )
    seg = resample_data_or_seg_to_shape(
        seg, new_shape, original_spacing, target_spacing, is_seg=True, **_resampling_kwargs(config, "seg")
    )
    if has_seg and class_locations:
        keys = LabelModel.from_dataset_json(dataset_json).class_location_keys
        properties["class_locations"] = sample_class_locations(seg[0], keys)
    lo, hi = (int(seg.min()), int(seg.max())) if seg.size else (0, 0)
    seg = seg.astype(np.int8 if -128 <= lo and hi <= 127 else np.int16, copy=False)
    return np.ascontiguousarray(data, dtype=np.float32), np.ascontiguousarray(seg), properties


def preprocess_case(
    image_paths: Sequence[str | os.PathLike],
    seg_path: str | os.PathLike | None,
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    class_locations: bool = True,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Read and preprocess one case for a configuration (docs/method.md §4).

    Returns ``(data float32 (C, *spatial), seg int8/int16 (1, *spatial), properties)`` in the preprocessed
    axis order. Without ``seg_path`` (test images) the seg is synthesised (0 inside the nonzero mask, -1
    outside) and there are no class locations. ``properties`` holds ``spacing`` and ``sitk_stuff`` (reader's),
    ``shape_before_cropping``, ``bbox_used_for_cropping``, ``shape_after_cropping_and_before_resampling`` and,
    with a seg, ``class_locations`` ({label or region tuple: int32 (N, n_spatial)}).
    """
    data, properties = read_images([str(p) for p in image_paths])
    seg = read_seg(seg_path)[0] if seg_path is not None else None
    return preprocess_arrays(data, seg, properties, plans, configuration, dataset_json, class_locations)


# ---------------------------------------------------------------------------------------------------------------
# the store


def check_store(store: str) -> str:
    """``store`` if it names a store format (``npy`` or ``blosc2``), else a ValueError naming the config key."""
    if store not in STORES:
        raise ValueError(f"preprocessing.store must be one of {list(STORES)}, got {store!r}")
    return store


def case_files(folder: str | os.PathLike, case_id: str, store: str = "npy") -> dict[str, Path]:
    """Paths of a stored case: ``data``, ``seg``, ``locations``, ``properties`` (the JSON, written last).

    ``store`` picks the array files' format (the JSON records which one a case uses)."""
    folder = Path(folder)
    data_suffix, seg_suffix = ARRAY_SUFFIXES[check_store(store)]
    return {
        "data": folder / f"{case_id}{data_suffix}",
        "seg": folder / f"{case_id}{seg_suffix}",
        "locations": folder / f"{case_id}{LOCATIONS_SUFFIX}",
        "properties": folder / f"{case_id}{PROPERTIES_SUFFIX}",
    }


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with jsonio.atomic_open(path, fsync=False) as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def blosc2_chunks_and_blocks(
    shape: Sequence[int], itemsize: int, patch_size: Sequence[int] | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Chunk and block shapes for a ``(C, *spatial)`` array read in patches of ``patch_size`` (the last axes;
    a 2d patch reads one slice). One channel per block; each block edge the patch edge's power of two (at
    most the image's), halved along its longest edge until the block fits ``BLOSC2_BLOCK_BYTES``; chunks grow
    one block per axis in turn while they fit ``BLOSC2_CHUNK_BYTES`` and ``BLOSC2_CHUNK_PATCH_FACTOR`` patch
    edges."""
    spatial = [max(1, int(s)) for s in shape[1:]]
    patch = [int(p) for p in (patch_size or spatial)][-len(spatial) :]
    patch = [1] * (len(spatial) - len(patch)) + patch
    block = [min(_next_power_of_two(p), s) for p, s in zip(patch, spatial, strict=True)]
    while math.prod(block) * itemsize > BLOSC2_BLOCK_BYTES and max(block) > 1:
        longest = max(range(len(block)), key=lambda a: (block[a], a))
        block[longest] = (block[longest] + 1) // 2
    limits = [
        max(b, min(math.ceil(s / b) * b, int(BLOSC2_CHUNK_PATCH_FACTOR * p)))
        for b, s, p in zip(block, spatial, patch, strict=True)
    ]
    chunk = list(block)
    grown = True
    while grown:
        grown = False
        for axis in range(len(chunk)):
            wider = chunk[axis] + block[axis]
            if (
                wider <= limits[axis]
                and math.prod(chunk) // chunk[axis] * wider * itemsize <= BLOSC2_CHUNK_BYTES
            ):
                chunk[axis] = wider
                grown = True
    return (1, *chunk), (1, *block)


def _blosc2_filter(array: np.ndarray, block: Sequence[int]) -> Any:
    """SHUFFLE or no filter, whichever compresses a central sample of ``array`` (2 blocks per axis) smaller
    (a normalised image with a constant background often compresses better unshuffled). The trial uses plain
    LZ4, ten times faster than LZ4HC and the same choice on every Hippocampus and BraTS case measured."""
    import blosc2

    sample_shape = [1, *(2 * b for b in block[1:])]
    if array.itemsize == 1:
        return blosc2.Filter.NOFILTER  # shuffling one-byte items changes nothing
    centre = tuple(
        slice(max(0, (n - c) // 2), max(0, (n - c) // 2) + c)
        for n, c in zip(array.shape, sample_shape, strict=True)
    )
    sample = np.ascontiguousarray(array[centre])
    sizes = {
        f: len(
            blosc2.compress2(sample, codec=blosc2.Codec.LZ4, clevel=BLOSC2_CLEVEL, filters=[f], nthreads=1)
        )
        for f in (blosc2.Filter.SHUFFLE, blosc2.Filter.NOFILTER)
    }
    return min(sizes, key=lambda f: sizes[f])


def _atomic_save_blosc2(path: Path, array: np.ndarray, patch_size: Sequence[int] | None) -> None:
    """A Blosc2 NDArray file (chunks and blocks shaped for patch reads), written under a temporary name."""
    import blosc2

    array = np.ascontiguousarray(array)
    chunks, blocks = blosc2_chunks_and_blocks(array.shape, array.itemsize, patch_size)
    cparams = {
        "codec": blosc2.Codec[BLOSC2_CODEC],
        "clevel": BLOSC2_CLEVEL,
        "filters": [_blosc2_filter(array, blocks)],
        "nthreads": 1,
    }
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        blosc2.asarray(array, urlpath=tmp, mode="w", chunks=chunks, blocks=blocks, cparams=cparams)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_case(
    folder: str | os.PathLike,
    case_id: str,
    data: np.ndarray,
    seg: np.ndarray,
    properties: Mapping[str, Any],
    signature: Mapping[str, Any] | None = None,
    store: str = DEFAULT_STORE,
    patch_size: Sequence[int] | None = None,
) -> str:
    """Store a preprocessed case atomically (arrays first, the JSON last; the old JSON is removed first).

    ``store``: ``npy`` (plain, memory-mapped) or ``blosc2`` (compressed, chunks and blocks shaped for reads of
    ``patch_size``); files of the case in the other format are removed.

    Returns the case's content digest (sha256 of its arrays), also stored in the JSON: the manifest lists it, so
    a changed image or label changes the manifest and reruns what depends on it, while a touched but unchanged
    raw file does not."""
    files = case_files(folder, case_id, store)
    files["properties"].parent.mkdir(parents=True, exist_ok=True)
    _remove_case(Path(folder), case_id)
    properties = dict(properties)
    locations = properties.pop("class_locations", None)
    ranges: dict[str, list[int]] | None = None
    n_spatial = data.ndim - 1
    stacked = np.zeros((0, n_spatial), dtype=np.int32)
    if locations is not None:
        ranges, parts, start = {}, [], 0
        for key, coords in locations.items():
            coords = np.asarray(coords, dtype=np.int32).reshape(-1, n_spatial)
            ranges[_key_to_text(key)] = [start, start + len(coords)]
            parts.append(coords)
            start += len(coords)
        if parts:
            stacked = np.concatenate(parts)
    data = data.astype(np.float32, copy=False)
    digest = case_digest(data, seg)
    if store == "blosc2":
        _atomic_save_blosc2(files["data"], data, patch_size)
        _atomic_save_blosc2(files["seg"], seg, patch_size)
    else:
        _atomic_save_npy(files["data"], data)
        _atomic_save_npy(files["seg"], seg)
    _atomic_save_npy(files["locations"], stacked)
    record = {
        "format": STORE_FORMATS[store],
        "properties": properties,
        "class_locations": ranges,
        # the JSON sorts ``ranges`` by key; the keys' own order (nnU-Net's: regions or labels, then the annotated
        # key) is what the sampler indexes when it picks a class, so it is kept too
        "class_location_order": list(ranges) if ranges is not None else None,
        "shape": list(data.shape),
        "seg_dtype": str(seg.dtype),
        "sha256": digest,
        "signature": dict(signature) if signature is not None else None,
    }
    jsonio.write_json(files["properties"], record, fsync=False)  # preprocess_dataset syncs once at its end
    return digest


def case_digest(data: np.ndarray, seg: np.ndarray) -> str:
    """sha256 of a preprocessed case's arrays (dtype, shape and bytes of data and segmentation)."""
    digest = hashlib.sha256()
    for array in (data, seg):
        array = np.ascontiguousarray(array)
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))  # type: ignore[arg-type]  # ndarrays are buffers
    return digest.hexdigest()


@functools.lru_cache(maxsize=8192)
def _npy_header(
    path: str, mtime_ns: int, size: int
) -> tuple[tuple[int, ...], np.dtype, Literal["C", "F"], int]:
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        reader = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = reader(fh)
        offset = fh.tell()
    if dtype.hasobject:
        raise ValueError(f"{path}: object arrays are not allowed")
    return shape, dtype, "F" if fortran_order else "C", offset


def _open_npy(path: Path, mmap_mode: bool) -> np.ndarray:
    """A ``.npy`` file as a read-only memory map (``mmap_mode``) or in memory; no pickle.

    Same result as ``np.load(path, mmap_mode='r')``, several times cheaper to open (cached header, a plain
    ``mmap`` and ``np.frombuffer`` instead of the ``np.memmap`` machinery), which matters when a loader opens
    a case for every patch it reads.
    """
    stat = os.stat(path)
    shape, dtype, order, offset = _npy_header(str(path), stat.st_mtime_ns, stat.st_size)
    count = math.prod(shape)
    with open(path, "rb") as fh:
        if not mmap_mode or count == 0 or stat.st_size < MMAP_MIN_BYTES:
            fh.seek(offset)
            array = np.fromfile(fh, dtype=dtype, count=count).reshape(shape, order=order)
            array.flags.writeable = not mmap_mode
            return array
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset).reshape(shape, order=order)


class Blosc2CaseArray:
    """Read-only, numpy-like view of a stored Blosc2 array (what ``load_case(mmap=True)`` gives for the blosc2
    store): ``shape``, ``dtype``, ``ndim``, ``nbytes``; indexing with slices decompresses only the blocks it
    touches and returns a numpy array; ``np.asarray`` decompresses everything."""

    def __init__(self, array: Any, path: Path) -> None:
        self._array = array
        self.path = path
        self.shape: tuple[int, ...] = tuple(int(n) for n in array.shape)
        self.dtype = np.dtype(array.dtype)
        self.ndim = len(self.shape)
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        out = np.asarray(self._array[key])
        out.flags.writeable = False
        return out

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        out = np.asarray(self._array[...])
        return out if dtype is None else out.astype(dtype, copy=False)

    def __repr__(self) -> str:
        return f"Blosc2CaseArray({self.path}, shape={self.shape}, dtype={self.dtype})"


def _handle_cache_size() -> int:
    """Opened Blosc2 files to keep: each holds a file descriptor, so at most a quarter of the soft limit."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):  # pragma: no cover - not POSIX
        return 128
    return int(min(1024, max(16, soft // 4))) if soft != resource.RLIM_INFINITY else 1024


@functools.lru_cache(maxsize=_handle_cache_size())
def _blosc2_handle(path: str, mtime_ns: int, size: int) -> Any:
    """An opened Blosc2 file, cached per file version: a loader re-opens a case for every patch, and parsing
    the header costs as much as decompressing a small patch. Opened memory-mapped, one decompression thread
    (loader processes are the parallelism)."""
    import blosc2

    try:
        return blosc2.open(path, mode="r", mmap_mode="r", dparams={"nthreads": 1})
    except Exception as exc:  # blosc2 raises RuntimeError/ValueError on damaged files
        raise ValueError(
            f"{path}: unreadable Blosc2 array ({exc}); rerun preprocessing to rewrite it"
        ) from exc


def _open_blosc2(path: Path, lazy: bool) -> np.ndarray | Blosc2CaseArray:
    """A Blosc2 file decompressed into memory, or (``lazy``) a view that decompresses per read; small arrays
    (under ``MMAP_MIN_BYTES``) are always decompressed whole, which is faster than any partial read."""
    stat = os.stat(path)
    view = Blosc2CaseArray(_blosc2_handle(str(path), stat.st_mtime_ns, stat.st_size), path)
    if lazy and view.nbytes >= MMAP_MIN_BYTES:
        return view
    out = np.asarray(view)
    out.flags.writeable = not lazy
    return out


def _open_array(path: Path, store: str, mmap_mode: bool) -> np.ndarray | Blosc2CaseArray:
    return _open_blosc2(path, mmap_mode) if store == "blosc2" else _open_npy(path, mmap_mode)


def _store_of_format(path: str, store_format: str | None) -> str:
    for store, name in STORE_FORMATS.items():
        if store_format == name:
            return store
    raise ValueError(f"{path}: unknown store format {store_format!r}; rerun preprocessing with this nnsnake")


@functools.lru_cache(maxsize=4096)
def _cached_record(path: str, mtime_ns: int, size: int) -> tuple[dict[str, Any], str]:
    """Parsed case JSON plus its class locations and its store, cached per file version (cases are re-opened
    per patch)."""
    record = jsonio.read_json(path)
    store = _store_of_format(path, record.get("format"))
    properties = dict(record["properties"])
    ranges = record.get("class_locations")
    if ranges is not None:
        stacked = _open_npy(Path(path[: -len(PROPERTIES_SUFFIX)] + LOCATIONS_SUFFIX), mmap_mode=False)
        stacked.flags.writeable = False
        order = record.get("class_location_order") or sorted(ranges, key=lambda k: tuple(ranges[k]))
        properties["class_locations"] = {_key_from_text(k): stacked[slice(*ranges[k])] for k in order}
    return properties, store


def _load_record(folder: str | os.PathLike, case_id: str) -> tuple[dict[str, Any], str]:
    path = case_files(folder, case_id)["properties"]
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: preprocessed case {case_id!r} is missing or incomplete; rerun preprocessing"
        ) from None
    properties, store = _cached_record(str(path), stat.st_mtime_ns, stat.st_size)
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in properties.items()}, store


def load_properties(folder: str | os.PathLike, case_id: str) -> dict[str, Any]:
    """A stored case's properties, with ``class_locations`` as {int label or region tuple: int32 (N, n_spatial)}
    (read-only arrays)."""
    return _load_record(folder, case_id)[0]


def load_case(
    folder: str | os.PathLike, case_id: str, mmap: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(data float32 (C, *spatial), seg int8/int16 (1, *spatial), properties)`` of a stored case.

    With ``mmap=True`` the arrays are read-only and read lazily (files under 4 MiB are read whole, which is
    faster): memory maps for the npy store, :class:`Blosc2CaseArray` views for the blosc2 store (numpy-like:
    shape, dtype, slicing, ``np.asarray``); a training loader then reads just its patch. Without ``mmap`` both
    are writable numpy arrays. Properties are cached per file version.
    """
    properties, store = _load_record(folder, case_id)
    files = case_files(folder, case_id, store)
    data = _open_array(files["data"], store, mmap)
    seg = _open_array(files["seg"], store, mmap)
    return data, seg, properties  # type: ignore[return-value]  # Blosc2CaseArray: numpy-like, read-only


def stored_case_ids(folder: str | os.PathLike) -> list[str]:
    """Ids of the complete cases in a store folder (those whose JSON exists)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    ids = (
        p.name[: -len(PROPERTIES_SUFFIX)]
        for p in folder.glob(f"*{PROPERTIES_SUFFIX}")
        if not p.name.startswith(".")
    )
    # other JSON files may share the folder (the workflow's manifest.json): a case also has its data file
    return sorted(i for i in ids if any(case_files(folder, i, st)["data"].is_file() for st in STORES))


def _remove_case(folder: Path, case_id: str) -> None:
    """Remove a stored case in any format: its JSON first, so it is incomplete from there on."""
    case_files(folder, case_id)["properties"].unlink(missing_ok=True)
    for store in STORES:
        files = case_files(folder, case_id, store)
        for key in ("data", "seg", "locations"):
            files[key].unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# a whole dataset


def _file_fingerprint(path: str | os.PathLike) -> list[Any]:
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def plan_signature(
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    store: str = "npy",
) -> dict[str, Any]:
    """The plan entries a preprocessed case depends on (a change to any of them recomputes the case); with the
    blosc2 store also the patch size, which shapes its chunks. ``configuration``: a name or its resolved entry."""
    config = configuration_entry(plans, configuration)
    layout = {"patch_size": list(config["patch_size"])} if check_store(store) == "blosc2" else {}
    return {
        "format": STORE_FORMATS[store],
        **layout,
        "transpose_forward": list(plans["transpose_forward"]),
        "spacing": list(config["spacing"]),
        "normalization_schemes": list(config["normalization_schemes"]),
        "use_mask_for_norm": list(config["use_mask_for_norm"]),
        "resampling_data": _resampling_kwargs(config, "data"),
        "resampling_seg": _resampling_kwargs(config, "seg"),
        "foreground_intensity_properties_per_channel": plans.get(
            "foreground_intensity_properties_per_channel"
        ),
        "labels": dataset_json["labels"],
    }


def case_signature(
    image_paths: Sequence[str | os.PathLike], seg_path: str | os.PathLike | None, plan: Mapping[str, Any]
) -> dict[str, Any]:
    """Inputs (path, size, mtime) and plan entries of one case, as stored in its JSON."""
    signature = {
        "images": [_file_fingerprint(p) for p in image_paths],
        "seg": _file_fingerprint(seg_path) if seg_path is not None else None,
        "plan": dict(plan),
    }
    return jsonio.to_builtin(signature)


def case_is_current(
    folder: str | os.PathLike, case_id: str, signature: Mapping[str, Any], store: str = "npy"
) -> bool:
    """True when the case is stored completely (in ``store``) and was made from exactly these inputs and plan
    entries."""
    files = case_files(folder, case_id, store)
    if not all(f.is_file() for f in files.values()):
        return False
    try:
        record = jsonio.read_json(files["properties"])
    except (OSError, ValueError):
        return False
    return record.get("sha256") is not None and record.get("signature") == jsonio.to_builtin(signature)


def _preprocess_and_save(
    case_id: str,
    image_paths: list[str],
    seg_path: str | None,
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    out_dir: str,
    signature: Mapping[str, Any],
    store: str = "npy",
) -> dict[str, Any]:
    """Worker: one case, start to finish (``configuration``: a name, or its entry already resolved, as
    :func:`preprocess_dataset` sends it so workers skip resolving per case). Errors come back as
    PreprocessingError naming the case."""
    try:
        config = configuration_entry(plans, configuration)
        data, seg, properties = preprocess_case(image_paths, seg_path, plans, config, dataset_json)
        digest = save_case(
            out_dir, case_id, data, seg, properties, signature, store, config.get("patch_size")
        )
    except Exception as exc:
        _remove_case(Path(out_dir), case_id)
        files = ", ".join([*image_paths, *([seg_path] if seg_path else [])])
        raise PreprocessingError(f"case {case_id!r} ({files}): {type(exc).__name__}: {exc}") from None
    return {"shape": list(data.shape), "seg_dtype": str(seg.dtype), "sha256": digest}


def _clean_temporaries(folder: Path, case_ids: Sequence[str] | None = None) -> None:
    """Remove temporary files left by killed jobs: all of them, or only those of ``case_ids`` (a shard must not
    touch the files other shards are writing right now)."""
    if case_ids is None:
        for tmp in folder.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        return
    for case_id in case_ids:
        for store in STORES:
            for path in case_files(folder, case_id, store).values():
                for tmp in folder.glob(f".{glob.escape(path.name)}.*.tmp"):
                    tmp.unlink(missing_ok=True)


def shard_case_ids(case_ids: Sequence[str], shard: int, shards: int) -> list[str]:
    """The cases of shard ``shard`` (0-based) of ``shards``: every ``shards``-th of the sorted ids, so shards
    are disjoint, cover all cases, and stay balanced in count."""
    if shards < 1 or not 0 <= shard < shards:
        raise ValueError(f"shard {shard} of {shards}: need 0 <= shard < shards and shards >= 1")
    return sorted(case_ids)[shard::shards]


def merge_manifests(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One manifest from the shards' manifests: equal to the manifest of one unsharded run."""
    if not parts:
        raise ValueError("no shard manifests to merge")
    heads = {_manifest_head(p) for p in parts}
    if len(heads) != 1:
        raise ValueError("shard manifests come from different configurations, plans or stores: rerun them")
    cases: dict[str, Any] = {}
    for part in parts:
        overlap = set(cases) & set(part["cases"])
        if overlap:
            raise ValueError(f"case(s) {sorted(overlap)} appear in more than one shard manifest")
        cases.update(part["cases"])
    return {
        **{k: v for k, v in parts[0].items() if k != "cases"},
        "cases": {k: cases[k] for k in sorted(cases)},
    }


def _manifest_head(manifest: Mapping[str, Any]) -> str:
    return jsonio.dumps({k: v for k, v in manifest.items() if k != "cases"})


def preprocess_dataset(
    raw_dir: str | os.PathLike,
    dataset_json: Mapping[str, Any],
    plans: Mapping[str, Any],
    configuration: str,
    out_dir: str | os.PathLike,
    case_ids: Sequence[str] | None = None,
    processes: int = 1,
    progress: bool = True,
    *,
    num_processes: int | None = None,
    store: str = DEFAULT_STORE,
    shard: int = 0,
    shards: int = 1,
) -> dict[str, Any]:
    """Preprocess the training cases of a raw dataset for one configuration into ``out_dir``.

    ``shard`` of ``shards`` (0-based) preprocesses only that deterministic subset of the cases
    (:func:`shard_case_ids`), so several jobs can share the work; their files are identical to an unsharded
    run's and :func:`merge_manifests` of their manifests equals its manifest.

    Parallel over cases (``processes`` worker processes, each holding one case at a time, so memory stays
    bounded; ``num_processes`` is its deprecated name), incremental (cases whose signature is unchanged are
    skipped), atomic per case. With ``case_ids=None`` every training case is processed and stored cases no
    longer in the dataset are removed. ``store``: ``blosc2`` (compressed, chunked for patch reads) or ``npy``
    (plain, memory-mapped); a change of store rewrites the cases. Returns a deterministic manifest ``{configuration, data_identifier, format, cases: {id: {shape,
    seg_dtype}}}`` (write it as the job's JSON output); counts and timings go to the log.
    A failing case raises :class:`PreprocessingError` naming it, after the running cases have finished.
    """
    from .dataset import discover_cases
    from .runtime import progress as progress_bar  # runtime imports torch: load it only when needed

    processes = processes_argument(processes, num_processes, "preprocess_dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cases, problems = discover_cases(raw_dir, dict(dataset_json))
    if problems:
        raise PreprocessingError(
            f"{raw_dir}: dataset layout problems (run the verify rule for the full report): "
            + "; ".join(str(p) for p in problems[:5])
        )
    if case_ids is None and shards > 1:
        selected = shard_case_ids(list(cases), shard, shards)
        _clean_temporaries(out, selected)
        if shard == 0:  # stale cases belong to no shard: the first removes them
            for stale in sorted(set(stored_case_ids(out)) - set(cases)):
                log.info("removing %s: no longer in the dataset", stale)
                _remove_case(out, stale)
    elif case_ids is None:
        _clean_temporaries(out)
        selected = sorted(cases)
        for stale in sorted(set(stored_case_ids(out)) - set(cases)):
            log.info("removing %s: no longer in the dataset", stale)
            _remove_case(out, stale)
    else:
        unknown = sorted(set(case_ids) - set(cases))
        if unknown:
            raise PreprocessingError(f"{raw_dir}: unknown case id(s) {unknown}")
        selected = list(case_ids)
        _clean_temporaries(out, selected)
    check_store(store)
    config = configuration_entry(plans, configuration)  # once: the signature and every case's worker use it
    plan = plan_signature(plans, config, dataset_json, store)
    jobs, manifest_cases = [], {}
    for case_id in selected:
        files = cases[case_id]
        images = [str(p) for p in files.images]
        seg = str(files.label) if files.label is not None else None
        signature = case_signature(images, seg, plan)
        if case_is_current(out, case_id, signature, store):
            record = jsonio.read_json(case_files(out, case_id)["properties"])
            manifest_cases[case_id] = {
                "shape": record["shape"],
                "seg_dtype": record["seg_dtype"],
                "sha256": record["sha256"],
            }
        else:
            jobs.append(
                (
                    case_id,
                    images,
                    seg,
                    dict(plans),
                    config,
                    dict(dataset_json),
                    str(out),
                    signature,
                    store,
                )
            )
    log.info(
        "%s: %d case(s) to preprocess, %d unchanged", configuration, len(jobs), len(selected) - len(jobs)
    )
    bar = progress_bar(total=len(jobs), description=f"preprocess {configuration}", enabled=progress)
    try:
        for case_id, summary in _run_jobs(jobs, processes, bar.update):
            manifest_cases[case_id] = summary
    finally:
        bar.close()
    if jobs:
        jsonio.sync_filesystem(out)  # the cases' files reach the disk before the manifest that lists them
    return {
        "configuration": configuration,
        "data_identifier": config.get("data_identifier"),
        "format": STORE_FORMATS[store],
        "cases": {k: manifest_cases[k] for k in sorted(manifest_cases)},
    }


def _run_jobs(jobs: list[tuple], processes: int, on_done: Callable[[int], Any]) -> list[tuple[str, dict]]:
    """Run the case jobs in ``processes`` workers; the first failure cancels the rest and is raised."""
    results = []
    if processes <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append((job[0], _preprocess_and_save(*job)))
            on_done(1)
        return results
    # fork: workers start instantly and inherit the imported modules; each holds one case at a time
    with process_pool(min(processes, len(jobs))) as pool:
        futures = {pool.submit(_preprocess_and_save, *job): job[0] for job in jobs}
        for future in as_completed(futures):  # each finished case moves the progress bar
            case_id = futures[future]
            error = future.exception()
            if error is not None:
                for other in futures:
                    other.cancel()
                if isinstance(error, PreprocessingError):
                    raise error
                hint = ""
                if isinstance(error, BrokenProcessPool):
                    hint = " (a worker process died, often from running out of memory: use fewer threads)"
                raise PreprocessingError(
                    f"case {case_id!r}: {type(error).__name__}: {error}{hint}"
                ) from error
            results.append((case_id, future.result()))
            on_done(1)
    return results
