"""The learning-rate schedule and the validation metric of a training run (docs/method.md §5.1, §5.6)."""

from __future__ import annotations

import math
from collections.abc import Sequence

POLY_EXPONENT = 0.9
EMA_MOMENTUM = 0.9  # ema = 0.9 * previous + 0.1 * current (§5.6)


def poly_lr(epoch: int, epochs: int, initial_lr: float = 1e-2, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate of ``epoch``: ``initial_lr * (1 - epoch / epochs) ** 0.9``, set at the start of the epoch."""
    return initial_lr * (1 - epoch / epochs) ** exponent


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
