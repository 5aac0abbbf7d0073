"""The trainer's resumable state and the file primitives that keep it safe: atomic saves, the fold lock and
the global random states.

``checkpoint_latest.pt`` is a plain ``torch.save`` dict of tensors and JSON-like values, loadable with
``torch.load(weights_only=True)``; :class:`TrainingState` is its one in-memory form. Its keys are the on-disk
format (``STATE_FORMAT``): states written by earlier versions must still load.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import random
import socket
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import TrainingLockedError
from ..jsonio import atomic_open
from .settings import STATE_FORMAT

log = logging.getLogger("nnsnake")


# --------------------------------------------------------------------------------------------------------------
# the resumable state


@dataclass
class TrainingState:
    """Where a run is: the next epoch and iteration, the log, the moving average and the best epoch, plus, in a
    snapshot that is written or was read, the network, optimizer, grad scaler and random states.

    The trainer keeps the progress fields current; the tensor fields are None except in a snapshot (weights
    live in the network and optimizer while training runs). ``partial`` holds the sums of an epoch that a signal
    interrupted, so the resumed epoch logs the same totals.
    """

    signature: dict[str, Any] = field(default_factory=dict)
    epoch: int = 0  # next epoch to run
    iteration: int = 0  # next training iteration inside ``epoch``
    partial: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    ema: float | None = None
    best_ema: float | None = None
    best_epoch: int | None = None
    best_file: str | None = None
    attempt: int = 1
    network_weights: Mapping[str, torch.Tensor] | None = None
    optimizer_state: dict[str, Any] | None = None
    grad_scaler_state: dict[str, Any] | None = None
    rng: dict[str, Any] | None = None
    saved_at: str | None = None
    nnsnake_version: str | None = None

    @property
    def finished(self) -> bool:
        """Every epoch the signature asks for has run."""
        epochs = self.signature.get("epochs")
        return epochs is not None and self.epoch == epochs

    def to_checkpoint(self) -> dict[str, Any]:
        """The ``checkpoint_latest.pt`` dict (the keys and their order are the on-disk format)."""
        return {
            "format": STATE_FORMAT,
            "signature": self.signature,
            "network_weights": self.network_weights,
            "optimizer_state": self.optimizer_state,
            "grad_scaler_state": self.grad_scaler_state,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "partial": dict(self.partial),
            "history": self.history,
            "ema": self.ema,
            "best_ema": self.best_ema,
            "best_epoch": self.best_epoch,
            "best_file": self.best_file,
            "attempt": self.attempt,
            "rng": self.rng,
            "saved_at": self.saved_at,
            "nnsnake_version": self.nnsnake_version,
        }

    @classmethod
    def from_checkpoint(cls, checkpoint: Mapping[str, Any]) -> TrainingState:
        """The state of a loaded ``checkpoint_latest.pt`` (keys that older versions did not write get defaults)."""
        return cls(
            signature=dict(checkpoint.get("signature") or {}),
            epoch=int(checkpoint["epoch"]),
            iteration=int(checkpoint["iteration"]),
            partial=dict(checkpoint.get("partial") or {}),
            history=list(checkpoint["history"]),
            ema=checkpoint["ema"],
            best_ema=checkpoint["best_ema"],
            best_epoch=checkpoint["best_epoch"],
            best_file=checkpoint["best_file"],
            attempt=int(checkpoint.get("attempt", 1)),
            network_weights=checkpoint["network_weights"],
            optimizer_state=checkpoint["optimizer_state"],
            grad_scaler_state=checkpoint.get("grad_scaler_state"),
            rng=checkpoint["rng"],
            saved_at=checkpoint.get("saved_at"),
            nnsnake_version=checkpoint.get("nnsnake_version"),
        )

    def progress_only(self) -> TrainingState:
        """A copy without the tensor fields (what the trainer keeps once a snapshot was applied or written)."""
        return dataclasses.replace(
            self, network_weights=None, optimizer_state=None, grad_scaler_state=None, rng=None
        )


# --------------------------------------------------------------------------------------------------------------
# files: atomic torch.save, lock


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` through a temporary file in the same folder and an atomic rename (never a partial file)."""
    with atomic_open(path) as fh:
        torch.save(obj, fh)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path``; if another process has it, fail at once naming the holder,
    or with ``wait`` log the holder and block until it is gone.

    POSIX record locks are released by the kernel when the holder dies (no stale locks after kill -9) and work
    on NFSv4, where two submissions of one fold on different nodes would otherwise collide. Waiting is what a
    rerun needs after snakemake itself was killed: its training jobs live on and finish (or die) first.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno not in (errno.EACCES, errno.EAGAIN):
                raise
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "unknown process"
            if wait:
                log.warning(
                    "%s: this fold is already being trained by %s (left running by a killed snakemake?); "
                    "waiting for it to finish",
                    path,
                    holder,
                )
                fcntl.lockf(fd, fcntl.LOCK_EX)
            else:
                raise TrainingLockedError(
                    f"{path}: this fold is already being trained by {holder}; wait for it to finish or stop it "
                    "(two copies would overwrite each other's checkpoints)"
                ) from None
        os.ftruncate(fd, 0)
        job = os.environ.get("SLURM_JOB_ID")
        os.pwrite(
            fd,
            f"pid {os.getpid()} on {socket.gethostname()}{f' (SLURM job {job})' if job else ''}\n".encode(),
            0,
        )
        yield
    finally:
        os.close(fd)  # closing releases the lock


# --------------------------------------------------------------------------------------------------------------
# random states


def capture_rng_states() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) global random states as tensors (weights_only-loadable)."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    states: dict[str, Any] = {
        "python_version": int(version),
        "python_internal": torch.tensor(internal, dtype=torch.int64),
        "python_gauss": None if gauss is None else float(gauss),
        "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_position": int(position),
        "numpy_has_gauss": int(has_gauss),
        "numpy_cached_gaussian": float(cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Set the global random states captured by :func:`capture_rng_states` (CUDA's only on the same GPU count)."""
    random.setstate(
        (
            states["python_version"],
            tuple(int(v) for v in states["python_internal"].tolist()),
            states["python_gauss"],
        )
    )
    np.random.set_state(  # noqa: NPY002
        (
            "MT19937",
            states["numpy_keys"].numpy().astype(np.uint32),
            states["numpy_position"],
            states["numpy_has_gauss"],
            states["numpy_cached_gaussian"],
        )
    )
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
