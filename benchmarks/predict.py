"""Prediction speed side by side: ``nnsnake predict`` vs ``nnUNetv2_predict``, Hippocampus 3d_fullres, 5 folds,
mirroring on, on this CPU, in the same run.

    python benchmarks/predict.py                        # 6 cases, 2 threads, nnunetv2 with its default -npp/-nps 3
    python benchmarks/predict.py --cases 10 --nnunet-np 3 0 --repeats 2

Models: prediction time depends on the architecture, not on what the weights learned, so
``predict_make_models.py`` (run with the anchor venv) builds the plan's network (40×56×40 patch, 4 stages) five
times with nnunetv2's own initialisation (seed = fold) and writes the same weights as nnunetv2 fold checkpoints
(``checkpoint_final.pth``) and as nnsnake's ``model_final.pt``. Both tools therefore compute the same function and
their segmentations are compared too (voxel agreement, Dice per label, identical geometry). Plans are the anchor's
``nnUNetPlans.json`` (nnsnake's plans are identical); nnsnake's results folder gets a ``selection.json`` naming
3d_fullres with folds 0-4 and a ``postprocessing.json`` without steps (nnUNetv2_predict does not postprocess).

Both CLIs run end to end on copies of the first ``--cases`` images of imagesTr (interpreter start-up, imports,
checkpoint loading, input checks and writing included), with ``--threads`` torch/OpenMP threads each
(nnUNetv2_predict -device cpu takes every core the machine has, so with fewer threads than cores both are pinned to
the same cores with taskset). Per case = marginal cost (T(N) − T(1)) / (N − 1), as ../shared/anchor/anchor_nnunet.sh
computes it; start-up = T(1) − per case. Runs alternate between the tools so that load from other jobs hits both.

Needs the anchor venv (/tmp/venv-nnunet, ../shared/anchor/setup_anchor_env.sh) and its preprocessed Hippocampus
plans (``--anchor-pre``, default /tmp/nnsnake_anchor/pre).

``--api N`` also times N cases in process (images read beforehand, first case = warm-up): nnunetv2's
``predict_single_npy_array`` with the 5 folds (``predict_api_nnunet.py``) against nnsnake's preprocess → sliding
window → raw geometry, in fp32 (default) and with CPU bfloat16 autocast (``autocast=True``, opt-in).

Measured 2026-11-22 on the idle 2-core development machine (AMD EPYC with avx512_bf16, nothing else running),
``python benchmarks/predict.py --cases 5 --api 4`` (about 12 minutes), with nnsnake's CPU networks in channels-last:

    CLI                           T(1) s  T(5) s  s/case  start-up s  CPU s/case  peak MB  x (s/case)  x (CPU)  x (T(5))
    nnUNetv2_predict -npp/-nps 3  25.7    64.2    9.61    16.1        18.99       6706     1.58        1.70     1.84
    nnsnake predict               10.5    34.8    6.07    4.4         11.17       1277     1.00        1.00     1.00

    in process                         s/case  CPU s/case  x (wall)  x (CPU)
    nnunetv2 predict_single_npy_array   7.28   14.43       1.00      1.00
    nnsnake (fp32)                      5.92   11.47       1.23      1.26
    nnsnake (bf16 autocast)             2.78    5.15       2.62      2.80   voxel agreement with fp32 0.993

Segmentations of the two CLIs (same weights): identical geometry, 99.86 % of voxels equal, Dice 0.997 per label;
the differing voxels are where the Gaussian weight is below 1e-6 (padding corners; fp16 accumulators are coarse
there in both tools). With random weights the classes are close everywhere, so this is a pessimistic figure (with
the trained fold of ``quality.py``, bf16 and fp32 agree on 99.995 % of the voxels of its 52 validation cases, and
the foreground-mean Dice is 0.84134 vs 0.84133).

History, same machine:
- Before channels-last (idle machine), the CLI was only x1.17 (8.55 vs 10.04 s/case), and in process 0.96.
- An earlier run under load 3-5 from other jobs gave x2.25 (16.6 vs 37.4 s/case). nnUNetv2_predict's six worker
  processes suffer most from a busy machine, so that figure overstated the gain.

On the lent H100 (``--device cuda``, run by ``benchmarks/gpu/predict_bench.sh``; results in
``benchmarks/gpu_bench.md``), with 200 cases: 0.05 s/case for nnsnake against 0.29 for nnUNetv2_predict (x6.1).
Over the whole run the times were 15.0 s and 87.4 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from common import SHARED, anchor_bin, measure, nnunet_env, print_table  # noqa: E402

DATASET = "Dataset004_Hippocampus"
CONFIGURATION = "3d_fullres"
NNUNET_TRAINER = "nnUNetTrainer"
N_FOLDS = 5


# ---------------------------------------------------------------------------------------------------------
# set-up (cached under --work)


def nnunet_model_dir(work: Path) -> Path:
    return work / "nnunet" / "res" / DATASET / f"{NNUNET_TRAINER}__nnUNetPlans__{CONFIGURATION}"


def prepare_models(work: Path, anchor_pre: Path, rebuild: bool) -> Path:
    """Fold checkpoints for both tools and nnsnake's results folder; returns that folder."""
    pre = anchor_pre / DATASET
    plans, dataset_json = pre / "nnUNetPlans.json", pre / "dataset.json"
    for path in (plans, dataset_json):
        if not path.is_file():
            sys.exit(
                f"{path} missing: run tests/fixtures/make_nnunetv2_reference.sh (anchor preprocessing) first"
            )
    results = work / "nnsnake_results"
    done = [nnunet_model_dir(work) / f"fold_{k}" / "checkpoint_final.pth" for k in range(N_FOLDS)] + [
        results / "training" / CONFIGURATION / f"fold_{k}" / "model_final.pt" for k in range(N_FOLDS)
    ]
    if rebuild or not all(p.is_file() for p in done):
        subprocess.run(
            [
                anchor_bin("python"),
                str(REPO / "benchmarks" / "predict_make_models.py"),
                str(plans),
                str(dataset_json),
                CONFIGURATION,
                str(nnunet_model_dir(work)),
                str(results),
                str(N_FOLDS),
            ],
            check=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),
        )
    shutil.copy(plans, results / "plans.json")
    dataset = json.loads(dataset_json.read_text())
    # the fields nnsnake.steps.predict reads from a results folder (written by the select rule)
    (results / "selection.json").write_text(
        json.dumps(
            {
                "selected": CONFIGURATION,
                "members": [CONFIGURATION],
                "folds": [str(k) for k in range(N_FOLDS)],
                "dataset_json": dataset,
            },
            indent=1,
        )
    )
    (results / "postprocessing.json").write_text(json.dumps({"steps": []}))
    return results


