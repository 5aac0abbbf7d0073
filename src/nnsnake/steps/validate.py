"""validate[configuration, fold]: predict a fold's validation cases and score them (docs/method.md §5.10)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..deprecation import renamed_keywords
from ..errors import EvaluationError
from ..jsonio import read_json
from ._common import (
    SUMMARY_FILE,
    PathLike,
    case_files,
    configuration_of,
    dataset_json_of,
    inference_settings,
    log,
    reference_files,
    remove_case_outputs,
    score_cases,
)

if TYPE_CHECKING:
    from ..inference import InferenceSettings


def _validation_cases(splits_path: PathLike, fold: int | str, preprocessed_dir: PathLike) -> list[str]:
    """The fold's validation cases, each checked to be preprocessed."""
    from ..preprocessing import stored_case_ids
    from ..splits import fold_cases

    stored_ids = stored_case_ids(preprocessed_dir)
    # fold all validates on what it trained on, every preprocessed case, as the trainer chose them
    _, val_ids = fold_cases(read_json(splits_path), fold, case_ids=stored_ids or None)
    if not val_ids:
        raise EvaluationError(f"{splits_path}: fold {fold} has no validation cases")
    stored = set(stored_ids)
    missing = [c for c in val_ids if c not in stored]
    if missing:
        raise EvaluationError(
            f"{preprocessed_dir}: validation case(s) {', '.join(missing[:5])} of fold {fold} are "
            f"not preprocessed; rerun preprocessing"
        )
    return list(val_ids)


def _previous_stage_loader(
    config: Mapping[str, Any],
    configuration: str,
    previous_stage_dir: PathLike | Sequence[PathLike] | None,
    val_ids: Sequence[str],
    fold: int | str,
) -> Callable[[str], np.ndarray] | None:
    """For a cascade stage, a function returning each case's previous-stage label map; else None."""
    from ..training import previous_stage_files

    if not config.get("previous_stage"):
        return None
    if previous_stage_dir is None:
        raise EvaluationError(
            f"{configuration} is a cascade stage: pass previous_stage_dir, the folder of the "
            f"{config['previous_stage']} predictions <case>.npy"
        )
    try:
        previous_files = previous_stage_files(previous_stage_dir, val_ids)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluationError(f"{err} (validate {config['previous_stage']} fold {fold} first)") from err

    def load(case_id: str) -> np.ndarray:
        return np.load(previous_files[case_id], allow_pickle=False)

    return load


def _clear_stale_outputs(
    output_dir: Path, val_ids: Sequence[str], file_ending: str, save_probabilities: bool
) -> None:
    """Remove the summary and the files of cases outside this fold's validation set (and probabilities that are
    no longer wanted), so the pooled cross-validation never sees stale cases."""
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / SUMMARY_FILE).unlink(missing_ok=True)
    for case_id in set(case_files(output_dir, file_ending)) - set(val_ids):
        remove_case_outputs(output_dir, case_id, file_ending)
    for stale in output_dir.glob("*.npz"):
        case_id = stale.name[:-4]
        if case_id not in val_ids or not save_probabilities:
            remove_case_outputs(output_dir, case_id, file_ending, keep_segmentation=case_id in val_ids)


def _predict_cases(
    preprocessed_dir: PathLike,
    val_ids: Sequence[str],
    output_dir: Path,
    model_path: PathLike,
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    settings: InferenceSettings,
    fold: int | str,
    **predict_options: Any,
) -> None:
    """Load the fold's network on the settings' device and predict the cases into ``output_dir``."""
    from ..inference import allowed_mirror_axes, network_from_checkpoint, predict_preprocessed
    from ..runtime import compute_device

    config = configuration_of(plans, configuration)
    with compute_device(settings.device, settings.threads) as torch_device:
        network, init = network_from_checkpoint(model_path, plans, config, dataset_json, torch_device)
        mirror_axes = allowed_mirror_axes(init, config)
        log.info(
            "validating %s fold %s: %d case(s) on %s, mirroring %s",
            configuration,
            fold,
            len(val_ids),
            torch_device,
            list(mirror_axes) if settings.mirroring and mirror_axes else "off",
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
            settings=settings.replace(device=str(torch_device)),
            **predict_options,
        )


