"""The cascade (docs/method.md §5.8, §9): 3d_lowres out-of-fold predictions feed 3d_cascade_fullres, through the workflow."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nnsnake.training import previous_stage_digest, previous_stage_files

from .test_workflow import DEMO, job_counts, snakemake, workflow_copy


def _write_cases(folder: Path, case_ids: list[str], value: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for case_id in case_ids:
        np.save(folder / f"{case_id}.npy", np.full((1, 2, 2, 2), value, dtype=np.int8))


def test_previous_stage_files_are_found_across_fold_folders(tmp_path: Path) -> None:
    _write_cases(tmp_path / "fold_0", ["a", "b"])
    _write_cases(tmp_path / "fold_1", ["c", "unused"])
    files = previous_stage_files([tmp_path / "fold_0", tmp_path / "fold_1"], ["a", "c", "b"])
    assert files == {
        "a": tmp_path / "fold_0" / "a.npy",
        "b": tmp_path / "fold_0" / "b.npy",
        "c": tmp_path / "fold_1" / "c.npy",
    }
    assert previous_stage_files(tmp_path / "fold_0", ["a"]) == {"a": tmp_path / "fold_0" / "a.npy"}


def test_previous_stage_files_name_missing_and_duplicated_cases(tmp_path: Path) -> None:
    _write_cases(tmp_path / "fold_0", ["a"])
    _write_cases(tmp_path / "fold_1", ["a"])
    with pytest.raises(FileNotFoundError, match=r"1 case\(s\) \(e.g. z\).*fold_0"):
        previous_stage_files([tmp_path / "fold_0"], ["a", "z"])
    with pytest.raises(ValueError, match="both .*fold_0 and .*fold_1"):
        previous_stage_files([tmp_path / "fold_0", tmp_path / "fold_1"], ["a"])
    with pytest.raises(FileNotFoundError):
        previous_stage_files([tmp_path / "absent"], ["a"])


def test_previous_stage_digest_follows_the_content(tmp_path: Path) -> None:
    _write_cases(tmp_path / "x", ["a", "b"])
    before = previous_stage_digest(previous_stage_files(tmp_path / "x", ["a", "b"]))
    _write_cases(tmp_path / "x", ["a", "b"])  # rewritten, same content
    assert previous_stage_digest(previous_stage_files(tmp_path / "x", ["a", "b"])) == before
    _write_cases(tmp_path / "x", ["b"], value=2)
    assert previous_stage_digest(previous_stage_files(tmp_path / "x", ["a", "b"])) != before


# A GPU memory target this small makes the demo's 3d_fullres patch cover < 25 % of the median image, so the plan
# gets 3d_lowres + 3d_cascade_fullres (16x24x16 patches, batch 2): every configuration trains in seconds.
FORCED_LOWRES = (
    "planning={gpu_memory_target_gb: 0.02}",
    "training={epochs: 1, iterations_per_epoch: 2, val_iterations: 1}",
)


@pytest.mark.slow
def test_all_four_configurations_and_prediction_with_the_cascade(tmp_path: Path) -> None:
    import SimpleITK as sitk

    wd = workflow_copy(tmp_path)
    # three folds from a user splits file (the workflow's 5-fold default is the demo test's): every case is still
    # validated once, and the cascade gathers its training inputs from a fold count other than 5
    case_ids = sorted(p.name.removesuffix(".nii.gz") for p in (DEMO / "labelsTr").glob("*.nii.gz"))
    splits = [
        {"train": [c for c in case_ids if c not in case_ids[k::3]], "val": case_ids[k::3]} for k in range(3)
    ]
    (tmp_path / "splits_3folds.json").write_text(json.dumps(splits))
    config = (
        "--config",
        f"dataset={DEMO}",
        *FORCED_LOWRES,
        f"splits_file={tmp_path / 'splits_3folds.json'}",
        "folds=[0,1,2]",
    )
    # 40 short jobs: two at a time (one core each; "gpu" is only a scheduling token on CPU)
    parallel = (
        "--resources",
        "gpu=2",
        "--set-threads",
        "train=1",
        "validate=1",
        "validate_lowres=1",
        "predict=1",
    )
    # the plan first: before the checkpoint has run, Snakemake's job table cannot list what the plan decides
    snakemake(wd, *config, "--", f"results/{DEMO.name}/plans.json")
    run = snakemake(wd, *parallel, *config, timeout=2400)
    counts = job_counts(run.stdout + run.stderr)
    assert counts["train"] == 12 and counts["validate"] == 9 and counts["validate_lowres"] == 3
    assert counts["crossval"] == 4 and counts["ensemble_crossval"] == 6
    results = wd / "results" / DEMO.name
    plans = json.loads((results / "plans.json").read_text())
    assert set(plans["configurations"]) == {"2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres"}
    assert json.loads((results / "splits.json").read_text()) == splits

    # every training case has exactly one out-of-fold lowres prediction, at the 3d_fullres preprocessed shape
    from nnsnake.preprocessing import load_case

    for fold, split in enumerate(splits):
        folder = results / "training" / "3d_lowres" / f"fold_{fold}" / "predicted_next_stage"
        assert sorted(p.stem for p in folder.glob("*.npy")) == sorted(split["val"])
        case_id = split["val"][0]
        _, seg, _ = load_case(results / "preprocessed" / "3d_fullres", case_id)
        assert np.load(folder / f"{case_id}.npy").shape[1:] == seg.shape[1:]
    cascade_log = (wd / "logs" / DEMO.name / "train_3d_cascade_fullres_fold_0.log").read_text()
    assert "training 3d_cascade_fullres fold 0" in cascade_log
    import torch

    weights = torch.load(
        results / "training" / "3d_cascade_fullres" / "fold_0" / "model_final.pt", weights_only=True
    )
    first_conv = next(
        v for k, v in weights["network_weights"].items() if k.endswith("weight") and v.ndim == 5
    )
    assert first_conv.shape[1] == 1 + 2  # the image + one-hot lowres labels 1 and 2
    crossval = json.loads((results / "crossval" / "3d_cascade_fullres" / "summary.json").read_text())
    assert len(crossval["metric_per_case"]) == 24
    assert (results / "crossval" / "ensemble_3d_lowres+3d_cascade_fullres" / "summary.json").is_file()

    # only the cascade as candidate: select reruns, prediction runs 3d_lowres then the cascade; no training reruns
    cascade_only = snakemake(wd, *parallel, *config, "configurations=[3d_cascade_fullres]")
    assert set(job_counts(cascade_only.stdout + cascade_only.stderr)) <= {
        "select",
        "postprocess",
        "crossval_table",
        "postprocessing_table",
        "predict",
        "all",
    }
    selection = json.loads((results / "selection.json").read_text())
    assert selection["selected"] == "3d_cascade_fullres"
    record = json.loads((results / "predictions" / "imagesTs" / "prediction.json").read_text())
    assert record["configurations_run"] == ["3d_lowres", "3d_cascade_fullres"]
    for image in sorted((DEMO / "imagesTs").iterdir()):
        prediction = sitk.ReadImage(
            str(results / "predictions" / "imagesTs" / image.name.replace("_0000", ""))
        )
        assert prediction.GetSize() == sitk.ReadImage(str(image)).GetSize()