def prepare_inputs(work: Path, n_cases: int) -> tuple[Path, Path]:
    """Folders with the first case and the first ``n_cases`` cases of imagesTr (copies)."""
    source = SHARED / "data" / DATASET / "imagesTr"
    files = sorted(source.glob("*_0000.nii.gz"))[:n_cases]
    if len(files) < n_cases:
        sys.exit(f"{source}: only {len(files)} images, {n_cases} requested")
    folders = work / "in_one", work / f"in_{n_cases}"
    for folder, chosen in zip(folders, (files[:1], files), strict=True):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for f in chosen:
            shutil.copy(f, folder / f.name)
    return folders


# ---------------------------------------------------------------------------------------------------------
# commands


DEVICE = "cpu"  # set from --device in main()


def pinned(cmd: list[str], threads: int) -> list[str]:
    """On the CPU, restrict to ``threads`` cores when the machine has more (nnUNetv2_predict -device cpu uses them
    all otherwise). With a GPU both tools get the whole machine, as a user would run them."""
    if DEVICE == "cpu" and (os.cpu_count() or 1) > threads and shutil.which("taskset"):
        return ["taskset", "-c", f"0-{threads - 1}", *cmd]
    return cmd


def nnunet_cmd(inp: Path, out: Path, processes: int) -> list[str]:
    return [
        anchor_bin("nnUNetv2_predict"),
        "-i",
        str(inp),
        "-o",
        str(out),
        "-d",
        DATASET,
        "-c",
        CONFIGURATION,
        "-tr",
        NNUNET_TRAINER,
        "-p",
        "nnUNetPlans",
        "-f",
        *[str(k) for k in range(N_FOLDS)],
        "-chk",
        "checkpoint_final.pth",
        "-device",
        DEVICE,
        "-npp",
        str(processes),
        "-nps",
        str(processes),
        "--disable_progress_bar",
    ]


