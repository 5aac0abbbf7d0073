"""Driver of the GPU benchmark: nnsnake vs nnunetv2 2.8.1 training speed, Hippocampus subset, fold 0.

Usage: python .gpubench/run_all.py DEVICE ITERATIONS WORKERS DEADLINE_S OUT_DIR [steps...]
Each step runs in its own process with a timeout; steps that no longer fit the deadline are skipped.
"""

import json
import os
import subprocess
import sys
import time

device, iters, workers, deadline, out = (
    sys.argv[1],
    int(sys.argv[2]),
    int(sys.argv[3]),
    float(sys.argv[4]),
    sys.argv[5],
)
t_start = time.perf_counter()
py_nnunet = os.environ.get("PY_NNUNET", sys.executable)
py_nnsnake = os.environ.get("PY_NNSNAKE", sys.executable)
G = os.path.abspath(".gpubench")
STEPS = {  # name: (tool, config, compile, timeout, minimum time left to start it)
    "nnsnake_3d": ("nnsnake", "3d_fullres", 0, 80, 45),
    "nnunet_3d": ("nnunet", "3d_fullres", 0, 80, 45),
    "nnsnake_2d": ("nnsnake", "2d", 0, 80, 45),
    "nnunet_2d": ("nnunet", "2d", 0, 80, 45),
    "nnunet_3d_compile": ("nnunet", "3d_fullres", 1, 150, 90),
    "nnsnake_3d_compile": ("nnsnake", "3d_fullres", 1, 150, 90),
}
steps = sys.argv[6:] or list(STEPS)
results = {}


def summarize(tool: str, data: dict) -> dict:
    s = data["starts"][iters:]  # second epoch
    row = {
        "steps_s2s_it_per_s": (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 else float("nan"),
        "total_s": round(data["total_s"], 1),
    }
    if tool == "nnsnake":
        entry = data["log"][-1]
        row["log_it_per_s"] = iters / entry["train_time_s"]
        row["data_wait_share"] = entry["data_wait_s"] / entry["train_time_s"]
    else:
        e = data["ends"][iters:]
        span = e[-1] - s[0]
        row["log_it_per_s"] = iters / span
        row["data_wait_share"] = sum(b - a for a, b in zip(e[:-1], s[1:], strict=True)) / span
        row["compiled"] = data["compiled"]
    return row


for name in steps:
    tool, cfg, comp, timeout, minimum = STEPS[name]
    timeout *= float(os.environ.get("GPUBENCH_TIMEOUT_SCALE", 1))
    left = deadline - (time.perf_counter() - t_start)
    if left < minimum:
        print(f"SKIP {name}: {left:.0f} s left", flush=True)
        continue
    result_file = os.path.join(out, f"{name}.json")
    env = dict(
        os.environ,
        nnUNet_n_proc_DA=str(workers),
        nnUNet_compile="t" if comp else "f",
        nnUNet_preprocessed=f"{G}/nnunet_pre",
        nnUNet_results="/tmp/gpubench_nnunet_res",
        nnUNet_raw="/tmp/gpubench_nnunet_raw",
    )
    if tool == "nnunet":
        cmd = [py_nnunet, f"{G}/nnunet_child.py", cfg, str(iters), device, result_file]
    else:
        cmd = [
            py_nnsnake,
            f"{G}/nnsnake_child.py",
            cfg,
            str(iters),
            device,
            str(workers),
            str(comp),
            result_file,
        ]
    print(f"=== {name} (timeout {min(timeout, left - 3):.0f} s)", flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=min(timeout, left - 3), capture_output=True, text=True)
        rc = proc.returncode
        tail = (proc.stdout + proc.stderr)[-2500:]
    except subprocess.TimeoutExpired as exc:
        rc = "timeout"
        tail = ((exc.stdout or b"").decode(errors="replace") + (exc.stderr or b"").decode(errors="replace"))[
            -2500:
        ]
    wall = time.perf_counter() - t0
    if rc != 0 or not os.path.exists(result_file):
        print(f"FAILED {name} rc={rc} after {wall:.0f} s\n{tail}", flush=True)
        continue
    with open(result_file) as f:
        results[name] = summarize(tool, json.load(f))
    results[name]["wall_s"] = round(wall, 1)
    print(f"{name}: {json.dumps(results[name])}", flush=True)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(results, f, indent=1)

for cfg, a, b in (
    ("3d_fullres", "nnsnake_3d", "nnunet_3d"),
    ("2d", "nnsnake_2d", "nnunet_2d"),
    ("3d_fullres compiled", "nnsnake_3d_compile", "nnunet_3d_compile"),
):
    if a in results and b in results:
        ra, rb = results[a], results[b]
        print(
            f"{cfg:<20} nnsnake {ra['steps_s2s_it_per_s']:6.2f} it/s (log {ra['log_it_per_s']:6.2f}, wait "
            f"{100 * ra['data_wait_share']:4.1f} %)  nnunetv2 {rb['steps_s2s_it_per_s']:6.2f} it/s (log "
            f"{rb['log_it_per_s']:6.2f}, wait {100 * rb['data_wait_share']:4.1f} %)  x "
            f"{ra['steps_s2s_it_per_s'] / rb['steps_s2s_it_per_s']:.2f}",
            flush=True,
        )
print(f"driver done in {time.perf_counter() - t_start:.0f} s", flush=True)
