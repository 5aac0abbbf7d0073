"""Raw datasets in nnU-Net v2 layout: dataset.json, case discovery and verification (docs/method.md §1).

A dataset folder holds ``dataset.json``, ``imagesTr/{CASE}_{XXXX}{ending}`` (one file per channel),
``labelsTr/{CASE}{ending}`` and optionally ``imagesTs/``. Alternatively ``dataset.json`` may list the files
of each case under a ``"dataset"`` key. :func:`verify_dataset` reads every file once and reports *every*
problem at once, each naming the file and the fix, so a user repairs a dataset in one round instead of
discovering one problem per failed run.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import DatasetError
from .imageio import LOSSY_ENDINGS, SUPPORTED_ENDINGS, ImageReadError, read_file
from .parallel import process_pool, processes_argument

REQUIRED_KEYS = ("channel_names", "labels", "numTraining", "file_ending")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset: where, what, and how to fix it."""

    path: str
    message: str
    fix: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message} -> fix: {self.fix}"


@dataclass
class CaseFiles:
    images: list[Path]
    label: Path | None


@dataclass
class VerificationReport:
    dataset: str
    n_cases: int
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "n_cases": self.n_cases,
            "ok": self.ok,
            "problems": [{"path": p.path, "message": p.message, "fix": p.fix} for p in self.problems],
            "warnings": list(self.warnings),
        }

    def raise_if_failed(self) -> None:
        if self.problems:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            raise DatasetError(
                f"dataset {self.dataset} has {len(self.problems)} problem(s); nothing was computed:\n{lines}"
            )


# --------------------------------------------------------------------------------------------------------------
# dataset.json


