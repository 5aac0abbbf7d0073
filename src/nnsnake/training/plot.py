"""The progress plot of a training run (``progress.png``): losses, pseudo-Dice, learning rate, epoch time."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..jsonio import atomic_open


def plot_progress(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draw losses, pseudo-Dice (mean, per class, EMA), learning rate and epoch time; written atomically.

    Uses matplotlib's object API with the Agg canvas, so no display and no global backend switch are needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    epochs = [e["epoch"] for e in history]
    figure = Figure(figsize=(10, 12), dpi=80)
    FigureCanvasAgg(figure)
    ax_loss, ax_dice, ax_lr, ax_time = figure.subplots(4, 1, sharex=True)

    def series(key: str) -> list[float]:
        return [float("nan") if e.get(key) is None else float(e[key]) for e in history]

    ax_loss.plot(epochs, series("train_loss"), color="tab:blue", label="train loss")
    ax_loss.plot(epochs, series("val_loss"), color="tab:red", label="val loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    names = list(history[-1].get("pseudo_dice", {})) if history else []
    for name in names:
        values = [
            float("nan") if e["pseudo_dice"].get(name) is None else e["pseudo_dice"][name] for e in history
        ]
        ax_dice.plot(epochs, values, linewidth=0.8, alpha=0.6, label=f"{name}")
    ax_dice.plot(epochs, series("mean_fg_dice"), color="tab:green", linestyle=":", label="mean pseudo Dice")
    ax_dice.plot(epochs, series("ema_pseudo_dice"), color="tab:green", linewidth=2, label="EMA pseudo Dice")
    ax_dice.set_ylabel("pseudo Dice")
    ax_dice.legend(loc="lower right", fontsize="small")
    ax_lr.plot(epochs, series("lr"), color="black")
    ax_lr.set_ylabel("learning rate")
    ax_time.plot(epochs, series("epoch_time_s"), color="tab:purple")
    ax_time.set_ylabel("epoch time [s]")
    ax_time.set_xlabel("epoch")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for axis in (ax_loss, ax_dice, ax_lr, ax_time):
        axis.grid(alpha=0.3)
    # fixed margins (room for the tick labels and the y labels): tight_layout would measure every text first,
    # almost half the drawing time
    figure.subplots_adjust(left=0.1, right=0.98, bottom=0.05, top=0.98, hspace=0.1)
    with atomic_open(path, fsync=False) as fh:
        figure.savefig(fh, format="png")
