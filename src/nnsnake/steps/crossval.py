"""crossval[configuration] and the ensembles' cross-validation (docs/method.md §8.1).

:func:`crossval` pools the folds' validation predictions of one configuration (nnU-Net's
``accumulate_cv_results``) and scores the pool; :func:`ensemble_crossval` averages two configurations'
probabilities per case and scores the result.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..deprecation import renamed_keywords
from ..errors import EvaluationError
from ..jsonio import read_json, write_json
from ..parallel import process_pool
from ._common import (
    CROSSVAL_FILE,
    SUMMARY_FILE,
    PathLike,
    case_files,
    companions,
    dataset_json_of,
    link_or_copy,
    log,
    reference_files,
    remove_case_outputs,
    score_cases,
)

if TYPE_CHECKING:
    from ..labels import LabelModel

_FOLD_PATTERN = re.compile(r"^fold_(\d+|all)$")


def _fold_of(folder: Path) -> str | None:
    """The fold a validation folder belongs to, from a ``fold_<k>`` component of its path."""
    for part in reversed(folder.parts):
        match = _FOLD_PATTERN.match(part)
        if match:
            return match.group(1)
    return None


def _pool(folders: Sequence[PathLike], file_ending: str) -> dict[str, Path]:
    """``{case: segmentation}`` over several prediction folders; a case predicted twice is an error."""
    pooled: dict[str, Path] = {}
    for folder in folders:
        for case_id, path in case_files(Path(folder), file_ending).items():
            if case_id in pooled:
                raise EvaluationError(
                    f"case {case_id} was predicted in two folds ({pooled[case_id].parent} and {path.parent}); "
                    "a case may be validated by one fold only (check splits.json)"
                )
            pooled[case_id] = path
    return pooled


def _check_folds_against_splits(
    folders: Sequence[Path], pooled: Mapping[str, Path], splits_path: PathLike
) -> None:
    """Every folder holds exactly the validation cases of its fold (read from its ``fold_<k>`` path part)."""
    from ..splits import fold_cases

    splits = read_json(splits_path)
    for folder in folders:
        fold = _fold_of(folder)
        if fold is None:
            raise EvaluationError(
                f"{folder}: cannot tell which fold this is (no fold_<k> in the path); pass "
                "the folds' validation folders training/<config>/fold_<k>/validation"
            )
        expected = set(fold_cases(splits, fold)[1])
        found = {c for c, p in pooled.items() if p.parent == folder}
        if expected - found:
            raise EvaluationError(
                f"{folder}: validation case(s) {', '.join(sorted(expected - found)[:5])} of "
                f"fold {fold} are missing; rerun validate for this fold"
            )
        if found - expected:
            raise EvaluationError(
                f"{folder}: case(s) {', '.join(sorted(found - expected)[:5])} are not in the "
                f"validation set of fold {fold} in {splits_path}; rerun validate for this fold"
            )


def _check_every_training_case(
    folders: Sequence[Path], pooled: Mapping[str, Path], dataset_dir: PathLike
) -> None:
    """Without splits: every training case of the dataset has a prediction."""
    from ..dataset import training_cases

    _, cases = training_cases(dataset_dir)
    absent = sorted(set(cases) - set(pooled))
    if absent:
        raise EvaluationError(
            f"{len(absent)} training case(s) have no cross-validation prediction in "
            f"{', '.join(map(str, folders))} (e.g. {', '.join(absent[:5])}); validate every fold"
        )


def _link_pool(pooled: Mapping[str, Path], output_dir: Path, file_ending: str) -> int:
    """Link (or copy) every pooled case's files into ``output_dir``; returns how many have probabilities."""
    with_probabilities = 0
    for case_id, source in pooled.items():
        sources = companions(source, file_ending)
        targets = companions(output_dir / f"{case_id}{file_ending}", file_ending)
        for kind, path in sources.items():
            if path.is_file():
                link_or_copy(path, targets[kind])
            else:
                targets[kind].unlink(missing_ok=True)
        with_probabilities += sources["probabilities"].is_file()
    return with_probabilities