def dataset_json_problems(dataset_json: dict[str, Any], path: str) -> list[Problem]:
    """Check dataset.json's keys, labels and file ending; returns a list of problems (empty when fine)."""
    problems: list[Problem] = []
    if "channel_names" not in dataset_json and "modality" in dataset_json:
        dataset_json["channel_names"] = dataset_json["modality"]  # nnU-Net v1 name, still accepted
    for key in REQUIRED_KEYS:
        if key not in dataset_json:
            problems.append(
                Problem(path, f"required key {key!r} is missing", f"add {key!r} (see config/README.md)")
            )
    problems += label_problems(dataset_json, path)
    channels = dataset_json.get("channel_names")
    if channels is not None and (not isinstance(channels, dict) or not channels):
        problems.append(Problem(path, "'channel_names' must be a non-empty mapping", 'e.g. {"0": "CT"}'))
    elif isinstance(channels, dict) and sorted(channels, key=str) != [str(i) for i in range(len(channels))]:
        problems.append(
            Problem(
                path,
                f"channel_names keys must be '0'..'{len(channels) - 1}', got {list(channels)}",
                "number the channels consecutively from 0",
            )
        )
    ending = dataset_json.get("file_ending")
    if isinstance(ending, str):
        if ending.lower() in LOSSY_ENDINGS:
            problems.append(
                Problem(path, f"file_ending {ending!r} is lossy", "convert the images to .nii.gz or .png")
            )
        elif ending.lower() not in SUPPORTED_ENDINGS:
            problems.append(
                Problem(
                    path,
                    f"file_ending {ending!r} is not supported",
                    f"use one of {', '.join(SUPPORTED_ENDINGS)}",
                )
            )
    num = dataset_json.get("numTraining")
    if num is not None and (not isinstance(num, int) or isinstance(num, bool)):
        problems.append(
            Problem(path, f"numTraining must be an integer, got {num!r}", "set numTraining to the case count")
        )
    return problems


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def label_problems(dataset_json: dict[str, Any], path: str) -> list[Problem]:
    """Check ``labels`` (plain labels, regions, the ignore label) and ``regions_class_order`` as nnU-Net reads
    them (extensions spec §3.1, §4.1): one problem per rule broken, each naming the entry and the fix.

    Labels map a name to an integer, or to a list of integers (a region: the union of those label values). A
    list with more than one value puts the dataset in region mode, which needs ``regions_class_order``: the label
    each region paints back, one per non-background entry in file order. ``ignore`` marks unannotated voxels: one
    integer, the highest value, in no region.
    """
    labels = dataset_json.get("labels")
    if labels is None:
        return []
    if not isinstance(labels, dict) or not labels:
        return [Problem(path, "'labels' must be a mapping name -> integer", 'e.g. {"background": 0, "x": 1}')]
    problems: list[Problem] = []
    values: dict[str, tuple[int, ...]] = {}
    for name, value in labels.items():
        if isinstance(value, (list, tuple)):
            if not value or not all(_is_int(v) for v in value):
                problems.append(
                    Problem(
                        path,
                        f"label {name!r} is {value!r}; a region must be a non-empty list of integer label values",
                        f'e.g. "{name}": [1, 2]',
                    )
                )
                continue
            if name == "ignore":
                problems.append(
                    Problem(
                        path,
                        f"label 'ignore' is the list {value!r}; the ignore label must be one integer",
                        "give it one integer: the next value above the other labels",
                    )
                )
                continue
            values[name] = tuple(int(v) for v in value)
        elif _is_int(value):
            values[name] = (int(value),)
        else:
            problems.append(
                Problem(
                    path,
                    f"label {name!r} is {value!r}; label values must be integers (or lists of integers for regions)",
                    "use integer label values",
                )
            )
    if problems:
        return problems
    if labels.get("background") != 0:
        problems.append(Problem(path, 'labels must contain "background": 0', 'add "background": 0 to labels'))
    ignore = values.pop("ignore", None)
    declared = sorted({v for vs in values.values() for v in vs})
    expected = list(range(len(declared)))
    if declared != expected:
        gaps = sorted(set(range(max(declared, default=0) + 1)) - set(declared))
        outside = [
            f"{name!r} -> {v}" for name, vs in values.items() for v in vs if v < 0 or (gaps and v > gaps[0])
        ]
        detail = f"; entries beyond the first gap: {', '.join(outside)}" if outside else ""
        problems.append(
            Problem(
                path,
                f"label values must be consecutive integers from 0, got {declared} (missing {gaps}){detail}",
                "renumber the labels 0, 1, 2, ... in dataset.json and the label files (a region may only "
                "refer to values that are labels)",
            )
        )
    if ignore is not None:
        top = max(declared, default=0)
        if ignore[0] != top + 1:
            problems.append(
                Problem(
                    path,
                    f"the ignore label is {ignore[0]} but must be the highest label value, {top + 1} "
                    f"(one above the other labels {declared})",
                    f'set "ignore": {top + 1} and relabel the unannotated voxels of the label files',
                )
            )
        in_regions = [name for name, vs in values.items() if ignore[0] in vs]
        if in_regions:
            problems.append(
                Problem(
                    path,
                    f"the ignore value {ignore[0]} is part of {in_regions}; ignored voxels belong to no label or region",
                    "remove the ignore value from those entries",
                )
            )
    has_regions = any(len(vs) > 1 for vs in values.values())
    order = dataset_json.get("regions_class_order")
    if has_regions:
        regions = [name for name, vs in values.items() if set(vs) != {0}]
        if order is None:
            problems.append(
                Problem(
                    path,
                    f"labels define regions {regions} but 'regions_class_order' is missing",
                    f'add "regions_class_order": the label each region paints, one per region in this order: {regions}',
                )
            )
        elif not isinstance(order, list) or len(order) != len(regions):
            problems.append(
                Problem(
                    path,
                    f"'regions_class_order' is {order!r} but must list one label per region {regions} "
                    f"({len(regions)} entries, in the order of labels)",
                    f"give {len(regions)} label values, e.g. {_suggested_class_order([values[n] for n in regions])}",
                )
            )
        else:
            foreground = [v for v in declared if v != 0]
            wrong = [
                (region, label)
                for region, label in zip(regions, order, strict=True)
                if not _is_int(label) or label not in foreground
            ]
            for region, label in wrong:
                problems.append(
                    Problem(
                        path,
                        f"regions_class_order paints region {region!r} with {label!r}, which is not a foreground "
                        f"label {foreground}",
                        "use one of the foreground label values (never background or ignore)",
                    )
                )
    return problems


