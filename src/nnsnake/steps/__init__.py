"""The entry layer: one function per workflow rule, and the only nnsnake module that ``workflow/scripts/*.py``
and ``nnsnake.cli`` import.

Each function reads its input files, calls the stage's library code and writes its outputs atomically, the file
that marks the step as done last, so everything a rule does can also be run from Python (the CLI and the tests
call these directly). The modules follow the rule groups: :mod:`.data` (verify, fingerprint, plan, splits,
preprocess, preprocess_shard, merge_preprocess_shards), :mod:`.train`, :mod:`.validate`, :mod:`.crossval`
(crossval, ensemble_crossval), :mod:`.select` (select, postprocess), :mod:`.predict` and :mod:`.report`
(crossval_table, postprocessing_table). Importing this package loads no torch and no matplotlib: each function
imports what it needs, so light rules stay light.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from ..errors import NnsnakeError
from .crossval import crossval, ensemble_crossval
from .data import (
    check_dataset,
    derive_plans,
    fingerprint,
    merge_preprocess_shards,
    plan,
    preprocess,
    preprocess_shard,
    splits,
    verify,
)
from .predict import predict, predict_folder, verify_prediction_inputs
from .report import crossval_table, postprocessing_table
from .select import decide_postprocessing, postprocess, select
from .train import train
from .validate import validate, validate_fold

log = logging.getLogger("nnsnake")
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def setup_logging(log_path: str | os.PathLike | None = None) -> None:
    """Log to stderr and, when given, to ``log_path`` (the rule's log file), uncaught errors included."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, handlers=handlers, force=True)

    def log_uncaught(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:  # the reason a job failed belongs in its log file too
        log.critical("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))

    sys.excepthook = log_uncaught


def finish_job_process(child_timeout_s: float = 30.0) -> NoReturn:
    """End a job script's process once its step has returned, without the interpreter's teardown.

    Python's exit finalizes every loaded module: with torch about 2,000, 0.7-0.8 s of every training, validation
    and prediction job (measured on the demo), for nothing a finished job needs: each output was written to a
    temporary file, closed and renamed, and the step shut its worker pools down (nothing of nnsnake's is left to
    atexit). Child processes still exiting are waited for (``child_timeout_s``, then terminated), the log files
    are closed and the standard streams flushed, then the process leaves with status 0. Only for the last line
    of a ``workflow/scripts`` job, never inside Snakemake's own process (:func:`job_log` rules) or a library
    caller's.
    """
    import multiprocessing

    deadline = time.monotonic() + child_timeout_s
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
        if child.is_alive():
            log.warning("worker process %s still running at the end of the job; terminating it", child.pid)
            child.terminate()
            child.join(5)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0)


@contextlib.contextmanager
def job_log(log_path: str | os.PathLike) -> Iterator[None]:
    """While a step runs in a thread of a process it shares (a light rule inside Snakemake's own process), send
    that thread's nnsnake log records, and the error that ends it, to ``log_path``, the rule's log file.

    :func:`setup_logging` is for a job that is a process of its own; this touches neither the root logger nor
    the other threads' records.
    """
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_path, mode="w")
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    except BaseException as exc:
        log.critical("%s: %s", type(exc).__name__, exc, exc_info=True)
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


__all__ = [
    "NnsnakeError",
    "check_dataset",
    "crossval",
    "crossval_table",
    "decide_postprocessing",
    "derive_plans",
    "ensemble_crossval",
    "fingerprint",
    "finish_job_process",
    "job_log",
    "log",
    "merge_preprocess_shards",
    "plan",
    "postprocess",
    "postprocessing_table",
    "predict",
    "predict_folder",
    "preprocess",
    "preprocess_shard",
    "select",
    "setup_logging",
    "splits",
    "train",
    "validate",
    "validate_fold",
    "verify",
    "verify_prediction_inputs",
]
