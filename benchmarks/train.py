"""Training speed side by side: nnsnake vs the official nnunetv2, Hippocampus fold 0, same plans, on this CPU.

For each configuration both trainers run one short epoch (``--iterations`` training iterations, one validation
iteration) from the same plans (nnunetv2's ``nnUNetPlans.json`` of the anchor run) with the same number of
augmentation workers. Both record the wall-clock and process CPU time at the start of every training iteration;
the medians of the start-to-start differences (so waiting for data counts) give seconds per iteration. CPU time
is the steadier number on a shared machine (it does not count time the process waits for a core); with
augmentation workers it misses the workers' CPU, so compare wall time there.

Extra nnsnake variants (``--variants``): ``workers=N`` (augmentation in N worker processes instead of in-process),
``bf16`` (CPU bfloat16 autocast), ``channels_last``, ``store=npy`` / ``store=blosc2`` (the same training from a
preprocessed store of that format; the default run uses the default store). ``--no-nnunet`` skips nnunetv2.

    python benchmarks/train.py --configs 3d_fullres --no-nnunet --variants store=npy   # blosc2 vs npy store

    python benchmarks/train.py                                    # 2d and 3d_fullres, 5 iterations, 0 workers
    python benchmarks/train.py --configs 3d_fullres --iterations 4 --variants bf16 workers=1

Other planners (``--planner nnUNetPlannerResEncM``, L, XL: ResidualEncoderUNet): both tools train from nnunetv2's
``<plans name>.json`` of that planner (``nnUNetResEncUNetMPlans.json``). ResEnc M plans Hippocampus 3d_fullres at
batch 58, far too slow for a CPU check: ``--batch-size N`` trains ``<config>_bs<N>`` instead, a configuration
derived with nnU-Net's ``inherits_from`` (same data, patch and network, batch N) in one plans file both tools read.
``--rounds R`` repeats the pair, alternating which tool starts (``--nnsnake-first`` starts with nnsnake), and
prints the per-round ratios: on a loaded machine compare ratios of back-to-back runs, not absolute numbers.

    python benchmarks/train.py --planner nnUNetPlannerResEncM --batch-size 2 --configs 3d_fullres --rounds 2

Needs the anchor venv (/tmp/venv-nnunet, ../shared/anchor/setup_anchor_env.sh) and its preprocessed Hippocampus
(``--anchor-pre``, default /tmp/nnsnake_anchor/pre; for ResEnc M: ``nnUNetv2_plan_experiment -d 4 -pl
nnUNetPlannerResEncM`` and ``nnUNetv2_preprocess -d 4 -plans_name nnUNetResEncUNetMPlans -c 3d_fullres``, or copy
``tests/fixtures/nnunetv2/Dataset004_Hippocampus/*.json`` there and run only the preprocessing); nnsnake's own
preprocessed copy is made under ``--work``. nnunetv2 reads the anchor folder through a mirror of symbolic links
under ``--work`` (the plans file is a copy there), so the anchor folder is never written.
``--gpu`` times nnsnake alone on CUDA (iterations/s and the share of time spent waiting for batches).

Measured 2026-11-22 on the idle 2-core development machine (AMD EPYC with avx512_bf16), 5 iterations, seconds
per iteration (wall), x = nnunetv2 / nnsnake, both with the same number of augmentation workers:

    config      workers  nnunetv2  nnsnake (fp32, defaults)  nnsnake bf16
    3d_fullres  1        6.04      4.33 (x1.40)              3.93 (x1.54)
    2d          1        6.82      4.51 (x1.51)              5.59 (x1.22)
    3d_fullres  0        5.76      4.15 (x1.39)

ResEnc M (``--planner nnUNetPlannerResEncM --batch-size 2 --configs 3d_fullres --iterations 3``, nnUNetResEncUNetMPlans
with 3d_fullres_bs2 derived in both tools, 0 workers, 2 threads), measured 2026-12-07 while the 2-core machine ran
other work at load 17-20, so the absolute numbers mean nothing and even the ratios are rough (one timed iteration
per run, two runs per tool, the order swapped):

    round (first)     nnunetv2 wall/cpu   nnsnake wall/cpu   x wall  x cpu
    1 (nnunetv2)      98.8 / 21.3 s       74.8 / 23.1 s      1.32    0.92
    2 (nnsnake)       48.2 / 20.5 s       41.0 / 15.9 s      1.18    1.29

After the CPU instance norm (a7266b6), on the idle machine (``--rounds 4``, 2026-12-07): nnunetv2 2.88 s, nnsnake
2.52 s per iteration; x per round 1.21, 1.12, 1.12, 1.14, median 1.13 (the goal is 1.3). With 3 iterations the
median of 2 start-to-start differences is their mean, so the first step's one-off costs counted half (torch's
optimiser imports torch._dynamo there, 1.2 s). In steady state (``--iterations 8 --rounds 2``, idle, 2026-12-07,
after nnsnake's optimiser stopped importing torch._dynamo): nnunetv2 2.18 / 2.26 s, nnsnake 2.09 / 2.14 s per
iteration, x 1.04 / 1.06 (whole runs 26.4 / 27.4 s vs 23.0 / 23.1 s). nnsnake's network step alone (forward,
backward, SGD) takes 2.0 s of its 2.1 s, compiled (``torch.compile``, 83 s to compile on 2 cores) also 2.0 s. In a torch.profiler
trace of nnsnake's step, oneDNN convolution takes 67 % (backward 47 %, forward 20 %), where channels-last gains
less on ResEnc's shapes than on the plain U-Net's; norms 14 %, concatenation and copies 7 %.

The network alone is at parity there: one-thread CPU time of a fwd+bwd (batch 2, both nets in the same run)
6.91 s for dynamic_network_architectures' ResidualEncoderUNet, 6.71 s for it in channels-last, 6.83 s for
nnsnake's (channels-last, group-norm path) and 7.03 s for nnsnake's contiguous. The profile shows why the plain
net's layout gain does not carry over: channels-last makes convolution backward cheaper (about -20 %), but the
group-norm backward on channels-last 3D maps costs about 13x nnU-Net's instance-norm (batch-norm) backward and
eats that gain (8 % of the step against 0.6 %), with avg-pool (the residual skips) and copies slower too.

The gain comes from the network's CPU layout: channels-last tensors, instance norm computed as a one-channel-per-
group group norm (native on channels-last), out-of-place leaky ReLU (no autograd copy of every map), and every
core for the network. On an H100 with 12 workers (session 1, uncompiled, fp16): 3d_fullres 38.4 vs 42.2 it/s
(x0.91), 2d 33.5 vs 16.1 it/s (x2.08; nnunetv2 waits for data 58.5 % of the time, nnsnake 9.3 %).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "src"))  # this checkout's nnsnake, whatever is installed
from common import SHARED, anchor_bin, install_anchor_trainer, nnunet_env  # noqa: E402

DATASET = "Dataset004_Hippocampus"
TRAINER = "nnUNetTrainer_nnsnakeBench"


def per_iteration(starts: list[float]) -> float | None:
    """Median start-to-start difference; the first iteration (warm-up, allocator) is left out."""
    deltas = [b - a for a, b in zip(starts[1:], starts[2:], strict=False)]
    return statistics.median(deltas) if deltas else None


# ---------------------------------------------------------------------------------------------------------
# nnunetv2


def nnunet_preprocessed(work: Path, anchor_pre: Path, plans: Path, plans_name: str) -> Path:
    """nnunetv2's preprocessed root for the benchmark: the anchor's dataset folder mirrored by symbolic links,
    with ``plans`` (which may hold derived configurations) as ``<plans_name>.json``, so the anchor stays untouched
    and both trainers read the very same plans file."""
    mirror = work / "nnunet" / "pre" / DATASET
    shutil.rmtree(mirror, ignore_errors=True)
    mirror.mkdir(parents=True)
    for entry in anchor_pre.iterdir():
        if entry.name != f"{plans_name}.json":
            (mirror / entry.name).symlink_to(entry.resolve())
    shutil.copyfile(plans, mirror / f"{plans_name}.json")
    return mirror.parent


def run_nnunet(
    work: Path,
    preprocessed: Path,
    configuration: str,
    iterations: int,
    workers: int,
    threads: int,
    plans_name: str = "nnUNetPlans",
) -> dict:
    env = nnunet_env(work / "nnunet", threads)
    env.update(
        nnUNet_preprocessed=str(preprocessed),
        NNSNAKE_BENCH_ITERS=str(iterations),
        nnUNet_n_proc_DA=str(workers),
        nnUNet_compile="f",
    )
    fold_dir = work / "nnunet" / "res" / DATASET / f"{TRAINER}__{plans_name}__{configuration}" / "fold_0"
    shutil.rmtree(fold_dir, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [
            anchor_bin("nnUNetv2_train"),
            DATASET,
            configuration,
            "0",
            "-device",
            "cpu",
            "-tr",
            TRAINER,
            "-p",
            plans_name,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"nnUNetv2_train {configuration} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    bench = json.loads((fold_dir / "nnsnake_bench.json").read_text())
    return {
        "wall_s_per_it": per_iteration(bench["wall_starts"]),
        "cpu_s_per_it": per_iteration(bench["cpu_starts"]),
        "total_s": total,
        "batch_size": bench["batch_size"],
        "torch_threads": bench["torch_threads"],
    }


# ---------------------------------------------------------------------------------------------------------
# nnsnake (run in a child process so imports and memory start equal)


def store_root(work: Path, store: str | None) -> Path:
    """Preprocessed root of one store format: ``<work>/pre`` for the default store, else ``<work>/pre_<store>``."""
    from nnsnake.preprocessing import DEFAULT_STORE

    return work / ("pre" if store in (None, DEFAULT_STORE) else f"pre_{store}")


def ensure_preprocessed(work: Path, plans: Path, configuration: str, store: str | None = None) -> Path:
    """nnsnake's store of Hippocampus for ``configuration`` from ``plans`` (incremental, cached)."""
    from nnsnake.dataset import load_dataset_json
    from nnsnake.jsonio import read_json
    from nnsnake.preprocessing import DEFAULT_STORE, preprocess_dataset

    raw = SHARED / "data" / DATASET
    out = store_root(work, store) / configuration
    preprocess_dataset(
        raw,
        load_dataset_json(raw),
        read_json(plans),
        configuration,
        out,
        processes=2,
        progress=False,
        store=store or DEFAULT_STORE,
    )
    return out


