"""The per-case process pools: forked workers whose BLAS/OpenMP pools run one thread each."""

from __future__ import annotations

import pytest

from nnsnake.parallel import process_pool

threadpoolctl = pytest.importorskip("threadpoolctl")


def _thread_counts() -> list[int]:
    return [int(info["num_threads"]) for info in threadpoolctl.threadpool_info()]


def test_pool_workers_run_single_threaded_blas() -> None:
    """Set once per worker by the pool's initializer (per case it cost 1.3 ms, as much as the case's work)."""
    if not _thread_counts():
        pytest.skip("no BLAS/OpenMP library loaded to limit")
    with threadpoolctl.threadpool_limits(2), process_pool(2) as pool:  # the workers inherit 2 threads
        counts = [pool.submit(_thread_counts).result() for _ in range(4)]
    assert all(count == 1 for worker in counts for count in worker), counts
