"""The learning-rate schedules and the validation metric of a training run (docs/method.md §5.1, §5.6, §5.12).

Each schedule sets the learning rate at the start of an epoch from the epoch index alone, so a resumed run needs
no scheduler state. The formulas are written in the operation order of nnU-Net's schedulers, so the rates are
equal to the last bit (tests/test_variants.py compares every epoch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

POLY_EXPONENT = 0.9
WARMUP_EPOCHS = 50  # nnUNetTrainer_warmup: linear warm-up of the whole network
LR_SCHEDULES = ("poly", "cosine", "warmup_poly")
EMA_MOMENTUM = 0.9  # ema = 0.9 * previous + 0.1 * current (§5.6)


def poly_lr(epoch: int, epochs: int, initial_lr: float = 1e-2, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate of ``epoch``: ``initial_lr * (1 - epoch / epochs) ** 0.9``, set at the start of the epoch."""
    return initial_lr * (1 - epoch / epochs) ** exponent


def cosine_lr(epoch: int, epochs: int, initial_lr: float = 1e-2) -> float:
    """nnUNetTrainerCosAnneal: ``CosineAnnealingLR(T_max=epochs, eta_min=0)`` stepped with the epoch index,
    ``initial_lr * (1 + cos(pi * epoch / epochs)) / 2``."""
    return initial_lr * (1 + math.cos(math.pi * epoch / epochs)) / 2


def warmup_poly_lr(epoch: int, epochs: int, initial_lr: float = 1e-2, warmup: int = WARMUP_EPOCHS) -> float:
    """nnUNetTrainer_warmup: ``initial_lr / 50 * (epoch + 1)`` for the first 50 epochs, then the poly schedule
    over the remaining epochs, ``initial_lr * (1 - (epoch - 50) / (epochs - 50)) ** 0.9``.

    With ``epochs <= 50`` the run never leaves the warm-up (as nnU-Net's trainer would with that budget).
    One optimiser serves both stages: nnU-Net keeps the warm-up SGD (and its momentum) when the poly stage starts
    at epoch 50 and restores its state on resume in either stage, which is what the trainer does for every
    schedule. (Its "new optimiser at epoch 0" is the one ``initialize`` already built: verified the same object.)
    """
    if epoch < warmup:
        return initial_lr / warmup * (1 + epoch)
    return initial_lr * (1 - (epoch - warmup) / (epochs - warmup)) ** POLY_EXPONENT


def learning_rate(schedule: str, epoch: int, epochs: int, initial_lr: float = 1e-2) -> float:
    """The learning rate of ``epoch`` under ``schedule`` (``poly``, ``cosine`` or ``warmup_poly``)."""
    if schedule == "poly":
        return poly_lr(epoch, epochs, initial_lr)
    if schedule == "cosine":
        return cosine_lr(epoch, epochs, initial_lr)
    if schedule == "warmup_poly":
        return warmup_poly_lr(epoch, epochs, initial_lr)
    raise ValueError(f"lr_schedule must be one of {list(LR_SCHEDULES)} (got {schedule!r})")


def ema_update(previous: float | None, value: float, momentum: float = EMA_MOMENTUM) -> float:
    """Moving average of the mean pseudo-Dice; the first epoch takes the raw value.

    A NaN value (no foreground predicted or present in any validation batch) keeps the previous average instead
    of poisoning every later epoch.
    """
    if previous is None or math.isnan(previous):
        return value
    if math.isnan(value):
        return previous
    return momentum * previous + (1 - momentum) * value


def global_dice(tp: Sequence[float], fp: Sequence[float], fn: Sequence[float]) -> list[float]:
    """Per-class ``2TP / (2TP + FP + FN)`` from counts summed over all validation batches; NaN where undefined."""
    out = []
    for t, p, n in zip(tp, fp, fn, strict=True):
        denominator = 2 * float(t) + float(p) + float(n)
        out.append(2 * float(t) / denominator if denominator > 0 else float("nan"))
    return out


def nanmean(values: Sequence[float]) -> float:
    """Mean of the defined (non-NaN) values; NaN when there is none."""
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")
