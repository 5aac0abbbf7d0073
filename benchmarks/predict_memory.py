"""Memory of the export step at prediction: nnsnake vs nnunetv2 2.8.1 on a synthetic CT-like case, many classes.

    python benchmarks/predict_memory.py [--classes 105] [--slices 100] [--big-slices 400] [--skip-nnunet]

The case: ``slices x 512 x 512`` voxels at spacing (1.0, 0.78, 0.78) mm, a 3d_fullres plan at (2.0, 1.56, 1.56)
mm, so the network's logits (``classes x slices/2 x 256 x 256`` float32, as a predictor hands them over) must be
resampled to the image's grid by the export. The logits are smooth made-up fields, one blob per class
(a CT-like parcellation into ``classes`` structures), built identically from a seed in each worker.

Each tool's export runs in its own fresh process with OMP_NUM_THREADS=1 (nnunetv2's
``convert_predicted_logits_to_segmentation_with_correct_shape`` with one torch thread, in the anchor venv;
nnsnake's ``convert_logits_to_raw_geometry``). Printed: the process's peak RSS (``ru_maxrss``), its RSS once the
logits exist (the predictor's own share), the export's wall time, and whether the label maps are identical.
Then nnsnake alone on ``--big-slices`` slices, with nnunetv2's requirement computed: it holds the logits (and a
float64 copy) plus all ``classes`` channels resampled to the image in float32 (plus the argmax), which is what it
cannot fit. On a shared 24 GB machine nnunetv2 was killed by the kernel's OOM killer at 100 slices (at 14.2 GB
RSS) and at 50 (at 10.1 GB), so the side-by-side default is 24 slices; ``--skip-nnunet --slices 100`` runs nnsnake
alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_SPACING = [1.0, 0.78, 0.78]
PLAN_SPACING = [2.0, 1.56, 1.56]
BENCHMARKS = Path(__file__).resolve().parent
IN_PLANE = 512


def case_geometry(slices: int) -> tuple[list[int], list[int]]:
    """(image shape, network shape) in numpy axis order: the network grid is the image at the plan spacing."""
    image = [slices, IN_PLANE, IN_PLANE]
    network = [round(n * s / p) for n, s, p in zip(image, IMAGE_SPACING, PLAN_SPACING, strict=True)]
    return image, network


def synthetic_logits(classes: int, shape: list[int], seed: int = 0) -> np.ndarray:
    """One smooth blob per class (negative anisotropic squared distance to a random centre): a parcellation
    of the volume into ``classes`` regions with smooth boundaries, no exact ties."""
    rng = np.random.default_rng(seed)
    axes = [np.linspace(0.0, 1.0, n, dtype=np.float32) for n in shape]
    logits = np.empty((classes, *shape), dtype=np.float32)
    for c in range(classes):
        centre = rng.uniform(0.1, 0.9, size=3).astype(np.float32)
        width = rng.uniform(0.5, 2.0, size=3).astype(np.float32)
        z, y, x = [
            ((a - m) ** 2 * w)[tuple(slice(None) if i == k else None for i in range(3))]
            for k, (a, m, w) in enumerate(zip(axes, centre, width, strict=True))
        ]
        np.add(z + y, x, out=logits[c])
        logits[c] *= -10.0
    return logits


def plans_and_properties(slices: int, classes: int) -> tuple[dict, dict, dict]:
    image, network = case_geometry(slices)
    config = {
        "data_identifier": "nnUNetPlans_3d_fullres",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": [64, 128, 128],
        "median_image_size_in_voxels": network,
        "spacing": PLAN_SPACING,
        "normalization_schemes": ["CTNormalization"],
        "use_mask_for_norm": [False],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": {"network_class_name": "unused", "arch_kwargs": {}, "_kw_requires_import": []},
        "batch_dice": False,
    }
    plans = {
        "dataset_name": "Dataset999_CTLike",
        "plans_name": "nnUNetPlans",
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "original_median_spacing_after_transp": IMAGE_SPACING,
        "original_median_shape_after_transp": image,
        "configurations": {"3d_fullres": config},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {},
    }
    dataset_json = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, **{f"structure_{c}": c for c in range(1, classes)}},
        "numTraining": 1,
        "file_ending": ".nii.gz",
    }
    properties = {
        "spacing": IMAGE_SPACING,
        "shape_before_cropping": image,
        "bbox_used_for_cropping": [[0, n] for n in image],
        "shape_after_cropping_and_before_resampling": image,
    }
    return plans, dataset_json, properties


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(tool: str, slices: int, classes: int, out: Path) -> None:
    """One export in this process; prints a JSON line with its memory and time, saves the label map."""
    import torch

    torch.set_num_threads(1)
    plans, dataset_json, properties = plans_and_properties(slices, classes)
    _, network = case_geometry(slices)
    logits = torch.from_numpy(synthetic_logits(classes, network))
    with_logits = rss_mb()
    start = time.perf_counter()
    if tool == "nnunetv2":
        from nnunetv2.inference.export_prediction import (
            convert_predicted_logits_to_segmentation_with_correct_shape,
        )
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        manager = PlansManager(plans)
        seg = convert_predicted_logits_to_segmentation_with_correct_shape(
            logits,
            manager,
            manager.get_configuration("3d_fullres"),
            manager.get_label_manager(dataset_json),
            properties,
            return_probabilities=False,
            num_threads_torch=1,
        )
    else:
        from nnsnake.inference import convert_logits_to_raw_geometry

        seg, _ = convert_logits_to_raw_geometry(logits, properties, plans, "3d_fullres", dataset_json)
    seconds = time.perf_counter() - start
    np.save(out, np.asarray(seg))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tool": tool, "peak_mb": peak, "logits_mb": with_logits, "export_s": seconds}))


def run_worker(tool: str, slices: int, classes: int, out: Path) -> dict:
    from common import anchor_bin  # psutil: not in the anchor venv, where workers run

    python = anchor_bin("python") if tool == "nnunetv2" else sys.executable
    cmd = [
        python,
        __file__,
        "--worker",
        tool,
        "--slices",
        str(slices),
        "--classes",
        str(classes),
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(BENCHMARKS)}
    wall = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{tool} worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - wall
    return result


def nnunet_requirement_gb(slices: int, classes: int) -> float:
    """A lower bound of nnunetv2's peak: the float32 logits, their float64 copy (its resampling works in float64),
    all channels resampled to the image in float32, the int64 argmax (torch) and the uint8 label map."""
    image, network = case_geometry(slices)
    voxels, network_voxels = int(np.prod(image)), int(np.prod(network))
    return (12 * classes * network_voxels + 4 * classes * voxels + 8 * voxels + voxels) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--classes", type=int, default=105)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--big-slices", type=int, default=400, help="0 to skip the large nnsnake-only case")
    parser.add_argument("--skip-nnunet", action="store_true")
    parser.add_argument("--worker", choices=["nnunetv2", "nnsnake"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.slices, args.classes, args.out)
        return
    from common import print_table

    rows = [("case", "tool", "peak RSS MB", "RSS with logits MB", "export s", "process s", "identical")]
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(args.slices, "nnsnake")] + ([] if args.skip_nnunet else [(args.slices, "nnunetv2")])
        if args.big_slices:
            runs.append((args.big_slices, "nnsnake"))
        results = {}
        for slices, tool in runs:
            out = Path(tmp) / f"{tool}_{slices}.npy"
            results[slices, tool] = result = run_worker(tool, slices, args.classes, out)
            identical = "-"
            if tool == "nnunetv2":
                same = np.load(out) == np.load(Path(tmp) / f"nnsnake_{slices}.npy")
                identical = "yes" if same.all() else f"no: {int((~same).sum())} voxels differ"
            rows.append(
                (
                    f"{slices}x512x512, {args.classes} classes",
                    tool,
                    f"{result['peak_mb']:.0f}",
                    f"{result['logits_mb']:.0f}",
                    f"{result['export_s']:.1f}",
                    f"{result['wall_s']:.1f}",
                    identical,
                )
            )
            print(json.dumps({"slices": slices, **result}), flush=True)
    print()
    print_table(rows)
    if (args.slices, "nnunetv2") in results:
        ours, theirs = results[args.slices, "nnsnake"], results[args.slices, "nnunetv2"]
        print(
            f"\n{args.slices} slices: nnsnake peak / nnunetv2 peak = {ours['peak_mb'] / theirs['peak_mb']:.2f}, "
            f"export time ratio = {ours['export_s'] / theirs['export_s']:.2f}"
        )
    for slices in {args.slices, args.big_slices} - {0}:
        print(f"nnunetv2's floor at {slices} slices: {nnunet_requirement_gb(slices, args.classes):.1f} GB")


if __name__ == "__main__":
    main()
