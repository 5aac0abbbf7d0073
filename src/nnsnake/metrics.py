"""Segmentation metrics with nnU-Net's rules and its ``summary.json`` layout.

Cross-validation scores, model selection and the postprocessing decision all read these numbers, and users
compare them with nnU-Net's, so the rules are nnU-Net's (docs/method.md §7.4):

* only the given foreground labels or regions are scored; background is never scored, and a region's mask is
  the union of its labels;
* voxels where the *reference* equals ``ignore_label`` are left out of every count;
* per case and label: TP, FP, FN, TN, ``n_pred = TP + FP``, ``n_ref = TP + FN``, Dice ``2TP / (2TP + FP + FN)``,
  IoU ``TP / (TP + FP + FN)``; when reference and prediction are both empty (``TP + FP + FN == 0``) Dice and IoU
  are NaN (an empty reference with a non-empty prediction scores 0);
* ``mean[label][metric]`` is the NaN-ignoring mean over cases; ``foreground_mean[metric]`` is the plain mean of
  those over labels (label 0 skipped), so one label that is NaN in every case makes it NaN.

Label keys are ``str(label)`` (``"1"``) or ``str(tuple)`` (``"(1, 2)"``) exactly as nnU-Net writes them, so a
summary can be diffed against nnU-Net's. In memory the keys are already strings: the summary dict is JSON-ready.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nnsnake import imageio, jsonio

from .deprecation import warn_deprecated
from .errors import MetricsError
from .labels import LabelModel, LabelOrRegion, label_or_region_key
from .parallel import process_pool

METRIC_NAMES = ("Dice", "IoU", "FP", "TP", "FN", "TN", "n_pred", "n_ref")


def normalize_label_or_region(label_or_region: Any) -> LabelOrRegion:
    """An int stays an int; a list or tuple of labels becomes a tuple of ints (a region)."""
    if isinstance(label_or_region, (list, tuple, np.ndarray)):
        return tuple(int(v) for v in label_or_region)
    return int(label_or_region)


def label_key(label_or_region: Any) -> str:
    """nnU-Net's key of a label (``"1"``) or region (``"(1, 2)"``, ``"(2,)"``) in ``summary.json``."""
    return label_or_region_key(normalize_label_or_region(label_or_region))


def parse_label_key(key: str) -> LabelOrRegion:
    """Inverse of :func:`label_key`."""
    key = key.strip()
    if key.startswith("("):
        return tuple(int(part) for part in key.strip("()").split(",") if part.strip())
    return int(key)


def region_mask(seg: np.ndarray, label_or_region: Any) -> np.ndarray:
    """Boolean mask of a label, or of the union of a region's labels."""
    label_or_region = normalize_label_or_region(label_or_region)
    if isinstance(label_or_region, tuple):
        return np.isin(seg, label_or_region)
    return seg == label_or_region


def foreground_labels_or_regions(dataset_json: Mapping[str, Any]) -> tuple[list[LabelOrRegion], int | None]:
    """What nnU-Net scores for a dataset and its ignore label: ``(LabelModel.evaluated, LabelModel.ignore_label)``
    (kept for callers that hold a ``dataset.json`` mapping rather than the label model)."""
    labels = LabelModel.from_dataset_json(dataset_json)
    return labels.evaluated, labels.ignore_label


def warn_renamed_keyword(function: str, old: str, new: str) -> None:
    """Log and warn (DeprecationWarning) that ``function``'s keyword ``old`` is now ``new``."""
    warn_deprecated(f"{function}({old}=...) is deprecated; use {new}=...", stacklevel=3)


def confusion_counts(
    mask_ref: np.ndarray, mask_pred: np.ndarray, ignore_mask: np.ndarray | None = None
) -> tuple[int, int, int, int]:
    """``(TP, FP, FN, TN)`` voxel counts, leaving out voxels where ``ignore_mask`` is set."""
    if ignore_mask is not None:
        use = ~ignore_mask
        mask_ref = mask_ref & use
        mask_pred = mask_pred & use
        n_used = int(np.count_nonzero(use))
    else:
        n_used = int(mask_ref.size)
    tp = int(np.count_nonzero(mask_ref & mask_pred))
    n_ref = int(np.count_nonzero(mask_ref))
    n_pred = int(np.count_nonzero(mask_pred))
    fp = n_pred - tp
    fn = n_ref - tp
    tn = n_used - tp - fp - fn
    return tp, fp, fn, tn