@renamed_keywords(num_processes="processes")
def crossval(
    fold_validation_dirs: Sequence[PathLike],
    dataset_dir: PathLike,
    output_dir: PathLike,
    splits_path: PathLike | None = None,
    processes: int = 1,
) -> dict[str, Any]:
    """Pool the folds' validation predictions of one configuration and score them together.

    ``output_dir`` (``crossval/<config>/``) receives every case's segmentation, ``.npz`` probabilities and
    ``.json`` properties (hard links to the fold files, copies where links are impossible), ``crossval.json``
    (which fold predicted which case) and ``summary.json`` (nnU-Net's fields, scored against the raw labels), last.
    A case predicted by two folds is an error. With ``splits_path`` every folder must hold exactly the validation
    cases of its fold (the fold is read from the ``fold_<k>`` part of its path); without it every training case
    of the dataset must be predicted.
    """
    from ..labels import LabelModel
    from ..metrics import write_summary

    start = time.perf_counter()
    dataset_json = dataset_json_of(dataset_dir)
    ending = dataset_json["file_ending"]
    folders = [Path(f) for f in fold_validation_dirs]
    if not folders:
        raise EvaluationError("crossval needs at least one fold validation folder")
    pooled = _pool(folders, ending)
    case_fold: dict[str, str | None] = {c: _fold_of(p.parent) for c, p in pooled.items()}
    if splits_path is not None:
        _check_folds_against_splits(folders, pooled, splits_path)
    else:
        _check_every_training_case(folders, pooled, dataset_dir)
    references = reference_files(dataset_dir, sorted(pooled))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, CROSSVAL_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for case_id in set(case_files(output_dir, ending)) - set(pooled):
        remove_case_outputs(output_dir, case_id, ending)
    with_probabilities = _link_pool(pooled, output_dir, ending)
    predictions = {c: output_dir / f"{c}{ending}" for c in pooled}
    summary = score_cases(predictions, references, LabelModel.from_dataset_json(dataset_json), processes)
    folds = sorted(
        {f for f in case_fold.values() if f is not None}, key=lambda f: (not f.isdigit(), f.zfill(4))
    )
    write_json(
        output_dir / CROSSVAL_FILE,
        {
            "folds": folds,
            "case_fold": {c: case_fold[c] for c in sorted(case_fold)},
            "sources": [str(f) for f in folders],
            "n_cases": len(pooled),
            "n_with_probabilities": int(with_probabilities),
        },
    )
    write_summary(output_dir / SUMMARY_FILE, summary)
    dice = summary["foreground_mean"]["Dice"]
    log.info(
        "cross-validation of %d case(s) from %d fold(s): foreground mean Dice %.4f (%.1f s)",
        len(pooled),
        len(folders),
        dice,
        time.perf_counter() - start,
    )
    return {
        "n_cases": len(pooled),
        "folds": folds,
        "foreground_mean_dice": dice,
        "summary": str(output_dir / SUMMARY_FILE),
    }


# --------------------------------------------------------------------------------------------------------------
# ensembles of configurations (§8.1: probabilities averaged)


def _member_cases(member: PathLike | Sequence[PathLike], file_ending: str) -> dict[str, Path]:
    """A member given as its crossval folder or as the list of its folds' validation folders."""
    if isinstance(member, (str, os.PathLike)):
        return _pool([member], file_ending)
    return _pool(list(member), file_ending)


def _load_probabilities(path: Path) -> np.ndarray:
    if not path.is_file():
        raise EvaluationError(
            f"{path}: probabilities are missing; ensembles need them (validate with "
            "save_probabilities, the default)"
        )
    with np.load(path, allow_pickle=False) as npz:
        if "probabilities" not in npz:
            raise EvaluationError(f"{path}: no 'probabilities' array inside; re-export this prediction")
        return np.asarray(npz["probabilities"], dtype=np.float32)


