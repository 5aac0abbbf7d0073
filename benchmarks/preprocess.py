"""Raw data to preprocessed 3d_fullres (fingerprint, plan, preprocess): nnsnake vs nnunetv2 2.8.1, same run.

nnsnake runs twice, once per store (``preprocessing.store``: ``blosc2``, the default, and ``npy``).

    python benchmarks/preprocess.py [--dataset DIR ...] [--processes 2] [--reads 200] [--workflow [--rounds N]]

Default datasets: ../shared/data/Dataset004_Hippocampus and ../shared/data/Dataset303_BraTSVariedSpacing.

nnunetv2 side (the anchor venv, see ../shared/anchor): ``nnUNetv2_plan_and_preprocess -d ID -c 3d_fullres -np N
-npfp N --clean`` with nnUNet_* variables pointing into a temporary folder. nnsnake side: ``nnsnake.steps``
fingerprint, plan and preprocess (the workflow's rules) in one fresh Python process. Both include interpreter
start-up and imports, as a user waits for them; both run with OMP_NUM_THREADS=1 and N worker processes.

``--workflow`` adds the same result through the workflow, as a user gets it (a fresh copy of the workflow, ``python
-m snakemake --cores N --config dataset=DIR configurations=["3d_fullres"] -- results/<DS>/preprocessed/3d_fullres/
manifest.json``: verify, fingerprint, plan, preprocess jobs, Snakemake's start-up and scheduling included) against
the same nnunetv2 command. ``--rounds N`` measures that pair N times, each nnunetv2 run right before its workflow
run (fresh folders each time), and reports the medians and the median of the N ratios with their range: a
virtual machine's speed drifts over minutes, and back-to-back pairs see the same speed.

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
from common import (
    SHARED,
    anchor_bin,
    dataset_id,
    folder_size_mb,
    link_raw,
    measure,
    nnunet_env,
    print_table,
    without_stopped_slurm,
)

STORES = ("blosc2", "npy")  # the first is the default store, the one the ratio column compares
NNSNAKE_SNIPPET = """
import sys
from nnsnake import steps
raw, out, n, store = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
steps.fingerprint(raw, out + "/fingerprint.json", processes=n)
steps.plan(out + "/fingerprint.json", raw, out + "/plans.json")
steps.preprocess(
    raw, out + "/plans.json", "3d_fullres", out + "/preprocessed/3d_fullres/manifest.json", processes=n, store=store
)
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
    nnunet_folder: Path, nnsnake_folders: dict[str, Path], patch: list[int], n_reads: int
) -> dict[str, float]:
    """Median over 3 interleaved rounds of random patch reads/s: nnunetv2's store and each nnsnake store."""
    import blosc2

    from nnsnake.preprocessing import load_case, stored_case_ids

    blosc2.set_nthreads(1)
    case_ids = stored_case_ids(next(iter(nnsnake_folders.values())))

    def open_nnunet(case_id: str) -> tuple:
        params = {"nthreads": 1}
        return (
            blosc2.open(str(nnunet_folder / f"{case_id}.b2nd"), mode="r", dparams=params, mmap_mode="r"),
            blosc2.open(str(nnunet_folder / f"{case_id}_seg.b2nd"), mode="r", dparams=params, mmap_mode="r"),
        )

    def nnsnake_opener(folder: Path) -> Callable[[str], tuple]:
        def open_nnsnake(case_id: str) -> tuple:
            data, seg, _ = load_case(folder, case_id, mmap=True)
            return data, seg

        return open_nnsnake

    openers = {"nnunetv2": open_nnunet, **{k: nnsnake_opener(f) for k, f in nnsnake_folders.items()}}
    results: dict[str, list[float]] = {k: [] for k in openers}
    for opener in openers.values():  # warm the page cache for all
        patch_reads_per_second(opener, case_ids, patch, min(20, n_reads))
    for round_ in range(3):  # interleaved rounds: a busy machine slows all alike
        for name, opener in openers.items():
            results[name].append(patch_reads_per_second(opener, case_ids, patch, n_reads, seed=round_))
    return {k: float(np.median(v)) for k, v in results.items()}


def run_nnunetv2(dataset: Path, env: dict[str, str], processes: int):
    """``nnUNetv2_plan_and_preprocess -c 3d_fullres`` with N processes for fingerprinting and preprocessing."""
    result = measure(
        [
            anchor_bin("nnUNetv2_plan_and_preprocess"),
            "-d",
            dataset_id(dataset),
            "-c",
            "3d_fullres",
            "-np",
            str(processes),
            "-npfp",
            str(processes),
            "--clean",
        ],
        env=env,
    )
    if result.returncode:
        sys.exit(f"nnunetv2 failed on {dataset.name}:\n{result.output[-3000:]}")
    return result


def workflow_rounds(
    dataset: Path, root: Path, processes: int, first: tuple[float, float], rounds: int
) -> tuple[float, float, list[float]]:
    """Median nnunetv2 and workflow wall times over ``rounds`` back-to-back pairs (``first``: the pair already
    measured), and every pair's ratio."""
    pairs = [first]
    for round_ in range(1, rounds):
        env = nnunet_env(root / f"round{round_}" / "nnunet")
        link_raw(root / f"round{round_}" / "nnunet", dataset)
        theirs = run_nnunetv2(dataset, env, processes)
        flow = run_workflow(dataset, root / f"round{round_}" / "workflow", processes, env)
        pairs.append((theirs.wall_s, flow.wall_s))
    ratios = [t / f for t, f in pairs]
    return float(np.median([t for t, _ in pairs])), float(np.median([f for _, f in pairs])), ratios


