"""nnunetv2 trainer for benchmarks/quality.py: the standard trainer with a small budget read from the environment.

Installed by benchmarks/quality.py into the anchor venv (top level of nnunetv2/training/nnUNetTrainer/, where
nnunetv2 finds trainers by class name). NNSNAKE_QUALITY_EPOCHS, NNSNAKE_QUALITY_ITERS and
NNSNAKE_QUALITY_VAL_ITERS set the budget; everything else, including the final sliding-window validation with
mirroring and its summary.json, is nnunetv2's own. NNSNAKE_QUALITY_BF16=1 runs the training and validation
iterations under CPU bfloat16 autocast (nnunetv2 itself only autocasts on CUDA), as nnsnake's ``amp: bf16`` does;
the final sliding-window validation stays in full precision in both tools.
"""

import contextlib
import os

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

_DEFAULT_DEVICE = torch.device("cuda")  # nnUNetTrainer's default


class nnUNetTrainer_nnsnakeQuality(nnUNetTrainer):  # noqa: N801 (nnunetv2 finds trainers by this name)
    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _DEFAULT_DEVICE,
    ):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_epochs = int(os.environ["NNSNAKE_QUALITY_EPOCHS"])
        self.num_iterations_per_epoch = int(os.environ["NNSNAKE_QUALITY_ITERS"])
        self.num_val_iterations_per_epoch = int(os.environ["NNSNAKE_QUALITY_VAL_ITERS"])

    def _bf16(self):
        if os.environ.get("NNSNAKE_QUALITY_BF16") == "1" and self.device.type == "cpu":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def train_step(self, batch: dict) -> dict:
        with self._bf16():
            return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        with self._bf16():
            return super().validation_step(batch)