def nnsnake_cmd(inp: Path, out: Path, results: Path, threads: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nnsnake.cli",
        "predict",
        "-i",
        str(inp),
        "-o",
        str(out),
        "-m",
        str(results),
        "--device",
        DEVICE,
        "--threads",
        str(threads),
        "--quiet",
    ]


def children_cpu_seconds() -> float:
    """User + system time of all finished, reaped descendants (worker pools included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(cmd: list[str], env: dict[str, str], out: Path, label: str) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds of the whole process tree and peak memory (MB) of one CLI call."""
    shutil.rmtree(out, ignore_errors=True)
    cpu_before = children_cpu_seconds()
    result = measure(cmd, env=env)
    cpu = children_cpu_seconds() - cpu_before
    if result.returncode != 0:
        sys.exit(f"{label} failed ({' '.join(cmd)}):\n{result.output[-4000:]}")
    print(
        f"  {label}: {result.wall_s:.1f} s wall, {cpu:.1f} s CPU, peak {result.peak_rss_mb:.0f} MB",
        flush=True,
    )
    return result.wall_s, cpu, result.peak_rss_mb


# ---------------------------------------------------------------------------------------------------------
# agreement of the two tools' outputs


def agreement(folder_a: Path, folder_b: Path) -> dict[str, float]:
    """Voxel agreement, Dice per label and geometry equality of the segmentations both folders hold."""
    import SimpleITK as sitk

    names = sorted(p.name for p in folder_a.glob("*.nii.gz"))
    missing = [n for n in names if not (folder_b / n).is_file()]
    if missing or not names:
        sys.exit(f"outputs differ: {folder_b} lacks {missing or 'everything'}")
    equal = total = 0
    overlap: dict[int, list[int]] = {}
    geometry_ok = True
    for name in names:
        a, b = sitk.ReadImage(str(folder_a / name)), sitk.ReadImage(str(folder_b / name))
        geometry_ok &= (
            a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing())
            and np.allclose(a.GetOrigin(), b.GetOrigin())
            and np.allclose(a.GetDirection(), b.GetDirection())
        )
        xa, xb = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
        equal += int((xa == xb).sum())
        total += xa.size
        for label in np.union1d(np.unique(xa), np.unique(xb)):
            if label == 0:
                continue
            sums = overlap.setdefault(int(label), [0, 0])
            sums[0] += 2 * int(((xa == label) & (xb == label)).sum())
            sums[1] += int((xa == label).sum() + (xb == label).sum())
    out = {"cases": len(names), "voxel_agreement": equal / total, "geometry_identical": float(geometry_ok)}
    out.update({f"dice_label_{k}": v[0] / v[1] for k, v in sorted(overlap.items())})
    return out


# ---------------------------------------------------------------------------------------------------------
# in-process timing (--api): per case without start-up, images read beforehand


