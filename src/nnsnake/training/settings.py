"""Training settings (everything about a run that is not in the plans) and the trainer's file names.

The names follow the glossary in CONTRIBUTING.md: ``workers`` (augmentation worker processes) and
``autocast`` (reduced precision) replaced ``num_workers`` and ``amp``; the old names are accepted for one
release with a deprecation warning.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import InitVar, dataclass
from typing import Any

from ..deprecation import warn_deprecated
from ..errors import ConfigError
from .variants import check_variant

log = logging.getLogger("nnsnake")

STATE_FORMAT = "nnsnake-training-state-1"
MODEL_FORMAT = "nnsnake-model-1"
STATE_FILE = "checkpoint_latest.pt"
LOCK_FILE = "training.lock"
BEST_FILE_PREFIX = "checkpoint_best_epoch"
MODEL_FINAL = "model_final.pt"
MODEL_BEST = "model_best.pt"
LOG_JSON = "log.json"
PROGRESS_PNG = "progress.png"

AUTOCAST_CHOICES = ("auto", "off", "fp16", "bf16")
AMP_CHOICES = AUTOCAST_CHOICES  # the former name, kept for one release
DEPRECATED_KEYS = {"amp": "autocast", "num_workers": "workers"}
"""Former setting names (old -> new), accepted for one release with a warning."""


def _warn_deprecated(old: str, new: str, stacklevel: int) -> None:
    warn_deprecated(f"training setting {old} is deprecated; use {new}", stacklevel=stacklevel + 1)


@dataclass
class TrainingSettings:
    """Everything about a training run that is not in the plans. Defaults are nnU-Net's (docs/method.md §5.1).

    ``threads`` is the number of CPU cores the job may use (Snakemake's ``threads``); ``workers`` the number of
    augmentation worker processes (None: chosen from the device and ``threads``, see :func:`default_workers`).
    ``autocast``: ``auto`` = fp16 autocast + GradScaler on CUDA, full precision elsewhere; ``bf16`` = bfloat16
    autocast (CPU or CUDA), ``fp16``, or ``off`` (booleans as in :func:`nnsnake.runtime.autocast_dtype`).
    ``compile``: None = on for CUDA (not in deterministic mode), off on CPU. ``channels_last``: None = on for the
    CPU and for 2D configurations on CUDA. ``amp`` and ``num_workers`` are the deprecated names of ``autocast``
    and ``workers`` (constructor keywords only).

    The trainer variants (docs/method.md §5.12; :mod:`nnsnake.training.variants`): ``loss`` (``dice_ce``, ``ce``,
    ``dice``, ``topk10``, ``dice_topk10``), ``optimizer`` (``sgd``, ``adam`` = torch Adam, ``adamw`` = AdamW with
    AMSGrad), ``lr_schedule`` (``poly``, ``cosine``, ``warmup_poly``), ``augmentation`` (``default``, ``none``,
    ``no_mirroring``), ``deep_supervision``, ``oversample_foreground_percent`` and ``probabilistic_oversampling``.
    """

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    checkpoint_every: int = 1
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip_norm: float = 12.0
    threads: int | None = None
    workers: int | None = None
    device: str = "auto"
    deterministic: bool = False
    seed: int = 12345
    autocast: str | bool | None = "auto"
    compile: bool | None = None
    channels_last: bool | None = None
    save_best: bool = True
    gpu_lock_dir: str | None = None
    loss: str = "dice_ce"
    optimizer: str = "sgd"
    lr_schedule: str = "poly"
    augmentation: str = "default"
    deep_supervision: bool = True
    oversample_foreground_percent: float = 0.33
    probabilistic_oversampling: bool = False
    pretrained_weights: str | None = None  # fine-tuning start (training/pretrained.py)
    amp: InitVar[str | bool | None] = None
    num_workers: InitVar[int | None] = None

    def __post_init__(self, amp: str | bool | None, num_workers: int | None) -> None:
        if amp is not None:
            if self.autocast != "auto":
                raise ConfigError("training settings: amp and autocast are both given; keep only autocast")
            _warn_deprecated("amp", "autocast", stacklevel=3)
            self.autocast = amp
        if num_workers is not None:
            if self.workers is not None:
                raise ConfigError(
                    "training settings: num_workers and workers are both given; keep only workers"
                )
            _warn_deprecated("num_workers", "workers", stacklevel=3)
            self.workers = num_workers
        problems = []
        for name in ("epochs", "iterations_per_epoch", "val_iterations"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if int(self.checkpoint_every) < 0:
            problems.append(
                f"checkpoint_every must be >= 0 epochs (0: only at the end and on signals), got {self.checkpoint_every}"
            )
        if self.initial_lr <= 0:
            problems.append(f"initial_lr must be > 0 (got {self.initial_lr})")
        if self.threads is not None and int(self.threads) < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if self.workers is not None and int(self.workers) < 0:
            problems.append(f"workers must be >= 0 (got {self.workers})")
        if not (
            self.autocast is None or isinstance(self.autocast, bool) or self.autocast in AUTOCAST_CHOICES
        ):
            problems.append(f"autocast must be one of {AUTOCAST_CHOICES} (got {self.autocast!r})")
        problems += check_variant(dataclasses.asdict(self))
        if problems:
            raise ConfigError("training settings: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TrainingSettings:
        """Settings from a config mapping (e.g. the workflow's ``training:`` section); unknown keys are errors.

        The deprecated keys ``amp`` and ``num_workers`` are read as ``autocast`` and ``workers`` with a warning;
        giving a deprecated key together with its new name is an error (which one was meant is unclear).
        """
        values = dict(values or {})
        for old, new in DEPRECATED_KEYS.items():
            if old not in values:
                continue
            if new in values:
                raise ConfigError(
                    f"training settings: {old} and {new} are both given; {old} is the deprecated name of {new}: "
                    f"keep only {new}"
                )
            _warn_deprecated(old, new, stacklevel=2)
            values[new] = values.pop(old)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"training settings: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def default_workers(device_type: str, threads: int) -> int:
    """Augmentation worker processes for a job with ``threads`` cores.

    On a GPU the main process only feeds the device, so all but one core augment (nnU-Net's cap of 12 kept).
    On CPU one worker per four cores, at least one, builds the next batch while the network (on all cores)
    trains, as nnU-Net does; the batches are cheap next to a CPU training step.
    """
    threads = max(1, int(threads))
    if device_type == "cuda":
        return min(12, max(1, threads - 1))
    return 0 if threads == 1 else max(1, threads // 4)


default_num_workers = default_workers  # the former name, kept for one release
