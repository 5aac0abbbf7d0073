"""Several planners in one workflow (issue 13): the classic plans and the residual-encoder M preset side by side.

One real run on 8 demo cases (2 folds from a splits file, 3d_fullres, one iteration per training) plans with both
planners, preprocesses the shared 3d_fullres data once, trains both U-Nets, cross-validates each and their
ensemble, selects across the planners (cost = network parameters), postprocesses and predicts the test images.
The default planner's paths are those of a single-planner run; the ResEnc ones sit under nnUNetResEncUNetMPlans/.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnsnake import steps
from nnsnake.selection import member_id, split_member

from .label_datasets import DEMO, derived_dataset, two_fold_splits
from .test_workflow import job_counts, snakemake, workflow_copy

pytestmark = pytest.mark.slow

NAME = "Dataset931_Planners"
RESENC = "nnUNetResEncUNetMPlans"
RESENC_MEMBER = f"{RESENC}__3d_fullres"
PLANNERS = "planning={planners: [ExperimentPlanner, nnUNetPlannerResEncM]}"
BUDGET = "training={epochs: 1, iterations_per_epoch: 1, val_iterations: 1}"


def _config(raw: Path, splits: Path, *extra: str) -> tuple[str, ...]:
    return (
        "--config",
        f"dataset={raw}",
        f"splits_file={splits}",
        "folds=[0,1]",
        "configurations=[3d_fullres]",
        BUDGET,
        "inference={mirroring: false}",
        *extra,
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, tuple[str, ...]]:
    root = tmp_path_factory.mktemp("planners")
    raw = derived_dataset(
        root / NAME,
        {"labels": json.loads((DEMO / "dataset.json").read_text())["labels"]},
        lambda seg: seg,
        n_cases=8,
    )
    splits = two_fold_splits(raw, root / "splits.json")
    wd = workflow_copy(root)
    config = _config(raw, splits, PLANNERS)
    snakemake(wd, "--resources", "gpu=1", *config)
    return wd, raw, config


def test_both_planners_run_side_by_side(finished: tuple[Path, Path, tuple[str, ...]]) -> None:
    wd, _, config = finished
    results = wd / "results" / NAME
    classic = json.loads((results / "plans.json").read_text())
    resenc = json.loads((results / RESENC / "plans.json").read_text())
    assert classic["plans_name"] == "nnUNetPlans" and resenc["plans_name"] == RESENC
    assert resenc["experiment_planner_used"] == "nnUNetPlannerResEncM"
    assert resenc["configurations"]["3d_fullres"]["architecture"]["network_class_name"].endswith(
        "ResidualEncoderUNet"
    )
    # the ResEnc 3d_fullres data is nnUNetPlans_3d_fullres: preprocessed once, in the default place
    assert resenc["configurations"]["3d_fullres"]["data_identifier"] == "nnUNetPlans_3d_fullres"
    assert (results / "preprocessed" / "3d_fullres" / "manifest.json").is_file()
    assert not (results / RESENC / "preprocessed").exists()
    for root in (results, results / RESENC):
        for fold in (0, 1):
            assert (root / "training" / "3d_fullres" / f"fold_{fold}" / "model_final.pt").is_file()
        assert (root / "crossval" / "3d_fullres" / "summary.json").is_file()
    assert (results / "crossval" / f"ensemble_3d_fullres+{RESENC_MEMBER}" / "summary.json").is_file()

    # selection across planners: cost = parameters of the candidate's networks
    bootstrap = json.loads((results / "bootstrap.json").read_text())
    candidates = bootstrap["candidates"]
    assert set(candidates) == {"3d_fullres", RESENC_MEMBER, f"ensemble_3d_fullres+{RESENC_MEMBER}"}
    plain, residual = candidates["3d_fullres"]["cost"], candidates[RESENC_MEMBER]["cost"]
    assert 0 < plain < residual
    assert candidates[f"ensemble_3d_fullres+{RESENC_MEMBER}"]["cost"] == plain + residual
    selection = json.loads((results / "selection.json").read_text())
    assert selection["cost_measure"] == "network parameters"
    assert selection["selected"] in candidates
    chosen = selection["inference_information"]["best_model_or_ensemble"]["selected_model_or_models"]
    assert [(m["plans_identifier"], m["configuration"]) for m in chosen] == [
        ("nnUNetPlans", "3d_fullres") if m == "3d_fullres" else split_member(m) for m in selection["members"]
    ]
    prediction = json.loads((results / "predictions" / "imagesTs" / "prediction.json").read_text())
    assert prediction["configurations_run"] == selection["members"]

    again = snakemake(wd, *config, "-n")
    assert job_counts(again.stdout + again.stderr) == {}
    assert "Nothing to be done" in again.stdout + again.stderr


def test_prediction_runs_a_selected_resenc_candidate(
    finished: tuple[Path, Path, tuple[str, ...]], tmp_path: Path
) -> None:
    """Whichever candidate the tiny budget selects, a results folder whose selection names the ResEnc model (or an
    ensemble across both planners) predicts with the right plans and weights."""
    wd, raw, _ = finished
    results = tmp_path / NAME
    shutil.copytree(wd / "results" / NAME, results, symlinks=True)
    selection = json.loads((results / "selection.json").read_text())
    images = tmp_path / "images"
    images.mkdir()
    first = sorted((raw / "imagesTs").iterdir())[0]
    (images / first.name).symlink_to(first.resolve())
    outputs = {}
    for members in ([RESENC_MEMBER], ["3d_fullres", RESENC_MEMBER]):
        chosen = dict(
            selection, selected=members[0] if len(members) == 1 else "+".join(members), members=members
        )
        (results / "selection.json").write_text(json.dumps(chosen))
        out = tmp_path / f"out_{len(members)}"
        steps.predict(images, out, results, settings={"mirroring": False, "device": "cpu"}, progress=False)
        record = json.loads((out / "prediction.json").read_text())
        assert record["configurations_run"] == members
        outputs[len(members)] = sitk.GetArrayFromImage(
            sitk.ReadImage(str(out / first.name.replace("_0000", "")))
        )
    reference = sitk.ReadImage(str(first))
    assert outputs[1].shape == sitk.GetArrayFromImage(reference).shape
    assert set(np.unique(outputs[2])) <= {0, 1, 2}


def test_member_names() -> None:
    assert member_id("nnUNetPlans", "3d_fullres") == "3d_fullres"
    assert member_id(RESENC, "2d") == f"{RESENC}__2d"
    assert split_member(f"{RESENC}__3d_fullres_bs24") == (RESENC, "3d_fullres_bs24")
    assert split_member("3d_lowres") == ("nnUNetPlans", "3d_lowres")


def test_derived_configuration_trains_on_its_parents_data(
    finished: tuple[Path, Path, tuple[str, ...]], tmp_path: Path
) -> None:
    """planning.extra_configurations: a derived configuration is added to every planner's plans, shares its
    parent's preprocessed data and gets its own trainings; the planned configurations' trainings stay."""
    wd, raw, config = finished
    copy = tmp_path / "wf"
    shutil.copytree(wd, copy, symlinks=True)
    extra = (
        "planning={planners: [ExperimentPlanner, nnUNetPlannerResEncM], extra_configurations: "
        "{3d_fullres_bs3: {inherits_from: 3d_fullres, batch_size: 3}}}"
    )
    derived_config = [a for a in config if not a.startswith(("planning=", "configurations="))]
    derived_config += [extra, "configurations=[3d_fullres,3d_fullres_bs3]"]
    results = copy / "results" / NAME
    plans_before = {p: p.read_bytes() for p in (results / "plans.json", results / RESENC / "plans.json")}
    run = snakemake(copy, *derived_config, "-n")
    counts = job_counts(run.stdout + run.stderr)
    # plans.json stays as it was: no plan, preprocessing or training of 3d_fullres reruns
    assert counts.get("plan", 0) == 0 and counts.get("preprocess", 0) == 0
    assert counts["derive_plans"] == 2
    assert counts["train"] == 4 and counts["validate"] == 4  # 2 planners x 2 folds of 3d_fullres_bs3 only
    assert counts["crossval"] == 2
    snakemake(
        copy,
        *derived_config,
        "--",
        f"results/{NAME}/derived/3d_fullres_bs3/plans.json",
        f"results/{NAME}/{RESENC}/derived/3d_fullres_bs3/plans.json",
    )
    for plans_file, before in plans_before.items():
        assert plans_file.read_bytes() == before
        derived = json.loads((plans_file.parent / "derived" / "3d_fullres_bs3" / "plans.json").read_text())
        assert derived["configurations"]["3d_fullres_bs3"] == {"inherits_from": "3d_fullres", "batch_size": 3}
        assert derived["configurations"]["3d_fullres"] == json.loads(before)["configurations"]["3d_fullres"]
