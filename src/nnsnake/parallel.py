"""Process pools for the per-case work of every stage.

Workers are forked on POSIX: a Snakemake ``script:`` runs as ``__main__`` with an injected ``snakemake`` object,
and the ``spawn`` start method would re-import that script in every worker, where the object does not exist.
Worker functions are plain numpy/SimpleITK code, so forking a parent that has used torch is safe here.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from .deprecation import warn_deprecated

_worker_thread_limits: object = None  # kept so the limits last for the worker's life


def _one_thread_per_worker() -> None:
    """Pool initializer: the workers are the parallelism, so the BLAS/OpenMP thread pools they inherit run one
    thread each (more would only oversubscribe the cores). Set once per worker: threadpoolctl scans the loaded
    libraries on each call, about 1.3 ms, as long as a small Hippocampus case's resampling."""
    global _worker_thread_limits
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl comes with the scientific stack (scikit-image)
        return
    _worker_thread_limits = threadpool_limits(1)


def process_pool(max_workers: int) -> ProcessPoolExecutor:
    """A pool of ``max_workers`` processes, forked where the platform allows (see the module docstring), each
    with single-threaded BLAS/OpenMP."""
    method = "fork" if os.name == "posix" else "spawn"
    return ProcessPoolExecutor(
        max_workers, mp_context=multiprocessing.get_context(method), initializer=_one_thread_per_worker
    )


def processes_argument(processes: int, num_processes: int | None, function: str) -> int:
    """``processes``, or the deprecated ``num_processes`` keyword when a caller still passes it (one release)."""
    if num_processes is None:
        return processes
    warn_deprecated(f"{function}(num_processes=...) is deprecated; use processes", stacklevel=3)
    return num_processes
