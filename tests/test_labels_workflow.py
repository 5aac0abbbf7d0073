"""Regions and the ignore label through the real workflow, and nnsnake's scores of workflow predictions equal to
nnunetv2's (issue 12).

The datasets are the embedded demo relabelled (``tests/label_datasets.py``): *regions + ignore* (hippocampus =
labels 1 and 2, posterior = 2, a 4-voxel unannotated band) and *ignore only* (every second slice unannotated).
The fixtures under ``fixtures/labels_workflow`` hold predictions the workflow wrote for such datasets and what
nnunetv2's ``compute_metrics_on_folder`` and ``determine_postprocessing`` make of them.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from nnsnake import jsonio
from nnsnake.labels import LabelModel
from nnsnake.metrics import compute_metrics_on_folder
from nnsnake.postprocessing import determine_postprocessing

from .label_datasets import (
    DEMO,
    IGNORE_LABELS,
    REGIONS_IGNORE_LABELS,
    derived_dataset,
    sparse_slices,
    two_fold_splits,
    unannotated_border,
)
from .test_workflow import job_counts, snakemake, workflow_copy

SCENARIOS = {
    "regions_ignore": (REGIONS_IGNORE_LABELS, unannotated_border),
    "ignore": (IGNORE_LABELS, sparse_slices),
}


def assert_close(ours: Any, theirs: Any, where: str = "") -> None:
    """Nested dicts of numbers equal to 1e-12 (NaN equal to NaN)."""
    if isinstance(theirs, dict):
        assert set(ours) == set(theirs), f"{where}: keys {sorted(ours)} != {sorted(theirs)}"
        for key in theirs:
            assert_close(ours[key], theirs[key], f"{where}/{key}")
    elif isinstance(theirs, float) and math.isnan(theirs):
        assert math.isnan(ours), where
    else:
        assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-12), where


def references_for(folder: Path, scenario: str, out: Path) -> Path:
    """The relabelled demo references of the cases in ``folder/pred``."""
    labels, relabel = SCENARIOS[scenario]
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (folder / "pred").glob("*.nii.gz"))
    source = out / "source"
    (source / "labelsTr").mkdir(parents=True)
    (source / "imagesTr").mkdir()
    for case in cases:
        (source / "labelsTr" / f"{case}.nii.gz").symlink_to(DEMO / "labelsTr" / f"{case}.nii.gz")
        (source / "imagesTr" / f"{case}_0000.nii.gz").symlink_to(DEMO / "imagesTr" / f"{case}_0000.nii.gz")
    shutil.copy(DEMO / "dataset.json", source / "dataset.json")
    derived = derived_dataset(out / "derived", labels, relabel, source=source, with_test_images=False)
    return derived / "labelsTr"


@pytest.mark.parametrize("scenario", ["regions_ignore", "ignore"])
def test_scores_and_postprocessing_of_workflow_predictions_equal_nnunetv2(fixtures_dir, scenario, tmp_path):
    folder = fixtures_dir / "labels_workflow" / scenario
    if not folder.is_dir():
        pytest.skip(f"fixture {folder} not generated")
    references = references_for(folder, scenario, tmp_path)
    labels = LabelModel.from_dataset_json(jsonio.read_json(folder / "dataset.json"))
    summary = compute_metrics_on_folder(
        references, folder / "pred", ".nii.gz", labels.evaluated, labels.ignore_label
    )
    theirs = json.loads((folder / "nnunetv2_summary.json").read_text())
    assert_close(summary["mean"], theirs["mean"], "mean")
    assert_close(summary["foreground_mean"], theirs["foreground_mean"], "foreground_mean")
    decision = determine_postprocessing(folder / "pred", references, labels, ".nii.gz", log=lambda _: None)
    expected = json.loads((folder / "nnunetv2_postprocessing.json").read_text())
    theirs_steps = [
        sorted(np.atleast_1d(step["labels_or_regions"]).tolist())
        for step in expected["postprocessing_kwargs"]
    ]
    assert [step["labels"] for step in decision["steps"]] == theirs_steps
    assert_close(decision["input_folder"]["mean"], expected["input_folder"]["mean"], "pre")
    assert_close(decision["postprocessed"]["mean"], expected["postprocessed"]["mean"], "post")


def _label_values(path: Path) -> set[int]:
    import SimpleITK as sitk

    return set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).tolist())


def _check_crossval_against_own_scoring(results: Path, raw: Path, configuration: str) -> dict[str, Any]:
    """The cross-validation summary the workflow reports equals a fresh scoring of its prediction folder."""
    labels = LabelModel.from_dataset_json(jsonio.read_json(raw / "dataset.json"))
    reported = jsonio.read_json(results / "crossval" / configuration / "summary.json")
    rescored = compute_metrics_on_folder(
        raw / "labelsTr",
        results / "crossval" / configuration,
        ".nii.gz",
        labels.evaluated,
        labels.ignore_label,
    )
    assert_close(reported["mean"], rescored["mean"], "mean")
    assert_close(reported["foreground_mean"], rescored["foreground_mean"], "foreground_mean")
    return reported


@pytest.mark.slow
def test_regions_with_ignore_label_through_the_workflow_and_the_cascade(tmp_path: Path) -> None:
    """Regions + ignore label: plan, preprocess, 3d_fullres / 3d_lowres / cascade on 2 folds, cross-validation,
    ensembles, selection, postprocessing, prediction; a second run has nothing to do."""
    from .test_cascade import FORCED_LOWRES

    name = "Dataset921_DemoRegionsIgnore"
    raw = derived_dataset(tmp_path / name, REGIONS_IGNORE_LABELS, unannotated_border)
    splits = two_fold_splits(raw, tmp_path / "splits.json")
    wd = workflow_copy(tmp_path)
    config = ("--config", f"dataset={raw}", f"splits_file={splits}", "folds=[0,1]", *FORCED_LOWRES)
    snakemake(wd, *config, "--", f"results/{name}/plans.json")
    run = snakemake(
        wd, "--resources", "gpu=1", *config, "configurations=[3d_fullres,3d_lowres,3d_cascade_fullres]"
    )
    counts = job_counts(run.stdout + run.stderr)
    assert counts["train"] == 6 and counts["ensemble_crossval"] == 3
    results = wd / "results" / name

    # preprocessing samples the regions (tuple keys for lists) and the annotated key of the ignore label
    from nnsnake.preprocessing import load_case

    _, seg, properties = load_case(results / "preprocessed" / "3d_fullres", "hippocampus_001")
    assert set(properties["class_locations"]) == {(1, 2), 2, (-1, 0, 1, 2)}
    assert 3 in np.unique(seg)  # the ignore label is kept in the preprocessed label map

    # two sigmoid heads; the cascade's extra inputs are one-hot foreground labels (1, 2), not regions
    import torch

    weights = torch.load(results / "training" / "3d_fullres" / "fold_0" / "model_final.pt", weights_only=True)
    heads = [
        v for k, v in weights["network_weights"].items() if k.startswith("heads.") and k.endswith("weight")
    ]
    assert heads and all(h.shape[0] == 2 for h in heads)
    cascade = torch.load(
        results / "training" / "3d_cascade_fullres" / "fold_0" / "model_final.pt", weights_only=True
    )
    first_conv = next(
        v for k, v in cascade["network_weights"].items() if k.endswith("weight") and v.ndim == 5
    )
    assert first_conv.shape[1] == 1 + 2

    for configuration in ("3d_fullres", "3d_cascade_fullres", "ensemble_3d_fullres+3d_cascade_fullres"):
        summary = _check_crossval_against_own_scoring(results, raw, configuration)
        assert set(summary["mean"]) == {"(1, 2)", "2"} and len(summary["metric_per_case"]) == 24
    probabilities = np.load(results / "crossval" / "3d_fullres" / "hippocampus_001.npz")["probabilities"]
    assert probabilities.shape[0] == 2 and 0.0 <= probabilities.min() and probabilities.max() <= 1.0
    assert _label_values(results / "crossval" / "3d_fullres" / "hippocampus_001.nii.gz") <= {0, 1, 2}

    decision = jsonio.read_json(results / "postprocessing.json")
    assert decision["labels_or_regions"] == ["(1, 2)", "2"]
    assert "hippocampus (1, 2)" in (results / "report" / "crossval.html").read_text()
    for image in sorted((DEMO / "imagesTs").iterdir()):
        predicted = results / "predictions" / "imagesTs" / image.name.replace("_0000", "")
        assert _label_values(predicted) <= {0, 1, 2}  # never the ignore label
    again = snakemake(wd, *config, "configurations=[3d_fullres,3d_lowres,3d_cascade_fullres]", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


@pytest.mark.slow
def test_ignore_label_through_the_workflow(tmp_path: Path) -> None:
    """Sparse annotation (label mode + ignore label), 2d and 3d_fullres on 2 folds, end to end."""
    name = "Dataset922_DemoIgnore"
    raw = derived_dataset(tmp_path / name, IGNORE_LABELS, sparse_slices)
    splits = two_fold_splits(raw, tmp_path / "splits.json")
    wd = workflow_copy(tmp_path)
    config = ("--config", f"dataset={raw}", f"splits_file={splits}", "folds=[0,1]")
    snakemake(wd, *config, "--", f"results/{name}/plans.json")  # job counts are known once the plan exists
    run = snakemake(wd, "--resources", "gpu=1", *config)
    assert job_counts(run.stdout + run.stderr)["train"] == 4
    results = wd / "results" / name
    from nnsnake.preprocessing import load_case

    _, _, properties = load_case(results / "preprocessed" / "2d", "hippocampus_001")
    assert set(properties["class_locations"]) == {1, 2, (-1, 0, 1, 2)}
    for configuration in ("2d", "3d_fullres", "ensemble_2d+3d_fullres"):
        summary = _check_crossval_against_own_scoring(results, raw, configuration)
        assert set(summary["mean"]) == {"1", "2"}
        assert _label_values(results / "crossval" / configuration / "hippocampus_001.nii.gz") <= {0, 1, 2}
    # only annotated voxels count: the unannotated slices hold half the voxels and are left out
    case = next(
        entry["metrics"]["1"]
        for entry in summary["metric_per_case"]
        if entry["reference_file"].endswith("hippocampus_001.nii.gz")
    )
    import SimpleITK as sitk

    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(raw / "labelsTr" / "hippocampus_001.nii.gz")))
    assert case["TP"] + case["FP"] + case["FN"] + case["TN"] == int((reference != 3).sum())
    for image in sorted((DEMO / "imagesTs").iterdir()):
        assert _label_values(results / "predictions" / "imagesTs" / image.name.replace("_0000", "")) <= {
            0,
            1,
            2,
        }
    again = snakemake(wd, *config, "-n")
    assert "Nothing to be done" in again.stdout + again.stderr