def run_nnsnake(
    inputs: dict,
    configuration: str,
    iterations: int,
    workers: int,
    threads: int,
    *,
    device: str = "cpu",
    epochs: int = 1,
    amp: str = "off",
    channels_last: bool | None = None,
    compile: bool = False,
) -> dict:
    """One short nnsnake training in a child process; seconds per iteration of its last epoch."""
    spec = dict(
        inputs,
        configuration=configuration,
        iterations=iterations,
        workers=workers,
        threads=threads,
        device=device,
        epochs=epochs,
        amp=amp,
        channels_last=channels_last,
        compile=compile,
    )
    result = Path(inputs["work"]) / "nnsnake_result.json"
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
    )
    total = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"nnsnake training {configuration} failed:\n{proc.stderr[-4000:]}")
    out = json.loads(result.read_text())
    out["total_s"] = total
    return out


def child(spec: dict) -> None:
    import logging

    import torch

    from nnsnake import training
    from nnsnake.jsonio import read_json
    from nnsnake.planning import preprocessed_data_owner

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    work = Path(spec["work"])
    wall, cpu = [], []
    original = training._Trainer.train_step

    def timed_step(self, batch):
        wall.append(time.perf_counter())
        cpu.append(time.process_time())
        return original(self, batch)

    training._Trainer.train_step = timed_step
    run_dir = work / "nnsnake_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    settings = training.TrainingSettings(
        epochs=spec["epochs"],
        iterations_per_epoch=spec["iterations"],
        val_iterations=1,
        device=spec["device"],
        threads=spec["threads"],
        workers=spec["workers"],
        autocast=spec["amp"],
        channels_last=spec["channels_last"],
        compile=spec["compile"],
    )
    plans = read_json(spec["plans"])
    training.train_fold(
        Path(spec["pre"])
        / preprocessed_data_owner(plans, spec["configuration"]),  # derived: the parent's data
        plans,
        spec["configuration"],
        read_json(spec["dataset_json"]),
        read_json(spec["splits"]),
        0,
        run_dir / "out",
        run_dir / "state",
        settings,
    )
    entry = read_json(run_dir / "out" / "log.json")[-1]
    last = spec["iterations"] * (
        spec["epochs"] - 1
    )  # timings of the last epoch only (earlier: warm-up, compile)
    (work / "nnsnake_result.json").write_text(
        json.dumps(
            {
                "wall_s_per_it": per_iteration(wall[max(0, last - 1) :]),
                "cpu_s_per_it": per_iteration(cpu[max(0, last - 1) :]),
                "data_wait_s_per_it": entry["data_wait_s"] / spec["iterations"],
                "data_wait_share": entry["data_wait_s"] / entry["train_time_s"],
                "last_epoch_it_per_s": spec["iterations"] / entry["train_time_s"],
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="+", default=["2d", "3d_fullres"])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--workers", type=int, default=0, help="augmentation worker processes, both trainers")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--variants", nargs="*", default=[], help="extra nnsnake runs: bf16, channels_last, workers=N"
    )
    parser.add_argument(
        "--anchor-pre", default=os.environ.get("NNSNAKE_ANCHOR_PRE", "/tmp/nnsnake_anchor/pre")
    )
    parser.add_argument("--work", default="/tmp/nnsnake_train_bench")
    parser.add_argument(
        "--gpu",
        action="store_true",
        help="nnsnake alone on CUDA (2 epochs, the second timed): default (fp16, compile, "
        "channels-last) and without compile / channels-last; uses --pre/--plans/--splits",
    )
    parser.add_argument(
        "--gpu-variants",
        nargs="+",
        default=["default", "nocompile", "nocl"],
        choices=["default", "nocompile", "nocl"],
    )
    parser.add_argument("--pre", help="nnsnake preprocessed root (<pre>/<config>/), default <work>/pre")
    parser.add_argument("--plans", help="plans.json, default the anchor's <plans name of --planner>.json")
    parser.add_argument("--splits", help="splits.json, default the anchor's splits_final.json")
    parser.add_argument("--dataset-json", help="dataset.json, default the shared raw Hippocampus'")
    parser.add_argument("--no-nnunet", action="store_true", help="nnsnake runs only (e.g. store comparisons)")
    parser.add_argument(
        "--planner",
        default="ExperimentPlanner",
        help="nnU-Net planner whose plans both trainers use (nnUNetPlannerResEncM/L/XL: ResidualEncoderUNet)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        help="train the derived configuration <config>_bs<N> (nnU-Net's inherits_from, batch size N) in both "
        "tools instead of the planned batch (ResEnc M plans Hippocampus 3d_fullres at batch 58)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the nnunetv2/nnsnake pair, alternating which runs first (load drifts on a shared machine)",
    )
    parser.add_argument(
        "--nnsnake-first",
        action="store_true",
        help="start each pair (round 0) with nnsnake instead of nnunetv2",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    from nnsnake.planning import get_planner_preset

    plans_name = get_planner_preset(args.planner).plans_name
    work, anchor_pre = Path(args.work), Path(args.anchor_pre) / DATASET
    work.mkdir(parents=True, exist_ok=True)
    inputs = {
        "work": str(work),
        "pre": args.pre or str(work / "pre"),
        "plans": args.plans or str(anchor_pre / f"{plans_name}.json"),
        "splits": args.splits or str(anchor_pre / "splits_final.json"),
        "dataset_json": args.dataset_json or str(SHARED / "data" / DATASET / "dataset.json"),
    }
    if not Path(inputs["plans"]).is_file():
        sys.exit(
            f"{inputs['plans']} not found: run tests/fixtures/make_nnunetv2_reference.sh first (other planners: "
            f"nnUNetv2_plan_experiment -d 4 -pl {args.planner}, then nnUNetv2_preprocess -d 4 -plans_name "
            f"{plans_name} -c {' '.join(args.configs)}, in the anchor venv with its nnUNet_* variables)"
        )
    configurations = list(args.configs)
    if args.batch_size:
        inputs["plans"], configurations = derive_batch_size(
            Path(inputs["plans"]), configurations, args.batch_size, work / "plans" / f"{plans_name}.json"
        )
    if args.gpu:
        args.configs = configurations
        gpu_main(args, inputs)
        return
    preprocessed = None
    if not args.no_nnunet:
        install_anchor_trainer(REPO / "benchmarks" / f"{TRAINER}.py")
        preprocessed = nnunet_preprocessed(work, anchor_pre, Path(inputs["plans"]), plans_name)
    rows: list[tuple[str, str, dict, dict | None]] = []
    print(
        f"Hippocampus fold 0, {plans_name}, {args.iterations} iterations, {args.workers} augmentation workers, "
        f"{args.threads} threads, {os.cpu_count()} CPUs; seconds per iteration (median)",
        flush=True,
    )
    for configuration in configurations:
        if args.pre is None:
            ensure_preprocessed(work, Path(inputs["plans"]), owner(Path(inputs["plans"]), configuration))
        pairs = []
        for round_ in range(args.rounds):
            theirs = None
            nnunet_first = (round_ + args.nnsnake_first) % 2 == 0
            if preprocessed is not None and nnunet_first:
                theirs = run_nnunet(
                    work, preprocessed, configuration, args.iterations, args.workers, args.threads, plans_name
                )
            ours = run_nnsnake(inputs, configuration, args.iterations, args.workers, args.threads)
            if preprocessed is not None and not nnunet_first:
                theirs = run_nnunet(
                    work, preprocessed, configuration, args.iterations, args.workers, args.threads, plans_name
                )
            if theirs is not None:
                rows.append((configuration, "nnunetv2", theirs, None))
                print_row(*rows[-1])
            rows.append((configuration, "nnsnake", ours, theirs))
            print_row(*rows[-1])
            pairs.append((theirs, ours))
        if args.rounds > 1 and preprocessed is not None:
            print_summary(configuration, pairs)
        theirs = pairs[-1][0]
        for variant in args.variants:
            kwargs: dict = {"amp": "off", "channels_last": None}
            workers = args.workers
            variant_inputs = inputs
            if variant.startswith("store="):
                store = variant.split("=")[1]
                if args.pre is not None:
                    sys.exit("store=... variants preprocess their own copy: leave out --pre")
                ensure_preprocessed(
                    work, Path(inputs["plans"]), owner(Path(inputs["plans"]), configuration), store
                )
                variant_inputs = dict(inputs, pre=str(store_root(work, store)))
            elif variant == "bf16":
                kwargs["amp"] = "bf16"
            elif variant == "channels_last":
                kwargs["channels_last"] = True
            elif variant.startswith("workers="):
                workers = int(variant.split("=")[1])
            else:
                sys.exit(f"unknown variant {variant!r}")
            result = run_nnsnake(
                variant_inputs, configuration, args.iterations, workers, args.threads, **kwargs
            )
            rows.append((configuration, f"nnsnake {variant}", result, theirs))
            print_row(*rows[-1])
    print("\nx = nnunetv2 seconds per iteration / nnsnake seconds per iteration (target >= 1.3)")
    by_store = {name: r for _, name, r, _ in rows if name in ("nnsnake", "nnsnake store=npy")}
    if len(by_store) == 2:
        ratio = by_store["nnsnake"]["wall_s_per_it"] / by_store["nnsnake store=npy"]["wall_s_per_it"]
        print(f"default store / npy store, wall s per iteration: {ratio:.3f} (target <= 1.05)")


def owner(plans: Path, configuration: str) -> str:
    """The configuration whose preprocessed folder ``configuration`` reads (a derived one: its parent's)."""
    from nnsnake.jsonio import read_json
    from nnsnake.planning import preprocessed_data_owner

    return preprocessed_data_owner(read_json(plans), configuration)


def derive_batch_size(
    plans: Path, configurations: list[str], batch_size: int, out: Path
) -> tuple[str, list[str]]:
    """``plans`` with ``<c>_bs<N>`` (nnU-Net's ``inherits_from: <c>``, ``batch_size: N``) added for each
    configuration, written to ``out`` (same plans name): both trainers read this one file. Returns its path and
    the derived names."""
    from nnsnake.jsonio import read_json, write_json
    from nnsnake.planning import add_extra_configurations

    derived = {f"{c}_bs{batch_size}": {"inherits_from": c, "batch_size": batch_size} for c in configurations}
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, add_extra_configurations(read_json(plans), derived))
    return str(out), list(derived)


def print_summary(configuration: str, pairs: list[tuple[dict | None, dict]]) -> None:
    """Medians over the rounds and the median of the per-round ratios (each ratio from one back-to-back pair)."""
    for key in ("wall_s_per_it", "cpu_s_per_it"):
        theirs = [t[key] for t, _ in pairs if t is not None]
        ours = [o[key] for _, o in pairs]
        ratios = [t[key] / o[key] for t, o in pairs if t is not None]
        print(
            f"{configuration:<11} {key[:3]} median of {len(pairs)} rounds: nnunetv2 {statistics.median(theirs):.2f} "
            f"nnsnake {statistics.median(ours):.2f} s/it; per-round x {', '.join(f'{r:.2f}' for r in ratios)} "
            f"(median x{statistics.median(ratios):.2f})",
            flush=True,
        )


def gpu_main(args: argparse.Namespace, inputs: dict) -> None:
    """nnsnake on the GPU: iterations/s of the second epoch and the share of it spent waiting for batches."""
    variants = {
        "default": ("fp16 + compile + channels-last", dict(amp="auto", compile=True, channels_last=True)),
        "nocompile": (
            "fp16 + channels-last, no compile",
            dict(amp="auto", compile=False, channels_last=True),
        ),
        "nocl": ("fp16 + compile, no channels-last", dict(amp="auto", compile=True, channels_last=False)),
    }
    print(
        f"nnsnake on CUDA, {args.workers} augmentation workers, {args.threads} threads, epochs of "
        f"{args.iterations} iterations (second epoch timed)",
        flush=True,
    )
    for configuration in args.configs:
        for key in args.gpu_variants:
            name, kwargs = variants[key]
            result = run_nnsnake(
                inputs,
                configuration,
                args.iterations,
                args.workers,
                args.threads,
                device="cuda",
                epochs=2,
                **kwargs,
            )
            print(
                f"{configuration:<11} {name:<34} {result['last_epoch_it_per_s']:6.2f} it/s  "
                f"step {result['wall_s_per_it'] * 1000:6.1f} ms  waiting for data "
                f"{100 * result['data_wait_share']:4.1f} %  run {result['total_s']:5.1f} s",
                flush=True,
            )


def print_row(configuration: str, name: str, result: dict, reference: dict | None) -> None:
    def ratio(key: str) -> str:
        if reference is None or not result.get(key) or not reference.get(key):
            return "     "
        return f"{reference[key] / result[key]:5.2f}"

    extra = f"  data wait {result['data_wait_s_per_it']:.2f} s/it" if "data_wait_s_per_it" in result else ""
    print(
        f"{configuration:<11} {name:<24} wall {result['wall_s_per_it']:7.2f} s/it (x{ratio('wall_s_per_it')})  "
        f"cpu {result['cpu_s_per_it']:7.2f} s/it (x{ratio('cpu_s_per_it')})  run {result['total_s']:6.1f} s"
        f"{extra}",
        flush=True,
    )


if __name__ == "__main__":
    main()