def _suggested_class_order(regions: list[tuple[int, ...]]) -> list[int]:
    """A ``regions_class_order`` to suggest: each region paints its smallest value no later region contains
    (BraTS' whole/core/enhancing -> edema/core/enhancing), so painting in order restores the label map."""
    order = []
    for i, region in enumerate(regions):
        later = {v for r in regions[i + 1 :] for v in r}
        own = sorted(set(region) - later) or sorted(region)
        order.append(own[0])
    return order


def allowed_label_values(dataset_json: dict[str, Any]) -> list[int]:
    """Every value a label file may hold: the labels (regions' values included) and the ignore label."""
    found: set[int] = set()
    for value in dataset_json.get("labels", {}).values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if _is_int(v):
                found.add(int(v))
    return sorted(found)


def load_dataset_json(root: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``<root>/dataset.json``; raises :class:`DatasetError` naming every problem."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        raise DatasetError(
            f"{path}: dataset.json not found -> fix: point config 'dataset' at a folder in nnU-Net v2 "
            "raw layout (dataset.json, imagesTr/, labelsTr/)"
        )
    try:
        dataset_json = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON ({exc}) -> fix: correct the JSON syntax") from exc
    problems = dataset_json_problems(dataset_json, str(path))
    if problems:
        raise DatasetError("dataset.json is not usable:\n" + "\n".join(f"  - {p}" for p in problems))
    return dataset_json


def num_channels(dataset_json: dict[str, Any]) -> int:
    """Number of input channels (images per case)."""
    return len(dataset_json["channel_names"])


# --------------------------------------------------------------------------------------------------------------
# case discovery


def _channel_pattern(file_ending: str) -> re.Pattern[str]:
    return re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})" + re.escape(file_ending) + "$")


def discover_cases(
    root: str | os.PathLike,
    dataset_json: dict[str, Any],
    images_folder: str = "imagesTr",
    labels_folder: str | None = "labelsTr",
) -> tuple[dict[str, CaseFiles], list[Problem]]:
    """Find the cases of a folder (or of dataset.json's ``"dataset"`` key) and the naming problems on the way.

    Returns ``(cases, problems)``: cases sorted by id, each with its channel files in channel order (only the
    files that exist) and its label file (None if missing); problems for files that do not fit the layout.
    """
    root = Path(root)
    n_channels = num_channels(dataset_json)
    if "dataset" in dataset_json:
        return _cases_from_json(root, dataset_json, n_channels, labels_folder is not None)
    image_dir = root / images_folder
    if not image_dir.is_dir():
        return {}, [Problem(str(image_dir), "folder is missing", f"put the images in {images_folder}/")]
    cases, problems = _image_cases(image_dir, dataset_json["file_ending"], n_channels, images_folder)
    if labels_folder is not None:
        label_dir = root / labels_folder
        problems += _attach_labels(
            cases, label_dir, dataset_json["file_ending"], images_folder, labels_folder
        )
    return cases, problems


