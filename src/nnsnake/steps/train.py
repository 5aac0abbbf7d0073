"""train[configuration, fold]: train one fold, resumably (docs/method.md §5)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._common import PathLike

if TYPE_CHECKING:
    from ..training import TrainingSettings


def train(
    preprocessed_dir: PathLike,
    plans_path: PathLike,
    configuration: str,
    dataset_json_path: PathLike,
    splits_path: PathLike,
    fold: int | str,
    output_dir: PathLike,
    state_dir: PathLike,
    settings: Mapping[str, Any] | TrainingSettings | None = None,
    previous_stage_dir: PathLike | Sequence[PathLike] | None = None,
) -> dict[str, Any]:
    """Train one fold from files (:func:`nnsnake.training.train_fold_from_files`); the state under ``state_dir``
    lets a killed job continue where it stopped.

    ``settings``: the workflow's ``training`` section with the job's ``threads`` and ``gpu_lock_dir`` (or a
    ``TrainingSettings``). ``previous_stage_dir`` (cascade only): the folder(s) of the previous stage's
    out-of-fold predictions; an empty list means none.
    """
    from ..training import train_fold_from_files

    if previous_stage_dir is not None and not isinstance(previous_stage_dir, (str, os.PathLike)):
        previous_stage_dir = list(previous_stage_dir) or None
    return train_fold_from_files(
        preprocessed_dir,
        plans_path,
        configuration,
        dataset_json_path,
        splits_path,
        fold,
        output_dir,
        state_dir,
        settings,
        previous_stage_dir=previous_stage_dir,
    )