def run_workflow(dataset: Path, root: Path, cores: int, env: dict[str, str]):
    """Raw to preprocessed 3d_fullres through a fresh copy of the workflow (benchmarks/workflow_overhead.py's)."""
    from workflow_overhead import snakemake_cmd, workflow_copy

    root.mkdir(parents=True)
    wd = workflow_copy(root)
    flow_env = dict(env)
    without_stopped_slurm(flow_env)
    target = f"results/{dataset.name}/preprocessed/3d_fullres/manifest.json"
    result = measure(snakemake_cmd(cores, dataset, target), env=flow_env, cwd=wd)
    if result.returncode:
        sys.exit(f"the workflow failed on {dataset.name}:\n{result.output[-3000:]}")
    return result


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
    parser.add_argument("--workflow", action="store_true", help="also through the Snakemake workflow")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="with --workflow: back-to-back nnunetv2/workflow pairs (medians)",
    )
    args = parser.parse_args()
    datasets = args.dataset or [
        SHARED / "data" / "Dataset004_Hippocampus",
        SHARED / "data" / "Dataset303_BraTSVariedSpacing",
    ]
    rows = [("dataset", "", "nnunetv2", *[f"nnsnake {k}" for k in STORES], f"ratio ({STORES[0]})")]
    with tempfile.TemporaryDirectory() as tmp:
        for ds in (d.resolve() for d in datasets):
            root = Path(tmp) / ds.name
            env = nnunet_env(root / "nnunet")
            link_raw(root / "nnunet", ds)
            theirs = run_nnunetv2(ds, env, args.processes)
            ours, stores = {}, {}
            for store in STORES:
                out = root / f"nnsnake_{store}"
                out.mkdir()
                ours[store] = measure(
                    [sys.executable, "-c", NNSNAKE_SNIPPET, str(ds), str(out), str(args.processes), store],
                    env=env,
                )
                if ours[store].returncode:
                    sys.exit(f"nnsnake ({store}) failed on {ds.name}:\n{ours[store].output[-3000:]}")
                stores[store] = out / "preprocessed" / "3d_fullres"
            nnunet_store = root / "nnunet" / "pre" / ds.name / "nnUNetPlans_3d_fullres"
            plans = json.loads((out / "plans.json").read_text())
            patch = plans["configurations"]["3d_fullres"]["patch_size"]
            n_reads = args.reads if np.prod(patch) < 1e6 else max(10, args.reads // 10)
            reads = compare_reads(nnunet_store, stores, patch, n_reads)
            disk_theirs = folder_size_mb(nnunet_store)
            disk = {k: folder_size_mb(f) for k, f in stores.items()}
            main_ = ours[STORES[0]]
            name = ds.name
            if args.workflow:
                pair_env = nnunet_env(root / "pair" / "nnunet")
                link_raw(root / "pair" / "nnunet", ds)
                pair_theirs = run_nnunetv2(ds, pair_env, args.processes)  # right before the workflow run
                flow = run_workflow(ds, root / "workflow", args.processes, env)
                their_s, flow_s, ratios = workflow_rounds(
                    ds, root, args.processes, (pair_theirs.wall_s, flow.wall_s), args.rounds
                )
                spread = (
                    f" (median of {len(ratios)}: {min(ratios):.2f}-{max(ratios):.2f})"
                    if len(ratios) > 1
                    else ""
                )
                rows.append(
                    (
                        name,
                        "workflow wall time s (verify+fingerprint+plan+preprocess)",
                        f"{their_s:.1f}",
                        f"{flow_s:.1f}",
                        "-",
                        f"{float(np.median(ratios)):.2f}x faster{spread}",
                    )
                )
            rows += [
                (
                    name,
                    "wall time s (fingerprint+plan+preprocess)",
                    f"{theirs.wall_s:.1f}",
                    *[f"{ours[k].wall_s:.1f}" for k in STORES],
                    f"{theirs.wall_s / main_.wall_s:.2f}x faster",
                ),
                (
                    name,
                    "peak memory MB (process tree)",
                    f"{theirs.peak_rss_mb:.0f}",
                    *[f"{ours[k].peak_rss_mb:.0f}" for k in STORES],
                    f"{main_.peak_rss_mb / theirs.peak_rss_mb:.2f}x of nnunetv2",
                ),
                (
                    name,
                    "disk MB (3d_fullres store)",
                    f"{disk_theirs:.1f}",
                    *[f"{disk[k]:.1f}" for k in STORES],
                    f"{disk[STORES[0]] / disk_theirs:.2f}x of nnunetv2",
                ),
                (
                    name,
                    f"patch reads/s ({'x'.join(map(str, patch))})",
                    f"{reads['nnunetv2']:.1f}",
                    *[f"{reads[k]:.1f}" for k in STORES],
                    f"{reads[STORES[0]] / reads['nnunetv2']:.2f}x faster",
                ),
            ]
    print(f"raw -> preprocessed 3d_fullres, {args.processes} processes each, OMP_NUM_THREADS=1")
    print_table(rows)


if __name__ == "__main__":
    main()
