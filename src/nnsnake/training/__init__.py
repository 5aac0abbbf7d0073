"""Training (docs/method.md §5): settings, learning-rate schedule, run signature, resumable state, signal
handling, progress plot and the trainer itself, one module each.

Everything that ``nnsnake.training`` offered as a single module is re-exported here, so
``from nnsnake.training import train_fold`` (and the names tests patch, e.g. ``training._Trainer``) keep
working.
"""

from __future__ import annotations

from ..errors import SignatureMismatchError, TrainingLockedError
from ..runtime import available_cpus
from .plot import plot_progress
from .schedule import (
    EMA_MOMENTUM,
    LR_SCHEDULES,
    POLY_EXPONENT,
    WARMUP_EPOCHS,
    cosine_lr,
    ema_update,
    global_dice,
    learning_rate,
    poly_lr,
    warmup_poly_lr,
)
from .settings import (
    AMP_CHOICES,
    AUTOCAST_CHOICES,
    BEST_FILE_PREFIX,
    LOCK_FILE,
    LOG_JSON,
    MODEL_BEST,
    MODEL_FINAL,
    MODEL_FORMAT,
    PROGRESS_PNG,
    STATE_FILE,
    STATE_FORMAT,
    TrainingSettings,
    default_num_workers,
    default_workers,
)
from .signals import INTERRUPT_SIGNALS, TrainingInterrupted
from .signature import (
    preprocessed_data_digest,
    previous_stage_digest,
    signature_differences,
    training_signature,
)
from .state import (
    TrainingState,
    atomic_torch_save,
    capture_rng_states,
    exclusive_lock,
    restore_rng_states,
)
from .trainer import (
    PLOT_INTERVAL_S,
    previous_stage_files,
    train_fold,
    train_fold_from_files,
)
from .trainer import _Trainer as _Trainer  # tests and benchmarks wrap its train_step
from .variants import (
    VARIANT_DEFAULTS,
    build_optimizer,
    nnunet_trainer_name,
    training_mirror_axes,
    variant_of,
)

__all__ = [
    "AMP_CHOICES",
    "AUTOCAST_CHOICES",
    "BEST_FILE_PREFIX",
    "EMA_MOMENTUM",
    "LR_SCHEDULES",
    "INTERRUPT_SIGNALS",
    "LOCK_FILE",
    "LOG_JSON",
    "MODEL_BEST",
    "MODEL_FINAL",
    "MODEL_FORMAT",
    "PLOT_INTERVAL_S",
    "POLY_EXPONENT",
    "PROGRESS_PNG",
    "STATE_FILE",
    "STATE_FORMAT",
    "SignatureMismatchError",
    "TrainingInterrupted",
    "TrainingLockedError",
    "TrainingSettings",
    "TrainingState",
    "VARIANT_DEFAULTS",
    "WARMUP_EPOCHS",
    "atomic_torch_save",
    "build_optimizer",
    "available_cpus",
    "capture_rng_states",
    "cosine_lr",
    "default_num_workers",
    "default_workers",
    "ema_update",
    "exclusive_lock",
    "global_dice",
    "learning_rate",
    "nnunet_trainer_name",
    "plot_progress",
    "poly_lr",
    "preprocessed_data_digest",
    "previous_stage_digest",
    "previous_stage_files",
    "restore_rng_states",
    "signature_differences",
    "train_fold",
    "train_fold_from_files",
    "training_mirror_axes",
    "training_signature",
    "variant_of",
    "warmup_poly_lr",
]
