"""Metrics: agreement with nnunetv2's compute_metrics_on_folder (stored fixtures) and nnU-Net's edge rules."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from nnsnake import jsonio
from nnsnake.metrics import (
    MetricsError,
    case_id_from_file,
    compute_case_metrics,
    compute_metrics_for_arrays,
    compute_metrics_on_folder,
    foreground_labels_or_regions,
    label_key,
    parse_label_key,
    per_case_metric,
    read_summary,
    write_summary,
)

RUNS = ["labels", "regions", "absent_label", "png"]


def assert_close(ours, theirs, where):
    if isinstance(theirs, float) and math.isnan(theirs):
        assert isinstance(ours, float) and math.isnan(ours), f"{where}: {ours} != NaN"
    else:
        assert ours == pytest.approx(theirs, abs=1e-6, rel=0), f"{where}: {ours} != {theirs}"


def assert_metric_dicts_equal(ours, theirs, where):
    assert sorted(ours) == sorted(theirs), f"{where}: keys {sorted(ours)} != {sorted(theirs)}"
    for key in theirs:
        if isinstance(theirs[key], dict):
            assert_metric_dicts_equal(ours[key], theirs[key], f"{where}/{key}")
        else:
            assert_close(ours[key], theirs[key], f"{where}/{key}")


@pytest.fixture(scope="module")
def metrics_fixtures(fixtures_dir):
    folder = fixtures_dir / "metrics"
    return folder, jsonio.read_json(folder / "runs.json")


@pytest.mark.parametrize("run", RUNS)
def test_agrees_with_nnunetv2_summary(metrics_fixtures, run):
    folder, runs = metrics_fixtures
    spec = runs[run]
    expected = jsonio.read_json(folder / f"nnunetv2_summary_{run}.json")
    labels = [tuple(x) if isinstance(x, list) else x for x in spec["labels_or_regions"]]
    ours = compute_metrics_on_folder(
        folder / spec["folder"] / "ref",
        folder / spec["folder"] / "pred",
        spec["file_ending"],
        labels,
        ignore_label=spec["ignore_label"],
        chill=True,
    )
    assert sorted(ours) == ["foreground_mean", "mean", "metric_per_case"]
    assert [os.path.basename(c["prediction_file"]) for c in ours["metric_per_case"]] == [
        os.path.basename(c["prediction_file"]) for c in expected["metric_per_case"]
    ]
    for mine, theirs in zip(ours["metric_per_case"], expected["metric_per_case"], strict=True):
        assert os.path.basename(mine["reference_file"]) == os.path.basename(theirs["reference_file"])
        assert_metric_dicts_equal(mine["metrics"], theirs["metrics"], theirs["prediction_file"])
    assert_metric_dicts_equal(ours["mean"], expected["mean"], "mean")
    assert_metric_dicts_equal(ours["foreground_mean"], expected["foreground_mean"], "foreground_mean")


def test_fixture_covers_the_edge_cases(metrics_fixtures):
    """Guards the fixture itself: empty reference, empty prediction, both empty, NaN foreground mean."""
    folder, _ = metrics_fixtures
    labels = jsonio.read_json(folder / "nnunetv2_summary_labels.json")
    by_case = {os.path.basename(c["prediction_file"]): c["metrics"] for c in labels["metric_per_case"]}
    assert math.isnan(by_case["case_both_empty.nii.gz"]["1"]["Dice"])
    assert by_case["case_empty_reference.nii.gz"]["1"]["Dice"] == 0.0
    assert by_case["case_empty_prediction.nii.gz"]["2"]["Dice"] == 0.0
    absent = jsonio.read_json(folder / "nnunetv2_summary_absent_label.json")
    assert math.isnan(absent["foreground_mean"]["Dice"])
    regions = jsonio.read_json(folder / "nnunetv2_summary_regions.json")
    assert sorted(regions["mean"]) == ["(1, 2)", "(2,)", "1"]


def test_missing_prediction_is_an_error_unless_chill(metrics_fixtures):
    folder, _ = metrics_fixtures
    with pytest.raises(MetricsError, match="case_not_predicted"):
        compute_metrics_on_folder(folder / "nifti" / "ref", folder / "nifti" / "pred", ".nii.gz", [1, 2], 3)


def test_parallel_in_memory_and_written_summaries_agree(metrics_fixtures, tmp_path):
    folder, _ = metrics_fixtures
    ref_dir, pred_dir = folder / "nifti" / "ref", folder / "nifti" / "pred"
    serial = compute_metrics_on_folder(
        ref_dir, pred_dir, ".nii.gz", [(1, 2), 1], 3, chill=True, output_file=tmp_path / "summary.json"
    )
    parallel = compute_metrics_on_folder(
        ref_dir, pred_dir, ".nii.gz", [(1, 2), 1], 3, processes=2, chill=True
    )
    assert_metric_dicts_equal(parallel["mean"], serial["mean"], "parallel")

    from nnsnake.imageio import read_seg

    names = sorted(p for p in os.listdir(pred_dir) if p.endswith(".nii.gz"))
    refs = [read_seg(ref_dir / n)[0] for n in names]
    preds = [read_seg(pred_dir / n)[0] for n in names]
    in_memory = compute_metrics_for_arrays(refs, preds, [(1, 2), 1], 3)
    assert_metric_dicts_equal(in_memory["mean"], serial["mean"], "in memory")
    assert_metric_dicts_equal(in_memory["foreground_mean"], serial["foreground_mean"], "in memory")

    written = read_summary(tmp_path / "summary.json")
    assert_metric_dicts_equal(written["mean"], serial["mean"], "written")
    text = (tmp_path / "summary.json").read_text()
    assert text.index('"foreground_mean"') < text.index('"mean"') < text.index('"metric_per_case"')
    assert "NaN" in text  # both-empty cases stay NaN, like nnU-Net's files


def test_rules_by_hand():
    ref = np.zeros((1, 4, 4), np.uint8)
    pred = np.zeros((1, 4, 4), np.uint8)
    ref[0, 0, :2] = 1  # 2 voxels of label 1
    pred[0, 0, 1:3] = 1  # TP 1, FP 1, FN 1
    ref[0, 3, :] = 5  # ignored row: the prediction's label 2 there does not count
    pred[0, 3, :] = 2
    pred[0, 2, 0] = 2  # label 2 absent in the reference: FP 1, Dice 0
    m = compute_case_metrics(ref, pred, [1, 2, 3, (1, 2)], ignore_label=5)
    assert m["1"] == {"Dice": 0.5, "IoU": 1 / 3, "FP": 1, "TP": 1, "FN": 1, "TN": 9, "n_pred": 2, "n_ref": 2}
    assert m["2"]["Dice"] == 0.0 and m["2"]["FP"] == 1 and m["2"]["TN"] == 11
    assert math.isnan(m["3"]["Dice"]) and math.isnan(m["3"]["IoU"]) and m["3"]["TN"] == 12
    assert m["(1, 2)"]["TP"] == 1 and m["(1, 2)"]["FP"] == 2 and m["(1, 2)"]["FN"] == 1

    summary = compute_metrics_for_arrays([ref, ref], [pred, ref], [1, 3])
    assert summary["mean"]["1"]["Dice"] == pytest.approx(0.75)
    assert math.isnan(summary["mean"]["3"]["Dice"])  # NaN in every case → NaN mean
    assert math.isnan(summary["foreground_mean"]["Dice"])  # plain mean over labels


def test_shape_mismatch_names_the_case():
    with pytest.raises(MetricsError, match="caseX"):
        compute_metrics_for_arrays([np.zeros((2, 2))], [np.zeros((2, 3))], [1], prediction_files=["caseX"])


def test_label_keys_and_dataset_labels():
    assert label_key(1) == "1" and label_key([1, 2]) == "(1, 2)" and label_key((2,)) == "(2,)"
    assert (
        parse_label_key("(1, 2)") == (1, 2) and parse_label_key("(2,)") == (2,) and parse_label_key("3") == 3
    )
    assert foreground_labels_or_regions({"labels": {"background": 0, "b": 2, "a": 1}}) == ([1, 2], None)
    assert foreground_labels_or_regions({"labels": {"background": 0, "a": 1, "ignore": 2}}) == ([1], 2)
    brats = {
        "labels": {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enh": 3},
        "regions_class_order": [1, 2, 3],
    }
    assert foreground_labels_or_regions(brats) == ([(1, 2, 3), (2, 3), 3], None)


def test_per_case_metric(metrics_fixtures):
    folder, _ = metrics_fixtures
    summary = jsonio.read_json(folder / "nnunetv2_summary_labels.json")
    dice = per_case_metric(summary, "Dice", ".nii.gz")
    assert list(dice)[0] == "case_both_empty" and dice["case_overlap"]["1"] == pytest.approx(
        0.6341463414634146
    )
    assert case_id_from_file("/x/BRATS_001.nii.gz") == "BRATS_001"
    with pytest.raises(MetricsError):
        case_id_from_file("/x/a.nii.gz", ".png")


def test_write_summary_roundtrip(tmp_path):
    summary = compute_metrics_for_arrays([np.ones((2, 2), np.uint8)], [np.ones((2, 2), np.uint8)], [1])
    write_summary(tmp_path / "s.json", summary)
    assert read_summary(tmp_path / "s.json") == summary
