"""nnunetv2 trainer for benchmarks/train.py: a short run that records when each training iteration starts.

Installed by benchmarks/train.py into the anchor venv (top level of nnunetv2/training/nnUNetTrainer/, where
nnunetv2 finds trainers by class name; see ../shared/anchor/README.md for why the top level). Reads
NNSNAKE_BENCH_ITERS (training iterations, one epoch, one validation iteration), skips the final sliding-window
validation, and writes ``nnsnake_bench.json`` into the fold folder: wall-clock and process CPU time at the start
of every ``train_step`` (start-to-start differences include waiting for the next batch), as nnsnake's side of
the benchmark records them.
"""

import json
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

_DEFAULT_DEVICE = torch.device("cuda")  # nnUNetTrainer's default


class nnUNetTrainer_nnsnakeBench(nnUNetTrainer):  # noqa: N801 (nnunetv2 finds trainers by this name)
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = 1
        self.num_iterations_per_epoch = int(os.environ.get("NNSNAKE_BENCH_ITERS", 5))
        self.num_val_iterations_per_epoch = 1
        self._wall, self._cpu = [], []

    def train_step(self, batch: dict) -> dict:
        self._wall.append(time.perf_counter())
        self._cpu.append(time.process_time())
        return super().train_step(batch)

    def perform_actual_validation(self, save_probabilities: bool = False):
        self._write()

    def on_train_end(self):
        super().on_train_end()
        self._write()

    def _write(self):
        with open(os.path.join(self.output_folder, "nnsnake_bench.json"), "w") as f:
            json.dump(
                {
                    "wall_starts": self._wall,
                    "cpu_starts": self._cpu,
                    "batch_size": self.batch_size,
                    "torch_threads": torch.get_num_threads(),
                    "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA"),
                },
                f,
            )
