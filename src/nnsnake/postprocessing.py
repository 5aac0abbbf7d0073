"""Keep-the-largest-component postprocessing, decided on cross-validation as nnU-Net does (docs/method.md §8.2).

The only operation is "keep the largest connected component" of a mask (full connectivity: 26 neighbours in 3D,
8 in 2D; every component of maximal size survives; removed voxels become background). Whether it is used is
decided on the selected candidate's cross-validation predictions:

1. all foreground labels together: accepted iff the foreground-mean Dice rises strictly and no label's (or
   region's) mean Dice falls;
2. then, only when more than one label/region is scored, each label/region in turn, starting from the best
   output so far: accepted iff that label's mean Dice rises strictly. Accepted steps are chained.

Every comparison with NaN is false, so a NaN mean rejects a step (as in nnU-Net).

The decision is plain JSON (``postprocessing.json``): the accepted ``steps`` (each names the labels whose union is
the mask) plus the scores before and after and a record of every step that was tried. :func:`apply_postprocessing`
replays the steps on a new segmentation; no pickled functions are needed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from nnsnake import imageio, jsonio
from nnsnake.metrics import (
    aggregate_metrics,
    compute_case_metrics,
    label_key,
    list_files_with_ending,
    normalize_label_or_region,
    warn_renamed_keyword,
)

from .errors import PostprocessingError
from .labels import LabelModel
from .parallel import process_pool

OPERATION = "keep_largest_component"
ALL_FOREGROUND = "all_foreground"


def labels_of(labels_or_regions: Any) -> list[int]:
    """The sorted labels whose union forms the mask of a label, a region, or a list of labels/regions."""
    items = labels_or_regions if isinstance(labels_or_regions, list) else [labels_or_regions]
    result: set[int] = set()
    for item in items:
        item = normalize_label_or_region(item)
        result.update(item if isinstance(item, tuple) else (item,))
    return sorted(result)


def largest_component_mask(mask: np.ndarray) -> np.ndarray:
    """The components of maximal size of a boolean mask, at full connectivity (ties keep all of them)."""
    structure = ndimage.generate_binary_structure(mask.ndim, mask.ndim)
    components, n_components = ndimage.label(mask, structure=structure)
    if n_components <= 1:
        return mask.copy()
    sizes = np.bincount(components.ravel())
    sizes[0] = 0
    keep = sizes == sizes.max()
    keep[0] = False
    return keep[components]


def keep_largest_component(seg: np.ndarray, labels_or_regions: Any, background: int = 0) -> np.ndarray:
    """Copy of ``seg`` where, within the union of the given labels/regions, only the largest component remains.

    ``labels_or_regions`` is a label, a region (tuple of labels) or a list of them; all of them form one mask.
    Voxels of smaller components are set to ``background``. The input is not modified.
    """
    mask = np.isin(seg, labels_of(labels_or_regions))
    result = np.array(seg, copy=True)
    if not mask.any():
        return result
    result[mask & ~largest_component_mask(mask)] = background
    return result


def make_step(labels_or_regions: Any, scope: str) -> dict[str, Any]:
    """One postprocessing step as JSON: the operation, the mask's labels and what it was decided for."""
    return {"operation": OPERATION, "labels": labels_of(labels_or_regions), "scope": scope}


def apply_step(seg: np.ndarray, step: Mapping[str, Any]) -> np.ndarray:
    if step["operation"] != OPERATION:
        raise PostprocessingError(
            f"unknown postprocessing operation {step['operation']!r} (known: {OPERATION})"
        )
    return keep_largest_component(seg, list(step["labels"]))


def apply_postprocessing(
    seg: np.ndarray, decision: Mapping[str, Any] | Sequence[Mapping[str, Any]]
) -> np.ndarray:
    """Replay the accepted steps of a decision (or a list of steps) on one segmentation, in order."""
    steps = decision["steps"] if isinstance(decision, Mapping) else decision
    for step in steps:
        seg = apply_step(seg, step)
    return np.array(seg, copy=True) if not steps else seg


