"""nnunetv2 2.8.1 side of the GPU benchmark: nnUNetTrainer for 2 short epochs, per-step wall times recorded.

Usage: python nnunet_child.py CONFIG ITERATIONS DEVICE OUT_JSON   (env: nnUNet_preprocessed/_results/_raw,
nnUNet_n_proc_DA, nnUNet_compile). Writes start/end of every train_step (end is after the loss reached the CPU,
i.e. the GPU work of that step is done), so start[i+1] - end[i] is the time waiting for the next batch.
"""

import json
import os
import sys
import time

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

cfg, iters, device, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
if os.environ.get("GPUBENCH_CUDNN_BENCHMARK") == "1":  # what nnUNetv2_train (run_training.py) sets on a GPU
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = False, True


class nnUNetTrainer_gpuBench(nnUNetTrainer):  # noqa: N801
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = torch.device("cuda"),  # noqa: B008 (nnunetv2 signature)
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 2
        self.num_iterations_per_epoch = iters
        self.num_val_iterations_per_epoch = 1
        self.bench_starts, self.bench_ends = [], []

    def train_step(self, batch):
        self.bench_starts.append(time.perf_counter())
        result = super().train_step(batch)
        self.bench_ends.append(time.perf_counter())
        return result


pre = os.path.join(os.environ["nnUNet_preprocessed"], "Dataset004_Hippocampus")
t0 = time.perf_counter()
plans = load_json(os.path.join(pre, "nnUNetPlans.json"))
plans["continue_training"] = False  # what nnunetv2.run.run_training.get_trainer_from_args adds
trainer = nnUNetTrainer_gpuBench(
    plans, cfg, 0, load_json(os.path.join(pre, "dataset.json")), device=torch.device(device)
)
trainer.run_training()
with open(out, "w") as f:
    json.dump(
        {
            "starts": trainer.bench_starts,
            "ends": trainer.bench_ends,
            "batch_size": trainer.batch_size,
            "compiled": trainer._do_i_compile(),
            "total_s": time.perf_counter() - t0,
            "patch_size": list(trainer.configuration_manager.patch_size),
        },
        f,
    )
if os.environ.get("GPUBENCH_MODULES"):
    with open(os.environ["GPUBENCH_MODULES"], "w") as f:
        f.write("\n".join(sorted({m.split(".")[0] for m in sys.modules})))
