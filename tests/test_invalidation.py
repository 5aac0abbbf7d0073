"""Rerun only what changed (issue 6 "Invalidation"): exact job counts of dry runs after one complete run.

One complete run of the real workflow (eight demo cases, 2d and 3d_fullres, folds 0 and 1, one iteration per
training, prediction of one test image) is shared by the module; tests that change the workflow's state work on
a copy of it. The dataset lives inside the workflow folder under a relative path, so a copy has the same config.
Counts come from the "Job stats" table of ``snakemake -n``.

``plan`` is a checkpoint: until it has run again, a dry run lists the jobs up to it and ``all`` only (what
comes after is decided by the new plan). So a plan-level change is followed by ``snakemake <plans.json>``
first; the dry run after it shows everything the new plan invalidates.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

import nnsnake

from .test_resume import executed_jobs, tiny_dataset
from .test_workflow import job_counts, snakemake, workflow_copy

pytestmark = pytest.mark.slow

NAME = "Dataset910_Invalidation"
CONFIGURATIONS = ("2d", "3d_fullres")
# what follows the trainings: pooling, selection, postprocessing, the report's tables, prediction
SELECTION_AND_AFTER = {
    "select": 1,
    "postprocess": 1,
    "crossval_table": 1,
    "postprocessing_table": 1,
    "predict": 1,
    "all": 1,
}
DOWNSTREAM_OF_ALL_TRAININGS = {"crossval": 2, "ensemble_crossval": 1, **SELECTION_AND_AFTER}


def config_args(*changes: str) -> tuple[str, ...]:
    return (
        "--config",
        f"dataset=data/{NAME}",
        "folds=[0,1]",
        f"configurations=[{','.join(CONFIGURATIONS)}]",
        "training={epochs: 1, iterations_per_epoch: 1, val_iterations: 1}",
        "inference={mirroring: false}",
        *changes,
    )


def dry_run(wd: Path, *changes: str) -> tuple[dict[str, int], str]:
    result = snakemake(wd, "-n", *config_args(*changes))
    output = result.stdout + result.stderr
    return job_counts(output), output


def output_mtimes(wd: Path) -> dict[str, int]:
    return {str(p.relative_to(wd)): p.stat().st_mtime_ns for p in (wd / "results").rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private copy of the nnsnake package, first on PYTHONPATH for every snakemake run of this module.

    The repository's package is installed editable and shared with other work, so it must not be edited; the
    workflow imports whichever ``nnsnake`` comes first on the path, and that is this copy (of the package this
    test process imported).
    """
    root = tmp_path_factory.mktemp("library")
    shutil.copytree(
        Path(nnsnake.__file__).parent, root / "nnsnake", ignore=shutil.ignore_patterns("__pycache__")
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
        yield root / "nnsnake"


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory, library: Path) -> Path:
    """The workflow folder after one complete run."""
    wd = workflow_copy(tmp_path_factory.mktemp("invalidation"))
    tiny_dataset(wd, NAME)
    snakemake(wd, *config_args())
    return wd


def copy_workflow(completed: Path, destination: Path, with_state: bool = False) -> Path:
    """A private copy of the completed workflow: results (mtimes kept), metadata, data; work/ only if asked."""

    def skip(folder: str, names: list[str]) -> list[str]:
        return ["work"] if Path(folder) == completed and not with_state else []

    shutil.copytree(completed, destination, symlinks=True, ignore=skip)
    return destination


def test_nothing_changed_nothing_reruns(completed: Path) -> None:
    counts, output = dry_run(completed)
    assert counts == {} and "Nothing to be done" in output


