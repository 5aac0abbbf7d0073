"""BraTS as regions through the workflow: plans equal to nnunetv2's, and one fold trained for a few iterations.

    python benchmarks/brats_regions.py [--iterations 2] [--work /tmp/nnsnake_brats_regions]

The dataset is ``../shared/data/Dataset301_BraTS2015DeepMedic`` (6 cases, FLAIR + T1c) with a regions
dataset.json: whole tumour = labels 1-4, tumour core = 1, 3, 4, enhancing = 4, painted back with
``regions_class_order`` [2, 1, 4] (whole tumour -> edema, core -> necrosis, enhancing -> 4). Steps:

1. nnunetv2 (anchor venv): ``nnUNetv2_extract_fingerprint`` + ``nnUNetv2_plan_experiment`` on it;
2. nnsnake, through Snakemake: ``results/<DS>/plans.json``; the plans are compared byte for byte (sorted JSON);
3. nnsnake, through Snakemake: 3d_fullres fold 0, 1 epoch of ``--iterations`` iterations (CPU), up to its
   ``model_final.pt``; prints the wall time and the training log's loss and pseudo-Dice per region.

A benchmark, not a test: one 3d_fullres iteration on these 128^3 patches takes tens of seconds on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import SHARED, anchor_bin, nnunet_env

REPO = Path(__file__).resolve().parents[1]
NAME = "Dataset311_BraTSRegions"
REGIONS = {
    "labels": {
        "background": 0,
        "whole_tumor": [1, 2, 3, 4],
        "tumor_core": [1, 3, 4],
        "enhancing_tumor": [4],
    },
    "regions_class_order": [2, 1, 4],
}


def regions_dataset(work: Path) -> Path:
    """The shared BraTS subset with the regions dataset.json (images and labels linked, not copied)."""
    source = SHARED / "data" / "Dataset301_BraTS2015DeepMedic"
    root = work / "raw" / NAME
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).symlink_to(source / sub)
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json.pop("labels")
    dataset_json.update(REGIONS)
    (root / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return root


def snakemake(wd: Path, *args: str) -> float:
    start = time.perf_counter()
    cmd = [sys.executable, "-m", "snakemake", "--cores", str(len(os.sched_getaffinity(0))), *args]
    result = subprocess.run(cmd, cwd=wd, capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnsnake_brats_regions"))
    args = parser.parse_args()
    work = args.work.resolve()
    raw = regions_dataset(work)

    # nnunetv2's plans
    env = nnunet_env(work / "nnunet")
    (work / "nnunet" / "raw").mkdir(parents=True, exist_ok=True)
    link = work / "nnunet" / "raw" / NAME
    if not link.exists():
        link.symlink_to(raw)
    for cmd in (
        ["nnUNetv2_extract_fingerprint", "-d", "311", "-np", "2", "--clean"],
        ["nnUNetv2_plan_experiment", "-d", "311"],
    ):
        done = subprocess.run([anchor_bin(cmd[0]), *cmd[1:]], env=env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{cmd[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    theirs = json.loads((work / "nnunet" / "pre" / NAME / "nnUNetPlans.json").read_text())

    # nnsnake's plans through the workflow
    wd = work / "wf"
    shutil.rmtree(wd, ignore_errors=True)
    wd.mkdir()
    for name in ("Snakefile", "workflow", "config", "profiles"):
        (shutil.copytree if (REPO / name).is_dir() else shutil.copy)(REPO / name, wd / name)
    config = ["--config", f"dataset={raw}", "folds=[0]", "configurations=[3d_fullres]"]
    plan_s = snakemake(wd, *config, "--", f"results/{NAME}/plans.json")
    ours = json.loads((wd / "results" / NAME / "plans.json").read_text())
    sys.path.insert(0, str(REPO / "src"))
    from nnsnake.jsonio import dumps

    # nnunetv2 sums 1e8 float32 intensity samples, nnsnake counts draws in float64 (docs/method.md §14.12): the
    # channels' mean and std agree to float32 rounding, everything else exactly
    intensities = "foreground_intensity_properties_per_channel"
    close = all(
        math.isclose(ours[intensities][c][k], v, rel_tol=1e-6 if k in ("mean", "std") else 0.0)
        for c, props in theirs[intensities].items()
        for k, v in props.items()
    )
    rest = {k: v for k, v in ours.items() if k != intensities}
    rest_theirs = {k: v for k, v in theirs.items() if k != intensities}
    differing = [
        f"{c}.{k}"
        for c in theirs["configurations"]
        for k in theirs["configurations"][c]
        if ours["configurations"].get(c, {}).get(k) != theirs["configurations"][c][k]
    ]
    differing += [k for k in rest_theirs if k != "configurations" and rest.get(k) != rest_theirs[k]]
    same = dumps(rest) == dumps(rest_theirs)
    print(
        f"plans ({', '.join(theirs['configurations'])}): "
        f"{'identical' if same else 'DIFFER: ' + ', '.join(differing)} apart from the intensity statistics, "
        f"which are {'equal to float32 rounding (mean/std) and exactly (the rest)' if close else 'DIFFERENT'}"
    )
    print(f"workflow up to the plan: {plan_s:.1f} s")

    # one fold, a few iterations
    budget = f"training={{epochs: 1, iterations_per_epoch: {args.iterations}, val_iterations: 1}}"
    train_s = snakemake(
        wd,
        "--resources",
        "gpu=1",
        *config,
        budget,
        "--",
        f"results/{NAME}/training/3d_fullres/fold_0/model_final.pt",
    )
    log = json.loads((wd / "results" / NAME / "training" / "3d_fullres" / "fold_0" / "log.json").read_text())
    dice = ", ".join(f"{name} {value:.3f}" for name, value in log[-1]["pseudo_dice"].items())
    print(
        f"3d_fullres fold 0, 1 epoch x {args.iterations} iterations: workflow {train_s:.0f} s "
        f"(preprocess + train), train loss {log[-1]['train_loss']:.4f}, pseudo Dice {dice}"
    )


if __name__ == "__main__":
    main()