def _files_with_ending(folder: Path, ending: str, problems: list[Problem], shown: str) -> list[Path]:
    """The visible files of a folder that have the dataset's file ending; a problem for every other file."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir():
            continue
        if not path.name.endswith(ending):
            problems.append(
                Problem(
                    str(path),
                    f"file ending is not the dataset's file_ending {ending!r}",
                    f"convert it to {ending} or remove it from {shown}/",
                )
            )
            continue
        files.append(path)
    return files


def _image_cases(
    image_dir: Path, ending: str, n_channels: int, images_folder: str
) -> tuple[dict[str, CaseFiles], list[Problem]]:
    """Cases of an images folder named ``{CASE}_{XXXX}{ending}``, and the files or channels that do not fit."""
    problems: list[Problem] = []
    pattern = _channel_pattern(ending)
    channels: dict[str, dict[int, Path]] = {}
    for path in _files_with_ending(image_dir, ending, problems, images_folder):
        match = pattern.match(path.name)
        if match is None:
            problems.append(
                Problem(
                    str(path),
                    "name does not follow {CASE}_{XXXX}" + ending,
                    "rename it to <case>_0000" + ending + " (4-digit channel index)",
                )
            )
            continue
        channels.setdefault(match["case"], {})[int(match["channel"])] = path
    cases: dict[str, CaseFiles] = {}
    for case_id in sorted(channels):
        found = channels[case_id]
        for c in range(n_channels):
            if c not in found:
                problems.append(
                    Problem(
                        str(image_dir / f"{case_id}_{c:04d}{ending}"),
                        f"missing channel file (dataset.json declares {n_channels} channel(s))",
                        f"add the channel-{c} image of case {case_id} or remove the case",
                    )
                )
        for c in sorted(found):
            if c >= n_channels:
                problems.append(
                    Problem(
                        str(found[c]),
                        f"channel {c} is not declared in channel_names",
                        "declare the channel in dataset.json or remove the file",
                    )
                )
        cases[case_id] = CaseFiles(images=[found[c] for c in range(n_channels) if c in found], label=None)
    return cases, problems


def _attach_labels(
    cases: dict[str, CaseFiles], label_dir: Path, ending: str, images_folder: str, labels_folder: str
) -> list[Problem]:
    """Give every case its label file from ``label_dir``; problems for missing labels and labels without images."""
    if not label_dir.is_dir():
        return [Problem(str(label_dir), "folder is missing", f"put the label files in {labels_folder}/")]
    problems: list[Problem] = []
    label_files = {
        path.name[: -len(ending)]: path
        for path in _files_with_ending(label_dir, ending, problems, labels_folder)
    }
    for case_id, files in cases.items():
        if case_id in label_files:
            files.label = label_files[case_id]
        else:
            problems.append(
                Problem(
                    str(label_dir / f"{case_id}{ending}"),
                    "label file is missing",
                    f"add the segmentation of case {case_id} or remove its images",
                )
            )
    for case_id in sorted(set(label_files) - set(cases)):
        problems.append(
            Problem(
                str(label_files[case_id]),
                "label file has no image",
                f"add {images_folder}/{case_id}_0000{ending} or remove the label file",
            )
        )
    return problems


def _cases_from_json(
    root: Path, dataset_json: dict[str, Any], n_channels: int, with_labels: bool
) -> tuple[dict[str, CaseFiles], list[Problem]]:
    problems: list[Problem] = []
    cases: dict[str, CaseFiles] = {}

    def resolve(p: str) -> Path:
        q = Path(os.path.expandvars(p))
        return q if q.is_absolute() else root / q

    for case_id in sorted(dataset_json["dataset"]):
        entry = dataset_json["dataset"][case_id]
        images = [resolve(p) for p in entry.get("images", [])]
        if len(images) != n_channels:
            problems.append(
                Problem(
                    f"{root / 'dataset.json'}[dataset][{case_id}]",
                    f"lists {len(images)} image(s), dataset.json declares {n_channels} channel(s)",
                    "list one image per channel",
                )
            )
        for p in images:
            if not p.is_file():
                problems.append(
                    Problem(str(p), "listed in dataset.json but missing", "fix the path or add the file")
                )
        label = resolve(entry["label"]) if with_labels and entry.get("label") else None
        if with_labels and (label is None or not label.is_file()):
            problems.append(Problem(str(label or case_id), "label file is missing", "add it or fix the path"))
        cases[case_id] = CaseFiles(images=[p for p in images if p.is_file()], label=label)
    return cases, problems


def list_raw_files(root: str | os.PathLike) -> list[str]:
    """Every file of a raw dataset's training part (for Snakemake inputs); never raises."""
    root = Path(root)
    files = [root / "dataset.json"] if (root / "dataset.json").exists() else []
    for sub in ("imagesTr", "labelsTr"):
        d = root / sub
        if d.is_dir():
            files.extend(p for p in sorted(d.iterdir()) if p.is_file() and not p.name.startswith("."))
    return [str(p) for p in files]


