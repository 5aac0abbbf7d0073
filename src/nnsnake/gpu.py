"""Former home of device choice and GPU claiming, kept for old imports for one release: use :mod:`nnsnake.runtime`."""

from __future__ import annotations

from .runtime import DEFAULT_GPU_LOCK_DIR, GPU_LOCK_DIR_ENV, claim_gpu, count_gpus_without_cuda, select_device

__all__ = [
    "DEFAULT_GPU_LOCK_DIR",
    "GPU_LOCK_DIR_ENV",
    "claim_gpu",
    "count_gpus_without_cuda",
    "select_device",
]
