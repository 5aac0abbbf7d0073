"""Does nnunetv2 accept ``nnsnake export --format nnunet``, and does it segment what nnsnake segments?

    python benchmarks/nnunet_export_check.py RESULTS/<DatasetXXX_Name> IMAGES [--threads 2] [--keep]

On a finished workflow result and a folder of images, in a temporary folder:

1. ``nnsnake export --format nnunet -m RESULTS -o export.zip`` (this environment);
2. ``nnUNetv2_install_pretrained_model_from_zip export.zip`` into a fresh ``nnUNet_results`` (anchor venv,
   nnunetv2 2.8.1: ``/tmp/venv-nnunet`` or ``$NNSNAKE_ANCHOR_VENV``);
3. the inference instructions of the exported ``inference_information.json``, with nnunetv2's own commands:
   ``nnUNetv2_predict -d DS -c C -tr nnUNetTrainer -p PLANS -f FOLDS`` per member (a cascade's previous stage
   first, ``-prev_stage_predictions``), ``nnUNetv2_ensemble`` when the selection is an ensemble, and
   ``nnUNetv2_apply_postprocessing -pp_pkl_file`` with the exported (opcode-written) postprocessing.pkl;
4. ``nnsnake predict -m RESULTS`` on the same images (mirroring on, as nnunetv2);
5. per case: identical geometry and the share of voxels with the same label; exits 1 below 99.9 %.

Prints both tools' wall times too (nnunetv2: the sum of its commands). CPU only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

VENV = Path(os.environ.get("NNSNAKE_ANCHOR_VENV", "/tmp/venv-nnunet"))
THRESHOLD = 0.999


def _run(*args: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(args, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def _agreement(ours: Path, theirs: Path) -> tuple[float, bool]:
    import numpy as np
    import SimpleITK as sitk

    a, b = sitk.ReadImage(str(ours)), sitk.ReadImage(str(theirs))
    same_geometry = (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)
    )
    x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
    return (float(np.mean(x == y)) if x.shape == y.shape else 0.0), same_geometry


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("results", type=Path, help="finished workflow results/<DatasetXXX_Name>")
    parser.add_argument("images", type=Path, help="images to segment, e.g. the raw dataset's imagesTs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()

    from nnsnake.cli import main as nnsnake_main

    selection = json.loads((args.results / "selection.json").read_text())
    images = args.images.resolve()
    work = Path(tempfile.mkdtemp(prefix="nnsnake_export_check_"))
    env = {
        **os.environ,
        "nnUNet_raw": str(work / "raw"),
        "nnUNet_preprocessed": str(work / "pre"),
        "nnUNet_results": str(work / "nnUNet_results"),
        "OMP_NUM_THREADS": str(args.threads),
        "nnUNet_def_n_proc": "1",
    }
    for key in ("raw", "pre", "nnUNet_results"):
        (work / key).mkdir()
    bin_dir = VENV / "bin"

    export = work / "export.zip"
    assert (
        nnsnake_main(["export", "--format", "nnunet", "-m", str(args.results), "-o", str(export), "--quiet"])
        == 0
    )
    _run(str(bin_dir / "nnUNetv2_install_pretrained_model_from_zip"), str(export), env=env)
    (dataset_folder,) = [p for p in (work / "nnUNet_results").iterdir() if p.is_dir()]
    information = json.loads((dataset_folder / "inference_information.json").read_text())
    best = information["best_model_or_ensemble"]
    folds = [str(f) for f in information["folds"]]
    nnunet_seconds = 0.0
    member_outputs = []
    ensemble = len(best["selected_model_or_models"]) > 1
    for member in best["selected_model_or_models"]:
        plans = json.loads(
            (
                dataset_folder
                / f"{member['trainer']}__{member['plans_identifier']}__{member['configuration']}"
                / "plans.json"
            ).read_text()
        )
        previous = plans["configurations"][member["configuration"]].get("previous_stage")
        extra: list[str] = []
        if previous:
            prev_out = work / "nnunet" / previous
            nnunet_seconds += _run(
                str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(prev_out), "-d", dataset_folder.name,
                "-c", previous, "-tr", member["trainer"], "-p", member["plans_identifier"], "-f", *folds,
                "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar", env=env,
            )  # fmt: skip
            extra = ["-prev_stage_predictions", str(prev_out)]
        out = work / "nnunet" / member["configuration"]
        nnunet_seconds += _run(
            str(bin_dir / "nnUNetv2_predict"), "-i", str(images), "-o", str(out), "-d", dataset_folder.name,
            "-c", member["configuration"], "-tr", member["trainer"], "-p", member["plans_identifier"], "-f", *folds,
            "-device", "cpu", "-npp", "1", "-nps", "1", "--disable_progress_bar",
            *(["--save_probabilities"] if ensemble else []), *extra, env=env,
        )  # fmt: skip
        member_outputs.append(out)
    before_pp = member_outputs[0]
    if ensemble:
        before_pp = work / "nnunet" / "ensemble"
        nnunet_seconds += _run(
            str(bin_dir / "nnUNetv2_ensemble"), "-i", *map(str, member_outputs), "-o", str(before_pp), "-np", "1",
            env=env,
        )  # fmt: skip
    final = work / "nnunet" / "final"
    pp_pkl = work / "nnUNet_results" / best["postprocessing_file"]
    some_plans = work / "nnUNet_results" / best["some_plans_file"]
    nnunet_seconds += _run(
        str(bin_dir / "nnUNetv2_apply_postprocessing"), "-i", str(before_pp), "-o", str(final),
        "-pp_pkl_file", str(pp_pkl), "-np", "1", "-plans_json", str(some_plans),
        "-dataset_json", str(some_plans.with_name("dataset.json")), env=env,
    )  # fmt: skip

    ours = work / "nnsnake"
    start = time.perf_counter()
    assert nnsnake_main(
        ["predict", "-i", str(images), "-o", str(ours), "-m", str(args.results), "--device", "cpu", "--quiet",
         "--threads", str(args.threads)]
    ) == 0  # fmt: skip
    nnsnake_seconds = time.perf_counter() - start

    some_plans = work / "nnUNet_results" / best["some_plans_file"]
    ending = json.loads(some_plans.with_name("dataset.json").read_text())["file_ending"]
    worst = 1.0
    geometry_ok = True
    print(
        f"selected {selection['selected']} (nnU-Net ids: {[m['configuration'] for m in best['selected_model_or_models']]}), folds {folds}"
    )
    print(f"{'case':<28}{'agreement':>12}{'geometry':>10}")
    for theirs in sorted(final.glob(f"*{ending}")):
        agreement, same = _agreement(ours / theirs.name, theirs)
        worst, geometry_ok = min(worst, agreement), geometry_ok and same
        print(f"{theirs.name:<28}{agreement:>12.6f}{'same' if same else 'DIFFERS':>10}")
    print(
        f"worst agreement {worst:.6f} (threshold {THRESHOLD}); geometry {'identical' if geometry_ok else 'DIFFERS'}"
    )
    print(f"wall time: nnunetv2 commands {nnunet_seconds:.1f} s, nnsnake predict {nnsnake_seconds:.1f} s")
    if not args.keep:
        import shutil

        shutil.rmtree(work)
    else:
        print(f"work folder kept: {work}")
    return 0 if worst >= THRESHOLD and geometry_ok else 1


if __name__ == "__main__":
    sys.exit(main())