def compute_case_metrics(
    reference: np.ndarray,
    prediction: np.ndarray,
    labels_or_regions: Sequence[Any],
    ignore_label: int | None = None,
) -> dict[str, dict[str, float | int]]:
    """Metrics of one case, keyed by :func:`label_key`; both arrays are label maps of the same shape."""
    reference = np.asarray(reference)
    prediction = np.asarray(prediction)
    if reference.shape != prediction.shape:
        raise MetricsError(
            f"reference shape {reference.shape} differs from prediction shape {prediction.shape}"
        )
    ignore_mask = reference == ignore_label if ignore_label is not None else None
    result: dict[str, dict[str, float | int]] = {}
    for label_or_region in labels_or_regions:
        tp, fp, fn, tn = confusion_counts(
            region_mask(reference, label_or_region), region_mask(prediction, label_or_region), ignore_mask
        )
        if tp + fp + fn == 0:
            dice = iou = float("nan")
        else:
            dice = 2 * tp / (2 * tp + fp + fn)
            iou = tp / (tp + fp + fn)
        result[label_key(label_or_region)] = {
            "Dice": dice,
            "IoU": iou,
            "FP": fp,
            "TP": tp,
            "FN": fn,
            "TN": tn,
            "n_pred": tp + fp,
            "n_ref": tp + fn,
        }
    return result


def compute_metrics_for_files(
    reference_file: str | os.PathLike,
    prediction_file: str | os.PathLike,
    labels_or_regions: Sequence[Any],
    ignore_label: int | None = None,
) -> dict[str, Any]:
    """One ``metric_per_case`` entry: reads both label maps and scores them."""
    reference, _ = imageio.read_seg(reference_file)
    prediction, _ = imageio.read_seg(prediction_file)
    if reference.shape != prediction.shape:
        raise MetricsError(
            f"{prediction_file}: shape {list(prediction.shape[1:])} differs from reference {reference_file} "
            f"{list(reference.shape[1:])}; predictions must be exported in the reference's geometry"
        )
    return {
        "reference_file": str(reference_file),
        "prediction_file": str(prediction_file),
        "metrics": compute_case_metrics(reference, prediction, labels_or_regions, ignore_label),
    }


def aggregate_metrics(
    metric_per_case: Sequence[Mapping[str, Any]], labels_or_regions: Sequence[Any]
) -> dict[str, Any]:
    """Build the summary (``metric_per_case``, ``mean``, ``foreground_mean``) from per-case entries."""
    if not metric_per_case:
        raise MetricsError(
            "no cases to aggregate: the prediction folder holds no file with the dataset's ending"
        )
    keys = [label_key(r) for r in labels_or_regions]
    means: dict[str, dict[str, float]] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices legitimately give NaN
        for key in keys:
            means[key] = {
                metric: float(
                    np.nanmean(np.array([c["metrics"][key][metric] for c in metric_per_case], float))
                )
                for metric in METRIC_NAMES
            }
        foreground_keys = [k for k in keys if k != "0"]
        foreground_mean = {
            metric: float(np.mean(np.array([means[k][metric] for k in foreground_keys], float)))
            for metric in METRIC_NAMES
        }
    return {"metric_per_case": list(metric_per_case), "mean": means, "foreground_mean": foreground_mean}


