"""Preprocessing of raw cases for one configuration, and the on-disk store of preprocessed cases (docs/method.md §4).

Per case, in nnU-Net's order: read (float32) → transpose (``transpose_forward``) → crop to the nonzero
bounding box → normalise per channel (before resampling, so the nonzero mask still fits) → resample data
(order 3) and segmentation (order 1 per label) to the configuration's spacing → sample class locations for
foreground oversampling. The arrays equal nnunetv2 2.8.1's (see tests/test_preprocessing.py); the speed comes
from :mod:`nnsnake.resampling`.

Store (one folder per configuration, four files per case, chosen by measurement, see benchmarks/preprocess.py):

* ``<case>.npy``: data float32 ``(C, *spatial)``, plain ``.npy`` so training memory-maps it: a random patch is a
  strided copy out of the page cache, with no decompression. Measured against nnunetv2's Blosc2 files (LZ4HC,
  patch-shaped chunks): 2-4x the random-patch reads per second, at 1.5x (Hippocampus) to 8x (BraTS, whose
  constant non-zero background Blosc2 compresses away) the disk. Blosc2 tuned for speed (LZ4, small blocks)
  stayed 3-4x slower than ``.npy``; reads were the priority;
* ``<case>_seg.npy``: segmentation int8 (int16 when labels exceed 127) ``(1, *spatial)``, -1 outside the
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
import hashlib
import logging
import math
import mmap
import os
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, wait
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
from .resampling import compute_new_shape, resample_data_or_seg_to_shape

log = logging.getLogger(__name__)

STORE_FORMAT = "nnsnake-npy-1"
RESAMPLING_FUNCTION = "resample_data_or_seg_to_shape"
CLASS_LOCATIONS_SEED = 1234
MIN_LOCATIONS_PER_CLASS = 10000
MIN_LOCATIONS_FRACTION = 0.01

DATA_SUFFIX = ".npy"
SEG_SUFFIX = "_seg.npy"
LOCATIONS_SUFFIX = "_locations.npy"
PROPERTIES_SUFFIX = ".json"
# with mmap requested, smaller files are read whole: one read() from the page cache beats mapping the file
# and faulting its pages in (measured 4x faster for Hippocampus-sized cases)
MMAP_MIN_BYTES = 4 * 2**20

ClassKey = int | tuple[int, ...]


# ---------------------------------------------------------------------------------------------------------------
# plans


def resolve_configuration(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """The configuration's entries with ``inherits_from`` applied (nnsnake.planning owns the rule)."""
    from .planning import resolve_configuration as resolve

    return resolve(dict(plans), configuration)


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
    config = (
        resolve_configuration(plans, configuration) if isinstance(configuration, str) else dict(configuration)
    )
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
    configuration: str,
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


def case_files(folder: str | os.PathLike, case_id: str) -> dict[str, Path]:
    """Paths of a stored case: ``data``, ``seg``, ``locations``, ``properties`` (the JSON, written last)."""
    folder = Path(folder)
    return {
        "data": folder / f"{case_id}{DATA_SUFFIX}",
        "seg": folder / f"{case_id}{SEG_SUFFIX}",
        "locations": folder / f"{case_id}{LOCATIONS_SUFFIX}",
        "properties": folder / f"{case_id}{PROPERTIES_SUFFIX}",
    }


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    with jsonio.atomic_open(path, fsync=False) as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)


