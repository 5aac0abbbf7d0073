"""The Snakemake workflow itself: lint, DAG, and real runs on tiny data (issue 2 contracts)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO
from .test_dataset import make_dataset

DEMO = REPO / "examples" / "Dataset104_HippocampusDemo"
WORKFLOW_FILES = ("Snakefile", "workflow", "config", "profiles")


def workflow_copy(tmp_path: Path) -> Path:
    """A private copy of the workflow (not the data) so runs do not touch the repository."""
    wd = tmp_path / "wf"
    wd.mkdir()
    for name in WORKFLOW_FILES:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, wd / name)
        else:
            shutil.copy(src, wd / name)
    return wd


def snakemake(wd: Path, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "snakemake", "--cores", "2", *args]
    result = subprocess.run(cmd, cwd=wd, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def job_counts(output: str) -> dict[str, int]:
    """Parse the 'Job stats' table of a (dry) run."""
    import re

    match = re.search(r"Job stats:\njob\s+count\n[- ]+\n(.*?)\ntotal", output, re.S)
    if not match:
        return {}
    return {line.split()[0]: int(line.split()[1]) for line in match.group(1).splitlines() if line.strip()}


def test_lint_and_ruff() -> None:
    lint = subprocess.run(
        [sys.executable, "-m", "snakemake", "--lint"], cwd=REPO, capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    ruff = shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff not installed")
    result = subprocess.run(
        [ruff, "check", "src", "tests", "workflow", "benchmarks"], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_config_schema_rejects_wrong_config(tmp_path: Path) -> None:
    wd = workflow_copy(tmp_path)
    result = snakemake(wd, "-n", "--config", "folds=[7,7]", check=False)
    assert result.returncode != 0
    assert "ValidationError" in result.stdout + result.stderr


def test_plan_target_builds_only_the_plan(tmp_path: Path) -> None:
    """`snakemake results/<DatasetName>/plans.json` verifies, fingerprints and plans, nothing more."""
    wd = workflow_copy(tmp_path)
    run = snakemake(wd, "--config", f"dataset={DEMO}", "--", f"results/{DEMO.name}/plans.json")
    assert job_counts(run.stdout + run.stderr) == {"verify": 1, "fingerprint": 1, "plan": 1}
    plans = json.loads((wd / "results" / DEMO.name / "plans.json").read_text())
    assert set(plans["configurations"]) == {"2d", "3d_fullres"}
    assert plans["configurations"]["3d_fullres"]["patch_size"] == [40, 56, 40]
    assert plans["transpose_forward"] == [0, 1, 2]
    assert not (wd / "results" / DEMO.name / "splits.json").exists()
    # nothing changed: a second run has nothing to do
    again = snakemake(wd, "--config", f"dataset={DEMO}", "-n", "--", f"results/{DEMO.name}/plans.json")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_splits_and_user_splits(tmp_path: Path) -> None:
    dataset = make_dataset(tmp_path / "Dataset905_Splits", n_cases=6, n_channels=1)
    wd = workflow_copy(tmp_path)
    snakemake(wd, "--config", f"dataset={dataset}", "--", "results/Dataset905_Splits/splits.json")
    splits = json.loads((wd / "results" / "Dataset905_Splits" / "splits.json").read_text())
    assert len(splits) == 5 and sorted(sum((s["val"] for s in splits), [])) == [
        f"case_{i:03d}" for i in range(6)
    ]
    # a splits_final.json shipped with the dataset replaces nnU-Net's folds and reruns the splits rule
    user = [{"train": ["case_000", "case_001", "case_002"], "val": ["case_003", "case_004", "case_005"]}]
    (dataset / "splits_final.json").write_text(json.dumps(user))
    snakemake(wd, "--config", f"dataset={dataset}", "--", "results/Dataset905_Splits/splits.json")
    assert json.loads((wd / "results" / "Dataset905_Splits" / "splits.json").read_text()) == user


def test_broken_dataset_stops_before_fingerprint(tmp_path: Path) -> None:
    """Verification fails the run with every problem named, and no later step runs."""
    dataset = make_dataset(tmp_path / "Dataset906_Broken", n_cases=3, n_channels=2)
    (dataset / "imagesTr" / "case_001_0001.nii.gz").unlink()
    (dataset / "labelsTr" / "case_002.nii.gz").unlink()
    wd = workflow_copy(tmp_path)
    result = snakemake(wd, "--config", f"dataset={dataset}", check=False)
    assert result.returncode != 0
    log = (wd / "logs" / "Dataset906_Broken" / "verify.log").read_text()
    assert "case_001_0001.nii.gz" in log and "labelsTr/case_002.nii.gz" in log and "2 problem(s)" in log
    assert not (wd / "results" / "Dataset906_Broken" / "fingerprint.json").exists()
    assert not (wd / "results" / "Dataset906_Broken" / "verification.json").exists()


def test_demo_main_job_runs_and_reruns_nothing(finished_demo: Path) -> None:
    """The README's main command on the embedded demo, end to end; a second run has nothing to do."""
    import SimpleITK as sitk
    import torch

    from nnsnake.preprocessing import load_case

    wd = finished_demo
    results = wd / "results" / DEMO.name
    for configuration in ("2d", "3d_fullres"):
        manifest = json.loads((results / "preprocessed" / configuration / "manifest.json").read_text())
        assert len(manifest["cases"]) == 24
        data, seg, properties = load_case(results / "preprocessed" / configuration, "hippocampus_001")
        assert data.dtype.name == "float32" and data.shape[0] == 1 and seg.shape[1:] == data.shape[1:]
        assert set(properties["class_locations"]) == {1, 2}
        for fold in range(5):
            folder = results / "training" / configuration / f"fold_{fold}"
            log = json.loads((folder / "log.json").read_text())
            assert [entry["epoch"] for entry in log] == [
                0,
                1,
            ]  # the demo's budget (examples/.../nnsnake.yaml)
            assert {"train_loss", "val_loss", "pseudo_dice", "lr", "epoch_time_s", "finished_at"} <= set(
                log[0]
            )
            assert (folder / "progress.png").stat().st_size > 0
            torch.load(folder / "model_final.pt", weights_only=True)
            assert json.loads((folder / "validation" / "summary.json").read_text())["metric_per_case"]
        crossval = json.loads((results / "crossval" / configuration / "summary.json").read_text())
        assert len(crossval["metric_per_case"]) == 24 and {"mean", "foreground_mean"} <= set(crossval)
    assert (results / "crossval" / "ensemble_2d+3d_fullres" / "summary.json").exists()
    selection = json.loads((results / "selection.json").read_text())
    assert selection["selected"] in ("2d", "3d_fullres", "ensemble_2d+3d_fullres")
    assert json.loads((results / "bootstrap.json").read_text())
    assert "steps" in json.loads((results / "postprocessing.json").read_text())
    for image in sorted((DEMO / "imagesTs").iterdir()):
        prediction = sitk.ReadImage(
            str(results / "predictions" / "imagesTs" / image.name.replace("_0000", ""))
        )
        source = sitk.ReadImage(str(image))
        assert prediction.GetSize() == source.GetSize() and prediction.GetOrigin() == source.GetOrigin()
        assert (
            prediction.GetSpacing() == source.GetSpacing()
            and prediction.GetDirection() == source.GetDirection()
        )
    again = snakemake(wd, "--config", f"dataset={DEMO}", "-n")
    assert "Nothing to be done" in again.stdout + again.stderr


def test_deprecated_config_keys_are_renamed_with_a_warning(tmp_path: Path) -> None:
    """training.amp / training.num_workers and the boolean inference.autocast still work for one release."""
    wd = workflow_copy(tmp_path)
    old = snakemake(wd, "-n", "--config", f"dataset={DEMO}", "training={amp: bf16, num_workers: 2}")
    output = old.stdout + old.stderr
    assert "config training.amp is deprecated; use training.autocast" in output
    assert "config training.num_workers is deprecated; use training.workers" in output
    null = snakemake(wd, "-n", "--config", f"dataset={DEMO}", "inference={autocast: null}")
    assert "inference.autocast: null is deprecated" in null.stdout + null.stderr
    both = snakemake(
        wd, "-n", "--config", f"dataset={DEMO}", "training={amp: bf16, autocast: fp16}", check=False
    )
    assert both.returncode != 0 and "both given" in both.stdout + both.stderr
