"""cudnn.benchmark on or off: nnsnake's network training step on a GPU, for several golden plans.

    python benchmarks/gpu/cudnn_benchmark.py [STEPS]          (run from the repo root on the device machine)

For each plans configuration below and each setting of ``torch.backends.cudnn.benchmark``, a fresh process builds
nnsnake's U-Net from the plans (deep supervision on) and times training steps on random data of the plan's batch
and patch size: fp16 autocast + GradScaler + SGD with Nesterov momentum, as nnsnake's trainer on CUDA, channels-last
for 2D (nnsnake's CUDA default), uncompiled. Printed per row: the first step (cuDNN autotuning happens there when
benchmark is on), and the median of the next STEPS steps. Only the network's compute is measured: no data loading.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLANS = REPO / "tests" / "fixtures" / "nnunetv2"
CASES = [  # plans folder, configuration, input channels, outputs (labels incl. background)
    ("Dataset004_Hippocampus", "3d_fullres", 1, 3),
    ("Dataset004_Hippocampus", "2d", 1, 3),
    ("Dataset009_SpleenCTCrop", "3d_fullres", 1, 2),
    ("Dataset301_BraTS2015DeepMedic", "3d_fullres", 4, 4),
    ("Dataset301_BraTS2015DeepMedic", "2d", 4, 4),
]


def child(dataset: str, configuration: str, channels: int, outputs: int, benchmark: bool, steps: int) -> None:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from nnsnake.network import build_network

    torch.backends.cudnn.benchmark = benchmark
    config = json.loads((PLANS / dataset / "nnUNetPlans.json").read_text())["configurations"][configuration]
    device = torch.device("cuda")
    network = build_network(config["architecture"], channels, outputs).to(device)
    two_d = len(config["patch_size"]) == 2
    memory_format = torch.channels_last if two_d else torch.contiguous_format
    network = network.to(memory_format=memory_format)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    scaler = torch.amp.GradScaler("cuda")
    data = torch.randn(config["batch_size"], channels, *config["patch_size"], device=device)
    data = data.contiguous(memory_format=memory_format)
    times = []
    for _ in range(steps + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.float16):
            heads = network(data)
            loss = sum(h.float().square().mean() for h in heads)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    print(
        json.dumps(
            {
                "first_s": times[0],
                "median_ms": 1000 * statistics.median(times[1:]),
                "batch": config["batch_size"],
                "patch": config["patch_size"],
            }
        )
    )


def main() -> None:
    if len(sys.argv) == 8 and sys.argv[1] == "--child":
        child(
            sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6] == "1", int(sys.argv[7])
        )
        return
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    print(
        f"{'plans':32} {'config':10} {'batch x patch':22} {'benchmark':9} {'first step s':12} {'median ms':9}"
    )
    for dataset, configuration, channels, outputs in CASES:
        medians = {}
        for benchmark in (True, False):
            proc = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    dataset,
                    configuration,
                    str(channels),
                    str(outputs),
                    "1" if benchmark else "0",
                    str(steps),
                ],
                capture_output=True,
                text=True,
            )
            if proc.returncode != 0:
                print(
                    f"{dataset} {configuration} benchmark={benchmark} failed:\n{proc.stderr[-2000:]}",
                    flush=True,
                )
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            medians[benchmark] = row["median_ms"]
            shape = f"{row['batch']} x {'x'.join(map(str, row['patch']))}"
            print(
                f"{dataset:32} {configuration:10} {shape:22} {'on' if benchmark else 'off':9} "
                f"{row['first_s']:<12.2f} {row['median_ms']:<9.1f}",
                flush=True,
            )
        if len(medians) == 2:
            print(f"{'':66} off / on step time: {medians[False] / medians[True]:.2f}", flush=True)


if __name__ == "__main__":
    main()
