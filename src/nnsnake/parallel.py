"""Process pools for the per-case work of every stage.

Workers are forked on POSIX: a Snakemake ``script:`` runs as ``__main__`` with an injected ``snakemake`` object,
and the ``spawn`` start method would re-import that script in every worker, where the object does not exist.
Worker functions are plain numpy/SimpleITK code, so forking a parent that has used torch is safe here.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def process_pool(max_workers: int) -> ProcessPoolExecutor:
    method = "fork" if os.name == "posix" else "spawn"
    return ProcessPoolExecutor(max_workers, mp_context=multiprocessing.get_context(method))