def compute_metrics_for_arrays(
    references: Sequence[np.ndarray],
    predictions: Sequence[np.ndarray],
    labels_or_regions: Sequence[Any],
    ignore_label: int | None = None,
    reference_files: Sequence[str] | None = None,
    prediction_files: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The summary of in-memory label maps (selection and postprocessing reuse it without writing files).

    ``reference_files`` / ``prediction_files`` only fill the entries' file fields (default: the case index).
    """
    if len(references) != len(predictions):
        raise MetricsError(f"{len(references)} references but {len(predictions)} predictions")
    entries = []
    for i, (ref, pred) in enumerate(zip(references, predictions, strict=True)):
        try:
            metrics = compute_case_metrics(ref, pred, labels_or_regions, ignore_label)
        except MetricsError as exc:
            name = prediction_files[i] if prediction_files is not None else f"case {i}"
            raise MetricsError(f"{name}: {exc}") from exc
        entries.append(
            {
                "reference_file": str(reference_files[i]) if reference_files is not None else str(i),
                "prediction_file": str(prediction_files[i]) if prediction_files is not None else str(i),
                "metrics": metrics,
            }
        )
    return aggregate_metrics(entries, labels_or_regions)


def list_files_with_ending(folder: str | os.PathLike, file_ending: str) -> list[str]:
    """Sorted names of the plain files in ``folder`` that end with ``file_ending`` (hidden files skipped)."""
    return sorted(
        name
        for name in os.listdir(folder)
        if name.endswith(file_ending)
        and not name.startswith(".")
        and os.path.isfile(os.path.join(folder, name))
    )


def compute_metrics_on_folder(
    reference_dir: str | os.PathLike,
    prediction_dir: str | os.PathLike,
    file_ending: str,
    labels_or_regions: Sequence[Any],
    ignore_label: int | None = None,
    processes: int = 1,
    chill: bool = False,
    output_file: str | os.PathLike | None = None,
    *,
    num_processes: int | None = None,
) -> dict[str, Any]:
    """Score every prediction in ``prediction_dir`` against the same file name in ``reference_dir``.

    Without ``chill`` every reference must have a prediction (a cross-validation that lost a case would
    otherwise score too well). The result has nnU-Net's ``summary.json`` structure; ``output_file`` writes it.
    ``processes`` worker processes score the cases (``num_processes`` is its deprecated name).
    """
    if num_processes is not None:
        warn_renamed_keyword("compute_metrics_on_folder", "num_processes", "processes")
        processes = num_processes
    reference_dir, prediction_dir = str(reference_dir), str(prediction_dir)
    for folder, what in ((reference_dir, "reference"), (prediction_dir, "prediction")):
        if not os.path.isdir(folder):
            raise MetricsError(f"{what} folder {folder} does not exist")
    predicted = list_files_with_ending(prediction_dir, file_ending)
    if not chill:
        missing = sorted(set(list_files_with_ending(reference_dir, file_ending)) - set(predicted))
        if missing:
            raise MetricsError(
                f"{prediction_dir}: {len(missing)} reference case(s) have no prediction "
                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); predict them or pass chill=True"
            )
    no_reference = [name for name in predicted if not os.path.isfile(os.path.join(reference_dir, name))]
    if no_reference:
        raise MetricsError(
            f"{prediction_dir}: prediction(s) without a reference in {reference_dir}: {', '.join(no_reference[:5])}"
        )
    if not predicted:
        raise MetricsError(f"{prediction_dir}: no predictions ending in {file_ending!r}")
    jobs = [
        (
            os.path.join(reference_dir, name),
            os.path.join(prediction_dir, name),
            list(labels_or_regions),
            ignore_label,
        )
        for name in predicted
    ]
    if processes > 1 and len(jobs) > 1:
        with process_pool(min(processes, len(jobs))) as pool:
            entries = list(pool.map(compute_metrics_for_files, *zip(*jobs, strict=True)))
    else:
        entries = [compute_metrics_for_files(*job) for job in jobs]
    summary = aggregate_metrics(entries, labels_or_regions)
    if output_file is not None:
        write_summary(output_file, summary)
    return summary


def write_summary(path: str | os.PathLike, summary: Mapping[str, Any]) -> None:
    """Write a summary as sorted-key JSON (NaN stays NaN, as in nnU-Net's files)."""
    jsonio.write_json(path, summary)


def read_summary(path: str | os.PathLike) -> dict[str, Any]:
    return jsonio.read_json(path)


def case_id_from_file(path: str | os.PathLike, file_ending: str | None = None) -> str:
    """The case identifier of a label file: its name without the file ending."""
    name = Path(path).name
    endings: Iterable[str] = (
        (file_ending,) if file_ending else sorted(imageio.SUPPORTED_ENDINGS, key=len, reverse=True)
    )
    for ending in endings:
        if name.endswith(ending):
            return name[: -len(ending)]
    raise MetricsError(f"{path}: does not end with {file_ending or 'a supported file ending'}")


def per_case_metric(
    summary: Mapping[str, Any], metric: str = "Dice", file_ending: str | None = None
) -> dict[str, dict[str, float]]:
    """``{case_id: {label_key: value}}`` from a summary, in the summary's case order (input to selection)."""
    result: dict[str, dict[str, float]] = {}
    for entry in summary["metric_per_case"]:
        case = case_id_from_file(entry["prediction_file"], file_ending)
        result[case] = {key: float(values[metric]) for key, values in entry["metrics"].items()}
    return result