# --------------------------------------------------------------------------------------------- evaluation backends
def _load(source: Any) -> np.ndarray:
    if isinstance(source, np.ndarray):
        return source
    if str(source).endswith(".npy"):
        return np.load(source)
    return imageio.read_seg(source)[0]


def _score_step(
    source: Any,
    reference: Any,
    step: Mapping[str, Any] | None,
    labels_or_regions: list[Any],
    ignore_label: int | None,
    save_to: str | None,
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Apply ``step`` (or nothing) to one case and score it; the result is saved as .npy or returned."""
    seg = _load(source)
    ref = _load(reference)
    if seg.shape != ref.shape:
        raise PostprocessingError(
            f"{source}: shape {seg.shape} differs from its reference {reference} {ref.shape}"
        )
    if step is not None:
        seg = apply_step(seg, step)
    metrics = compute_case_metrics(ref, seg, labels_or_regions, ignore_label)
    if save_to is not None:
        np.save(save_to, seg)
        return metrics, None
    return metrics, seg


class _Cases:
    """The current segmentation of every case, in memory (array input) or as .npy files (folder input)."""

    def __init__(
        self,
        current: dict[str, Any],
        references: dict[str, Any],
        work_dir: Path | None,
        labels_or_regions: list[Any],
        ignore_label: int | None,
        pool: ProcessPoolExecutor | None = None,
    ):
        self.current, self.references, self.work_dir = current, references, work_dir
        self.labels_or_regions, self.ignore_label, self.pool = labels_or_regions, ignore_label, pool
        self.n_trials = 0

    def run(self, step: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """Apply ``step`` to the current segmentations: (candidate segmentations, their summary)."""
        cases = list(self.current)
        targets: list[str | None] = [None] * len(cases)
        if self.work_dir is not None and step is not None:
            self.n_trials += 1
            folder = self.work_dir / f"trial_{self.n_trials}"
            folder.mkdir()
            targets = [str(folder / f"{case}.npy") for case in cases]
        jobs = [
            (self.current[c], self.references[c], step, self.labels_or_regions, self.ignore_label, t)
            for c, t in zip(cases, targets, strict=True)
        ]
        if self.pool is not None:
            results = list(self.pool.map(_score_step, *zip(*jobs, strict=True)))
        else:
            results = [_score_step(*job) for job in jobs]
        candidate = {
            case: (target if target is not None else seg if step is not None else self.current[case])
            for case, target, (_, seg) in zip(cases, targets, results, strict=True)
        }
        entries = [
            {
                "reference_file": _name(self.references[c], c),
                "prediction_file": _name(self.current[c], c),
                "metrics": metrics,
            }
            for c, (metrics, _) in zip(cases, results, strict=True)
        ]
        return candidate, aggregate_metrics(entries, self.labels_or_regions)

    def accept(self, candidate: dict[str, Any]) -> None:
        previous = self.current
        self.current = candidate
        self._remove_trial_files(previous)

    def reject(self, candidate: dict[str, Any]) -> None:
        self._remove_trial_files(candidate)

    def _remove_trial_files(self, segmentations: dict[str, Any]) -> None:
        """Free the disk space of a superseded trial (never the input predictions)."""
        if self.work_dir is None:
            return
        for source in segmentations.values():
            if (
                isinstance(source, str)
                and source.endswith(".npy")
                and Path(source).parent.parent == self.work_dir
            ):
                Path(source).unlink(missing_ok=True)


def _name(source: Any, case: str) -> str:
    return case if isinstance(source, np.ndarray) else str(source)


def _dice_scores(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "foreground_mean": summary["foreground_mean"]["Dice"],
        "mean": {key: values["Dice"] for key, values in summary["mean"].items()},
    }


def _means(summary: Mapping[str, Any]) -> dict[str, Any]:
    return {"foreground_mean": summary["foreground_mean"], "mean": summary["mean"]}


def _decide(
    cases: _Cases, labels_or_regions: list[Any], foreground_labels: list[int], log: Callable[[str], None]
) -> dict[str, Any]:
    _, baseline = cases.run(None)
    current_summary = baseline
    steps: list[dict[str, Any]] = []
    trials: list[dict[str, Any]] = []

    step = make_step(foreground_labels, ALL_FOREGROUND)
    candidate, summary = cases.run(step)
    improved = summary["foreground_mean"]["Dice"] > current_summary["foreground_mean"]["Dice"]
    worse = [k for k in summary["mean"] if summary["mean"][k]["Dice"] < current_summary["mean"][k]["Dice"]]
    accepted = bool(improved and not worse)
    trials.append(
        {
            "step": step,
            "accepted": accepted,
            "before": _dice_scores(current_summary),
            "after": _dice_scores(summary),
            "rule": "foreground_mean Dice strictly higher and no label's mean Dice lower",
        }
    )
    log(
        f"keep largest foreground component: foreground mean Dice {current_summary['foreground_mean']['Dice']:.5f} "
        f"-> {summary['foreground_mean']['Dice']:.5f}; {'accepted' if accepted else 'rejected'}"
        + (f" (worse: {', '.join(worse)})" if worse and improved else "")
    )
    if accepted:
        cases.accept(candidate)
        current_summary = summary
        steps.append(step)
    else:
        cases.reject(candidate)

    if len(labels_or_regions) > 1:
        for label_or_region in labels_or_regions:
            key = label_key(label_or_region)
            step = make_step(label_or_region, key)
            candidate, summary = cases.run(step)
            before, after = current_summary["mean"][key]["Dice"], summary["mean"][key]["Dice"]
            accepted = bool(after > before)
            trials.append(
                {
                    "step": step,
                    "accepted": accepted,
                    "before": _dice_scores(current_summary),
                    "after": _dice_scores(summary),
                    "rule": f"mean Dice of {key} strictly higher",
                }
            )
            log(
                f"keep largest component of {key}: mean Dice {before:.5f} -> {after:.5f}; "
                f"{'accepted' if accepted else 'rejected'}"
            )
            if accepted:
                cases.accept(candidate)
                current_summary = summary
                steps.append(step)
            else:
                cases.reject(candidate)

    return {
        "steps": steps,
        "input_folder": _means(baseline),
        "postprocessed": _means(current_summary),
        "trials": trials,
        "labels_or_regions": [label_key(r) for r in labels_or_regions],
        "n_cases": len(cases.current),
    }


def determine_postprocessing(
    predictions: str | os.PathLike | Mapping[str, np.ndarray],
    references: str | os.PathLike | Mapping[str, np.ndarray],
    labels_or_regions: Sequence[Any] | LabelModel,
    file_ending: str | None = None,
    ignore_label: int | None = None,
    foreground_labels: Sequence[int] | None = None,
    processes: int = 1,
    work_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
    *,
    num_processes: int | None = None,
) -> dict[str, Any]:
    """Decide nnU-Net's keep-largest-component postprocessing on cross-validation predictions.

    ``predictions`` / ``references`` are either folders of label files with ``file_ending`` (every prediction is
    scored against the reference of the same name; folder mode keeps intermediate results as .npy files in a
    temporary folder under ``work_dir``, so memory stays at one case per process) or mappings
    ``case -> label map`` (in memory). ``foreground_labels`` forms the all-foreground mask (default: every label
    of ``labels_or_regions``). ``labels_or_regions`` may be the dataset's :class:`~nnsnake.labels.LabelModel`:
    then what it evaluates is scored and its ignore label left out. ``processes`` worker processes score the
    cases (``num_processes`` is its deprecated name). Returns the JSON-able decision; write it with
    :func:`write_decision`.
    """
    if num_processes is not None:
        warn_renamed_keyword("determine_postprocessing", "num_processes", "processes")
        processes = num_processes
    if isinstance(labels_or_regions, LabelModel):
        if ignore_label is None:
            ignore_label = labels_or_regions.ignore_label
        labels_or_regions = labels_or_regions.evaluated
    labels_or_regions = [normalize_label_or_region(r) for r in labels_or_regions]
    if not labels_or_regions:
        raise PostprocessingError("no labels or regions to postprocess")
    foreground = (
        sorted(set(foreground_labels) - {0})
        if foreground_labels is not None
        else [v for v in labels_of(list(labels_or_regions)) if v != 0]
    )

    if isinstance(predictions, Mapping):
        if not isinstance(references, Mapping):
            raise PostprocessingError(
                "predictions are arrays, so references must be a mapping case -> array too"
            )
        missing = [c for c in predictions if c not in references]
        if missing:
            raise PostprocessingError(f"no reference for case(s) {', '.join(missing[:5])}")
        if not predictions:
            raise PostprocessingError("no predictions given")
        cases = _Cases(
            {c: np.asarray(p) for c, p in predictions.items()},
            {c: np.asarray(references[c]) for c in predictions},
            None,
            labels_or_regions,
            ignore_label,
        )
        return _decide(cases, labels_or_regions, foreground, log)

    if file_ending is None:
        raise PostprocessingError("file_ending is required when predictions is a folder")
    prediction_dir, reference_dir = Path(predictions), Path(references)  # type: ignore[arg-type]
    names = list_files_with_ending(prediction_dir, file_ending)
    if not names:
        raise PostprocessingError(f"{prediction_dir}: no predictions ending in {file_ending!r}")
    missing = [n for n in names if not (reference_dir / n).is_file()]
    if missing:
        raise PostprocessingError(
            f"{prediction_dir}: no reference in {reference_dir} for {', '.join(missing[:5])}"
        )
    unpredicted = sorted(set(list_files_with_ending(reference_dir, file_ending)) - set(names))
    if unpredicted:
        warnings.warn(
            f"{prediction_dir}: {len(unpredicted)} reference case(s) have no prediction; postprocessing "
            "should be decided on the whole cross-validation",
            stacklevel=2,
        )
    tmp = Path(tempfile.mkdtemp(prefix="nnsnake_pp_", dir=work_dir))
    pool = None
    if processes > 1 and len(names) > 1:  # one pool for all steps: spawning workers costs seconds
        pool = process_pool(min(processes, len(names)))
    try:
        case_ids = [n[: -len(file_ending)] for n in names]
        cases = _Cases(
            {c: str(prediction_dir / n) for c, n in zip(case_ids, names, strict=True)},
            {c: str(reference_dir / n) for c, n in zip(case_ids, names, strict=True)},
            tmp,
            labels_or_regions,
            ignore_label,
            pool,
        )
        return _decide(cases, labels_or_regions, foreground, log)
    finally:
        if pool is not None:
            pool.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


def write_decision(path: str | os.PathLike, decision: Mapping[str, Any]) -> None:
    """Write ``postprocessing.json`` (sorted keys, atomic)."""
    jsonio.write_json(path, decision)


def read_decision(path: str | os.PathLike) -> dict[str, Any]:
    decision = jsonio.read_json(path)
    for step in decision.get("steps", []):
        if step.get("operation") != OPERATION:
            raise PostprocessingError(f"{path}: unknown postprocessing operation {step.get('operation')!r}")
    return decision


def _postprocess_file(source: str, target: str, steps: list[dict[str, Any]]) -> None:
    seg, props = imageio.read_seg(source)
    imageio.write_seg(apply_postprocessing(seg, steps)[0], target, props)


def apply_postprocessing_to_folder(
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    decision: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    file_ending: str,
    processes: int = 1,
    *,
    num_processes: int | None = None,
) -> list[str]:
    """Postprocess every label file of ``input_dir`` into ``output_dir`` (same names, same geometry), with
    ``processes`` worker processes (``num_processes`` is its deprecated name)."""
    if num_processes is not None:
        warn_renamed_keyword("apply_postprocessing_to_folder", "num_processes", "processes")
        processes = num_processes
    steps = list(decision["steps"] if isinstance(decision, Mapping) else decision)
    names = list_files_with_ending(input_dir, file_ending)
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    jobs = [(os.path.join(input_dir, n), os.path.join(output_dir, n), steps) for n in names]
    if processes > 1 and len(jobs) > 1:
        with process_pool(min(processes, len(jobs))) as pool:
            list(pool.map(_postprocess_file, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _postprocess_file(*job)
    return names