def api_nnunet(work: Path, images: list[Path], threads: int) -> dict[str, list[float]]:
    cmd = pinned(
        [
            anchor_bin("python"),
            str(REPO / "benchmarks" / "predict_api_nnunet.py"),
            str(nnunet_model_dir(work)),
            str(N_FOLDS),
            str(threads),
            DEVICE,
            *map(str, images),
        ],
        threads,
    )
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads))
    )
    if proc.returncode != 0:
        sys.exit(f"nnunetv2 in-process timing failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def api_nnsnake(results: Path, images: list[Path], threads: int) -> dict[str, dict[str, list[float]]]:
    """Run :func:`api_child` in a fresh process (imports and memory start equal)."""
    spec = {"results": str(results), "images": [str(i) for i in images], "threads": threads, "device": DEVICE}
    cmd = pinned([sys.executable, __file__, "--api-child", json.dumps(spec)], threads)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads))
    )
    if proc.returncode != 0:
        sys.exit(f"nnsnake in-process timing failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def api_child(spec: dict) -> None:
    """nnsnake's equivalent of ``predict_single_npy_array``: preprocess, sliding window over the 5 folds with
    mirroring, back to raw geometry (argmax), per case. On the CPU in fp32 (the default) and with bfloat16
    autocast; on a GPU with fp16 autocast (the default, as nnunetv2) and in fp32."""
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from nnsnake.imageio import read_images
    from nnsnake.inference import convert_logits_to_raw_geometry, load_fold_networks, predict_sliding_window
    from nnsnake.planning import resolve_configuration
    from nnsnake.preprocessing import preprocess_arrays

    torch.set_num_threads(spec["threads"])
    results = Path(spec["results"])
    plans = json.loads((results / "plans.json").read_text())
    dataset_json = json.loads((results / "selection.json").read_text())["dataset_json"]
    config = resolve_configuration(plans, CONFIGURATION)
    checkpoints = [
        results / "training" / CONFIGURATION / f"fold_{k}" / "model_final.pt" for k in range(N_FOLDS)
    ]
    device = torch.device(spec["device"])
    networks, mirror_axes = load_fold_networks(checkpoints, plans, CONFIGURATION, dataset_json, device)
    cases = [read_images([image]) for image in spec["images"]]
    out: dict[str, dict[str, list[float]]] = {}
    segmentations: dict[str, list[np.ndarray]] = {}
    variants = (
        (("fp32", False), ("bf16 autocast", True))
        if device.type == "cpu"
        else (("fp16 autocast", None), ("fp32", False))
    )
    for variant, autocast in variants:
        wall, cpu = [], []
        for image, properties in cases:
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            data, _, props = preprocess_arrays(
                image, None, properties, plans, CONFIGURATION, dataset_json, class_locations=False
            )
            logits = predict_sliding_window(
                networks, data, config["patch_size"], mirror_axes, device=device, autocast=autocast
            )
            seg, _ = convert_logits_to_raw_geometry(logits, props, plans, config, dataset_json)
            wall.append(time.perf_counter() - start_wall)
            cpu.append(time.process_time() - start_cpu)
            segmentations.setdefault(variant, []).append(seg)
        out[variant] = {"seconds": wall, "cpu_seconds": cpu}
    same = sum(int((a == b).sum()) for a, b in zip(*segmentations.values(), strict=True))
    total = sum(a.size for a in segmentations["fp32"])
    other = next(name for name, _ in variants if name != "fp32")
    out[other]["voxel_agreement_with_fp32"] = [same / total]
    print(json.dumps(out))


def api_rows(work: Path, results: Path, images: list[Path], threads: int) -> list[tuple[str, ...]]:
    print(f"in-process timing, {len(images)} cases (the first is warm-up and left out):", flush=True)
    timings = {"nnunetv2 predict_single_npy_array": api_nnunet(work, images, threads)}
    for variant, values in api_nnsnake(results, images, threads).items():
        timings[f"nnsnake ({variant})"] = values
    reference = statistics.median(timings["nnunetv2 predict_single_npy_array"]["seconds"][1:])
    reference_cpu = statistics.median(timings["nnunetv2 predict_single_npy_array"]["cpu_seconds"][1:])
    rows = [("in process", "s/case (median)", "CPU s/case", "x (wall)", "x (CPU)", "note")]
    for name, values in timings.items():
        wall = statistics.median(values["seconds"][1:])
        cpu = statistics.median(values["cpu_seconds"][1:])
        note = (
            f"voxel agreement with fp32 {values['voxel_agreement_with_fp32'][0]:.5f}"
            if "voxel_agreement_with_fp32" in values
            else ""
        )
        rows.append(
            (name, f"{wall:.2f}", f"{cpu:.2f}", f"{reference / wall:.2f}", f"{reference_cpu / cpu:.2f}", note)
        )
    return rows


# ---------------------------------------------------------------------------------------------------------


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--api-child":
        api_child(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=5, help="N cases for T(N) (default 5)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OpenMP threads per tool (default 2)")
    parser.add_argument(
        "--nnunet-np",
        type=int,
        nargs="+",
        default=[3],
        help="nnUNetv2_predict -npp/-nps values to time (3 = its default, 0 = sequential)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="repeat every CLI measurement, keep the fastest"
    )
    parser.add_argument(
        "--api",
        type=int,
        default=0,
        metavar="N",
        help="also time N cases in process (nnunetv2's predictor vs nnsnake fp32 and bf16)",
    )
    parser.add_argument("--no-cli", action="store_true", help="skip the CLI comparison (with --api)")
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu (default) or cuda: -device of nnUNetv2_predict and "
        "--device of nnsnake predict; with cuda neither tool is pinned to --threads cores",
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/nnsnake_predict_bench"))
    parser.add_argument("--anchor-pre", type=Path, default=Path("/tmp/nnsnake_anchor/pre"))
    parser.add_argument("--rebuild-models", action="store_true")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    if args.cases < 2:
        parser.error("--cases must be at least 2 (the per-case cost is T(N) - T(1))")

    work = args.work.resolve()
    results = prepare_models(work, args.anchor_pre, args.rebuild_models)
    print(
        f"{DATASET} {CONFIGURATION}, {N_FOLDS} folds, mirroring on, device {DEVICE}, {args.threads} threads, "
        f"work {work}",
        flush=True,
    )
    if not args.no_cli:
        cli_comparison(args, work, results)
    if args.api:
        images = sorted((SHARED / "data" / DATASET / "imagesTr").glob("*_0000.nii.gz"))[: args.api]
        print()
        print_table(api_rows(work, results, images, args.threads))
        print("(x = nnunetv2's time / this one's; > 1 means faster than nnunetv2)")


def cli_comparison(args: argparse.Namespace, work: Path, results: Path) -> None:
    in_one, in_all = prepare_inputs(work, args.cases)
    env_nnunet = nnunet_env(work / "nnunet", args.threads)
    env_nnsnake = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")])),
    )
    tools = {
        f"nnUNetv2_predict -npp/-nps {p}": (
            lambda i, o, p=p: pinned(nnunet_cmd(i, o, p), args.threads),
            env_nnunet,
        )
        for p in args.nnunet_np
    }
    tools["nnsnake predict"] = (
        lambda i, o: pinned(nnsnake_cmd(i, o, results, args.threads), args.threads),
        env_nnsnake,
    )
    times: dict[str, dict[str, list[tuple[float, float, float]]]] = {t: {"one": [], "all": []} for t in tools}
    print(f"CLI end to end, T(1) and T({args.cases}):", flush=True)
    for _ in range(args.repeats):
        for which, inp in (("one", in_one), ("all", in_all)):
            for k, (tool, (make_cmd, env)) in enumerate(tools.items()):
                out = work / f"out_{k}_{which}"
                times[tool][which].append(run(make_cmd(inp, out), env, out, f"{tool}, {inp.name}"))

    n = args.cases
    summary = {}
    for tool in tools:
        t1, c1, m1 = min(times[tool]["one"])
        tn, cn, mn = min(times[tool]["all"])
        summary[tool] = {
            "t1": t1,
            "tn": tn,
            "per_case": (tn - t1) / (n - 1),
            "cpu_per_case": (cn - c1) / (n - 1),
            "peak": max(m1, mn),
        }
    ours = summary["nnsnake predict"]
    rows = [
        (
            "CLI",
            "T(1) s",
            f"T({n}) s",
            "s/case",
            "start-up s",
            "CPU s/case",
            "peak MB",
            "x (s/case)",
            "x (CPU s/case)",
            f"x (T({n}))",
        )
    ]
    for tool, s in summary.items():
        rows.append(
            (
                tool,
                f"{s['t1']:.1f}",
                f"{s['tn']:.1f}",
                f"{s['per_case']:.2f}",
                f"{s['t1'] - s['per_case']:.1f}",
                f"{s['cpu_per_case']:.2f}",
                f"{s['peak']:.0f}",
                f"{s['per_case'] / ours['per_case']:.2f}",
                f"{s['cpu_per_case'] / ours['cpu_per_case']:.2f}",
                f"{s['tn'] / ours['tn']:.2f}",
            )
        )
    print()
    print_table(rows)
    print("(x = this tool's time / nnsnake's; > 1 means nnsnake is faster)")
    print(
        f"\nagreement of the segmentations (nnunetv2 -npp/-nps {args.nnunet_np[0]} vs nnsnake, same weights):"
    )
    for key, value in agreement(work / "out_0_all", work / f"out_{len(tools) - 1}_all").items():
        print(f"  {key}: {value:.6g}")


if __name__ == "__main__":
    main()
