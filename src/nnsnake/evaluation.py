"""From trained folds to a decision and to segmentations of new images (method §5.10, §7–§9).

These are the file-level functions behind the workflow's evaluation rules and ``nnsnake predict``:

* :func:`validate_fold` predicts a fold's validation cases (sliding window, mirroring) and scores them;
* :func:`crossval` pools the folds' validation predictions of a configuration and scores the pool;
* :func:`ensemble_crossval` averages two configurations' cross-validation probabilities (§8.1);
* :func:`select` picks the configuration or ensemble (nnU-Net's rule plus the bootstrap of the cases);
* :func:`decide_postprocessing` decides keep-the-largest-component on the selected candidate's pool (§8.2);
* :func:`predict_folder` segments a folder of new images with the selected candidate, all its folds and the
  postprocessing, after checking the whole input folder.

Each reads files, calls the stage's library code (``inference``, ``metrics``, ``selection``, ``postprocessing``)
and writes its outputs atomically, the JSON that marks a step as done last; each returns a small dict for the log.
The results layout is DESIGN.md's: ``training/<config>/fold_<k>/{model_final.pt, validation/}``,
``crossval/<candidate>/``, ``selection.json``, ``bootstrap.json``, ``postprocessing.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EvaluationError, PredictionInputError
from .jsonio import read_json, write_json
from .parallel import process_pool

log = logging.getLogger("nnsnake")

PathLike = str | os.PathLike

SUMMARY_FILE = "summary.json"
CROSSVAL_FILE = "crossval.json"
SELECTION_FILE = "selection.json"
BOOTSTRAP_FILE = "bootstrap.json"
BOOTSTRAP_PLOT = "bootstrap.png"
POSTPROCESSING_FILE = "postprocessing.json"
PLANS_FILE = "plans.json"
PREDICTION_RECORD = "prediction.json"
WORK_FOLDER = ".nnsnake_work"
# nnU-Net's candidate order (find_best_configuration's default -c); it decides exact ties
CONFIGURATION_ORDER = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
TRAINER_NAME = "nnsnake"


# --------------------------------------------------------------------------------------------------------------
# small helpers


def _dataset_json_of(dataset: PathLike) -> dict[str, Any]:
    """dataset.json of a raw dataset folder (checked), or read from a dataset.json path."""
    from .dataset import load_dataset_json

    path = Path(dataset)
    if path.is_file():
        return read_json(path)
    return load_dataset_json(path)


def _reference_files(dataset_dir: PathLike, case_ids: Sequence[str]) -> dict[str, Path]:
    """The raw label file of each case (labelsTr, or the files dataset.json lists)."""
    from .dataset import training_cases

    _, cases = training_cases(dataset_dir)
    unknown = [c for c in case_ids if c not in cases or cases[c].label is None]
    if unknown:
        raise EvaluationError(
            f"{dataset_dir}: no reference segmentation for case(s) {', '.join(unknown[:5])}; predictions and the "
            "dataset do not belong together (wrong dataset folder, or the dataset changed after training)"
        )
    return {c: Path(cases[c].label) for c in case_ids}  # type: ignore[arg-type]


def _score_cases(
    predictions: Mapping[str, Path],
    references: Mapping[str, Path],
    dataset_json: Mapping[str, Any],
    num_processes: int = 1,
) -> dict[str, Any]:
    """nnU-Net's summary (``metric_per_case``, ``mean``, ``foreground_mean``) of explicit case → file pairs."""
    from .metrics import aggregate_metrics, compute_metrics_for_files, foreground_labels_or_regions

    labels_or_regions, ignore_label = foreground_labels_or_regions(dataset_json)
    cases = sorted(predictions)
    jobs = [(str(references[c]), str(predictions[c]), list(labels_or_regions), ignore_label) for c in cases]
    if num_processes > 1 and len(jobs) > 1:
        with process_pool(min(num_processes, len(jobs))) as pool:
            entries = list(pool.map(compute_metrics_for_files, *zip(*jobs, strict=True)))
    else:
        entries = [compute_metrics_for_files(*job) for job in jobs]
    return aggregate_metrics(entries, labels_or_regions)


