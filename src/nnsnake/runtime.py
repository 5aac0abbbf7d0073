"""The process's compute runtime: device choice, GPU claiming, thread limits, determinism, autocast, progress.

Training, validation and prediction all run through these helpers, so a device string, a thread count or an
autocast choice means the same thing in every stage (the names are in CONTRIBUTING.md's glossary).

Claiming a GPU: Snakemake's ``resources: gpu=1`` only counts GPUs; it does not tell a job *which* one to use, so
on a workstation with several GPUs every training job would land on GPU 0. :func:`claim_gpu` gives each job its
own GPU with one lock file per GPU (``fcntl`` locks vanish with the process, so a killed job never leaves a stale
claim) and pins the job to it through ``CUDA_VISIBLE_DEVICES``. Schedulers (SLURM) set that variable themselves;
then, as on a machine with at most one GPU or none, claiming is a no-op.

``CUDA_VISIBLE_DEVICES`` is read once, when CUDA initialises, so the GPUs are counted without touching CUDA
(``/proc/driver/nvidia/gpus`` or ``nvidia-smi -L``) and the claim must happen before the first ``torch.cuda``
call of the process.

torch is imported inside the functions that use it, not at module level: light jobs (verify, fingerprint,
preprocess) use only :func:`progress` from here, and importing torch costs them seconds of start-up.
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
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DeviceError

if TYPE_CHECKING:
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
    import torch

    text = str(requested).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError as err:
        raise ConfigError(
            f"device {requested!r} is not understood; use auto, cpu, cuda, cuda:N or mps"
        ) from err
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device {requested!r} was requested but torch {torch.__version__} sees no CUDA GPU "
                f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')!s}); install a CUDA build "
                "of torch, or set the training device to cpu / auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {requested!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
    elif device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise DeviceError("device 'mps' was requested but this torch build or machine has no MPS support")
    elif device.type != "cpu":
        raise ConfigError(f"device {requested!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
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


# --------------------------------------------------------------------------------------------------------------
# threads, determinism, autocast


def available_cpus() -> int:
    """Cores this process may run on (its affinity mask: what SLURM or taskset granted), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


@contextlib.contextmanager
def limited_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count for the ``with`` block, restored afterwards (it is process-global)."""
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def determinism(device: torch.device, deterministic: bool) -> Iterator[None]:
    """Deterministic algorithms (``deterministic``), else cuDNN autotuning on CUDA, as nnU-Net; restored after.

    Autotuning costs seconds once per process and pays on anisotropic patches (4.35x on SpleenCTCrop 3d, H100).
    ``torch.use_deterministic_algorithms`` imports torch's compiler stack (about 830 modules, 1.2 s) to set an
    inductor flag, so it is called only when the setting changes: never in a default (non-deterministic) run.
    """
    import torch

    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    saved_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA flags integer ops such as bincount (exact, but without a "deterministic" implementation) as errors
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    elif device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        if deterministic:
            torch.use_deterministic_algorithms(saved_deterministic, warn_only=saved_warn_only)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved_cudnn


@contextlib.contextmanager
def compute_device(device: str, threads: int | None = None) -> Iterator[torch.device]:
    """The torch device for an inference job, with a claimed GPU and the thread count set (restored after).

    On CUDA the CPU only feeds the GPU, so torch gets one thread; on the CPU ``threads`` or every available core.
    """
    with contextlib.ExitStack() as stack:
        if str(device).strip().lower() != "cpu":
            stack.enter_context(claim_gpu())
        selected = select_device(device)
        count = 1 if selected.type == "cuda" else int(threads or available_cpus())
        stack.enter_context(limited_threads(count))
        yield selected


def autocast_dtype(device: torch.device, autocast: str | bool | None) -> torch.dtype | None:
    """The autocast dtype of an ``autocast`` choice on ``device``, or None for full precision.

    ``auto`` / None: fp16 on CUDA (nnU-Net's rule), none elsewhere; ``fp16``, ``bf16``, ``off``; True means the
    device's reduced type (fp16 on CUDA, bf16 elsewhere), False none. fp16 on the CPU is refused.
    """
    import torch

    if autocast is None or autocast == "auto":
        return torch.float16 if device.type == "cuda" else None
    if autocast is True:
        return torch.float16 if device.type == "cuda" else torch.bfloat16
    if autocast is False or autocast == "off":
        return None
    if autocast == "fp16":
        if device.type != "cuda":
            raise ConfigError(f"autocast fp16 is not supported on {device.type}; use bf16 or off")
        return torch.float16
    if autocast == "bf16":
        return torch.bfloat16
    raise ConfigError(f"autocast {autocast!r} is not understood; use auto, off, fp16 or bf16")


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``dtype`` on ``device``, or a no-op for full precision."""
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# progress


class _NoProgress:
    """Stands in for a bar where none is shown: accepts updates, iterates its iterable unchanged."""

    def __init__(self, iterable: Iterable[Any] | None = None) -> None:
        self._iterable = iterable

    def __iter__(self) -> Iterator[Any]:
        return iter(self._iterable if self._iterable is not None else ())

    def __enter__(self) -> _NoProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        pass

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


def progress(
    iterable: Iterable[Any] | None = None,
    *,
    total: int | None = None,
    description: str | None = None,
    unit: str = "case",
    enabled: bool = True,
    initial: int = 0,
    leave: bool = True,
    terminal_only: bool = False,
) -> Any:
    """The one progress bar of nnsnake (tqdm on stderr): wraps ``iterable`` or counts ``update`` calls.

    ``enabled=False`` gives a no-op with the same interface. ``terminal_only`` hides the bar when stderr is not a
    terminal (a job's log file), where per-step log lines say enough.
    """
    if not enabled or (terminal_only and not sys.stderr.isatty()):
        return _NoProgress(iterable)
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, unit=unit, initial=initial, leave=leave)
