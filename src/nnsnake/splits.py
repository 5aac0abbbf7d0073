"""Cross-validation splits in nnU-Net's ``splits_final.json`` format (docs/method.md §6).

The default 5-fold split reproduces ``sklearn.model_selection.KFold(n_splits=5, shuffle=True,
random_state=12345)`` over the sorted case ids, without sklearn, so nnsnake and nnU-Net train on the same folds.
Users may supply their own splits (any number of folds, e.g. grouped by patient); they are checked against the
dataset's case ids before anything is trained.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DEFAULT_N_SPLITS = 5
DEFAULT_SEED = 12345
RANDOM_SPLIT_TRAIN_FRACTION = 0.8


def make_splits(
    case_ids: Sequence[str], n_splits: int = DEFAULT_N_SPLITS, seed: int = DEFAULT_SEED
) -> list[dict]:
    """nnU-Net's default k-fold split: shuffle indices of the sorted ids with RandomState(seed), cut into folds.

    Fold k's validation set is chunk k of the shuffled indices (the first ``n % n_splits`` chunks are one case
    larger); both lists are in sorted-id order, exactly as KFold returns them.
    """
    ids = sorted(case_ids)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("case ids are not unique; every case needs its own identifier")
    if n_splits < 2:
        raise ValueError(f"n_splits must be at least 2, got {n_splits}")
    if n < n_splits:
        raise ValueError(
            f"{n} training case(s) cannot be split into {n_splits} folds; add cases or provide your own "
            'splits_final.json (a list of {"train": [...], "val": [...]}) next to dataset.json'
        )
    order = np.arange(n)
    np.random.RandomState(seed).shuffle(order)
    splits = []
    start = 0
    for fold in range(n_splits):
        size = n // n_splits + (1 if fold < n % n_splits else 0)
        val_mask = np.zeros(n, dtype=bool)
        val_mask[order[start : start + size]] = True
        start += size
        splits.append(
            {
                "train": [ids[i] for i in np.flatnonzero(~val_mask)],
                "val": [ids[i] for i in np.flatnonzero(val_mask)],
            }
        )
    return splits


def validate_user_splits(splits: object, case_ids: Sequence[str], source: str) -> list[dict]:
    """Check user-supplied splits against the dataset and return them as plain lists.

    Errors name ``source`` (the file) and the offending fold and cases. Train/val overlap is allowed, as in
    nnU-Net, but warned about, because it makes the validation scores meaningless.
    """
    if not isinstance(splits, list) or not splits:
        raise ValueError(
            f'{source}: expected a non-empty JSON list of {{"train": [...], "val": [...]}} folds'
        )
    known = set(case_ids)
    cleaned = []
    for fold, entry in enumerate(splits):
        if not isinstance(entry, dict) or not {"train", "val"} <= set(entry):
            raise ValueError(f"{source}: fold {fold} must be an object with 'train' and 'val' lists")
        lists = {}
        for part in ("train", "val"):
            values = entry[part]
            if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
                raise ValueError(f"{source}: fold {fold} '{part}' must be a list of case id strings")
            if not values:
                raise ValueError(f"{source}: fold {fold} has an empty '{part}' list")
            unknown = sorted(set(values) - known)
            if unknown:
                shown = ", ".join(unknown[:10]) + (
                    f" (+{len(unknown) - 10} more)" if len(unknown) > 10 else ""
                )
                raise ValueError(
                    f"{source}: fold {fold} '{part}' names {len(unknown)} case id(s) that are not in the "
                    f"dataset: {shown}. Case ids are the image file names without the _0000 channel suffix."
                )
            duplicates = sorted({v for v in values if values.count(v) > 1})
            if duplicates:
                raise ValueError(
                    f"{source}: fold {fold} '{part}' lists case(s) twice: {', '.join(duplicates[:10])}"
                )
            lists[part] = list(values)
        overlap = sorted(set(lists["train"]) & set(lists["val"]))
        if overlap:
            warnings.warn(
                f"{source}: fold {fold} has {len(overlap)} case(s) in both train and val (e.g. {overlap[0]}); "
                "its validation scores will be optimistic",
                stacklevel=2,
            )
        cleaned.append(lists)
    return cleaned


def splits_for_dataset(case_ids: Sequence[str], user_splits_path: Path | None = None) -> list[dict]:
    """The user's splits file when given (validated), otherwise nnU-Net's default 5-fold split."""
    if user_splits_path is None:
        return make_splits(case_ids)
    path = Path(user_splits_path)
    try:
        splits = json.loads(path.read_text())
    except FileNotFoundError as error:
        raise FileNotFoundError(f"splits file {path} does not exist") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    return validate_user_splits(splits, case_ids, str(path))


def fold_cases(
    splits: list[dict], fold: int | str, case_ids: Sequence[str] | None = None
) -> tuple[list[str], list[str]]:
    """Training and validation case ids of one fold, as nnU-Net's trainer chooses them (docs/method.md §6).

    ``fold="all"`` trains on every case and "validates" on the same cases. A fold index beyond the splits gives
    a seeded random 80:20 split (RandomState(12345 + fold)); it needs ``case_ids`` (defaults to all ids named
    in ``splits``).
    """
    if case_ids is None:
        case_ids = sorted({c for entry in splits for part in ("train", "val") for c in entry[part]})
    if fold == "all":
        ids = sorted(case_ids)
        return ids, list(ids)
    try:
        fold = int(fold)
    except (TypeError, ValueError) as error:
        raise ValueError(f"fold must be an integer >= 0 or 'all', got {fold!r}") from error
    if fold < 0:
        raise ValueError(f"fold must be >= 0 or 'all', got {fold}")
    if fold < len(splits):
        return list(splits[fold]["train"]), list(splits[fold]["val"])
    keys = sorted(case_ids)
    rng = np.random.RandomState(DEFAULT_SEED + fold)
    train_index = rng.choice(len(keys), int(len(keys) * RANDOM_SPLIT_TRAIN_FRACTION), replace=False)
    chosen = set(train_index.tolist())
    train = [keys[i] for i in train_index]  # nnU-Net keeps the order in which the indices were drawn
    val = [keys[i] for i in range(len(keys)) if i not in chosen]
    return train, val
