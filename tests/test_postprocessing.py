"""Postprocessing: keep-largest-component, nnU-Net's acceptance rule, agreement with nnunetv2's decisions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from nnsnake import jsonio
from nnsnake.metrics import compute_metrics_on_folder, foreground_labels_or_regions
from nnsnake.postprocessing import (
    ALL_FOREGROUND,
    PostprocessingError,
    apply_postprocessing,
    apply_postprocessing_to_folder,
    determine_postprocessing,
    keep_largest_component,
    read_decision,
    write_decision,
)

SCENARIOS = ["single_label", "per_label", "regions"]


def quiet(_msg: str) -> None:
    pass


def assert_nested_close(ours, theirs, where=""):
    if isinstance(theirs, dict):
        assert sorted(ours) == sorted(theirs), where
        for key in theirs:
            assert_nested_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours), where
    else:
        assert ours == pytest.approx(theirs, abs=1e-6, rel=0), where


# ------------------------------------------------------------------------------------------- keep_largest_component
def test_full_connectivity_in_3d_and_2d():
    seg = np.zeros((5, 5, 5), np.uint8)
    seg[0, 0, 0] = 1
    seg[1, 1, 1] = 1  # touches the first voxel only at a corner: same component (26-neighbourhood)
    seg[4, 4, 4] = 1  # alone
    out = keep_largest_component(seg, 1)
    assert out[0, 0, 0] == 1 and out[1, 1, 1] == 1 and out[4, 4, 4] == 0

    img = np.zeros((4, 4), np.uint8)
    img[0, 0] = img[1, 1] = 1  # 8-neighbourhood in 2D
    img[3, 3] = 1
    assert keep_largest_component(img, [1]).tolist() == [
        [1, 0, 0, 0],
        [0, 1, 0, 0],
        [0, 0, 0, 0],
        [0, 0, 0, 0],
    ]


def test_ties_keep_every_largest_component_and_other_labels_stay():
    seg = np.zeros((1, 6, 6), np.uint8)
    seg[0, 0, 0:2] = 1
    seg[0, 5, 0:2] = 1  # same size: both stay
    seg[0, 3, 5] = 1  # smaller: removed
    seg[0, 2:4, 2:4] = 2  # label 2 is not part of the mask
    before = seg.copy()
    out = keep_largest_component(seg, 1)
    assert np.array_equal(seg, before), "input must not be modified"
    assert out[0, 0, 0] == out[0, 5, 1] == 1 and out[0, 3, 5] == 0
    assert (out == 2).sum() == 4
    # as one mask, labels 1 and 2 form several components: the 2x2 block of label 2 is the largest
    union = keep_largest_component(seg, [1, 2])
    assert (union == 1).sum() == 0 and (union == 2).sum() == 4
    assert np.array_equal(keep_largest_component(seg, (1, 2)), union)  # a region means the union too
    assert np.array_equal(keep_largest_component(np.zeros((3, 3), np.uint8), 1), np.zeros((3, 3)))


# ------------------------------------------------------------------------------------------- agreement with nnunetv2
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_decision_agrees_with_nnunetv2(fixtures_dir, scenario, tmp_path):
    folder = fixtures_dir / "postprocessing" / scenario
    expected = jsonio.read_json(fixtures_dir / "postprocessing" / f"nnunetv2_decision_{scenario}.json")
    labels, ignore = foreground_labels_or_regions(jsonio.read_json(folder / "dataset.json"))
    decision = determine_postprocessing(
        folder / "pred",
        folder / "ref",
        labels,
        ".nii.gz",
        ignore,
        processes=2 if scenario == "regions" else 1,
        work_dir=tmp_path,
        log=quiet,
    )
    theirs = [
        sorted(s["labels_or_regions"])
        if isinstance(s["labels_or_regions"], list)
        else [s["labels_or_regions"]]
        for s in expected["accepted_steps"]
    ]
    assert [s["labels"] for s in decision["steps"]] == theirs
    assert_nested_close(decision["input_folder"], expected["input_folder"], "input_folder")
    assert_nested_close(decision["postprocessed"], expected["postprocessed"], "postprocessed")
    assert list(tmp_path.iterdir()) == [], "temporary trial files must be removed"


def test_known_decisions_of_the_constructed_folders(fixtures_dir):
    base = fixtures_dir / "postprocessing"
    single = determine_postprocessing(
        base / "single_label" / "pred", base / "single_label" / "ref", [1], ".nii.gz", log=quiet
    )
    assert [(s["scope"], s["labels"]) for s in single["steps"]] == [(ALL_FOREGROUND, [1])]
    assert len(single["trials"]) == 1  # one label: no per-label steps

    per_label = determine_postprocessing(
        base / "per_label" / "pred", base / "per_label" / "ref", [1, 2], ".nii.gz", log=quiet
    )
    assert [(t["step"]["scope"], t["accepted"]) for t in per_label["trials"]] == [
        (ALL_FOREGROUND, False),
        ("1", True),
        ("2", False),
    ]
    # the label-2 step was tried on top of the accepted label-1 step (chaining)
    assert per_label["trials"][2]["before"] == per_label["trials"][1]["after"]


# ------------------------------------------------------------------------------------------- the rule, in memory
def blob_case(specks: bool, separate_label2: bool):
    ref = np.zeros((1, 10, 10, 10), np.uint8)
    ref[0, 1:5, 1:5, 1:5] = 1
    if separate_label2:
        ref[0, 8:10, 8:10, 8:10] = 2  # a second, true object far away
    else:
        ref[0, 5:7, 1:5, 1:5] = 2  # touches label 1
    pred = ref.copy()
    if specks:
        pred[0, 9, 0:10:2, 0:10:2] = 1  # 25 isolated voxels of label 1
    return ref, pred


def test_foreground_step_rejected_when_a_label_gets_worse():
    cases = {f"c{i}": blob_case(specks=True, separate_label2=False) for i in range(7)}
    cases["c7"] = blob_case(specks=False, separate_label2=True)
    refs = {k: v[0] for k, v in cases.items()}
    preds = {k: v[1] for k, v in cases.items()}
    decision = determine_postprocessing(preds, refs, [1, 2], log=quiet)
    fg_trial = decision["trials"][0]
    assert (
        fg_trial["after"]["foreground_mean"] > fg_trial["before"]["foreground_mean"]
    )  # better on average ...
    assert fg_trial["after"]["mean"]["2"] < fg_trial["before"]["mean"]["2"]  # ... but label 2 worse
    assert not fg_trial["accepted"]
    assert [s["scope"] for s in decision["steps"]] == ["1"]  # the label-1 step alone removes the specks

    # without the separate object the all-foreground step is accepted, and label 1 then has nothing left to gain
    cases["c7"] = blob_case(specks=False, separate_label2=False)
    decision = determine_postprocessing(
        {k: v[1] for k, v in cases.items()}, {k: v[0] for k, v in cases.items()}, [1, 2], log=quiet
    )
    assert [s["scope"] for s in decision["steps"]] == [ALL_FOREGROUND]
    assert decision["postprocessed"]["foreground_mean"]["Dice"] == 1.0


def test_nan_mean_rejects():
    refs, preds = {}, {}
    for i in range(2):
        refs[f"c{i}"], preds[f"c{i}"] = blob_case(specks=True, separate_label2=False)
    # label 3 never occurs: its mean Dice is NaN, so foreground_mean is NaN and every comparison is false
    decision = determine_postprocessing(preds, refs, [1, 2, 3], log=quiet)
    assert math.isnan(decision["input_folder"]["foreground_mean"]["Dice"])
    assert [t["accepted"] for t in decision["trials"]] == [False, True, False, False]


def test_apply_matches_the_decision_and_keeps_geometry(fixtures_dir, tmp_path):
    folder = fixtures_dir / "postprocessing" / "regions"
    labels, ignore = foreground_labels_or_regions(jsonio.read_json(folder / "dataset.json"))
    decision = determine_postprocessing(folder / "pred", folder / "ref", labels, ".nii.gz", ignore, log=quiet)
    write_decision(tmp_path / "postprocessing.json", decision)
    reread = read_decision(tmp_path / "postprocessing.json")
    assert reread["steps"] == decision["steps"]
    names = apply_postprocessing_to_folder(folder / "pred", tmp_path / "out", reread, ".nii.gz", processes=1)
    assert names
    summary = compute_metrics_on_folder(folder / "ref", tmp_path / "out", ".nii.gz", labels, ignore)
    assert_nested_close(summary["mean"], decision["postprocessed"]["mean"])
    source = sitk.ReadImage(str(folder / "pred" / names[0]))
    written = sitk.ReadImage(str(tmp_path / "out" / names[0]))
    assert written.GetSize() == source.GetSize() and written.GetSpacing() == source.GetSpacing()
    seg = sitk.GetArrayFromImage(source)
    assert np.array_equal(apply_postprocessing(seg, decision), sitk.GetArrayFromImage(written))


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(PostprocessingError, match="c9"):
        determine_postprocessing({"c9": np.zeros((2, 2))}, {}, [1], log=quiet)
    (tmp_path / "postprocessing.json").write_text('{"steps": [{"operation": "dilate", "labels": [1]}]}')
    with pytest.raises(PostprocessingError, match="dilate"):
        read_decision(tmp_path / "postprocessing.json")
