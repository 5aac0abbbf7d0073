"""Stopping a training cleanly: SLURM's and the terminal's signals, and augmentation workers that must not
outlive a killed trainer.

SIGTERM / SIGINT / SIGUSR1 (SLURM's wall-time and early-warning signals, Ctrl-C) ask the loop to stop after the
current iteration; the trainer then saves a mid-epoch checkpoint and raises :class:`TrainingInterrupted`, so a
scheduler retry continues where it stopped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger("nnsnake")

INTERRUPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")


class TrainingInterrupted(SystemExit):  # noqa: N818 (it is an exit, like KeyboardInterrupt)
    """Raised after a signal stopped training and its checkpoint was saved; exits with status 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------------------------
# signals


class StopRequest:
    """Signal handler that asks the loop to stop after the current iteration (a second Ctrl-C aborts at once).

    Forked augmentation workers inherit Python's handlers; in them the signal takes its default action, so
    workers still die when SLURM or the terminal signals the whole process group.
    """

    def __init__(self) -> None:
        self.owner_pid = os.getpid()
        self.signum: int | None = None

    def __call__(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.owner_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self.signum is None:
            log.warning(
                "received %s: finishing the current iteration, then saving a checkpoint",
                signal.Signals(signum).name,
            )
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextlib.contextmanager
def handle_signals(stop: StopRequest) -> Iterator[None]:
    """Route :data:`INTERRUPT_SIGNALS` to ``stop`` for the ``with`` block; the previous handlers come back after."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be installed from the main thread
        return
    previous = {}
    for name in INTERRUPT_SIGNALS:
        signum = getattr(signal, name, None)
        if signum is not None:
            previous[signum] = signal.signal(signum, stop)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


# --------------------------------------------------------------------------------------------------------------
# augmentation workers must not outlive a killed trainer


_PR_SET_PDEATHSIG = 1
_orphan_guard = {"active": False, "forking_thread_is_main": False}


def _before_fork() -> None:
    _orphan_guard["forking_thread_is_main"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    """Ask Linux to kill this forked worker when the trainer dies, even by SIGKILL (node loss, kill -9).

    batchgenerators' workers otherwise loop forever on a full queue once their parent is gone. Only forks made
    by the main thread while training runs are covered (the death signal follows the forking thread).
    """
    if not (_orphan_guard["active"] and _orphan_guard["forking_thread_is_main"]):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: workers end with the queue's abort instead
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


@contextlib.contextmanager
def workers_die_with_trainer() -> Iterator[None]:
    """Give processes forked by the main thread inside the ``with`` block a death signal tied to this process."""
    previous = _orphan_guard["active"]
    _orphan_guard["active"] = True
    try:
        yield
    finally:
        _orphan_guard["active"] = previous
