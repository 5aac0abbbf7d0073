"""Raw data to preprocessed 3d_fullres (fingerprint, plan, preprocess): nnsnake vs nnunetv2 2.8.1, same run.

    python benchmarks/preprocess.py [--dataset DIR ...] [--processes 2] [--reads 200]

Default datasets: ../shared/data/Dataset004_Hippocampus and ../shared/data/Dataset303_BraTSVariedSpacing.

nnunetv2 side (the anchor venv, see ../shared/anchor): ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N
-npfp N --clean`` with nnUNet_* variables pointing into a temporary folder. nnsnake side: ``nnsnake.steps``
fingerprint, plan and preprocess (the workflow's rules) in one fresh Python process. Both include interpreter
start-up and imports, as a user waits for them; both run with OMP_NUM_THREADS=1 and N worker processes.

Printed per dataset: wall time, peak memory (summed RSS of the whole process tree, sampled every 20 ms), disk
use of the 3d_fullres store, and random-patch reads per second of both stores (3d_fullres patch size, all
channels plus the segmentation, each read opening the case as a training loader does: nnunetv2's
``blosc2.open(mmap_mode='r')`` with one thread, nnsnake's ``load_case(mmap=True)``), with the ratios.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from common import SHARED, anchor_bin, dataset_id, folder_size_mb, link_raw, measure, nnunet_env, print_table

NNSNAKE_SNIPPET = """
import sys
from nnsnake import steps
raw, out, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
steps.fingerprint(raw, out + "/fingerprint.json", processes=n)
steps.plan(out + "/fingerprint.json", raw, out + "/plans.json")
steps.preprocess(raw, out + "/plans.json", "3d_fullres", out + "/preprocessed/3d_fullres/manifest.json", processes=n)
"""


def patch_reads_per_second(
    open_case: Callable[[str], tuple], case_ids: list[str], patch: list[int], n_reads: int, seed: int = 0
) -> float:
    """Random patches (all channels + seg, copied into memory) per second, opening the case for every read."""
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    for _ in range(n_reads):
        data, seg = open_case(case_ids[rng.integers(len(case_ids))])
        shape = data.shape[1:]
        lower = [int(rng.integers(0, max(1, s - p + 1))) for s, p in zip(shape, patch, strict=True)]
        region = (slice(None), *[slice(lo, lo + p) for lo, p in zip(lower, patch, strict=True)])
        np.array(data[region])
        np.array(seg[region])
    return n_reads / (time.perf_counter() - start)


def compare_reads(
    nnunet_folder: Path, nnsnake_folder: Path, patch: list[int], n_reads: int
) -> tuple[float, float]:
    import blosc2

    from nnsnake.preprocessing import load_case, stored_case_ids

    blosc2.set_nthreads(1)
    case_ids = stored_case_ids(nnsnake_folder)

    def open_nnunet(case_id: str) -> tuple:
        params = {"nthreads": 1}
        return (
            blosc2.open(str(nnunet_folder / f"{case_id}.b2nd"), mode="r", dparams=params, mmap_mode="r"),
            blosc2.open(str(nnunet_folder / f"{case_id}_seg.b2nd"), mode="r", dparams=params, mmap_mode="r"),
        )

    def open_nnsnake(case_id: str) -> tuple:
        data, seg, _ = load_case(nnsnake_folder, case_id, mmap=True)
        return data, seg

    results = {"nnunetv2": [], "nnsnake": []}
    for opener in (open_nnunet, open_nnsnake):  # warm the page cache for both
        patch_reads_per_second(opener, case_ids, patch, min(20, n_reads))
    for round_ in range(3):  # interleaved rounds: a busy machine slows both alike
        results["nnunetv2"].append(patch_reads_per_second(open_nnunet, case_ids, patch, n_reads, seed=round_))
        results["nnsnake"].append(patch_reads_per_second(open_nnsnake, case_ids, patch, n_reads, seed=round_))
    return float(np.median(results["nnunetv2"])), float(np.median(results["nnsnake"]))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--dataset",
        type=Path,
        action="append",
        help="raw dataset folder (repeatable); default Hippocampus and Dataset303",
    )
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--reads", type=int, default=200, help="patches per read-speed round")
    args = parser.parse_args()
    datasets = args.dataset or [
        SHARED / "data" / "Dataset004_Hippocampus",
        SHARED / "data" / "Dataset303_BraTSVariedSpacing",
    ]
    rows = [("dataset", "", "nnunetv2", "nnsnake", "ratio")]
    with tempfile.TemporaryDirectory() as tmp:
        for ds in (d.resolve() for d in datasets):
            root = Path(tmp) / ds.name
            env = nnunet_env(root / "nnunet")
            link_raw(root / "nnunet", ds)
            theirs = measure(
                [
                    anchor_bin("nnUNetv2_plan_and_preprocess"),
                    "-d",
                    dataset_id(ds),
                    "-c",
                    "3d_fullres",
                    "-np",
                    str(args.processes),
                    "-npfp",
                    str(args.processes),
                    "--clean",
                ],
                env=env,
            )
            if theirs.returncode:
                sys.exit(f"nnunetv2 failed on {ds.name}:\n{theirs.output[-3000:]}")
            out = root / "nnsnake"
            out.mkdir()
            ours = measure(
                [sys.executable, "-c", NNSNAKE_SNIPPET, str(ds), str(out), str(args.processes)], env=env
            )
            if ours.returncode:
                sys.exit(f"nnsnake failed on {ds.name}:\n{ours.output[-3000:]}")
            nnunet_store = root / "nnunet" / "pre" / ds.name / "nnUNetPlans_3d_fullres"
            nnsnake_store = out / "preprocessed" / "3d_fullres"
            plans = json.loads((out / "plans.json").read_text())
            patch = plans["configurations"]["3d_fullres"]["patch_size"]
            n_reads = args.reads if np.prod(patch) < 1e6 else max(10, args.reads // 10)
            reads_theirs, reads_ours = compare_reads(nnunet_store, nnsnake_store, patch, n_reads)
            disk_theirs, disk_ours = folder_size_mb(nnunet_store), folder_size_mb(nnsnake_store)
            name = ds.name
            rows += [
                (
                    name,
                    "wall time s (fingerprint+plan+preprocess)",
                    f"{theirs.wall_s:.1f}",
                    f"{ours.wall_s:.1f}",
                    f"{theirs.wall_s / ours.wall_s:.2f}x faster",
                ),
                (
                    name,
                    "peak memory MB (process tree)",
                    f"{theirs.peak_rss_mb:.0f}",
                    f"{ours.peak_rss_mb:.0f}",
                    f"{ours.peak_rss_mb / theirs.peak_rss_mb:.2f}x of nnunetv2",
                ),
                (
                    name,
                    "disk MB (3d_fullres store)",
                    f"{disk_theirs:.1f}",
                    f"{disk_ours:.1f}",
                    f"{disk_ours / disk_theirs:.2f}x of nnunetv2",
                ),
                (
                    name,
                    f"patch reads/s ({'x'.join(map(str, patch))})",
                    f"{reads_theirs:.1f}",
                    f"{reads_ours:.1f}",
                    f"{reads_ours / reads_theirs:.2f}x faster",
                ),
            ]
    print(f"raw -> preprocessed 3d_fullres, {args.processes} processes each, OMP_NUM_THREADS=1")
    print_table(rows)


if __name__ == "__main__":
    main()
