"""Device choice, and claiming one free GPU on a multi-GPU machine.

Snakemake's ``resources: gpu=1`` only counts GPUs; it does not tell a job *which* one to use, so on a
workstation with several GPUs every training job would land on GPU 0. :func:`claim_gpu` gives each job its own
GPU with one lock file per GPU (``fcntl`` locks vanish with the process, so a killed job never leaves a stale
claim) and pins the job to it through ``CUDA_VISIBLE_DEVICES``. Schedulers (SLURM) set that variable themselves;
then, as on a machine with at most one GPU or none, claiming is a no-op.

``CUDA_VISIBLE_DEVICES`` is read once, when CUDA initialises, so the GPUs are counted without touching CUDA
(``/proc/driver/nvidia/gpus`` or ``nvidia-smi -L``) and the claim must happen before the first ``torch.cuda``
call of the process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger("nnsnake")

DEFAULT_GPU_LOCK_DIR = "/tmp/nnsnake-gpu-locks"
GPU_LOCK_DIR_ENV = "NNSNAKE_GPU_LOCK_DIR"
_POLL_SECONDS = 5.0


def select_device(requested: str = "auto") -> torch.device:
    """The torch device for ``requested``: ``auto`` (CUDA if usable, else CPU), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Asking for a GPU that is not there is an error rather than a silent fall-back to a CPU run that would take
    weeks.
    """
    text = str(requested).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ValueError(
            f"device {requested!r} is not understood; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(
                f"device {requested!r} was requested but torch {torch.__version__} sees no CUDA GPU "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}); install a CUDA build "
                "of torch, or set the training device to cpu / auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RuntimeError(
                f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise RuntimeError(
                "device 'mps' was requested but this torch build or machine has no MPS support"
            )
    elif device.type != "cpu":
        raise ValueError(f"device {requested!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def count_gpus_without_cuda() -> int:
    """Number of NVIDIA GPUs on the machine, found without initialising CUDA in this process."""
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def _try_lock(path: Path) -> int | None:
    """An open descriptor holding an exclusive lock on ``path``, or None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EACCES, errno.EAGAIN):
            return None
        raise
    with contextlib.suppress(OSError):
        os.chmod(path, 0o666)  # other users' jobs must be able to lock it too
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


@contextlib.contextmanager
def claim_gpu(
    lock_dir: str | os.PathLike | None = None, timeout_s: float | None = None
) -> Iterator[int | None]:
    """Hold one free GPU for the duration of the ``with`` block and make it the only visible one.

    Yields the claimed GPU's index, or None when nothing was claimed: ``CUDA_VISIBLE_DEVICES`` already set (a
    scheduler or the user chose), or fewer than two GPUs. When all GPUs are claimed it waits (Snakemake's gpu
    resource normally prevents this; other programs' jobs may not), up to ``timeout_s`` if given.
    ``lock_dir`` defaults to ``$NNSNAKE_GPU_LOCK_DIR`` or /tmp/nnsnake-gpu-locks, shared by all users.
    """
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        yield None
        return
    n_gpus = count_gpus_without_cuda()
    if n_gpus < 2:
        yield None
        return
    folder = Path(lock_dir or os.environ.get(GPU_LOCK_DIR_ENV) or DEFAULT_GPU_LOCK_DIR)
    folder.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(folder, 0o1777)
    start = time.monotonic()
    announced = False
    while True:
        for index in range(n_gpus):
            fd = _try_lock(folder / f"gpu{index}.lock")
            if fd is None:
                continue
            os.environ["CUDA_VISIBLE_DEVICES"] = str(index)
            log.info("claimed GPU %d of %d (lock %s)", index, n_gpus, folder / f"gpu{index}.lock")
            try:
                yield index
            finally:
                os.environ.pop("CUDA_VISIBLE_DEVICES", None)
                os.close(fd)
            return
        if timeout_s is not None and time.monotonic() - start > timeout_s:
            raise TimeoutError(
                f"all {n_gpus} GPUs stayed claimed by other nnsnake jobs for {timeout_s:.0f} s (locks in {folder}); "
                "lower the workflow's --resources gpu=N, or set CUDA_VISIBLE_DEVICES to choose a GPU yourself"
            )
        if not announced:
            log.warning(
                "all %d GPUs are claimed by other jobs (locks in %s); waiting for one", n_gpus, folder
            )
            announced = True
        time.sleep(_POLL_SECONDS)