def ensemble_segmentation(
    sources: Sequence[Path], labels: LabelModel, file_ending: str
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Average the members' probabilities of one case and take the label map (the label model's rule: argmax, or
    regions painted in order).

    Returns ``(label map, mean probabilities, geometry properties of the first member's segmentation)``.
    """
    from ..imageio import read_seg
    from ..selection import ensemble_probabilities

    probabilities = ensemble_probabilities(
        [_load_probabilities(companions(s, file_ending)["probabilities"]) for s in sources]
    )
    seg = labels.segmentation_from_probabilities(probabilities)
    member_seg, properties = read_seg(
        sources[0]
    )  # the geometry to write with: the member's raw-geometry file
    if seg.shape != member_seg.shape[1:]:
        raise EvaluationError(
            f"{sources[0]}: probabilities of shape {list(probabilities.shape)} do not fit the "
            f"segmentation beside it {list(member_seg.shape[1:])}; re-export this prediction"
        )
    return seg, probabilities, properties


def _ensemble_case(sources: Sequence[Path], target: Path, labels: LabelModel, file_ending: str) -> None:
    from ..imageio import write_seg

    seg, _, properties = ensemble_segmentation(sources, labels, file_ending)
    write_seg(seg, target, properties)


@renamed_keywords(num_processes="processes")
def ensemble_crossval(
    members: Sequence[PathLike | Sequence[PathLike]],
    dataset_dir: PathLike,
    output_dir: PathLike,
    processes: int = 1,
) -> dict[str, Any]:
    """Cross-validation of an ensemble: average the members' probabilities per case, take the label map in raw
    geometry, and score it (§8.1).

    ``members``: for each configuration its ``crossval/<config>`` folder, or the list of its folds' validation
    folders. Both members must cover the same cases. Writes ``<case><file_ending>`` per case, ``crossval.json`` and
    ``summary.json`` (last) into ``output_dir`` (``crossval/ensemble_<a>+<b>/``).
    """
    from ..labels import LabelModel
    from ..metrics import write_summary

    start = time.perf_counter()
    if len(members) < 2:
        raise EvaluationError(f"an ensemble needs at least two members, got {len(members)}")
    dataset_json = dataset_json_of(dataset_dir)
    labels = LabelModel.from_dataset_json(dataset_json)
    ending = dataset_json["file_ending"]
    member_cases = [_member_cases(m, ending) for m in members]
    first = set(member_cases[0])
    for member, cases in zip(members[1:], member_cases[1:], strict=True):
        if set(cases) != first:
            differ = sorted(first ^ set(cases))
            raise EvaluationError(
                f"ensemble members cover different cases ({member} vs {members[0]}: "
                f"{', '.join(differ[:5])}); validate every fold of both configurations"
            )
    case_ids = sorted(first)
    if not case_ids:
        raise EvaluationError(f"{members[0]}: no predictions ending in {ending!r}")
    references = reference_files(dataset_dir, case_ids)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, CROSSVAL_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for case_id in set(case_files(output_dir, ending)) - set(case_ids):
        remove_case_outputs(output_dir, case_id, ending)
    jobs = [
        ([cases[c] for cases in member_cases], output_dir / f"{c}{ending}", labels, ending) for c in case_ids
    ]
    if processes > 1 and len(jobs) > 1:
        with process_pool(min(processes, len(jobs))) as pool:
            list(pool.map(_ensemble_case, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _ensemble_case(*job)
    summary = score_cases({c: output_dir / f"{c}{ending}" for c in case_ids}, references, labels, processes)
    write_json(
        output_dir / CROSSVAL_FILE,
        {
            "members": [
                str(m) if isinstance(m, (str, os.PathLike)) else [str(f) for f in m] for m in members
            ],
            "n_cases": len(case_ids),
        },
    )
    write_summary(output_dir / SUMMARY_FILE, summary)
    dice = summary["foreground_mean"]["Dice"]
    log.info(
        "ensemble of %d members over %d case(s): foreground mean Dice %.4f (%.1f s)",
        len(members),
        len(case_ids),
        dice,
        time.perf_counter() - start,
    )
    return {"n_cases": len(case_ids), "foreground_mean_dice": dice, "summary": str(output_dir / SUMMARY_FILE)}
