"""Quality at equal budget: Hippocampus 3d_fullres fold 0 trained by nnsnake and by nnunetv2, same plans, same budget.

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
from common import SHARED, anchor_bin, install_anchor_trainer, nnunet_env  # noqa: E402

DATASET = "Dataset004_Hippocampus"
TRAINER = "nnUNetTrainer_nnsnakeQuality"
CONFIGURATION = "3d_fullres"


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
    fold_dir = work / "nnunet" / "res" / DATASET / f"{TRAINER}__nnUNetPlans__{CONFIGURATION}" / "fold_0"
    shutil.rmtree(fold_dir, ignore_errors=True)
    log = open(work / "nnunet.log", "w")  # noqa: SIM115 (closed when the process ends)
    proc = subprocess.Popen(
        [anchor_bin("nnUNetv2_train"), DATASET, CONFIGURATION, "0", "-device", "cpu", "-tr", TRAINER],
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
        "epochs": args.epochs,
        "iterations": args.iterations,
        "val_iterations": args.val_iterations,
        "threads": threads,
        "seed": args.seed,
        "bf16": args.bf16,
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
    raw = SHARED / "data" / DATASET
    plans_path, splits_path = anchor_pre / "nnUNetPlans.json", anchor_pre / "splits_final.json"
    pre = work / "pre" / CONFIGURATION
    preprocess_dataset(
        raw,
        load_dataset_json(raw),
        read_json(plans_path),
        CONFIGURATION,
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
        CONFIGURATION,
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
        CONFIGURATION,
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


def class_dice(summary_path: Path) -> dict[str, float]:
    summary = json.loads(summary_path.read_text())
    return {label: values["Dice"] for label, values in sorted(summary["mean"].items())} | {
        "foreground mean": summary["foreground_mean"]["Dice"]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--val-iterations", type=int, default=2)
    parser.add_argument("--seed", type=int, default=12345, help="nnsnake's seed (nnunetv2 is not seeded)")
    parser.add_argument("--bf16", action="store_true", help="both train under CPU bfloat16 autocast")
    parser.add_argument("--parallel", action="store_true", help="both at once, one thread each")
    parser.add_argument(
        "--anchor-pre", default=os.environ.get("NNSNAKE_ANCHOR_PRE", "/tmp/nnsnake_anchor/pre")
    )
    parser.add_argument("--work", default="/tmp/nnsnake_quality_bench")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    work, anchor_pre = Path(args.work), Path(args.anchor_pre) / DATASET
    work.mkdir(parents=True, exist_ok=True)
    if not (anchor_pre / "nnUNetPlans.json").is_file():
        sys.exit(
            f"{anchor_pre}/nnUNetPlans.json not found: run tests/fixtures/make_nnunetv2_reference.sh first"
        )
    install_anchor_trainer(REPO / "benchmarks" / f"{TRAINER}.py")
    threads = 1 if args.parallel else len(os.sched_getaffinity(0))
    print(
        f"Hippocampus {CONFIGURATION} fold 0: {args.epochs} epochs x {args.iterations} iterations "
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
    print("target: nnsnake >= nnunetv2 - 0.01 for every class")


if __name__ == "__main__":
    main()
