"""Cross-validation splits: identical to nnU-Net's splits_final.json and to sklearn's KFold."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from nnsnake.splits import fold_cases, make_splits, splits_for_dataset, validate_user_splits

NNUNET_FIXTURES = Path(__file__).resolve().parent / "fixtures" / "nnunetv2"
SPLIT_FIXTURES = sorted(NNUNET_FIXTURES.glob("Dataset*/splits_final.json"))


def test_hippocampus_splits_equal_nnunetv2():
    reference = json.loads((NNUNET_FIXTURES / "Dataset004_Hippocampus" / "splits_final.json").read_text())
    case_ids = sorted(reference[0]["train"] + reference[0]["val"])
    assert len(case_ids) == 260
    assert make_splits(case_ids) == reference


@pytest.mark.parametrize("path", SPLIT_FIXTURES, ids=[p.parent.name for p in SPLIT_FIXTURES])
def test_splits_equal_nnunetv2_on_reference_datasets(path):
    reference = json.loads(path.read_text())
    case_ids = reference[0]["train"] + reference[0]["val"]
    assert make_splits(list(reversed(case_ids))) == reference  # input order does not matter


@pytest.mark.parametrize("n_cases", [5, 6, 7, 11, 23, 64, 101])
def test_splits_equal_sklearn_kfold(n_cases):
    sklearn = pytest.importorskip("sklearn.model_selection")
    case_ids = [f"case_{i:03d}" for i in range(n_cases)]
    expected = [
        {"train": [case_ids[i] for i in train], "val": [case_ids[i] for i in val]}
        for train, val in sklearn.KFold(n_splits=5, shuffle=True, random_state=12345).split(case_ids)
    ]
    assert make_splits(case_ids) == expected


def test_split_structure():
    case_ids = [f"c{i:02d}" for i in range(23)]
    splits = make_splits(case_ids)
    assert [len(s["val"]) for s in splits] == [5, 5, 5, 4, 4]  # n//5 + (k < n%5)
    assert sorted(c for s in splits for c in s["val"]) == case_ids
    for s in splits:
        assert s["train"] == sorted(set(case_ids) - set(s["val"]))
        assert s["val"] == sorted(s["val"])


def test_too_few_cases_asks_for_a_splits_file():
    with pytest.raises(ValueError, match="splits_final.json"):
        make_splits(["a", "b", "c"])
    with pytest.raises(ValueError, match="unique"):
        make_splits(["a", "a", "b", "c", "d"])


def test_validate_user_splits():
    case_ids = ["a", "b", "c", "d"]
    good = [{"train": ["a", "b"], "val": ["c", "d"]}, {"train": ["c", "d"], "val": ["a"]}]
    assert validate_user_splits(good, case_ids, "my_splits.json") == good
    with pytest.raises(ValueError, match=r"my_splits\.json.*fold 1.*zzz"):
        validate_user_splits([good[0], {"train": ["a"], "val": ["zzz"]}], case_ids, "my_splits.json")
    with pytest.raises(ValueError, match=r"my_splits\.json.*fold 0.*empty 'val'"):
        validate_user_splits([{"train": ["a"], "val": []}], case_ids, "my_splits.json")
    with pytest.raises(ValueError, match="'train' and 'val'"):
        validate_user_splits([{"training": ["a"], "val": ["b"]}], case_ids, "my_splits.json")
    with pytest.raises(ValueError, match="non-empty JSON list"):
        validate_user_splits({"train": ["a"]}, case_ids, "my_splits.json")
    with pytest.warns(UserWarning, match="both train and val"):
        validate_user_splits([{"train": ["a", "b"], "val": ["b"]}], case_ids, "my_splits.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_user_splits(good, case_ids, "my_splits.json")


def test_splits_for_dataset(tmp_path):
    case_ids = [f"c{i}" for i in range(7)]
    assert splits_for_dataset(case_ids, None) == make_splits(case_ids)
    user = [{"train": case_ids[:5], "val": case_ids[5:]}]
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps(user))
    assert splits_for_dataset(case_ids, path) == user
    path.write_text("[{")
    with pytest.raises(ValueError, match="splits_final.json"):
        splits_for_dataset(case_ids, path)
    with pytest.raises(FileNotFoundError, match="nope.json"):
        splits_for_dataset(case_ids, tmp_path / "nope.json")


def test_fold_cases():
    case_ids = [f"case_{i}" for i in range(10)]
    splits = make_splits(case_ids)
    assert fold_cases(splits, 0) == (splits[0]["train"], splits[0]["val"])
    assert fold_cases(splits, "3") == (splits[3]["train"], splits[3]["val"])
    assert fold_cases(splits, "all") == (case_ids, case_ids)
    # fold beyond the file: seeded 80:20 with RandomState(12345 + fold), train in draw order
    train, val = fold_cases(splits, 5)
    assert train == ["case_0", "case_8", "case_4", "case_5", "case_3", "case_9", "case_7", "case_6"]
    assert val == ["case_1", "case_2"]
    train7, val7 = fold_cases(splits, 7, case_ids)
    assert len(train7) == 8 and sorted(train7 + val7) == case_ids and (train7, val7) != (train, val)
    with pytest.raises(ValueError, match="'all'"):
        fold_cases(splits, "best")
    with pytest.raises(ValueError, match=">= 0"):
        fold_cases(splits, -1)
