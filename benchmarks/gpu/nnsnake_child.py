"""nnsnake side of the GPU benchmark: train_fold for 2 short epochs, per-step start times recorded.

Usage: python nnsnake_child.py CONFIG ITERATIONS DEVICE WORKERS COMPILE(0/1) OUT_JSON  (run from the repo root)
"""

import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, "src")
from nnsnake import training  # noqa: E402
from nnsnake.jsonio import read_json  # noqa: E402

cfg, iters, device, workers, compile_, out = (
    sys.argv[1],
    int(sys.argv[2]),
    sys.argv[3],
    int(sys.argv[4]),
    bool(int(sys.argv[5])),
    sys.argv[6],
)
G = Path(".gpubench")
logging.basicConfig(level=logging.INFO, format="%(message)s")
starts = []
original = training._Trainer.train_step


def timed_step(self, batch):
    starts.append(time.perf_counter())
    return original(self, batch)


training._Trainer.train_step = timed_step
if os.environ.get("GPUBENCH_CUDNN_BENCHMARK") == "0":  # nnsnake's default on a GPU is cudnn.benchmark on
    _settings = training.trainer._process_settings

    def settings_without_cudnn_benchmark(*args, **kwargs):
        import contextlib

        import torch

        @contextlib.contextmanager
        def inner():
            with _settings(*args, **kwargs):
                torch.backends.cudnn.benchmark = False
                yield

        return inner()

    training.trainer._process_settings = settings_without_cudnn_benchmark
run = Path("/tmp/gpubench_nnsnake_run") / cfg
shutil.rmtree(run, ignore_errors=True)
settings = training.TrainingSettings(
    epochs=2,
    iterations_per_epoch=iters,
    val_iterations=1,
    device=device,
    threads=16 if device == "cuda" else 1,
    workers=workers,
    compile=compile_,
)
t0 = time.perf_counter()
training.train_fold(
    Path("/tmp/gpubench_nnsnake_pre") / cfg,
    read_json(G / "nnunet_pre/Dataset004_Hippocampus/nnUNetPlans.json"),
    cfg,
    read_json(G / "nnsnake_dataset.json"),
    read_json(G / "nnunet_pre/Dataset004_Hippocampus/splits_final.json"),
    0,
    run / "out",
    run / "state",
    settings,
)
log = read_json(run / "out" / "log.json")
Path(out).write_text(json.dumps({"starts": starts, "log": log, "total_s": time.perf_counter() - t0}))
if os.environ.get("GPUBENCH_MODULES"):
    with open(os.environ["GPUBENCH_MODULES"], "w") as f:
        f.write("\n".join(sorted({m.split(".")[0] for m in sys.modules})))