@renamed_keywords(num_processes="processes")
def validate(
    preprocessed_dir: PathLike,
    plans_path: PathLike,
    configuration: str,
    dataset_dir: PathLike,
    splits_path: PathLike,
    fold: int | str,
    model_path: PathLike,
    output_dir: PathLike,
    settings: InferenceSettings | Mapping[str, Any] | None = None,
    *,
    save_probabilities: bool = True,
    previous_stage_dir: PathLike | Sequence[PathLike] | None = None,
    next_stage_preprocessed_dir: PathLike | None = None,
    next_stage_output_dir: PathLike | None = None,
    processes: int = 1,
    progress: bool = True,
    **legacy: Any,
) -> dict[str, Any]:
    """Predict a fold's validation cases from their preprocessed data with ``model_final.pt`` and score them.

    Writes into ``output_dir`` (the fold's ``validation/`` folder) per case ``<case><file_ending>`` (raw
    geometry) and, with ``save_probabilities``, ``<case>.npz`` (key ``probabilities``, needed by ensembles) and
    ``<case>.json`` (properties); then ``summary.json`` against the raw label files, last. Files of cases that
    are not in this fold's validation set are removed, so the pooled cross-validation never sees stale cases.

    ``settings``: :class:`~nnsnake.inference.InferenceSettings` or the workflow's ``inference`` mapping (device,
    mirroring, step size, autocast, tiles per pass, threads); the loose keywords ``device``, ``mirroring``,
    ``step_size``, ``autocast``, ``num_threads`` (``legacy``) are deprecated and update it with a warning.
    ``preprocessed_dir``: this configuration's preprocessed cases (the cascade uses 3d_fullres's).
    ``previous_stage_dir`` (3d_cascade_fullres only): the folder(s) of the 3d_lowres out-of-fold predictions
    ``<case>.npy`` at the fullres preprocessed shape, as used in training (an empty list means none).
    ``next_stage_preprocessed_dir`` + ``next_stage_output_dir`` (3d_lowres only): also write ``<case>.npy`` for
    the cascade (§5.8) into ``next_stage_output_dir``; pass the same folder for all five folds so it ends up
    holding every training case out-of-fold. ``processes`` worker processes score the cases.
    """
    from ..labels import LabelModel
    from ..metrics import write_summary

    start = time.perf_counter()
    inference = inference_settings("validate", settings, legacy)
    output_dir = Path(output_dir)
    plans = read_json(plans_path)
    dataset_json = dataset_json_of(dataset_dir)
    config = configuration_of(plans, configuration)
    ending = dataset_json["file_ending"]
    val_ids = _validation_cases(splits_path, fold, preprocessed_dir)
    references = reference_files(dataset_dir, val_ids)
    if previous_stage_dir is not None and not isinstance(previous_stage_dir, (str, os.PathLike)):
        previous_stage_dir = list(previous_stage_dir) or None
    previous_stage_segs = _previous_stage_loader(config, configuration, previous_stage_dir, val_ids, fold)
    if (next_stage_preprocessed_dir is None) != (next_stage_output_dir is None):
        raise EvaluationError("pass both next_stage_preprocessed_dir and next_stage_output_dir, or neither")
    next_stage = None
    if next_stage_preprocessed_dir is not None and next_stage_output_dir is not None:
        next_stage = (next_stage_preprocessed_dir, next_stage_output_dir)

    _clear_stale_outputs(output_dir, val_ids, ending, save_probabilities)
    _predict_cases(
        preprocessed_dir,
        val_ids,
        output_dir,
        model_path,
        plans,
        configuration,
        dataset_json,
        inference,
        fold,
        save_probabilities=save_probabilities,
        previous_stage_segs=previous_stage_segs,
        next_stage=next_stage,
        progress=progress,
    )
    predictions = {c: output_dir / f"{c}{ending}" for c in val_ids}
    summary = score_cases(predictions, references, LabelModel.from_dataset_json(dataset_json), processes)
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


validate_fold = validate
"""The name :func:`validate` had before the entry functions moved to :mod:`nnsnake.steps`."""