def training_cases(root: str | os.PathLike) -> tuple[dict[str, Any], dict[str, CaseFiles]]:
    """dataset.json and the training cases of a dataset that must already be verified (raises otherwise)."""
    dataset_json = load_dataset_json(root)
    cases, problems = discover_cases(root, dataset_json)
    if problems:
        raise DatasetError(
            "dataset layout problems (run the verify rule for the full report):\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    return dataset_json, cases


# --------------------------------------------------------------------------------------------------------------
# verification


def _geometry(props: dict[str, Any]) -> dict[str, Any] | None:
    return props.get("sitk_stuff")


def _same(a: Iterable[float], b: Iterable[float], atol: float) -> bool:
    a, b = np.asarray(list(a), float), np.asarray(list(b), float)
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=1e-5, atol=atol))


def nonfinite_counts(path: Path, array: np.ndarray) -> tuple[int, int]:
    """Number of NaN and inf voxels of an image file that :func:`nnsnake.imageio.read_file` read without
    counting them (its ``nonfinite_voxels`` property is absent: a NIfTI file SimpleITK read alone, or another
    format).

    SimpleITK's NIfTI reader silently turns NaN/inf into 0, which would hide them; for floating-point NIfTI
    files the raw voxels are therefore read again with nibabel. ``array`` is the file as SimpleITK read it, which
    is floating-point for every file that stores floats (or scales integers): an integer array means integer
    voxels, which cannot be non-finite, and the file is not opened again.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return 0, 0
    name = path.name.lower()
    if name.endswith((".nii", ".nii.gz")):
        import nibabel

        image: Any = nibabel.load(
            path
        )  # a NIfTI image (the stubs type load's result as the generic base class)
        if np.issubdtype(image.get_data_dtype(), np.floating):
            array = np.asarray(image.dataobj)
    return int(np.isnan(array).sum()), int(np.isinf(array).sum())


def verify_case(case_id: str, files: CaseFiles, allowed_labels: list[int]) -> tuple[list[Problem], list[str]]:
    """Read one case and report everything wrong with it (runs in a worker process)."""
    problems, _ = _checked_case(files, allowed_labels)
    return problems, []


def _checked_case(
    files: CaseFiles, allowed_labels: list[int]
) -> tuple[list[Problem], tuple[np.ndarray, dict[str, Any], np.ndarray] | None]:
    """A case's problems and, when it has none and a label, its arrays as read: (channels stacked as float32,
    the first channel's properties, label map)."""
    problems, reference, arrays = _check_images(files.images)
    seg = None
    if files.label is not None and files.label.exists():
        label_problems, seg = _check_label(files.label, allowed_labels, reference)
        problems += label_problems
    if problems or seg is None or reference is None:
        return problems, None
    data = np.concatenate(arrays, axis=0).astype(np.float32, copy=False)
    return problems, (data, reference[2], seg)


def _verify_and_fingerprint_case(
    case_id: str, files: CaseFiles, allowed_labels: list[int], n_samples: int | None
) -> tuple[list[Problem], list[str], Any]:
    """:func:`verify_case`, plus the case's fingerprint from the same arrays when ``n_samples`` is given and the
    case has no problem (None otherwise)."""
    problems, checked = _checked_case(files, allowed_labels)
    if n_samples is None or checked is None:
        return problems, [], None
    from .fingerprint import fingerprint_arrays  # it imports this module

    data, props, seg = checked
    return problems, [], fingerprint_arrays(data, props["spacing"], seg, n_samples)


_Reference = tuple[Path, tuple[int, ...], dict[str, Any]]
"""The first readable channel of a case: path, spatial shape and properties, which the others must match."""


def _same_grid(props: dict[str, Any], ref_props: dict[str, Any]) -> bool:
    """Same origin and direction (when the reader knows them)."""
    g, rg = _geometry(props), _geometry(ref_props)
    if not (g and rg):
        return True
    return _same(g["origin"], rg["origin"], 1e-3) and _same(g["direction"], rg["direction"], 1e-4)