def save_case(
    folder: str | os.PathLike,
    case_id: str,
    data: np.ndarray,
    seg: np.ndarray,
    properties: Mapping[str, Any],
    signature: Mapping[str, Any] | None = None,
) -> str:
    """Store a preprocessed case atomically (arrays first, the JSON last; the old JSON is removed first).

    Returns the case's content digest (sha256 of its arrays), also stored in the JSON: the manifest lists it, so
    a changed image or label changes the manifest and reruns what depends on it, while a touched but unchanged
    raw file does not."""
    files = case_files(folder, case_id)
    files["properties"].parent.mkdir(parents=True, exist_ok=True)
    files["properties"].unlink(missing_ok=True)
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
    _atomic_save_npy(files["data"], data)
    _atomic_save_npy(files["seg"], seg)
    _atomic_save_npy(files["locations"], stacked)
    record = {
        "format": STORE_FORMAT,
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
    jsonio.write_json(files["properties"], record)
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


@functools.lru_cache(maxsize=4096)
def _cached_properties(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    """Parsed case JSON plus its class locations, cached per file version (cases are re-opened per patch)."""
    record = jsonio.read_json(path)
    properties = dict(record["properties"])
    ranges = record.get("class_locations")
    if ranges is not None:
        stacked = _open_npy(Path(path[: -len(PROPERTIES_SUFFIX)] + LOCATIONS_SUFFIX), mmap_mode=False)
        stacked.flags.writeable = False
        order = record.get("class_location_order") or sorted(ranges, key=lambda k: tuple(ranges[k]))
        properties["class_locations"] = {_key_from_text(k): stacked[slice(*ranges[k])] for k in order}
    return properties


def load_properties(folder: str | os.PathLike, case_id: str) -> dict[str, Any]:
    """A stored case's properties, with ``class_locations`` as {int label or region tuple: int32 (N, n_spatial)}
    (read-only arrays)."""
    path = case_files(folder, case_id)["properties"]
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: preprocessed case {case_id!r} is missing or incomplete; rerun preprocessing"
        ) from None
    properties = _cached_properties(str(path), stat.st_mtime_ns, stat.st_size)
    return {k: (dict(v) if isinstance(v, dict) else v) for k, v in properties.items()}


def load_case(
    folder: str | os.PathLike, case_id: str, mmap: bool = False
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``(data float32 (C, *spatial), seg int8/int16 (1, *spatial), properties)`` of a stored case.

    With ``mmap=True`` the arrays are read-only memory maps (files under 4 MiB are read whole, which is
    faster): a training loader then reads just its patch. Properties are cached per file version.
    """
    properties = load_properties(folder, case_id)
    files = case_files(folder, case_id)
    return _open_npy(files["data"], mmap), _open_npy(files["seg"], mmap), properties


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
    return sorted(i for i in ids if case_files(folder, i)["data"].is_file())


def _remove_case(folder: Path, case_id: str) -> None:
    files = case_files(folder, case_id)
    files["properties"].unlink(missing_ok=True)  # first: the case is incomplete from here on
    for key in ("data", "seg", "locations"):
        files[key].unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------------------------
# a whole dataset


def _file_fingerprint(path: str | os.PathLike) -> list[Any]:
    stat = os.stat(path)
    return [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]


def plan_signature(
    plans: Mapping[str, Any], configuration: str, dataset_json: Mapping[str, Any]
) -> dict[str, Any]:
    """The plan entries a preprocessed case depends on (a change to any of them recomputes the case)."""
    config = resolve_configuration(plans, configuration)
    return {
        "format": STORE_FORMAT,
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


def case_is_current(folder: str | os.PathLike, case_id: str, signature: Mapping[str, Any]) -> bool:
    """True when the case is stored completely and was made from exactly these inputs and plan entries."""
    files = case_files(folder, case_id)
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
    configuration: str,
    dataset_json: Mapping[str, Any],
    out_dir: str,
    signature: Mapping[str, Any],
) -> dict[str, Any]:
    """Worker: one case, start to finish. Errors come back as PreprocessingError naming the case."""
    try:
        with _single_threaded_blas():
            data, seg, properties = preprocess_case(image_paths, seg_path, plans, configuration, dataset_json)
            digest = save_case(out_dir, case_id, data, seg, properties, signature)
    except Exception as exc:
        _remove_case(Path(out_dir), case_id)
        files = ", ".join([*image_paths, *([seg_path] if seg_path else [])])
        raise PreprocessingError(f"case {case_id!r} ({files}): {type(exc).__name__}: {exc}") from None
    return {"shape": list(data.shape), "seg_dtype": str(seg.dtype), "sha256": digest}


class _single_threaded_blas:
    """Case-level processes are the parallelism; BLAS threads on top would only oversubscribe the cores."""

    def __enter__(self) -> None:
        try:
            from threadpoolctl import threadpool_limits

            self._limits = threadpool_limits(1)
        except (
            ImportError
        ):  # pragma: no cover - threadpoolctl comes with scikit-learn / most scientific stacks
            self._limits = None

    def __exit__(self, *exc: object) -> None:
        if self._limits is not None:
            self._limits.restore_original_limits()


def _clean_temporaries(folder: Path) -> None:
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


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
) -> dict[str, Any]:
    """Preprocess the training cases of a raw dataset for one configuration into ``out_dir``.

    Parallel over cases (``processes`` worker processes, each holding one case at a time, so memory stays
    bounded; ``num_processes`` is its deprecated name), incremental (cases whose signature is unchanged are
    skipped), atomic per case. With ``case_ids=None`` every training case is processed and stored cases no
    longer in the dataset are removed. Returns a deterministic manifest ``{configuration, data_identifier, format, cases: {id: {shape,
    seg_dtype}}}`` (write it as the job's JSON output); counts and timings go to the log.
    A failing case raises :class:`PreprocessingError` naming it, after the running cases have finished.
    """
    from .dataset import discover_cases
    from .runtime import progress as progress_bar  # runtime imports torch: load it only when needed

    processes = processes_argument(processes, num_processes, "preprocess_dataset")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _clean_temporaries(out)
    cases, problems = discover_cases(raw_dir, dict(dataset_json))
    if problems:
        raise PreprocessingError(
            f"{raw_dir}: dataset layout problems (run the verify rule for the full report): "
            + "; ".join(str(p) for p in problems[:5])
        )
    if case_ids is None:
        selected = sorted(cases)
        for stale in sorted(set(stored_case_ids(out)) - set(cases)):
            log.info("removing %s: no longer in the dataset", stale)
            _remove_case(out, stale)
    else:
        unknown = sorted(set(case_ids) - set(cases))
        if unknown:
            raise PreprocessingError(f"{raw_dir}: unknown case id(s) {unknown}")
        selected = list(case_ids)
    plan = plan_signature(plans, configuration, dataset_json)
    jobs, manifest_cases = [], {}
    for case_id in selected:
        files = cases[case_id]
        images = [str(p) for p in files.images]
        seg = str(files.label) if files.label is not None else None
        signature = case_signature(images, seg, plan)
        if case_is_current(out, case_id, signature):
            record = jsonio.read_json(case_files(out, case_id)["properties"])
            manifest_cases[case_id] = {
                "shape": record["shape"],
                "seg_dtype": record["seg_dtype"],
                "sha256": record["sha256"],
            }
        else:
            jobs.append(
                (case_id, images, seg, dict(plans), configuration, dict(dataset_json), str(out), signature)
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
    config = resolve_configuration(plans, configuration)
    return {
        "configuration": configuration,
        "data_identifier": config.get("data_identifier"),
        "format": STORE_FORMAT,
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
        pending = {pool.submit(_preprocess_and_save, *job): job[0] for job in jobs}
        while pending:
            done, _ = wait(pending, return_when=FIRST_EXCEPTION)
            for future in done:
                case_id = pending.pop(future)
                error = future.exception()
                if error is not None:
                    for other in pending:
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
