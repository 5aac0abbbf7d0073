"""Quality at equal budget: Hippocampus fold 0 (3d_fullres, or 2d) trained by nnsnake and by nnunetv2, same plans.

Both train ``--epochs`` x ``--iterations`` (+ ``--val-iterations``) from nnunetv2's plans of the anchor run, then
predict the fold's 52 validation cases with full sliding-window prediction (step 0.5, Gaussian, mirroring) and
score them against the raw labels; nnunetv2 with its own ``perform_actual_validation``, nnsnake with
``steps.validate``. The table shows the per-class Dice of both (target: nnsnake >= nnunetv2 - 0.01).

``--bf16`` trains both under CPU bfloat16 autocast (nnunetv2 through the benchmark trainer's autocast context;
about 2.4x faster per iteration on CPUs with native bf16), so that a budget large enough to learn fits in the time.

``--parallel`` runs the two trainings at the same time, one thread each (halves the wall time on 2 cores; the
budget is in iterations, so it does not change the result).

    python benchmarks/quality.py --epochs 10 --iterations 15 --val-iterations 2 --parallel

Needs the anchor venv (/tmp/venv-nnunet) and its preprocessed Hippocampus (/tmp/nnsnake_anchor/pre,
tests/fixtures/make_nnunetv2_reference.sh).

``--regions`` runs the same comparison in region mode (sigmoid outputs, Dice + BCE): the dataset is
Dataset314_HippocampusRegions under ``--work`` (default /tmp/nnsnake_quality_bench_regions), the 260 Hippocampus
cases linked, with labels {background: 0, hippocampus: [1, 2], posterior: 2} and regions_class_order [1, 2].
Class locations depend on region mode, so the anchor's label-mode preprocessing cannot be reused: nnunetv2's own
``nnUNetv2_plan_and_preprocess -c 3d_fullres -np 2`` runs on it first (skipped when already done) and its
splits_final.json is generated as tests/fixtures/make_nnunetv2_reference.sh does (seed 12345, same case ids as
the label-mode splits). The table then shows the Dice per region, keys "(1, 2)" and "2".

    python benchmarks/quality.py --regions --epochs 10 --iterations 15 --val-iterations 2 --parallel

``--configuration 2d`` compares the 2d configuration instead (same fold, plans and scoring).

    python benchmarks/quality.py --regions --configuration 2d --batch-size 32 --epochs 30 --iterations 50 --parallel

``--batch-size N`` (with ``--regions``) trains ``<configuration>_bs<N>`` in both tools, a configuration derived
with nnU-Net's ``inherits_from`` in the plans file both read (same preprocessed data, patch and network): Hippocampus
2d plans batch 366, about 12 s per iteration on one CPU thread; batch 32 gives ten times the updates for the
same time.

Measured 2026-12-07 (``--regions --configuration 2d --batch-size 32 --epochs 20 --iterations 50 --val-iterations 2
--parallel``, beside the test suite, so the wall time means nothing), Dice on the 52 validation cases of fold 0:

    Dice              nnunetv2   nnsnake     diff
    (1, 2)              0.8605    0.8595  -0.0009
    2                   0.8344    0.8360  +0.0016
    foreground mean     0.8474    0.8478  +0.0004
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))
from common import SHARED, anchor_bin, dataset_id, install_anchor_trainer, nnunet_env  # noqa: E402

DATASET = "Dataset004_Hippocampus"
REGIONS_DATASET = "Dataset314_HippocampusRegions"
REGIONS = {
    "labels": {"background": 0, "hippocampus": [1, 2], "posterior": 2},
    "regions_class_order": [1, 2],
}
TRAINER = "nnUNetTrainer_nnsnakeQuality"
CONFIGURATIONS = ("3d_fullres", "2d")


def start_nnunet(
    work: Path, anchor_pre: Path, args: argparse.Namespace, threads: int
) -> tuple[subprocess.Popen, Path]:
    env = nnunet_env(work / "nnunet", threads)
    env.update(
        nnUNet_preprocessed=str(anchor_pre.parent),
        NNSNAKE_QUALITY_EPOCHS=str(args.epochs),
        NNSNAKE_QUALITY_ITERS=str(args.iterations),
        NNSNAKE_QUALITY_VAL_ITERS=str(args.val_iterations),
        nnUNet_n_proc_DA="0",
        nnUNet_compile="f",
        nnUNet_def_n_proc=str(threads),
        NNSNAKE_QUALITY_BF16="1" if args.bf16 else "0",
    )
    fold_dir = (
        work / "nnunet" / "res" / args.dataset / f"{TRAINER}__nnUNetPlans__{args.configuration}" / "fold_0"
    )
    shutil.rmtree(fold_dir, ignore_errors=True)
    log = open(work / "nnunet.log", "w")  # noqa: SIM115 (closed when the process ends)
    proc = subprocess.Popen(
        [
            anchor_bin("nnUNetv2_train"),
            args.dataset,
            args.configuration,
            "0",
            "-device",
            "cpu",
            "-tr",
            TRAINER,
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return proc, fold_dir / "validation" / "summary.json"


def start_nnsnake(
    work: Path, anchor_pre: Path, args: argparse.Namespace, threads: int
) -> tuple[subprocess.Popen, Path]:
    spec = {
        "work": str(work),
        "anchor_pre": str(anchor_pre),
        "raw": str(args.raw),
        "epochs": args.epochs,
        "iterations": args.iterations,
        "val_iterations": args.val_iterations,
        "threads": threads,
        "seed": args.seed,
        "bf16": args.bf16,
        "configuration": args.configuration,
    }
    log = open(work / "nnsnake.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
    )
    return proc, work / "nnsnake" / "validation" / "summary.json"


def child(spec: dict) -> None:
    import logging

    from nnsnake import training
    from nnsnake.dataset import load_dataset_json
    from nnsnake.jsonio import read_json
    from nnsnake.preprocessing import preprocess_dataset
    from nnsnake.steps import validate as validate_fold

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work, anchor_pre = Path(spec["work"]), Path(spec["anchor_pre"])
    configuration = spec["configuration"]
    raw = Path(spec["raw"])
    plans_path, splits_path = anchor_pre / "nnUNetPlans.json", anchor_pre / "splits_final.json"
    pre = work / "pre" / configuration
    preprocess_dataset(
        raw,
        load_dataset_json(raw),
        read_json(plans_path),
        configuration,
        pre,
        processes=spec["threads"],
        progress=False,
    )
    out = work / "nnsnake"
    shutil.rmtree(out, ignore_errors=True)
    settings = training.TrainingSettings(
        epochs=spec["epochs"],
        iterations_per_epoch=spec["iterations"],
        val_iterations=spec["val_iterations"],
        device="cpu",
        threads=spec["threads"],
        workers=0,
        autocast="bf16" if spec["bf16"] else "off",
        seed=spec["seed"],
    )
    start = time.perf_counter()
    training.train_fold(
        pre,
        read_json(plans_path),
        configuration,
        load_dataset_json(raw),
        read_json(splits_path),
        0,
        out / "train",
        out / "state",
        settings,
    )
    trained = time.perf_counter()
    validate_fold(
        pre,
        plans_path,
        configuration,
        raw,
        splits_path,
        0,
        out / "train" / "model_final.pt",
        out / "validation",
        settings={"device": "cpu", "mirroring": True, "threads": spec["threads"]},
        save_probabilities=False,
        progress=False,
    )
    logging.info(
        "nnsnake: training %.0f s, validation %.0f s", trained - start, time.perf_counter() - trained
    )


def regions_dataset(work: Path) -> Path:
    """Hippocampus with the regions dataset.json under ``work/nnunet/raw`` (images and labels linked)."""
    source = SHARED / "data" / DATASET
    root = work / "nnunet" / "raw" / REGIONS_DATASET
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        if not (root / sub).exists():
            (root / sub).symlink_to(source.resolve() / sub)
    dataset_json = json.loads((source / "dataset.json").read_text())
    dataset_json.update(name="HippocampusRegions", **REGIONS)  # replaces "labels"
    text = json.dumps(dataset_json, indent=4)  # labels keep their file order (regions are numbered by it)
    if not (root / "dataset.json").is_file() or (root / "dataset.json").read_text() != text:
        (root / "dataset.json").write_text(text)
    return root


SPLITS = """
import os, sys
from batchgenerators.utilities.file_and_folder_operations import save_json
from nnunetv2.utilities.crossval_split import generate_crossval_split
folder = sys.argv[1]
data = os.path.join(folder, "nnUNetPlans_" + sys.argv[2])
ids = sorted(f[:-5] for f in os.listdir(data) if f.endswith(".b2nd") and not f.endswith("_seg.b2nd"))
save_json(generate_crossval_split(ids, seed=12345, n_splits=5), os.path.join(folder, "splits_final.json"))
"""


def nnunet_preprocess_regions(work: Path, raw: Path, configuration: str) -> Path:
    """nnunetv2's plans, preprocessing of ``configuration`` and splits of the regions dataset (each skipped when
    there)."""
    pre = work / "nnunet" / "pre" / raw.name
    done = pre / f"nnsnake_quality_preprocessed_{configuration}.txt"
    if not done.is_file():
        env = nnunet_env(work / "nnunet", 1)
        started = time.perf_counter()
        print(f"nnunetv2: plan and preprocess {raw.name} ({configuration}, -np 2) ...", flush=True)
        with open(work / "nnunet_preprocess.log", "w") as log:
            result = subprocess.run(
                [
                    anchor_bin("nnUNetv2_plan_and_preprocess"),
                    "-d",
                    dataset_id(raw),
                    "-c",
                    configuration,
                    "-np",
                    "2",
                    "-npfp",
                    "2",
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if result.returncode:
            sys.exit(f"nnUNetv2_plan_and_preprocess failed, see {work / 'nnunet_preprocess.log'}")
        done.write_text(f"{time.perf_counter() - started:.0f} s\n")
        print(f"nnunetv2: preprocessed in {time.perf_counter() - started:.0f} s", flush=True)
    if not (pre / "splits_final.json").is_file():
        subprocess.run([anchor_bin("python"), "-c", SPLITS, str(pre), configuration], check=True)
    return pre


def derive_batch_size(plans_path: Path, configuration: str, batch_size: int) -> str:
    """Add ``<configuration>_bs<N>`` (nnU-Net's ``inherits_from``: same data, patch and network, batch N) to the
    plans file both tools read; returns its name."""
    plans = json.loads(plans_path.read_text())
    name = f"{configuration}_bs{batch_size}"
    derived = {"inherits_from": configuration, "batch_size": batch_size}
    if plans["configurations"].get(name) != derived:
        plans["configurations"][name] = derived
        plans_path.write_text(json.dumps(plans, indent=4))
    return name


def class_dice(summary_path: Path) -> dict[str, float]:
    summary = json.loads(summary_path.read_text())
    return {label: values["Dice"] for label, values in sorted(summary["mean"].items())} | {
        "foreground mean": summary["foreground_mean"]["Dice"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configuration", choices=CONFIGURATIONS, default="3d_fullres")
    parser.add_argument(
        "--batch-size",
        type=int,
        help="train <configuration>_bs<N> (nnU-Net's inherits_from, batch N) in both tools (with --regions)",
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=12345, help="nnsnake's seed (nnunetv2 is not seeded)")
    parser.add_argument("--bf16", action="store_true", help="both train under CPU bfloat16 autocast")
    parser.add_argument("--parallel", action="store_true", help="both at once, one thread each")
    parser.add_argument(
        "--regions",
        action="store_true",
        help=f"region mode: {REGIONS_DATASET} (Hippocampus as regions (1, 2) and 2), preprocessed by nnunetv2",
    )
    parser.add_argument(
        "--anchor-pre", default=os.environ.get("NNSNAKE_ANCHOR_PRE", "/tmp/nnsnake_anchor/pre")
    )
    parser.add_argument("--work", help="default /tmp/nnsnake_quality_bench[_regions]")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    work = Path(args.work or ("/tmp/nnsnake_quality_bench" + ("_regions" if args.regions else ""))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    if args.regions:
        args.raw = regions_dataset(work)
        args.dataset = args.raw.name
        anchor_pre = nnunet_preprocess_regions(work, args.raw, args.configuration)
        if args.batch_size:
            args.configuration = derive_batch_size(
                anchor_pre / "nnUNetPlans.json", args.configuration, args.batch_size
            )
    else:
        args.dataset, args.raw = DATASET, SHARED / "data" / DATASET
        anchor_pre = Path(args.anchor_pre) / DATASET
        if args.batch_size:
            sys.exit("--batch-size needs --regions: the anchor's plans file is not written")
        if not (anchor_pre / "nnUNetPlans.json").is_file():
            sys.exit(
                f"{anchor_pre}/nnUNetPlans.json not found: run tests/fixtures/make_nnunetv2_reference.sh first"
            )
    install_anchor_trainer(REPO / "benchmarks" / f"{TRAINER}.py")
    threads = 1 if args.parallel else len(os.sched_getaffinity(0))
    print(
        f"{args.dataset} {args.configuration} fold 0: {args.epochs} epochs x {args.iterations} iterations "
        f"(+{args.val_iterations} validation), {'bf16 autocast' if args.bf16 else 'fp32'}, {threads} thread(s) each, "
        f"{'in parallel' if args.parallel else 'one after the other'}",
        flush=True,
    )
    results, times = {}, {}
    starters = {"nnunetv2": start_nnunet, "nnsnake": start_nnsnake}
    if args.parallel:
        running = {
            name: (start(work, anchor_pre, args, threads), time.perf_counter())
            for name, start in starters.items()
        }
        for name, ((proc, summary), started) in running.items():
            if proc.wait() != 0:
                sys.exit(f"{name} failed, see {work / (name + '.log')}")
            times[name], results[name] = time.perf_counter() - started, class_dice(summary)
    else:
        for name, start in starters.items():
            started = time.perf_counter()
            proc, summary = start(work, anchor_pre, args, threads)
            if proc.wait() != 0:
                sys.exit(f"{name} failed, see {work / (name + '.log')}")
            times[name], results[name] = time.perf_counter() - started, class_dice(summary)
    print(f"{'Dice':<16}{'nnunetv2':>10}{'nnsnake':>10}{'diff':>9}")
    for key in results["nnunetv2"]:
        theirs, ours = results["nnunetv2"][key], results["nnsnake"][key]
        print(f"{key:<16}{theirs:10.4f}{ours:10.4f}{ours - theirs:+9.4f}")
    print(f"{'wall (s)':<16}{times['nnunetv2']:10.0f}{times['nnsnake']:10.0f}")
    print(f"target: nnsnake >= nnunetv2 - 0.01 for every {'region' if args.regions else 'class'}")


if __name__ == "__main__":
    main()