def _check_images(images: list[Path]) -> tuple[list[Problem], _Reference | None, list[np.ndarray]]:
    """Problems of a case's channel files (unreadable, non-finite, not on one grid), the reference channel and
    the arrays read."""
    problems: list[Problem] = []
    reference: _Reference | None = None
    arrays: list[np.ndarray] = []
    for path in images:
        try:
            array, props = read_file(path)
        except ImageReadError as exc:
            problems.append(
                Problem(str(path), f"unreadable or corrupt ({exc})", "re-export or replace the file")
            )
            continue
        arrays.append(array)
        n_nan, n_inf = props.get("nonfinite_voxels") or nonfinite_counts(path, array)
        if n_nan or n_inf:
            problems.append(
                Problem(
                    str(path),
                    f"contains {n_nan} NaN and {n_inf} inf value(s)",
                    "replace non-finite intensities (e.g. with 0) before training",
                )
            )
        shape = array.shape[1:]
        if reference is None:
            reference = (path, shape, props)
            continue
        ref_path, ref_shape, ref_props = reference
        if shape != ref_shape:
            problems.append(
                Problem(
                    str(path),
                    f"shape {list(shape)} differs from {ref_path.name} {list(ref_shape)}",
                    "resample all channels of a case onto the same grid",
                )
            )
        elif not _same(props["spacing"], ref_props["spacing"], 1e-6):
            problems.append(
                Problem(
                    str(path),
                    f"spacing {props['spacing']} differs from {ref_path.name} {ref_props['spacing']}",
                    "give all channels of a case the same spacing",
                )
            )
        if not _same_grid(props, ref_props):
            problems.append(
                Problem(
                    str(path),
                    f"origin/direction differ from {ref_path.name}",
                    "register/resample the channels onto the same physical grid",
                )
            )
    return problems, reference, arrays


def _check_label(
    label: Path, allowed_labels: list[int], reference: _Reference | None
) -> tuple[list[Problem], np.ndarray | None]:
    """Problems of a label file (unreadable, not one integer map of declared labels, not on the image's grid)
    and the label map read (None if unreadable)."""
    try:
        seg, seg_props = read_file(label)
    except ImageReadError as exc:
        return [Problem(str(label), f"unreadable or corrupt ({exc})", "re-export or replace it")], None
    if seg.shape[0] != 1:
        return [Problem(str(label), f"label file has {seg.shape[0]} channels", "store a label map")], None
    if np.issubdtype(seg.dtype, np.floating) and not np.isfinite(seg).all():
        return [Problem(str(label), "contains NaN/inf", "store integer labels")], None
    problems: list[Problem] = []
    values = np.unique(seg)
    non_integer = values[values != np.round(values)]
    if non_integer.size:
        problems.append(
            Problem(
                str(label),
                f"holds non-integer values {non_integer[:5].tolist()}",
                "store integer labels (nearest-neighbour resampling only)",
            )
        )
    undeclared = sorted(set(values.astype(np.int64).tolist()) - set(allowed_labels))
    if undeclared:
        problems.append(
            Problem(
                str(label),
                f"label value(s) {undeclared} are not declared in dataset.json labels {allowed_labels}",
                "declare them in dataset.json 'labels' or fix the segmentation",
            )
        )
    if reference is None:
        return problems, seg
    ref_path, ref_shape, ref_props = reference
    if seg.shape[1:] != ref_shape:
        problems.append(
            Problem(
                str(label),
                f"shape {list(seg.shape[1:])} differs from image {ref_path.name} {list(ref_shape)}",
                "segment on the image's own grid",
            )
        )
    elif not _same(seg_props["spacing"], ref_props["spacing"], 1e-6):
        problems.append(
            Problem(
                str(label),
                f"spacing {seg_props['spacing']} differs from image {ref_path.name} {ref_props['spacing']}",
                "write the label with the image's spacing",
            )
        )
    if not _same_grid(seg_props, ref_props):
        problems.append(
            Problem(
                str(label),
                f"origin/direction differ from image {ref_path.name}",
                "copy the image's origin and direction into the label file",
            )
        )
    return problems, seg