def _link_or_copy(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` as a hard link (no extra disk), or a copy where links are impossible;
    atomically, replacing what was there."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def _case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    """``{case: segmentation file}`` of a prediction folder (hidden files skipped)."""
    from .metrics import list_files_with_ending

    if not folder.is_dir():
        raise EvaluationError(
            f"{folder}: prediction folder does not exist; run the step that writes it first"
        )
    return {name[: -len(file_ending)]: folder / name for name in list_files_with_ending(folder, file_ending)}


def _companions(segmentation: Path, file_ending: str) -> dict[str, Path]:
    from .inference import prediction_paths

    return prediction_paths(segmentation, file_ending)


def _remove_case_outputs(
    folder: Path, case_id: str, file_ending: str, keep_segmentation: bool = False
) -> None:
    paths = _companions(folder / f"{case_id}{file_ending}", file_ending)
    for kind, path in paths.items():
        if kind == "segmentation" and keep_segmentation:
            continue
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _compute_device(device: str, num_threads: int | None) -> Iterator[Any]:
    """The torch device for a prediction job, with a claimed GPU slot and the thread count set (restored after).

    On CUDA the CPU only feeds the GPU, so torch gets one thread (§7.1); on CPU ``num_threads`` or every
    available core.
    """
    import torch

    from .runtime import claim_gpu, select_device
    from .training import available_cpus

    saved_threads = torch.get_num_threads()
    with contextlib.ExitStack() as stack:
        if str(device).strip().lower() != "cpu":
            stack.enter_context(claim_gpu())
        selected = select_device(device)
        threads = 1 if selected.type == "cuda" else int(num_threads or available_cpus())
        torch.set_num_threads(max(1, threads))
        try:
            yield selected
        finally:
            torch.set_num_threads(saved_threads)


def _configuration(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    from .planning import resolve_configuration

    return resolve_configuration(dict(plans), configuration)


# --------------------------------------------------------------------------------------------------------------
# validate[configuration, fold]  (§5.10)


def validate_fold(
    preprocessed_dir: PathLike,
    plans_path: PathLike,
    configuration: str,
    dataset_dir: PathLike,
    splits_path: PathLike,
    fold: int | str,
    model_path: PathLike,
    output_dir: PathLike,
    device: str = "auto",
    mirroring: bool = True,
    save_probabilities: bool = True,
    previous_stage_dir: PathLike | Sequence[PathLike] | None = None,
    num_threads: int | None = None,
    next_stage_preprocessed_dir: PathLike | None = None,
    next_stage_output_dir: PathLike | None = None,
    step_size: float = 0.5,
    num_processes: int = 1,
    progress: bool = True,
    autocast: bool | None = None,
) -> dict[str, Any]:
    """Predict a fold's validation cases from their preprocessed data with ``model_final.pt`` and score them.

    Writes into ``output_dir`` (the fold's ``validation/`` folder) per case ``<case><file_ending>`` (raw
    geometry) and, with ``save_probabilities``, ``<case>.npz`` (key ``probabilities``, needed by ensembles) and
    ``<case>.json`` (properties); then ``summary.json`` against the raw label files, last. Files of cases that
    are not in this fold's validation set are removed, so the pooled cross-validation never sees stale cases.

    ``preprocessed_dir``: this configuration's preprocessed cases (the cascade uses 3d_fullres's).
    ``previous_stage_dir`` (3d_cascade_fullres only): the folder(s) of the 3d_lowres out-of-fold predictions
    ``<case>.npy`` at the fullres preprocessed shape, as used in training. ``next_stage_preprocessed_dir`` + ``next_stage_output_dir``
    (3d_lowres only): also write ``<case>.npy`` for the cascade (§5.8) into ``next_stage_output_dir``; pass the
    same folder for all five folds so it ends up holding every training case out-of-fold.
    """
    from .inference import network_from_checkpoint, predict_preprocessed
    from .metrics import write_summary
    from .preprocessing import stored_case_ids
    from .splits import fold_cases
    from .training import previous_stage_files

    start = time.perf_counter()
    output_dir = Path(output_dir)
    plans = read_json(plans_path)
    dataset_json = _dataset_json_of(dataset_dir)
    config = _configuration(plans, configuration)
    ending = dataset_json["file_ending"]
    _, val_ids = fold_cases(read_json(splits_path), fold)
    if not val_ids:
        raise EvaluationError(f"{splits_path}: fold {fold} has no validation cases")
    stored = set(stored_case_ids(preprocessed_dir))
    missing = [c for c in val_ids if c not in stored]
    if missing:
        raise EvaluationError(
            f"{preprocessed_dir}: validation case(s) {', '.join(missing[:5])} of fold {fold} are "
            f"not preprocessed; rerun preprocessing"
        )
    references = _reference_files(dataset_dir, val_ids)

    previous_stage_segs = None
    if config.get("previous_stage"):
        if previous_stage_dir is None:
            raise EvaluationError(
                f"{configuration} is a cascade stage: pass previous_stage_dir, the folder of the "
                f"{config['previous_stage']} predictions <case>.npy"
            )
        try:
            previous_files = previous_stage_files(previous_stage_dir, val_ids)
        except (FileNotFoundError, ValueError) as err:
            raise EvaluationError(f"{err} (validate {config['previous_stage']} fold {fold} first)") from err

        def previous_stage_segs(case_id: str) -> np.ndarray:
            return np.load(previous_files[case_id], allow_pickle=False)

    next_stage = None
    if (next_stage_preprocessed_dir is None) != (next_stage_output_dir is None):
        raise EvaluationError("pass both next_stage_preprocessed_dir and next_stage_output_dir, or neither")
    if next_stage_preprocessed_dir is not None:
        next_stage = (next_stage_preprocessed_dir, next_stage_output_dir)

    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
    for case_id in set(_case_files(output_dir, ending)) - set(val_ids):
        _remove_case_outputs(output_dir, case_id, ending)
    for stale in output_dir.glob("*.npz"):
        if stale.name[:-4] not in val_ids or not save_probabilities:
            _remove_case_outputs(
                output_dir, stale.name[:-4], ending, keep_segmentation=stale.name[:-4] in val_ids
            )

    with _compute_device(device, num_threads) as torch_device:
        network, init = network_from_checkpoint(model_path, plans, config, dataset_json, torch_device)
        mirror_axes = None
        if mirroring:
            axes = init.get("inference_allowed_mirroring_axes")
            mirror_axes = (
                tuple(int(a) for a in axes) if axes is not None else tuple(range(len(config["patch_size"])))
            )
        log.info(
            "validating %s fold %s: %d case(s) on %s, mirroring %s",
            configuration,
            fold,
            len(val_ids),
            torch_device,
            list(mirror_axes) if mirror_axes else "off",
        )
        predict_preprocessed(
            preprocessed_dir,
            val_ids,
            output_dir,
            network,
            plans,
            configuration,
            dataset_json,
            mirror_axes=mirror_axes,
            step_size=step_size,
            device=torch_device,
            save_probabilities=save_probabilities,
            previous_stage_segs=previous_stage_segs,
            next_stage=next_stage,
            progress=progress,
            autocast=autocast,
        )
    predictions = {c: output_dir / f"{c}{ending}" for c in val_ids}
    summary = _score_cases(predictions, references, dataset_json, num_processes)
    write_summary(output_dir / SUMMARY_FILE, summary)
    seconds = time.perf_counter() - start
    dice = summary["foreground_mean"]["Dice"]
    log.info(
        "%s fold %s: foreground mean Dice %.4f over %d case(s) (%.1f s)",
        configuration,
        fold,
        dice,
        len(val_ids),
        seconds,
    )
    return {
        "configuration": configuration,
        "fold": str(fold),
        "n_cases": len(val_ids),
        "foreground_mean_dice": dice,
        "summary": str(output_dir / SUMMARY_FILE),
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------------------
# crossval[configuration]  (§8.1 accumulate_cv_results)

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
        for case_id, path in _case_files(Path(folder), file_ending).items():
            if case_id in pooled:
                raise EvaluationError(
                    f"case {case_id} was predicted in two folds ({pooled[case_id].parent} and {path.parent}); "
                    "a case may be validated by one fold only (check splits.json)"
                )
            pooled[case_id] = path
    return pooled


def crossval(
    fold_validation_dirs: Sequence[PathLike],
    dataset_dir: PathLike,
    output_dir: PathLike,
    splits_path: PathLike | None = None,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Pool the folds' validation predictions of one configuration and score them together.

    ``output_dir`` (``crossval/<config>/``) receives every case's segmentation, ``.npz`` probabilities and
    ``.json`` properties (hard links to the fold files, copies where links are impossible), ``crossval.json``
    (which fold predicted which case) and ``summary.json`` (nnU-Net's fields, scored against the raw labels), last.
    A case predicted by two folds is an error. With ``splits_path`` every folder must hold exactly the validation
    cases of its fold (the fold is read from the ``fold_<k>`` part of its path); without it every training case
    of the dataset must be predicted.
    """
    from .metrics import write_summary
    from .splits import fold_cases

    start = time.perf_counter()
    dataset_json = _dataset_json_of(dataset_dir)
    ending = dataset_json["file_ending"]
    folders = [Path(f) for f in fold_validation_dirs]
    if not folders:
        raise EvaluationError("crossval needs at least one fold validation folder")
    pooled = _pool(folders, ending)
    case_fold: dict[str, str | None] = {c: _fold_of(p.parent) for c, p in pooled.items()}
    if splits_path is not None:
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
    else:
        from .dataset import training_cases

        _, cases = training_cases(dataset_dir)
        absent = sorted(set(cases) - set(pooled))
        if absent:
            raise EvaluationError(
                f"{len(absent)} training case(s) have no cross-validation prediction in "
                f"{', '.join(map(str, folders))} (e.g. {', '.join(absent[:5])}); validate every fold"
            )
    references = _reference_files(dataset_dir, sorted(pooled))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, CROSSVAL_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for case_id in set(_case_files(output_dir, ending)) - set(pooled):
        _remove_case_outputs(output_dir, case_id, ending)
    with_probabilities = 0
    for case_id, source in pooled.items():
        sources = _companions(source, ending)
        targets = _companions(output_dir / f"{case_id}{ending}", ending)
        for kind, path in sources.items():
            if path.is_file():
                _link_or_copy(path, targets[kind])
            else:
                targets[kind].unlink(missing_ok=True)
        with_probabilities += sources["probabilities"].is_file()
    predictions = {c: output_dir / f"{c}{ending}" for c in pooled}
    summary = _score_cases(predictions, references, dataset_json, num_processes)
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


def _ensemble_segmentation(
    sources: Sequence[Path], dataset_json: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Average the members' probabilities of one case and take the label map (argmax, or regions in order).

    Returns ``(label map, mean probabilities, geometry properties of the first member's segmentation)``.
    """
    from .imageio import read_seg
    from .inference import LabelLayout, segmentation_from_probabilities
    from .selection import ensemble_probabilities

    ending = dataset_json["file_ending"]
    probabilities = ensemble_probabilities(
        [_load_probabilities(_companions(s, ending)["probabilities"]) for s in sources]
    )
    seg = segmentation_from_probabilities(probabilities, LabelLayout.from_dataset_json(dataset_json))
    member_seg, properties = read_seg(
        sources[0]
    )  # the geometry to write with: the member's raw-geometry file
    if seg.shape != member_seg.shape[1:]:
        raise EvaluationError(
            f"{sources[0]}: probabilities of shape {list(probabilities.shape)} do not fit the "
            f"segmentation beside it {list(member_seg.shape[1:])}; re-export this prediction"
        )
    return seg, probabilities, properties


def _ensemble_case(sources: Sequence[Path], target: Path, dataset_json: Mapping[str, Any]) -> None:
    from .imageio import write_seg

    seg, _, properties = _ensemble_segmentation(sources, dataset_json)
    write_seg(seg, target, properties)


def ensemble_crossval(
    members: Sequence[PathLike | Sequence[PathLike]],
    dataset_dir: PathLike,
    output_dir: PathLike,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Cross-validation of an ensemble: average the members' probabilities per case, take the label map in raw
    geometry, and score it (§8.1).

    ``members``: for each configuration its ``crossval/<config>`` folder, or the list of its folds' validation
    folders. Both members must cover the same cases. Writes ``<case><file_ending>`` per case, ``crossval.json`` and
    ``summary.json`` (last) into ``output_dir`` (``crossval/ensemble_<a>+<b>/``).
    """
    from .metrics import write_summary

    start = time.perf_counter()
    if len(members) < 2:
        raise EvaluationError(f"an ensemble needs at least two members, got {len(members)}")
    dataset_json = _dataset_json_of(dataset_dir)
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
    references = _reference_files(dataset_dir, case_ids)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in (SUMMARY_FILE, CROSSVAL_FILE):
        (output_dir / name).unlink(missing_ok=True)
    for case_id in set(_case_files(output_dir, ending)) - set(case_ids):
        _remove_case_outputs(output_dir, case_id, ending)
    jobs = [
        ([cases[c] for cases in member_cases], output_dir / f"{c}{ending}", dataset_json) for c in case_ids
    ]
    if num_processes > 1 and len(jobs) > 1:
        with process_pool(min(num_processes, len(jobs))) as pool:
            list(pool.map(_ensemble_case, *zip(*jobs, strict=True)))
    else:
        for job in jobs:
            _ensemble_case(*job)
    summary = _score_cases(
        {c: output_dir / f"{c}{ending}" for c in case_ids}, references, dataset_json, num_processes
    )
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


# --------------------------------------------------------------------------------------------------------------
# select  (§8.1, §8.3 + bootstrap)


def _candidate_sort_key(name: str) -> tuple[int, list[tuple[int, str]]]:
    from .selection import candidate_members

    members = candidate_members(name)
    return len(members), [
        (CONFIGURATION_ORDER.index(m) if m in CONFIGURATION_ORDER else len(CONFIGURATION_ORDER), m)
        for m in members
    ]


def select(
    candidate_summaries: Mapping[str, PathLike],
    output_selection: PathLike,
    output_bootstrap: PathLike,
    output_plot: PathLike,
    n_bootstrap: int = 1000,
    seed: int = 0,
    min_win_share: float = 0.5,
    dataset_dir: PathLike | None = None,
    plans_path: PathLike | None = None,
    folds: Sequence[int | str] | None = None,
) -> dict[str, Any]:
    """Choose the configuration or ensemble to predict with, from the candidates' cross-validation summaries.

    ``candidate_summaries`` maps each candidate name (a configuration, or ``ensemble_<a>+<b>`` from
    :func:`nnsnake.selection.ensemble_name`) to its ``crossval/<name>/summary.json``. Candidates are put in
    nnU-Net's order (configurations 2d, 3d_fullres, 3d_lowres, 3d_cascade_fullres, then pairs), which decides
    exact ties. The per-case, per-label Dice values go to :func:`nnsnake.selection.bootstrap_selection`.

    Writes ``output_bootstrap`` (every candidate's pooled score, bootstrap mean, interval, P(best), the
    comparisons), ``output_plot``, and ``output_selection`` last: the chosen candidate, its member
    configurations and folds, nnU-Net's ``inference_information`` fields, and (with ``dataset_dir``) a copy of
    dataset.json so that ``nnsnake predict`` needs nothing but the results folder.
    """
    from .metrics import per_case_metric, read_summary
    from .selection import bootstrap_selection, candidate_cost, plot_bootstrap, selection_record

    if not candidate_summaries:
        raise EvaluationError("select needs at least one candidate summary")
    names = sorted(candidate_summaries, key=_candidate_sort_key)
    per_case = {}
    for name in names:
        path = Path(candidate_summaries[name])
        if not path.is_file():
            raise EvaluationError(
                f"{path}: cross-validation summary of candidate {name} is missing; run crossval"
            )
        per_case[name] = per_case_metric(read_summary(path), "Dice")
    result = bootstrap_selection(per_case, n_bootstrap=n_bootstrap, seed=seed, min_win_share=min_win_share)
    record = selection_record(result)
    selected = record["selected"]
    if folds is None:
        folds = _crossval_folds(candidate_summaries, record["members"])
    plans = read_json(plans_path) if plans_path is not None else {}
    dataset_json = _dataset_json_of(dataset_dir) if dataset_dir is not None else None
    selection_dir = Path(output_selection).parent
    plot_name = os.path.relpath(Path(output_plot), selection_dir)
    record.update(
        {
            "folds": [str(f) for f in folds] if folds is not None else None,
            "crossval_folder": os.path.relpath(Path(candidate_summaries[selected]).parent, selection_dir),
            "candidates": {
                name: {k: result["candidates"][name][k] for k in ("score", "ci_low", "ci_high", "p_best")}
                for name in names
            },
            "bootstrap": {
                "file": os.path.relpath(Path(output_bootstrap), selection_dir),
                "plot": plot_name,
                "n_bootstrap": n_bootstrap,
                "seed": seed,
            },
            "inference_information": {
                "dataset_name_or_id": plans.get("dataset_name")
                or (Path(dataset_dir).name if dataset_dir else None),
                "folds": [str(f) for f in folds] if folds is not None else None,
                "considered_models": names,
                "ensembling_allowed": any(candidate_cost(n) > 1 for n in names),
                "all_results": record["all_results"],
                "best_model_or_ensemble": {
                    "result_on_crossval_pre_pp": record["score"],
                    "postprocessing_file": POSTPROCESSING_FILE,
                    "some_plans_file": PLANS_FILE,
                    "selected_model_or_models": [
                        {
                            "configuration": m,
                            "trainer": TRAINER_NAME,
                            "plans_identifier": plans.get("plans_name"),
                        }
                        for m in record["members"]
                    ],
                },
            },
            "inference_command": "nnsnake predict -i INPUT_FOLDER -o OUTPUT_FOLDER -m " + str(selection_dir),
        }
    )
    if dataset_json is not None:
        record["dataset_json"] = dataset_json
    write_json(output_bootstrap, result)
    plot_bootstrap(result, output_plot)
    write_json(output_selection, record)
    log.info(
        "selected %s (cross-validation foreground mean Dice %.4f; nnU-Net's choice %s)",
        selected,
        record["score"],
        record["nnunet_choice"],
    )
    for name in result["order"]:
        info = result["candidates"][name]
        log.info(
            "  %-40s %.4f  [%.4f, %.4f]  P(best) %.2f",
            name,
            info["score"],
            info["ci_low"],
            info["ci_high"],
            info["p_best"],
        )
    return {
        "selected": selected,
        "members": record["members"],
        "score": record["score"],
        "nnunet_choice": record["nnunet_choice"],
        "selection": str(output_selection),
    }


def _crossval_folds(candidate_summaries: Mapping[str, PathLike], members: Sequence[str]) -> list[str] | None:
    """The folds of the selected members, from the ``crossval.json`` beside their summaries."""
    folds: list[str] | None = None
    for member in members:
        if member not in candidate_summaries:
            continue
        record_path = Path(candidate_summaries[member]).parent / CROSSVAL_FILE
        if not record_path.is_file():
            continue
        member_folds = [str(f) for f in read_json(record_path)["folds"]]
        if folds is not None and member_folds != folds:
            raise EvaluationError(
                f"members of the selected ensemble were cross-validated on different folds "
                f"({folds} and {member_folds} in {record_path})"
            )
        folds = member_folds
    return folds


# --------------------------------------------------------------------------------------------------------------
# postprocessing decision  (§8.2)


def decide_postprocessing(
    selection_path: PathLike,
    dataset_dir: PathLike,
    output_path: PathLike,
    crossval_dir: PathLike | None = None,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Decide keep-the-largest-component on the selected candidate's cross-validation predictions (§8.2).

    ``crossval_dir`` defaults to the candidate's folder recorded in ``selection.json`` (``crossval/<selected>``
    beside it), so a rule can depend on every candidate's summary without knowing the winner in advance. Writes
    ``output_path`` (postprocessing.json): the accepted ``steps``, the scores before and after, every trial, and
    ``result_on_crossval_pre_pp`` / ``result_on_crossval_post_pp`` (foreground mean Dice).
    """
    from .metrics import foreground_labels_or_regions
    from .postprocessing import determine_postprocessing, write_decision

    start = time.perf_counter()
    selection = read_json(selection_path)
    if crossval_dir is None:
        crossval_dir = Path(selection_path).parent / selection["crossval_folder"]
    crossval_dir = Path(crossval_dir)
    dataset_json = _dataset_json_of(dataset_dir)
    ending = dataset_json["file_ending"]
    predictions = _case_files(crossval_dir, ending)
    if not predictions:
        raise EvaluationError(
            f"{crossval_dir}: no cross-validation predictions ending in {ending!r}; run crossval"
        )
    references = _reference_files(dataset_dir, sorted(predictions))
    labels_or_regions, ignore_label = foreground_labels_or_regions(dataset_json)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".nnsnake_pp_", dir=output_path.parent) as tmp:
        reference_dir = Path(tmp) / "references"  # exactly the predicted cases, under the predictions' names
        reference_dir.mkdir()
        for case_id, path in references.items():
            target = reference_dir / f"{case_id}{ending}"
            try:
                target.symlink_to(path.resolve())
            except OSError:
                shutil.copy2(path, target)
        decision = determine_postprocessing(
            crossval_dir,
            reference_dir,
            labels_or_regions,
            file_ending=ending,
            ignore_label=ignore_label,
            num_processes=num_processes,
            work_dir=tmp,
            log=log.info,
        )
    decision = dict(decision)
    decision.update(
        {
            "selected": selection["selected"],
            "crossval_folder": os.path.relpath(crossval_dir, output_path.parent),
            "result_on_crossval_pre_pp": decision["input_folder"]["foreground_mean"]["Dice"],
            "result_on_crossval_post_pp": decision["postprocessed"]["foreground_mean"]["Dice"],
        }
    )
    write_decision(output_path, decision)
    log.info(
        "postprocessing for %s: %d step(s) accepted; foreground mean Dice %.4f -> %.4f (%.1f s)",
        selection["selected"],
        len(decision["steps"]),
        decision["result_on_crossval_pre_pp"],
        decision["result_on_crossval_post_pp"],
        time.perf_counter() - start,
    )
    return {
        "selected": selection["selected"],
        "steps": decision["steps"],
        "result_on_crossval_pre_pp": decision["result_on_crossval_pre_pp"],
        "result_on_crossval_post_pp": decision["result_on_crossval_post_pp"],
        "output": str(output_path),
    }


# --------------------------------------------------------------------------------------------------------------
# predict[input set] and `nnsnake predict`  (§9)


def verify_prediction_inputs(
    input_dir: PathLike, dataset_json: Mapping[str, Any], num_processes: int = 1
) -> dict[str, list[Path]]:
    """Check a folder of new images completely before anything is predicted; ``{case: channel files}``.

    Every file must be named ``{CASE}_{XXXX}{file_ending}`` with the model's file ending; every case needs exactly
    the channels of dataset.json; every file must be readable, finite, and the channels of a case must share
    shape, spacing, origin and direction. All problems are reported at once (:class:`PredictionInputError`),
    each naming its file.
    """
    from .dataset import discover_cases, verify_case

    folder = Path(input_dir).resolve()
    if not folder.is_dir():
        raise PredictionInputError(f"{input_dir}: input folder does not exist (or is not a folder)")
    layout_json = {
        k: v for k, v in dataset_json.items() if k != "dataset"
    }  # cases come from the folder itself
    cases, problems = discover_cases(
        folder.parent, layout_json, images_folder=folder.name, labels_folder=None
    )
    ending = dataset_json["file_ending"]
    if not cases and not problems:
        raise PredictionInputError(f"{input_dir}: no images named <case>_0000{ending} in this folder")
    jobs = [(case_id, files, []) for case_id, files in cases.items() if files.images]
    if num_processes > 1 and len(jobs) > 1:
        with process_pool(min(num_processes, len(jobs))) as pool:
            results = list(pool.map(verify_case, *zip(*jobs, strict=True)))
    else:
        results = [verify_case(*job) for job in jobs]
    for case_problems, _warnings in results:
        problems.extend(case_problems)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise PredictionInputError(
            f"input folder {input_dir} has {len(problems)} problem(s); nothing was predicted:\n{lines}"
        )
    return {case_id: list(files.images) for case_id, files in cases.items()}


def _model_files(results_dir: Path, configuration: str, folds: Sequence[str]) -> list[Path]:
    from .training import MODEL_FINAL

    return [results_dir / "training" / configuration / f"fold_{f}" / MODEL_FINAL for f in folds]


def _stages_to_run(plans: Mapping[str, Any], members: Sequence[str]) -> list[str]:
    """The members plus the previous stages they need, each stage after the one it depends on."""
    order: list[str] = []

    def add(configuration: str, chain: tuple[str, ...]) -> None:
        if configuration in order:
            return
        if configuration in chain:
            raise EvaluationError(f"plans: previous_stage of {configuration} loops ({' -> '.join(chain)})")
        previous = _configuration(plans, configuration).get("previous_stage")
        if previous:
            add(previous, (*chain, configuration))
        order.append(configuration)

    for member in members:
        add(member, ())
    return order


def _load_selection(results_dir: Path, postprocess: bool) -> tuple[dict, dict, dict | None, dict]:
    """selection.json, plans.json, postprocessing.json and dataset.json of a results folder, or one error
    listing every missing file."""
    from .postprocessing import read_decision

    needed = [results_dir / SELECTION_FILE, results_dir / PLANS_FILE]
    if postprocess:
        needed.append(results_dir / POSTPROCESSING_FILE)
    missing = [p for p in needed if not p.is_file()]
    if missing:
        hint = ""
        if not results_dir.is_dir():
            hint = f" ({results_dir} does not exist)"
        elif not (results_dir / PLANS_FILE).is_file():
            found = sorted(p.parent.name for p in results_dir.glob(f"*/{SELECTION_FILE}"))
            hint = f"; did you mean {results_dir / found[0]}?" if found else ""
        raise EvaluationError(
            f"{results_dir} is not a finished nnsnake results folder: missing {', '.join(p.name for p in missing)}"
            f"{hint}. Pass -m results/<DatasetName> after the workflow has run select and postprocess."
        )
    selection = read_json(results_dir / SELECTION_FILE)
    plans = read_json(results_dir / PLANS_FILE)
    decision = read_decision(results_dir / POSTPROCESSING_FILE) if postprocess else None
    if "dataset_json" in selection:
        dataset_json = selection["dataset_json"]
    elif (results_dir / "dataset.json").is_file():
        dataset_json = read_json(results_dir / "dataset.json")
    else:
        raise EvaluationError(
            f"{results_dir / SELECTION_FILE}: holds no dataset_json and there is no "
            f"{results_dir / 'dataset.json'}; rerun the select rule"
        )
    return selection, plans, decision, dataset_json


def _finish_case(
    sources: Sequence[Path],
    targets: Mapping[str, Path],
    dataset_json: Mapping[str, Any],
    decision: Mapping[str, Any] | None,
    save_probabilities: bool,
) -> None:
    """Final output of one case: the member's segmentation or the ensemble's, postprocessed, written with the
    input's geometry (probabilities first, the segmentation last)."""
    from .imageio import read_seg, write_seg
    from .inference import save_probabilities_npz
    from .postprocessing import apply_postprocessing

    ending = dataset_json["file_ending"]
    if len(sources) > 1:
        seg, probabilities, properties = _ensemble_segmentation(sources, dataset_json)
    else:
        seg_array, properties = read_seg(sources[0])
        seg, probabilities = seg_array[0], None
    if decision is not None:
        seg = apply_postprocessing(seg, decision)
    if save_probabilities:
        member_files = _companions(sources[0], ending)
        if probabilities is not None:
            save_probabilities_npz(targets["probabilities"], probabilities)
            shutil.copy2(member_files["properties"], targets["properties"])
        else:
            os.replace(member_files["probabilities"], targets["probabilities"])
            os.replace(member_files["properties"], targets["properties"])
    write_seg(seg, targets["segmentation"], properties)
    log.debug("wrote %s", targets["segmentation"])


def predict_folder(
    input_dir: PathLike,
    output_dir: PathLike,
    results_dir: PathLike,
    folds: Sequence[int | str] | None = None,
    mirroring: bool = True,
    device: str = "auto",
    save_probabilities: bool = False,
    continue_prediction: bool = False,
    num_threads: int | None = None,
    step_size: float = 0.5,
    postprocess: bool = True,
    num_processes: int = 1,
    progress: bool = True,
    autocast: bool | None = None,
) -> dict[str, Any]:
    """Segment every case of ``input_dir`` with the selected model or ensemble of ``results_dir`` (§9).

    First, before anything is predicted, the results folder (selection.json, plans.json, postprocessing.json,
    every needed ``model_final.pt``) and the whole input folder (:func:`verify_prediction_inputs`) are checked.
    Then each configuration of the selected candidate (and a cascade's previous stage, run first and fed in)
    predicts with all its ``folds`` (default: the cross-validated ones; logits averaged over folds), an
    ensemble's members' probabilities are averaged, the postprocessing decision is applied and
    ``<case><file_ending>`` is written into ``output_dir`` with the input's exact geometry (with
    ``save_probabilities`` also ``<case>.npz`` + ``<case>.json``). ``continue_prediction`` skips cases whose
    outputs exist. ``autocast``: None = fp16 on CUDA, full precision on CPU; True = also bfloat16 on CPU.
    Intermediate files live in ``output_dir/.nnsnake_work`` and are removed at the end;
    ``prediction.json`` (what was run) is written last.
    """
    from .inference import predict_from_raw, prediction_paths

    start = time.perf_counter()
    input_path, output_path, results_path = Path(input_dir), Path(output_dir), Path(results_dir)
    if output_path.resolve() == input_path.resolve():
        raise EvaluationError(f"{output_dir}: the output folder must differ from the input folder")
    selection, plans, decision, dataset_json = _load_selection(results_path, postprocess)
    members = list(selection["members"])
    ending = dataset_json["file_ending"]
    stages = _stages_to_run(plans, members)
    if folds is None:
        folds = selection.get("folds")
    if not folds:
        raise EvaluationError(f"{results_path / SELECTION_FILE} names no folds; pass the folds to use")
    fold_names = [str(f) for f in folds]
    models = {stage: _model_files(results_path, stage, fold_names) for stage in stages}
    absent = [str(p) for paths in models.values() for p in paths if not p.is_file()]
    if absent:
        raise EvaluationError(
            f"{len(absent)} model file(s) of {selection['selected']} are missing: "
            f"{', '.join(absent[:6])}; train these folds or choose others with --folds"
        )
    cases = verify_prediction_inputs(input_path, dataset_json, num_processes)

    todo = dict(cases)
    if continue_prediction:
        for case_id in list(todo):
            paths = prediction_paths(output_path / case_id, ending)
            wanted = [paths["segmentation"]] + ([paths["probabilities"]] if save_probabilities else [])
            if all(p.is_file() for p in wanted):
                del todo[case_id]
    log.info(
        "predicting %d of %d case(s) with %s (folds %s, mirroring %s)%s",
        len(todo),
        len(cases),
        selection["selected"],
        ", ".join(fold_names),
        "on" if mirroring else "off",
        f"; {len(cases) - len(todo)} already done" if len(todo) < len(cases) else "",
    )
    ensemble = len(members) > 1
    work = output_path / WORK_FOLDER
    device_used = None
    # the device is chosen (and a GPU claimed) before anything is written, so a wrong --device leaves no trace
    with _compute_device(device, num_threads) if todo else contextlib.nullcontext() as torch_device:
        output_path.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
        try:
            for stage in stages if todo else []:
                device_used = str(torch_device)
                previous = _configuration(plans, stage).get("previous_stage")
                log.info("%s: %d fold(s) on %s", stage, len(fold_names), torch_device)
                predict_from_raw(
                    todo,
                    work / stage,
                    models[stage],
                    plans,
                    stage,
                    dataset_json,
                    use_mirroring=mirroring,
                    step_size=step_size,
                    device=torch_device,
                    save_probabilities=stage in members and (ensemble or save_probabilities),
                    previous_stage_dir=work / previous if previous else None,
                    progress=progress,
                    autocast=autocast,
                )
            for case_id in sorted(todo):
                _finish_case(
                    [work / m / f"{case_id}{ending}" for m in members],
                    prediction_paths(output_path / case_id, ending),
                    dataset_json,
                    decision,
                    save_probabilities,
                )
        finally:
            shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - start
    record = {
        "selected": selection["selected"],
        "members": members,
        "configurations_run": stages,
        "folds": fold_names,
        "mirroring": bool(mirroring),
        "step_size": float(step_size),
        "autocast": autocast,
        "device": device_used,
        "postprocessing_steps": decision["steps"] if decision is not None else None,
        "results_dir": str(results_path),
        "input_dir": str(input_path),
        "cases": sorted(cases),
        "n_predicted": len(todo),
        "seconds": seconds,
        "seconds_per_case": seconds / len(todo) if todo else None,
    }
    write_json(output_path / PREDICTION_RECORD, record)
    log.info("wrote %d segmentation(s) to %s in %.1f s", len(todo), output_path, seconds)
    return {
        "n_cases": len(cases),
        "n_predicted": len(todo),
        "selected": selection["selected"],
        "output_dir": str(output_path),
        "seconds": seconds,
    }