def test_library_edit_does_not_rerun_finished_trainings(completed: Path, library: Path) -> None:
    """Editing the nnsnake package (a bug fix, a new option) reruns nothing that is finished.

    What makes this true is the layout: the rules' scripts are thin shims that import the installed package,
    Snakemake's code trigger only looks at a rule's own script file (its mtime), and no rule lists library
    files as inputs or derives a param from them. The test edits the very copy of the package that the run
    imported (checked below), with a newer mtime than every output, and runs the workflow for real: nothing
    runs and no output is rewritten. Whoever wants a library change to reach finished results asks for it
    (``--forcerun train``); editing a shim under workflow/scripts/ does rerun its rule, by Snakemake's design.
    """
    imported = subprocess.run(
        [sys.executable, "-c", "import nnsnake.training as t; print(t.__file__)"],
        cwd=completed,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(imported) == library / "training" / "__init__.py"
    before = output_mtimes(completed)
    future = max(before.values()) / 1e9 + 60
    for module in ("training/trainer.py", "steps/data.py", "preprocessing.py", "inference/predictor.py"):
        path = library / module
        path.write_text(path.read_text() + "\n# an edit after the run\n")
        os.utime(path, (future, future))
    run = snakemake(completed, *config_args())
    output = run.stdout + run.stderr
    assert job_counts(output) == {} and "Nothing to be done" in output
    assert output_mtimes(completed) == before


def test_training_parameter_of_one_configuration_reruns_only_its_trainings(completed: Path) -> None:
    """A per-configuration training override reruns that configuration's two trainings and what depends on them
    (their validations, its cross-validation, the ensemble with the other configuration, selection,
    postprocessing, prediction); the other configuration's trainings, validations and cross-validation stay."""
    counts, output = dry_run(completed, "training_per_configuration={3d_fullres: {epochs: 2}}")
    assert counts == {"train": 2, "validate": 2, "crossval": 1, "ensemble_crossval": 1, **SELECTION_AND_AFTER}
    jobs = executed_jobs(output).values()
    assert sorted(outputs[0] for rule, outputs in jobs if rule == "train") == [
        f"results/{NAME}/training/3d_fullres/fold_{fold}/model_final.pt" for fold in (0, 1)
    ]
    assert [outputs for rule, outputs in jobs if rule == "crossval"] == [
        [f"results/{NAME}/crossval/3d_fullres/summary.json"]
    ]
    assert "Params have changed" in output


def test_trainer_variant_of_one_configuration_reruns_only_its_trainings(completed: Path) -> None:
    """A trainer variant (nnUNetTrainerTopk10Loss as `loss: topk10`) set for one configuration reruns exactly what
    another per-configuration training value does: that configuration's trainings and what depends on them."""
    counts, output = dry_run(completed, "training_per_configuration={3d_fullres: {loss: topk10}}")
    assert counts == {"train": 2, "validate": 2, "crossval": 1, "ensemble_crossval": 1, **SELECTION_AND_AFTER}
    jobs = executed_jobs(output).values()
    assert sorted(outputs[0] for rule, outputs in jobs if rule == "train") == [
        f"results/{NAME}/training/3d_fullres/fold_{fold}/model_final.pt" for fold in (0, 1)
    ]


def replan(completed: Path, tmp_path: Path, change: str) -> tuple[Path, Path, bytes]:
    """A copy of the finished run, the plan-level ``change`` applied and only the plan rerun (the checkpoint
    hides everything after it until then); returns the copy, its plans.json and that file's earlier bytes."""
    workflow = copy_workflow(completed, tmp_path / "wf")
    plans = workflow / "results" / NAME / "plans.json"
    plans_before = plans.read_bytes()
    assert dry_run(workflow, change)[0] == {"plan": 1, "all": 1}
    run = snakemake(workflow, *config_args(change), "--", str(plans.relative_to(workflow)))
    assert job_counts(run.stdout + run.stderr) == {"plan": 1}
    return workflow, plans, plans_before


def test_plan_change_that_leaves_plans_identical_reruns_nothing_downstream(
    completed: Path, tmp_path: Path
) -> None:
    """gpu_memory_target_gb 8 -> 10 on images this small gives the same plan: the plan job reruns (its param
    changed), writes a byte-identical plans.json (deterministic JSON), and Snakemake's checksum of it keeps
    every later job: not one preprocessing or training reruns."""
    change = "planning={gpu_memory_target_gb: 10}"
    workflow, plans, plans_before = replan(completed, tmp_path, change)
    assert plans.read_bytes() == plans_before
    counts, output = dry_run(workflow, change)
    assert counts == {} and "Nothing to be done" in output


def test_plan_change_reruns_from_preprocessing_on(completed: Path, tmp_path: Path) -> None:
    """overwrite_target_spacing changes the plan (both configurations use the new spacing): once the plan has
    run, everything from preprocessing on is invalidated, and only that: verification, fingerprint and splits
    stay."""
    change = "planning={overwrite_target_spacing: [1.5, 1.5, 1.5]}"
    workflow, plans, plans_before = replan(completed, tmp_path, change)
    assert plans.read_bytes() != plans_before
    assert json.loads(plans.read_bytes())["configurations"]["3d_fullres"]["spacing"] == [1.5, 1.5, 1.5]
    counts, _ = dry_run(workflow, change)
    assert counts == {"preprocess": 2, "train": 4, "validate": 4, **DOWNSTREAM_OF_ALL_TRAININGS}


def test_label_correction_reruns_the_trainings_and_validations_that_use_the_case(
    completed: Path, tmp_path: Path
) -> None:
    """Swapping labels 1 and 2 of one case (a typical label fix; fingerprint and plan stay the same) must rerun
    every training and validation whose fold holds the case, and all that depends on them; and a rerun training
    must start over, not restore its finished state. Every fold holds every case (for training, or for
    validation, whose pseudo-Dice picks model_best), so all four trainings and validations rerun."""
    workflow = copy_workflow(completed, tmp_path / "wf", with_state=True)
    splits = json.loads((workflow / "results" / NAME / "splits.json").read_text())
    case = splits[0]["val"][0]  # validated in fold 0, trained on in fold 1
    label = workflow / "data" / NAME / "labelsTr" / f"{case}.nii.gz"
    image = sitk.ReadImage(str(label))
    seg = sitk.GetArrayFromImage(image)
    swapped = np.where(seg == 1, 2, np.where(seg == 2, 1, seg)).astype(seg.dtype)
    fixed = sitk.GetImageFromArray(swapped)
    fixed.CopyInformation(image)
    sitk.WriteImage(fixed, str(label))

    manifests = [f"results/{NAME}/preprocessed/{c}/manifest.json" for c in CONFIGURATIONS]
    run = snakemake(workflow, *config_args(), "--", *manifests)
    assert job_counts(run.stdout + run.stderr) == {"verify": 1, "fingerprint": 1, "plan": 1, "preprocess": 2}
    counts, _ = dry_run(workflow)
    assert counts == {"train": 4, "validate": 4, **DOWNSTREAM_OF_ALL_TRAININGS}

    model = f"results/{NAME}/training/3d_fullres/fold_1/model_final.pt"
    snakemake(workflow, *config_args(), "--", model)
    log = (workflow / "logs" / NAME / "train_3d_fullres_fold_1.log").read_text()
    assert "training 3d_fullres fold 1:" in log and "already finished" not in log