def _verify_case_star(
    args: tuple[str, CaseFiles, list[int], int | None],
) -> tuple[list[Problem], list[str], Any]:
    return _verify_and_fingerprint_case(*args)


def verify_dataset(
    root: str | os.PathLike,
    processes: int = 1,
    progress: bool = False,
    *,
    fingerprint_sink: Callable[[str, Any], None] | None = None,
    num_processes: int | None = None,
) -> VerificationReport:
    """Check a raw dataset completely and return every problem found (does not raise).

    ``processes`` worker processes read the cases (``num_processes`` is its deprecated name). With
    ``fingerprint_sink`` each sound case's fingerprint (:class:`nnsnake.fingerprint.CaseFingerprint`), computed
    from the arrays just checked, is handed to ``fingerprint_sink(case_id, fingerprint)`` as it arrives, in case
    order (the workflow's verify job streams them to a file: the fingerprint job then reads no image again, and
    neither holds the dataset's samples).
    """
    from .runtime import (
        progress as progress_bar,
    )  # imports torch: not at module level (the Snakefile imports us)

    processes = processes_argument(processes, num_processes, "verify_dataset")
    root = Path(root)
    report = VerificationReport(dataset=root.name, n_cases=0)
    json_path = root / "dataset.json"
    if not json_path.is_file():
        report.problems.append(
            Problem(
                str(json_path),
                "dataset.json not found",
                "point config 'dataset' at a folder in nnU-Net v2 raw layout",
            )
        )
        return report
    try:
        dataset_json = json.loads(json_path.read_text())
    except json.JSONDecodeError as exc:
        report.problems.append(Problem(str(json_path), f"not valid JSON ({exc})", "correct the JSON syntax"))
        return report
    report.problems.extend(dataset_json_problems(dataset_json, str(json_path)))
    if any(k not in dataset_json for k in REQUIRED_KEYS):
        return report
    cases, layout_problems = discover_cases(root, dataset_json)
    report.problems.extend(layout_problems)
    report.n_cases = len(cases)
    if not cases:
        report.problems.append(
            Problem(
                str(root / "imagesTr"),
                "no training cases found (empty dataset)",
                f"add images named <case>_0000{dataset_json['file_ending']}",
            )
        )
        return report
    if isinstance(dataset_json["numTraining"], int) and dataset_json["numTraining"] != len(cases):
        report.problems.append(
            Problem(
                str(json_path),
                f"numTraining is {dataset_json['numTraining']} but {len(cases)} cases were found",
                f"set numTraining to {len(cases)}",
            )
        )
    allowed = allowed_label_values(dataset_json)
    n_samples = None
    if fingerprint_sink is not None:
        from .fingerprint import samples_per_case

        n_samples = samples_per_case(len(cases))
    jobs = [(cid, files, allowed, n_samples) for cid, files in cases.items()]
    if processes > 1:
        with process_pool(processes) as pool:
            checked = pool.map(_verify_case_star, jobs, chunksize=4)
            _collect(
                report,
                jobs,
                progress_bar(checked, total=len(jobs), description="verify", enabled=progress),
                fingerprint_sink,
            )
    else:
        checked = map(_verify_case_star, jobs)
        _collect(
            report,
            jobs,
            progress_bar(checked, total=len(jobs), description="verify", enabled=progress),
            fingerprint_sink,
        )
    return report


def _collect(
    report: VerificationReport,
    jobs: list[tuple[str, CaseFiles, list[int], int | None]],
    results: Iterable[tuple[list[Problem], list[str], Any]],
    fingerprint_sink: Callable[[str, Any], None] | None,
) -> None:
    """Add the cases' problems to ``report`` and pass their fingerprints on as they arrive (none is kept)."""
    for (case_id, *_), (problems, warnings, fingerprint) in zip(jobs, results, strict=True):
        report.problems.extend(problems)
        report.warnings.extend(warnings)
        # once any problem is known the report fails and no fingerprint is written: stop passing them on
        if fingerprint is not None and fingerprint_sink is not None and not report.problems:
            fingerprint_sink(case_id, fingerprint)
