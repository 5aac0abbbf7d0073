"""The nnU-Net trainer (method §5): one (configuration, fold) trained from preprocessed cases, resumably.

The method is nnU-Net's: SGD with Nesterov momentum 0.99, poly learning rate set at the start of each epoch,
deep-supervision Dice + CE loss, gradient clipping at 12, 250 training and 50 validation iterations per epoch,
a global pseudo-Dice over the validation batches and its exponential moving average. What is ours is how the run
survives:

* **State lives in ``state_dir``** (under ``work/``, never a Snakemake output, since Snakemake deletes a job's
  outputs when it starts): ``checkpoint_latest.pt`` holds weights, optimizer, grad scaler, the next epoch, the
  log history, the best EMA and every random state. It is written atomically (temporary file + ``os.replace``)
  every ``checkpoint_every`` epochs, so a job killed at any instant resumes from the last complete checkpoint
  with the same learning-rate schedule and an unbroken log.
* **A signature** (hash of the resolved configuration, the labels, the fold's cases and the settings that define
  the run, e.g. epochs) is stored with the state; a different run refuses to resume it and says what differs.
* **SIGTERM / SIGINT / SIGUSR1** (SLURM's wall-time and early-warning signals, Ctrl-C) finish the current
  iteration, save a mid-epoch checkpoint and exit non-zero, so a scheduler retry continues where it stopped.
* **One process per fold**: an exclusive lock file in ``state_dir`` stops a second copy of the same training.
* **Outputs last**: ``model_best.pt``, ``progress.png``, ``log.json`` and finally ``model_final.pt`` are written
  into ``output_dir`` atomically after the last epoch. A copy of the log is refreshed in ``state_dir`` after
  every epoch and one of the plot at most every minute, so a long run can be watched.
* **Deterministic mode** seeds everything and rebuilds the data iterators each epoch from ``(seed, epoch)``, so a
  resumed run ends bit-identical to an uninterrupted one (on CPU; on CUDA as far as cuDNN allows).

Checkpoints are plain ``torch.save`` dicts of tensors and JSON-like values, loadable with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import functools
import hashlib
import logging
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .errors import SignatureMismatchError, TrainingLockedError
from .jsonio import atomic_open, dumps, read_json, write_json
from .network import channels_last_format

log = logging.getLogger("nnsnake")

STATE_FORMAT = "nnsnake-training-state-1"
MODEL_FORMAT = "nnsnake-model-1"
STATE_FILE = "checkpoint_latest.pt"
LOCK_FILE = "training.lock"
BEST_FILE_PREFIX = "checkpoint_best_epoch"
MODEL_FINAL = "model_final.pt"
MODEL_BEST = "model_best.pt"
LOG_JSON = "log.json"
PROGRESS_PNG = "progress.png"

POLY_EXPONENT = 0.9
EMA_MOMENTUM = 0.9  # ema = 0.9 * previous + 0.1 * current (§5.6)
PLOT_INTERVAL_S = 60.0  # state_dir/progress.png is redrawn at most this often during a run
INTERRUPT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
AMP_CHOICES = ("auto", "off", "fp16", "bf16")


# --------------------------------------------------------------------------------------------------------------
# settings


@dataclass
class TrainingSettings:
    """Everything about a training run that is not in the plans. Defaults are nnU-Net's (§5.1).

    ``threads`` is the number of CPU cores the job may use (Snakemake's ``threads``); ``num_workers`` the number
    of augmentation worker processes (None: chosen from the device and ``threads``, see
    :func:`default_num_workers`). ``amp``: ``auto`` = fp16 autocast + GradScaler on CUDA, full precision on CPU;
    ``bf16`` = bfloat16 autocast (CPU or CUDA), ``fp16``, or ``off``. ``compile``: None = on for CUDA (not in
    deterministic mode), off on CPU. ``channels_last``: None = on for the CPU and for 2D configurations on CUDA.
    """

    epochs: int = 1000
    iterations_per_epoch: int = 250
    val_iterations: int = 50
    checkpoint_every: int = 1
    initial_lr: float = 1e-2
    weight_decay: float = 3e-5
    momentum: float = 0.99
    grad_clip_norm: float = 12.0
    threads: int | None = None
    num_workers: int | None = None
    device: str = "auto"
    deterministic: bool = False
    seed: int = 12345
    amp: str = "auto"
    compile: bool | None = None
    channels_last: bool | None = None
    save_best: bool = True
    gpu_lock_dir: str | None = None

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "iterations_per_epoch", "val_iterations"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if int(self.checkpoint_every) < 0:
            problems.append(
                f"checkpoint_every must be >= 0 epochs (0: only at the end and on signals), got {self.checkpoint_every}"
            )
        if self.initial_lr <= 0:
            problems.append(f"initial_lr must be > 0 (got {self.initial_lr})")
        if self.threads is not None and int(self.threads) < 1:
            problems.append(f"threads must be >= 1 (got {self.threads})")
        if self.num_workers is not None and int(self.num_workers) < 0:
            problems.append(f"num_workers must be >= 0 (got {self.num_workers})")
        if self.amp not in AMP_CHOICES:
            problems.append(f"amp must be one of {AMP_CHOICES} (got {self.amp!r})")
        if problems:
            raise ValueError("training settings: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> TrainingSettings:
        """Settings from a config mapping (e.g. the workflow's ``training:`` section); unknown keys are errors."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"training settings: unknown key(s) {unknown}; known keys are {sorted(known)}")
        return cls(**values)


def default_num_workers(device_type: str, threads: int) -> int:
    """Augmentation worker processes for a job with ``threads`` cores.

    On a GPU the main process only feeds the device, so all but one core augment (nnU-Net's cap of 12 kept).
    On CPU one worker per four cores, at least one, builds the next batch while the network (on all cores)
    trains, as nnU-Net does; the batches are cheap next to a CPU training step.
    """
    threads = max(1, int(threads))
    if device_type == "cuda":
        return min(12, max(1, threads - 1))
    return 0 if threads == 1 else max(1, threads // 4)


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover (macOS)
        return os.cpu_count() or 1


# --------------------------------------------------------------------------------------------------------------
# schedule and metrics (§5.1, §5.6)


def poly_lr(epoch: int, epochs: int, initial_lr: float = 1e-2, exponent: float = POLY_EXPONENT) -> float:
    """Learning rate of ``epoch``: ``initial_lr * (1 - epoch / epochs) ** 0.9``, set at the start of the epoch."""
    return initial_lr * (1 - epoch / epochs) ** exponent


def ema_update(previous: float | None, value: float, momentum: float = EMA_MOMENTUM) -> float:
    """Moving average of the mean pseudo-Dice; the first epoch takes the raw value.

    A NaN value (no foreground predicted or present in any validation batch) keeps the previous average instead
    of poisoning every later epoch.
    """
    if previous is None or math.isnan(previous):
        return value
    if math.isnan(value):
        return previous
    return momentum * previous + (1 - momentum) * value


def global_dice(tp: Sequence[float], fp: Sequence[float], fn: Sequence[float]) -> list[float]:
    """Per-class ``2TP / (2TP + FP + FN)`` from counts summed over all validation batches; NaN where undefined."""
    out = []
    for t, p, n in zip(tp, fp, fn, strict=True):
        denominator = 2 * float(t) + float(p) + float(n)
        out.append(2 * float(t) / denominator if denominator > 0 else float("nan"))
    return out


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else float("nan")


# --------------------------------------------------------------------------------------------------------------
# labels


@dataclass(frozen=True)
class _Labels:
    """What the network outputs, from dataset.json: labels (softmax) or regions (sigmoid), and the ignore label."""

    num_outputs: int
    foreground_labels: list[int]
    regions: list[int | list[int]] | None
    ignore_label: int | None
    names: list[str]  # one per foreground class / region, for the log


def _labels(dataset_json: Mapping[str, Any]) -> _Labels:
    labels = dict(dataset_json["labels"])
    ignore = labels.pop("ignore", None)
    ignore_label = int(ignore) if ignore is not None else None
    has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for v in labels.values())

    def as_list(v: Any) -> list[int]:
        return [int(i) for i in v] if isinstance(v, (list, tuple)) else [int(v)]

    foreground = sorted({i for v in labels.values() for i in as_list(v)} - {0})
    if has_regions:
        named = [(k, v) for k, v in labels.items() if as_list(v) != [0]]
        regions = [as_list(v) if len(as_list(v)) > 1 else as_list(v)[0] for _, v in named]
        return _Labels(len(regions), foreground, regions, ignore_label, [k for k, _ in named])
    by_value = {as_list(v)[0]: k for k, v in labels.items()}
    return _Labels(len(labels), foreground, None, ignore_label, [by_value[v] for v in foreground])


# --------------------------------------------------------------------------------------------------------------
# hashing, signature


def _sha256(obj: Any) -> str:
    return hashlib.sha256(dumps(obj).encode("utf-8")).hexdigest()


_SIGNATURE_MEANING = {
    "format": "the checkpoint format of nnsnake",
    "configuration": "the configuration name",
    "configuration_sha256": "the resolved configuration in plans.json (patch, batch size, network, spacing...)",
    "labels_sha256": "labels / channel_names / regions_class_order in dataset.json",
    "fold": "the fold",
    "cases_sha256": "the fold's training/validation cases (splits.json)",
    "data_sha256": "the preprocessed images/labels of the fold's cases",
    "previous_stage_sha256": "the previous stage's (3d_lowres) predictions of the fold's cases",
}


def training_signature(
    configuration: str,
    config: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    fold: int | str,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    settings: TrainingSettings,
    num_workers: int,
    data_sha256: str | None = None,
    previous_stage_sha256: str | None = None,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that defines the run's trajectory.

    Settings that only change speed (threads, device, amp, compile) may change between attempts; in
    deterministic mode the seed and the (resolved) number of workers define the batch stream and are part of it.
    """
    labels = {k: dataset_json.get(k) for k in ("labels", "channel_names", "regions_class_order")}
    return {
        "format": STATE_FORMAT,
        "configuration": configuration,
        "configuration_sha256": _sha256(config),
        "labels_sha256": _sha256(labels),
        "fold": str(fold),
        "cases_sha256": _sha256({"train": list(train_ids), "val": list(val_ids)}),
        "data_sha256": data_sha256,
        **({"previous_stage_sha256": previous_stage_sha256} if previous_stage_sha256 else {}),
        "epochs": int(settings.epochs),
        "iterations_per_epoch": int(settings.iterations_per_epoch),
        "val_iterations": int(settings.val_iterations),
        "initial_lr": float(settings.initial_lr),
        "weight_decay": float(settings.weight_decay),
        "momentum": float(settings.momentum),
        "grad_clip_norm": float(settings.grad_clip_norm),
        "deterministic": bool(settings.deterministic),
        "seed": int(settings.seed) if settings.deterministic else None,
        "num_workers": int(num_workers) if settings.deterministic else None,
    }


def preprocessed_data_digest(preprocessed_dir: str | os.PathLike, case_ids: Sequence[str]) -> str:
    """One digest of the stored content digests of these cases: retraining follows a changed image or label."""
    from .preprocessing import case_files

    digests = {}
    for case_id in sorted(case_ids):
        record = read_json(case_files(preprocessed_dir, case_id)["properties"])
        digests[case_id] = record.get("sha256")
    return _sha256(digests)


def previous_stage_digest(files: Mapping[str, Path]) -> str:
    """One digest of the previous-stage predictions' contents: a cascade run restarts when lowres changed."""
    digests = {}
    for case_id in sorted(files):
        sha = hashlib.sha256()
        with open(files[case_id], "rb") as fh:
            for block in iter(functools.partial(fh.read, 1 << 20), b""):
                sha.update(block)
        digests[case_id] = sha.hexdigest()
    return _sha256(digests)


def signature_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable list of what differs between a stored and the current signature."""
    out = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if key.endswith("_sha256") or key in _SIGNATURE_MEANING:
            out.append(f"{_SIGNATURE_MEANING.get(key, key)} changed")
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out


class TrainingInterrupted(SystemExit):  # noqa: N818 (it is an exit, like KeyboardInterrupt)
    """Raised after a signal stopped training and its checkpoint was saved; exits with status 128 + signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(128 + int(signum))
        self.signum = int(signum)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------------------------
# files: atomic torch.save, lock, random states


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


# --------------------------------------------------------------------------------------------------------------
# signals


class _StopRequest:
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
def _handle_signals(stop: _StopRequest) -> Iterator[None]:
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
def _workers_die_with_trainer() -> Iterator[None]:
    previous = _orphan_guard["active"]
    _orphan_guard["active"] = True
    try:
        yield
    finally:
        _orphan_guard["active"] = previous


# --------------------------------------------------------------------------------------------------------------
# progress plot


def plot_progress(history: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> None:
    """Draw losses, pseudo-Dice (mean, per class, EMA), learning rate and epoch time; written atomically.

    Uses matplotlib's object API with the Agg canvas, so no display and no global backend switch are needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    epochs = [e["epoch"] for e in history]
    figure = Figure(figsize=(10, 12), dpi=80)
    FigureCanvasAgg(figure)
    ax_loss, ax_dice, ax_lr, ax_time = figure.subplots(4, 1, sharex=True)

    def series(key: str) -> list[float]:
        return [float("nan") if e.get(key) is None else float(e[key]) for e in history]

    ax_loss.plot(epochs, series("train_loss"), color="tab:blue", label="train loss")
    ax_loss.plot(epochs, series("val_loss"), color="tab:red", label="val loss")
    ax_loss.set_ylabel("loss")
    ax_loss.legend(loc="upper right")
    names = list(history[-1].get("pseudo_dice", {})) if history else []
    for name in names:
        values = [
            float("nan") if e["pseudo_dice"].get(name) is None else e["pseudo_dice"][name] for e in history
        ]
        ax_dice.plot(epochs, values, linewidth=0.8, alpha=0.6, label=f"{name}")
    ax_dice.plot(epochs, series("mean_fg_dice"), color="tab:green", linestyle=":", label="mean pseudo Dice")
    ax_dice.plot(epochs, series("ema_pseudo_dice"), color="tab:green", linewidth=2, label="EMA pseudo Dice")
    ax_dice.set_ylabel("pseudo Dice")
    ax_dice.legend(loc="lower right", fontsize="small")
    ax_lr.plot(epochs, series("lr"), color="black")
    ax_lr.set_ylabel("learning rate")
    ax_time.plot(epochs, series("epoch_time_s"), color="tab:purple")
    ax_time.set_ylabel("epoch time [s]")
    ax_time.set_xlabel("epoch")
    ax_time.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
    for axis in (ax_loss, ax_dice, ax_lr, ax_time):
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_open(path, fsync=False) as fh:
        figure.savefig(fh, format="png")


# --------------------------------------------------------------------------------------------------------------
# runtime choices


@dataclass
class _Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None
    use_grad_scaler: bool
    compile: bool
    channels_last: bool
    num_workers: int
    torch_threads: int

    def describe(self) -> str:
        amp = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[self.amp_dtype]
        return (
            f"device {self.device}, {amp}{' + grad scaler' if self.use_grad_scaler else ''}, "
            f"compile {'on' if self.compile else 'off'}, channels-last {'on' if self.channels_last else 'off'}, "
            f"{self.num_workers} augmentation worker(s), {self.torch_threads} torch thread(s)"
        )


def _runtime(settings: TrainingSettings, device: torch.device, config_patch_size: Sequence[int]) -> _Runtime:
    threads = int(settings.threads) if settings.threads is not None else available_cpus()
    workers = (
        int(settings.num_workers)
        if settings.num_workers is not None
        else default_num_workers(device.type, threads)
    )
    amp = settings.amp
    if amp == "auto":
        amp = "fp16" if device.type == "cuda" else "off"
    amp_dtype = {"off": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]
    if amp_dtype == torch.float16 and device.type == "cpu":
        raise ValueError("amp fp16 is not supported on CPU; use bf16 or off")
    compile_on = (
        settings.compile
        if settings.compile is not None
        else (device.type == "cuda" and not settings.deterministic)
    )
    # Measured on an H100 (benchmarks/train.py --gpu): channels-last made the compiled 3D U-Net slower (48 vs
    # 51 it/s on Hippocampus), so on CUDA it is used for 2D convolutions only. On the CPU (oneDNN) it makes the
    # 3D step about 15 % cheaper together with network.InstanceNorm's group-norm path.
    channels_last = (
        settings.channels_last
        if settings.channels_last is not None
        else (device.type == "cpu" or (device.type == "cuda" and len(config_patch_size) == 2))
    )
    # On the CPU the network gets every core and the workers share them: batches of nnU-Net's augmentation are
    # cheap next to a training step, so a core reserved for them mostly idles (idle 2-core machine, Hippocampus
    # 3d_fullres: 1 worker + 1 torch thread 8.7 s/iteration, 1 worker + 2 threads 5.4 s).
    torch_threads = threads if device.type == "cpu" else max(1, min(threads, 4))
    return _Runtime(
        device,
        amp_dtype,
        amp_dtype == torch.float16 and device.type == "cuda",
        bool(compile_on),
        bool(channels_last),
        workers,
        torch_threads,
    )


@contextlib.contextmanager
def _process_settings(runtime: _Runtime, settings: TrainingSettings) -> Iterator[None]:
    """Thread count and determinism flags for the run, restored afterwards (they are process-global)."""
    saved_threads = torch.get_num_threads()
    saved_deterministic = torch.are_deterministic_algorithms_enabled()
    saved_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    torch.set_num_threads(runtime.torch_threads)
    if settings.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # CUDA flags integer ops such as bincount (exact, but without a "deterministic" implementation) as errors
        torch.use_deterministic_algorithms(True, warn_only=runtime.device.type == "cuda")
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    elif runtime.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_deterministic)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved_cudnn


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------------------
# the trainer


def previous_stage_files(
    folders: str | os.PathLike | Sequence[str | os.PathLike], case_ids: Sequence[str]
) -> dict[str, Path]:
    """Where each case's previous-stage prediction ``<case>.npy`` is, searched in one folder or several.

    The workflow keeps the 3d_lowres out-of-fold predictions one folder per fold (each a declared output of that
    fold's validation), so the cascade looks a case up in all of them; a case found in two folders is an error
    (two folds claim to have held it out). Raises ``FileNotFoundError`` naming the missing cases.
    """
    if isinstance(folders, (str, os.PathLike)):
        folders = [folders]
    found: dict[str, Path] = {}
    wanted = set(case_ids)
    for folder in map(Path, folders):
        for path in sorted(folder.glob("*.npy")) if folder.is_dir() else []:
            case_id = path.name[: -len(".npy")]
            if case_id not in wanted:
                continue
            if case_id in found:
                raise ValueError(
                    f"previous-stage prediction of {case_id} is in both {found[case_id].parent} and "
                    f"{folder}: the folds' validation sets overlap; recreate splits.json"
                )
            found[case_id] = path
    missing = [c for c in case_ids if c not in found]
    if missing:
        names = ", ".join(str(f) for f in folders)
        raise FileNotFoundError(
            f"previous-stage predictions missing for {len(missing)} case(s) (e.g. {', '.join(missing[:5])}) in "
            f"{names}; every fold of the previous stage must be trained and validated first"
        )
    return found


def _load_previous_stage(files: Mapping[str, Path], case_id: str) -> np.ndarray:
    """A cascade input: the 3d_lowres out-of-fold prediction of a case at the fullres preprocessed shape."""
    return np.load(files[case_id], mmap_mode="r", allow_pickle=False)


def _as_numpy(counts: Any) -> np.ndarray:
    return counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)


def _utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _finite_or_none(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


class _Trainer:
    """One training run; :func:`train_fold` is the public entry point."""

    def __init__(
        self,
        preprocessed_dir: Path,
        plans: Mapping[str, Any],
        configuration: str,
        dataset_json: Mapping[str, Any],
        train_ids: list[str],
        val_ids: list[str],
        fold: int | str,
        output_dir: Path,
        state_dir: Path,
        settings: TrainingSettings,
        runtime: _Runtime,
        config: dict[str, Any],
        previous_stage: Mapping[str, Path] | None,
        epoch_callback: Callable[[dict[str, Any]], None] | None,
        stop: _StopRequest,
    ) -> None:
        from .loss import build_loss
        from .network import build_network, deep_supervision_scales, deep_supervision_weights

        self.preprocessed_dir = preprocessed_dir
        self.plans = plans
        self.configuration = configuration
        self.dataset_json = dataset_json
        self.train_ids, self.val_ids = train_ids, val_ids
        self.fold = fold
        self.output_dir, self.state_dir = output_dir, state_dir
        self.settings, self.runtime, self.config = settings, runtime, config
        self.epoch_callback = epoch_callback
        self.device = runtime.device
        self.labels = _labels(dataset_json)
        self.is_cascaded = bool(config.get("previous_stage"))
        self.previous_stage_files = dict(previous_stage) if self.is_cascaded and previous_stage else None
        self.patch_size = [int(p) for p in config["patch_size"]]
        self.signature = training_signature(
            configuration,
            config,
            dataset_json,
            fold,
            train_ids,
            val_ids,
            settings,
            runtime.num_workers,
            preprocessed_data_digest(preprocessed_dir, train_ids + val_ids),
            previous_stage_digest(self.previous_stage_files) if self.previous_stage_files else None,
        )

        self.num_input_channels = len(dataset_json["channel_names"]) + (
            len(self.labels.foreground_labels) if self.is_cascaded else 0
        )
        architecture = config["architecture"]
        strides = (architecture.get("arch_kwargs") or architecture)["strides"]
        self.ds_scales = deep_supervision_scales(strides)
        if settings.deterministic:
            _seed_everything(settings.seed)
        self.network = build_network(architecture, self.num_input_channels, self.labels.num_outputs, True)
        self.network.to(self.device)
        if runtime.channels_last:
            self.network.to(memory_format=self._memory_format())
        self.model: torch.nn.Module = torch.compile(self.network) if runtime.compile else self.network
        self.optimizer = torch.optim.SGD(
            self.network.parameters(),
            lr=settings.initial_lr,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            nesterov=True,
        )
        self.grad_scaler = torch.amp.GradScaler("cuda") if runtime.use_grad_scaler else None
        weights = deep_supervision_weights(len(self.ds_scales))
        try:
            self.loss = build_loss(
                batch_dice=bool(config.get("batch_dice", False)),
                ignore_label=self.labels.ignore_label,
                deep_supervision_weights=[float(w) for w in weights],
                **self._regions_kwargs(),
            )
        except TypeError as err:
            if self.labels.regions is None:
                raise
            raise NotImplementedError(
                "dataset.json defines regions (label values that are lists), but nnsnake.loss has no region-based "
                f"loss (BCE + sigmoid Dice, method §5.3) yet ({err})"
            ) from err

        # progress of the run (restored on resume)
        self.epoch = 0  # next epoch to run
        self.iteration = 0  # next training iteration inside ``epoch``
        self.partial: dict[str, float] = {}
        self.history: list[dict[str, Any]] = []
        self.ema: float | None = None
        self.best_ema: float | None = None
        self.best_epoch: int | None = None
        self.best_file: str | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None  # in memory until the next checkpoint
        self.attempt = 1
        self.stop = stop  # set by the signal handlers that train_fold installs
        self._persistent_iterators: tuple[Any, Any] | None = None
        self._last_plot = -math.inf

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _memory_format(self) -> torch.memory_format:
        return channels_last_format(len(self.patch_size))

    def _regions_kwargs(self) -> dict[str, Any]:
        return {"regions": self.labels.regions} if self.labels.regions is not None else {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.runtime.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.runtime.amp_dtype)

    def _weights_cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}

    # ---- data -------------------------------------------------------------------------------------------------
    def _make_iterators(self, seed: int | None) -> tuple[Any, Any]:
        from .augmentation import make_data_iterators
        from .preprocessing import load_case

        load_previous = None
        if self.is_cascaded:
            load_previous = functools.partial(_load_previous_stage, self.previous_stage_files)
        return make_data_iterators(
            self.train_ids,
            self.val_ids,
            functools.partial(load_case, str(self.preprocessed_dir), mmap=True),
            self.patch_size,
            int(self.config["batch_size"]),
            self.ds_scales,
            self.runtime.num_workers,
            use_mask_for_norm=self.config.get("use_mask_for_norm"),
            is_cascaded=self.is_cascaded,
            foreground_labels=self.labels.foreground_labels,
            regions=self.labels.regions,
            ignore_label=self.labels.ignore_label,
            load_previous_stage=load_previous,
            seed=seed,
            pin_memory=self.device.type == "cuda",
        )

    @contextlib.contextmanager
    def _epoch_iterators(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """Deterministic runs draw each epoch's batches from ``(seed, epoch)``: resumable without loader state."""
        if self.settings.deterministic:
            from .sampling import derive_seed

            train, val = self._make_iterators(derive_seed(self.settings.seed, 7, epoch))
            try:
                yield train, val
            finally:
                train.close()
                val.close()
        else:
            if self._persistent_iterators is None:
                self._persistent_iterators = self._make_iterators(None)
            yield self._persistent_iterators

    def _close_iterators(self) -> None:
        if self._persistent_iterators is not None:
            for iterator in self._persistent_iterators:
                iterator.close()
            self._persistent_iterators = None

    def _next_batch(self, iterator: Iterator[dict]) -> dict | None:
        """The next batch, or None when a stop was requested while waiting (workers may have died with it)."""
        try:
            return next(iterator)
        except Exception:
            if self.stop.requested:
                return None
            raise

    def _to_device(self, batch: dict) -> tuple[torch.Tensor, list[torch.Tensor]]:
        non_blocking = self.device.type == "cuda"
        data = batch["data"].to(self.device, non_blocking=non_blocking)
        if self.runtime.channels_last:
            data = data.contiguous(memory_format=self._memory_format())
        target = batch["target"]
        if not isinstance(target, list):
            target = [target]
        return data, [t.to(self.device, non_blocking=non_blocking) for t in target]

    # ---- steps ------------------------------------------------------------------------------------------------
    def train_step(self, batch: dict) -> torch.Tensor:
        data, target = self._to_device(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            output = self.model(data)
            loss = self.loss(output, target)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.settings.grad_clip_norm)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.settings.grad_clip_norm)
            self.optimizer.step()
        return loss.detach()

    def validation_step(self, batch: dict) -> tuple[torch.Tensor, Any, Any, Any]:
        from .loss import pseudo_dice_counts

        data, target = self._to_device(batch)
        with self._autocast():
            output = self.model(data)
            loss = self.loss(output, target)
        top = output[0] if isinstance(output, (list, tuple)) else output
        tp, fp, fn = pseudo_dice_counts(top, target[0], self.labels.ignore_label, **self._regions_kwargs())
        return loss.detach(), tp, fp, fn

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def save_state(self) -> None:
        """Write ``checkpoint_latest.pt`` (and a pending best-weights file first), then drop stale best files."""
        if self.best_weights is not None:
            name = f"{BEST_FILE_PREFIX}{self.best_epoch}.pt"
            atomic_torch_save(
                {
                    "network_weights": self.best_weights,
                    "epoch": self.best_epoch,
                    "ema_pseudo_dice": self.best_ema,
                },
                self.state_dir / name,
            )
            self.best_file, self.best_weights = name, None
        state = {
            "format": STATE_FORMAT,
            "signature": self.signature,
            "network_weights": self.network.state_dict(),
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "epoch": self.epoch,
            "iteration": self.iteration,
            "partial": dict(self.partial),
            "history": self.history,
            "ema": self.ema,
            "best_ema": self.best_ema,
            "best_epoch": self.best_epoch,
            "best_file": self.best_file,
            "attempt": self.attempt,
            "rng": capture_rng_states(),
            "saved_at": _utc_now(),
            "nnsnake_version": __version__,
        }
        atomic_torch_save(state, self.state_path)
        for stale in self.state_dir.glob(f"{BEST_FILE_PREFIX}*.pt"):
            if stale.name != self.best_file:
                stale.unlink(missing_ok=True)

    def load_state(self) -> bool:
        """Resume from ``checkpoint_latest.pt`` if present; refuse a state of a different run. True if resumed."""
        if not self.state_path.is_file():
            return False
        try:
            state = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"{self.state_path}: cannot be read ({err}); it was written atomically, so the file was damaged "
                f"afterwards. Delete {self.state_dir} to start this training over."
            ) from err
        stored = state.get("signature", {}) if isinstance(state, dict) else {}
        finished = stored.get("epochs") is not None and state.get("epoch") == stored.get("epochs")
        differences = signature_differences(stored, self.signature)
        if differences:
            if finished:
                log.warning(
                    "%s holds a finished run with other inputs (%s); starting a new run over it",
                    self.state_path,
                    "; ".join(differences),
                )
                return False
            raise SignatureMismatchError(
                f"{self.state_path} belongs to a different training run and cannot be resumed: "
                f"{'; '.join(differences)}. To start this fold over, delete the state folder "
                f"(rm -r {self.state_dir}); to continue the old run, restore the previous inputs/settings."
            )
        self.network.load_state_dict(state["network_weights"])
        self.optimizer.load_state_dict(state["optimizer_state"])
        if self.grad_scaler is not None and state.get("grad_scaler_state"):
            self.grad_scaler.load_state_dict(state["grad_scaler_state"])
        self.epoch, self.iteration = int(state["epoch"]), int(state["iteration"])
        self.partial = dict(state.get("partial") or {})
        self.history = list(state["history"])
        self.ema, self.best_ema = state["ema"], state["best_ema"]
        self.best_epoch, self.best_file = state["best_epoch"], state["best_file"]
        self.attempt = int(state.get("attempt", 1)) + (0 if finished else 1)
        restore_rng_states(state["rng"])
        if self.best_file is not None and not (self.state_dir / self.best_file).is_file():
            raise RuntimeError(
                f"{self.state_dir / self.best_file} (best weights named by {self.state_path}) is "
                f"missing; delete {self.state_dir} to start this training over"
            )
        for stale in self.state_dir.glob(f"{BEST_FILE_PREFIX}*.pt"):
            if stale.name != self.best_file:
                stale.unlink(missing_ok=True)
        return True

    # ---- outputs ----------------------------------------------------------------------------------------------
    def model_payload(
        self, weights: Mapping[str, torch.Tensor], epoch: int, ema: float | None
    ) -> dict[str, Any]:
        """``model_final.pt`` / ``model_best.pt``: weights plus what inference needs to rebuild the network."""
        from .sampling import mirror_axes

        return {
            "format": MODEL_FORMAT,
            "network_weights": {k: v.detach().cpu() for k, v in weights.items()},
            "init": {
                "configuration": self.configuration,
                "architecture": self.config["architecture"],
                "patch_size": self.patch_size,
                "num_input_channels": self.num_input_channels,
                "num_outputs": self.labels.num_outputs,
                "inference_allowed_mirroring_axes": list(mirror_axes(self.patch_size)),
                "labels": dict(self.dataset_json["labels"]),
                "channel_names": dict(self.dataset_json["channel_names"]),
                "plans_sha256": _sha256(self.plans),
                "configuration_sha256": self.signature["configuration_sha256"],
                "dataset_name": self.plans.get("dataset_name"),
                "fold": str(self.fold),
                "epoch": int(epoch),
                "epochs_planned": int(self.settings.epochs),
                "ema_pseudo_dice": ema,
                "nnsnake_version": __version__,
                "torch_version": str(torch.__version__),
            },
        }

    def write_outputs(self) -> dict[str, str]:
        """Declared outputs, each atomic, ``model_final.pt`` last (its presence means the fold is complete)."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        written = {}
        if self.settings.save_best:
            if self.best_file is not None:
                best = torch.load(self.state_dir / self.best_file, map_location="cpu", weights_only=True)
                payload = self.model_payload(best["network_weights"], best["epoch"], best["ema_pseudo_dice"])
            else:  # no epoch ever had a defined pseudo-Dice: the final weights are the best we know
                payload = self.model_payload(self.network.state_dict(), self.settings.epochs - 1, None)
            atomic_torch_save(payload, self.output_dir / MODEL_BEST)
            written["model_best"] = str(self.output_dir / MODEL_BEST)
        plot_progress(self.history, self.output_dir / PROGRESS_PNG)
        write_json(self.output_dir / LOG_JSON, self.history)
        last = self.history[-1] if self.history else {}
        atomic_torch_save(
            self.model_payload(
                self.network.state_dict(), self.settings.epochs - 1, last.get("ema_pseudo_dice")
            ),
            self.output_dir / MODEL_FINAL,
        )
        written.update(
            progress=str(self.output_dir / PROGRESS_PNG),
            log=str(self.output_dir / LOG_JSON),
            model_final=str(self.output_dir / MODEL_FINAL),
        )
        return written

    # ---- the loop ---------------------------------------------------------------------------------------------
    def _interrupt(self, where: str) -> None:
        """Save the mid-epoch state after a signal and leave with a non-zero exit status."""
        self.save_state()
        signum = int(self.stop.signum)
        message = (
            f"training interrupted by {signal.Signals(signum).name} {where}; state saved to "
            f"{self.state_path}; run the same command again to continue"
        )
        log.error(message)
        raise TrainingInterrupted(signum, message)

    def run(self) -> dict[str, Any]:
        settings = self.settings
        resumed_from = (self.epoch, self.iteration)
        try:
            while self.epoch < settings.epochs:
                self._run_epoch()
        finally:
            self._close_iterators()
        outputs = self.write_outputs()
        last = self.history[-1] if self.history else {}
        return {
            "epochs": settings.epochs,
            "resumed_from_epoch": resumed_from[0] if resumed_from != (0, 0) else None,
            "final_ema_pseudo_dice": last.get("ema_pseudo_dice"),
            "best_ema_pseudo_dice": self.best_ema,
            "best_epoch": self.best_epoch,
            "outputs": outputs,
            "runtime": self.runtime.describe(),
        }

    def _run_epoch(self) -> None:
        settings, epoch = self.settings, self.epoch
        lr = poly_lr(epoch, settings.epochs, settings.initial_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        if self.iteration == 0:
            self.partial = {
                "train_loss_sum": 0.0,
                "elapsed_s": 0.0,
                "data_wait_s": 0.0,
                "started_at": _utc_now(),
            }  # type: ignore[dict-item]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        data_wait = 0.0
        progress = _progress_bar(settings.iterations_per_epoch, f"epoch {epoch}", self.iteration)
        with self._epoch_iterators(epoch) as (train_iterator, val_iterator):
            if settings.deterministic and 0 < self.iteration < settings.iterations_per_epoch:
                for _ in range(self.iteration):  # replay the batch stream up to where the run stopped
                    next(train_iterator)

            def flush_partial() -> None:
                self.partial["train_loss_sum"] += float(loss_sum)
                self.partial["elapsed_s"] += time.perf_counter() - started
                self.partial["data_wait_s"] += data_wait

            self.network.train()
            while self.iteration < settings.iterations_per_epoch:
                if self.stop.requested:
                    flush_partial()
                    self._interrupt(f"in epoch {epoch} before training iteration {self.iteration}")
                waited = time.perf_counter()
                batch = self._next_batch(train_iterator)
                data_wait += time.perf_counter() - waited
                if batch is None:
                    continue  # stop requested; handled at the top of the loop
                loss_sum += self.train_step(batch)
                self.iteration += 1
                progress.update(1)
            progress.close()
            train_done = time.perf_counter()

            self.network.eval()
            val_losses = []
            counts: np.ndarray | None = None
            with torch.no_grad():
                for v in range(settings.val_iterations):
                    if self.stop.requested:
                        flush_partial()
                        self._interrupt(f"in epoch {epoch} during validation (batch {v})")
                    batch = self._next_batch(val_iterator)
                    if batch is None:
                        continue
                    loss, tp, fp, fn = self.validation_step(batch)
                    val_losses.append(loss)
                    stacked = np.stack([_as_numpy(tp), _as_numpy(fp), _as_numpy(fn)]).astype(np.float64)
                    counts = stacked if counts is None else counts + stacked
        if self.stop.requested:  # the signal came during the last validation batch
            flush_partial()
            self._interrupt(f"at the end of epoch {epoch}")

        ended = time.perf_counter()
        train_loss = (self.partial["train_loss_sum"] + float(loss_sum)) / settings.iterations_per_epoch
        val_loss = float(torch.stack(val_losses).double().mean())
        tp, fp, fn = counts.tolist() if counts is not None else ([], [], [])
        dice = global_dice(tp, fp, fn)
        mean_fg = _nanmean(dice)
        self.ema = ema_update(self.ema, mean_fg)
        improved = (
            self.ema is not None
            and not math.isnan(self.ema)
            and (self.best_ema is None or self.ema > self.best_ema)
        )
        epoch_time = self.partial["elapsed_s"] + (ended - started)
        entry = {
            "epoch": epoch,
            "train_loss": _finite_or_none(train_loss),
            "val_loss": _finite_or_none(val_loss),
            "pseudo_dice": {
                name: _finite_or_none(d) for name, d in zip(self.labels.names, dice, strict=True)
            },
            "mean_fg_dice": _finite_or_none(mean_fg),
            "ema_pseudo_dice": _finite_or_none(self.ema),
            "lr": lr,
            "epoch_time_s": round(epoch_time, 3),
            "train_time_s": round(self.partial["elapsed_s"] + (train_done - started), 3),
            "data_wait_s": round(self.partial["data_wait_s"] + data_wait, 3),
            "started_at": self.partial["started_at"],
            "finished_at": _utc_now(),
            "new_best": bool(improved),
            "attempt": self.attempt,
        }
        self.history.append(entry)
        if improved:
            self.best_ema, self.best_epoch = float(self.ema), epoch
            if settings.save_best:
                self.best_weights = self._weights_cpu()
        self.epoch, self.iteration, self.partial = epoch + 1, 0, {}
        every = settings.checkpoint_every
        if self.epoch == settings.epochs or (every and self.epoch % every == 0):
            self.save_state()
        write_json(self.state_dir / LOG_JSON, self.history)
        if (
            time.monotonic() - self._last_plot >= PLOT_INTERVAL_S
        ):  # a plot costs ~1 s: not after every short epoch
            plot_progress(self.history, self.state_dir / PROGRESS_PNG)
            self._last_plot = time.monotonic()
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, pseudo Dice %s, EMA %.4f%s, lr %.3g, %.1f s%s",
            epoch + 1,
            settings.epochs,
            train_loss,
            val_loss,
            "[" + ", ".join(f"{d:.4f}" for d in dice) + "]",
            self.ema if self.ema is not None else float("nan"),
            " (new best)" if improved else "",
            lr,
            epoch_time,
            f" ({entry['data_wait_s']:.1f} s waiting for data)"
            if entry["data_wait_s"] > 0.05 * epoch_time
            else "",
        )
        if self.epoch_callback is not None:
            self.epoch_callback(entry)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, description: str, initial: int) -> Any:
    """A tqdm bar per epoch on a terminal; nothing in log files (the per-epoch log line is enough there)."""
    if not sys.stderr.isatty():
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=description, unit="it", leave=False)


# --------------------------------------------------------------------------------------------------------------
# public entry points


def train_fold(
    preprocessed_dir: str | os.PathLike,
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    splits: list[dict[str, list[str]]],
    fold: int | str,
    output_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    settings: TrainingSettings | None = None,
    previous_stage_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    epoch_callback: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one fold of one configuration (method §5), resuming from ``state_dir`` if a checkpoint is there.

    ``preprocessed_dir`` holds this configuration's preprocessed cases; ``previous_stage_dir`` (cascade only)
    the folder(s) of the 3d_lowres out-of-fold predictions ``<case>.npy`` at this configuration's preprocessed
    shape (the workflow passes one folder per lowres fold).
    ``epoch_callback`` is called with each finished epoch's log entry after its checkpoint was written.
    Returns a summary (best/final EMA, output paths, the runtime used). Raises :class:`TrainingInterrupted`
    (a ``SystemExit`` with status 128 + signal) after SIGTERM/SIGINT/SIGUSR1 once the state is saved.
    """
    from .runtime import claim_gpu, select_device
    from .planning import resolve_configuration
    from .preprocessing import stored_case_ids
    from .splits import fold_cases

    settings = settings or TrainingSettings()
    preprocessed_dir, output_dir, state_dir = Path(preprocessed_dir), Path(output_dir), Path(state_dir)
    config = resolve_configuration(dict(plans), configuration)
    for key in ("patch_size", "batch_size", "architecture"):
        if key not in config:
            raise ValueError(
                f"configuration {configuration!r} of the plans has no {key!r}; regenerate plans.json"
            )
    stored = stored_case_ids(preprocessed_dir)
    train_ids, val_ids = fold_cases(splits, fold, case_ids=stored or None)
    missing = sorted(set(train_ids + val_ids) - set(stored))
    if missing:
        raise FileNotFoundError(
            f"{preprocessed_dir}: {len(missing)} case(s) of fold {fold} are not preprocessed "
            f"(e.g. {', '.join(missing[:5])}); rerun preprocessing for {configuration}"
        )
    previous_stage = None
    if config.get("previous_stage"):
        if previous_stage_dir is None:
            raise ValueError(
                f"{configuration} is a cascade stage (previous_stage {config['previous_stage']!r}): pass "
                "previous_stage_dir, the folder of the previous stage's out-of-fold predictions"
            )
        # found once, before anything starts (a missing case is reported here)
        previous_stage = previous_stage_files(previous_stage_dir, train_ids + val_ids)
    state_dir.mkdir(parents=True, exist_ok=True)
    stop = _StopRequest()
    with (
        exclusive_lock(state_dir / LOCK_FILE, wait=True),
        _handle_signals(stop),
        _workers_die_with_trainer(),
        contextlib.ExitStack() as stack,
    ):
        if settings.device != "cpu":
            stack.enter_context(claim_gpu(settings.gpu_lock_dir))
        device = select_device(settings.device)
        runtime = _runtime(settings, device, config["patch_size"])
        stack.enter_context(_process_settings(runtime, settings))
        trainer = _Trainer(
            preprocessed_dir,
            plans,
            configuration,
            dataset_json,
            train_ids,
            val_ids,
            fold,
            output_dir,
            state_dir,
            settings,
            runtime,
            config,
            previous_stage,
            epoch_callback,
            stop,
        )
        resumed = trainer.load_state()
        if resumed and trainer.epoch >= settings.epochs:
            log.info(
                "%s: training already finished (%d epochs); writing the outputs again",
                state_dir,
                settings.epochs,
            )
        elif resumed:
            log.info(
                "resuming %s fold %s at epoch %d%s (attempt %d)",
                configuration,
                fold,
                trainer.epoch,
                f", iteration {trainer.iteration}" if trainer.iteration else "",
                trainer.attempt,
            )
        else:
            log.info(
                "training %s fold %s: %d train / %d val cases, %d epochs x %d iterations",
                configuration,
                fold,
                len(train_ids),
                len(val_ids),
                settings.epochs,
                settings.iterations_per_epoch,
            )
        log.info("runtime: %s", runtime.describe())
        return trainer.run()


def train_fold_from_files(
    preprocessed_dir: str | os.PathLike,
    plans_path: str | os.PathLike,
    configuration: str,
    dataset_json_path: str | os.PathLike,
    splits_path: str | os.PathLike,
    fold: int | str,
    output_dir: str | os.PathLike,
    state_dir: str | os.PathLike,
    settings: Mapping[str, Any] | TrainingSettings | None = None,
    previous_stage_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """:func:`train_fold` from file paths (what the workflow's train rule calls).

    ``dataset_json_path`` may be the raw dataset folder or its ``dataset.json``; ``settings`` a mapping such as
    the workflow config's ``training`` section.
    """
    dataset_json_path = Path(dataset_json_path)
    if dataset_json_path.is_dir():
        dataset_json_path = dataset_json_path / "dataset.json"
    if not isinstance(settings, TrainingSettings):
        settings = TrainingSettings.from_mapping(settings)
    fold_value: int | str = fold if str(fold) == "all" else int(fold)
    return train_fold(
        preprocessed_dir,
        read_json(plans_path),
        configuration,
        read_json(dataset_json_path),
        read_json(splits_path),
        fold_value,
        output_dir,
        state_dir,
        settings,
        previous_stage_dir,
    )
