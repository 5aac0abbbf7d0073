"""The nnU-Net trainer (docs/method.md §5): one (configuration, fold) trained from preprocessed cases, resumably.

The method is nnU-Net's: SGD with Nesterov momentum 0.99, poly learning rate set at the start of each epoch,
deep-supervision Dice + CE loss, gradient clipping at 12, 250 training and 50 validation iterations per epoch,
a global pseudo-Dice over the validation batches and its exponential moving average. nnU-Net's trainer variants
(loss, optimiser, schedule, augmentation, deep supervision, oversampling) are settings here
(:mod:`~nnsnake.training.variants`, docs/method.md §5.12). What is ours is how the run survives:

* **State lives in ``state_dir``** (under ``work/``, never a Snakemake output, since Snakemake deletes a job's
  outputs when it starts): ``checkpoint_latest.pt`` (:class:`~nnsnake.training.state.TrainingState`) holds
  weights, optimizer, grad scaler, the next epoch, the log history, the best EMA and every random state. It is
  written atomically (temporary file + ``os.replace``) every ``checkpoint_every`` epochs, so a job killed at any
  instant resumes from the last complete checkpoint with the same learning-rate schedule and an unbroken log.
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
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..errors import SignatureMismatchError
from ..jsonio import read_json, write_json
from ..labels import LabelModel
from ..network import channels_last_format
from ..runtime import (
    autocast_context,
    autocast_dtype,
    available_cpus,
    claim_gpu,
    determinism,
    limited_threads,
    progress,
    seed_everything,
    select_device,
)
from .plot import plot_progress
from .pretrained import load_pretrained_weights
from .schedule import ema_update, global_dice, learning_rate, nanmean
from .settings import (
    BEST_FILE_PREFIX,
    LOCK_FILE,
    LOG_JSON,
    MODEL_BEST,
    MODEL_FINAL,
    MODEL_FORMAT,
    PROGRESS_PNG,
    STATE_FILE,
    TrainingSettings,
    default_workers,
)
from .signals import StopRequest, TrainingInterrupted, handle_signals, workers_die_with_trainer
from .signature import (
    preprocessed_data_digest,
    previous_stage_digest,
    sha256_of,
    signature_differences,
    training_signature,
)
from .state import TrainingState, atomic_torch_save, capture_rng_states, exclusive_lock, restore_rng_states
from .variants import build_optimizer, nnunet_trainer_name, training_mirror_axes, variant_of

log = logging.getLogger("nnsnake")

PLOT_INTERVAL_S = 60.0  # state_dir/progress.png is redrawn at most this often during a run


# --------------------------------------------------------------------------------------------------------------
# runtime choices


@dataclass
class _Runtime:
    """How this run uses the machine (speed only: none of it is part of the signature except ``workers``)."""

    device: torch.device
    autocast_dtype: torch.dtype | None
    use_grad_scaler: bool
    compile: bool
    channels_last: bool
    workers: int
    torch_threads: int

    def describe(self) -> str:
        precision = {None: "fp32", torch.float16: "fp16 autocast", torch.bfloat16: "bf16 autocast"}[
            self.autocast_dtype
        ]
        return (
            f"device {self.device}, {precision}{' + grad scaler' if self.use_grad_scaler else ''}, "
            f"compile {'on' if self.compile else 'off'}, channels-last {'on' if self.channels_last else 'off'}, "
            f"{self.workers} augmentation worker(s), {self.torch_threads} torch thread(s)"
        )


def _runtime(settings: TrainingSettings, device: torch.device, config_patch_size: Sequence[int]) -> _Runtime:
    threads = int(settings.threads) if settings.threads is not None else available_cpus()
    workers = int(settings.workers) if settings.workers is not None else default_workers(device.type, threads)
    dtype = autocast_dtype(device, settings.autocast)
    compile_on = (
        settings.compile
        if settings.compile is not None
        else (device.type == "cuda" and not settings.deterministic)
    )
    # Measured on an H100 (benchmarks/train.py --gpu): channels-last made the compiled 3D U-Net slower (48 vs
    # 51 it/s on Hippocampus), so on CUDA it is used for 2D convolutions only. On the CPU (oneDNN) it is on for
    # every architecture: with network.InstanceNorm's channels-last kernels a forward + backward (one thread,
    # benchmarks/norm_layers.py --network) in the contiguous layout costs 1.11-1.15x the channels-last one for
    # ResEnc M Hippocampus 3d_fullres and the plain 3d_fullres, 1.04-1.31x for the 2d configurations.
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
        dtype,
        dtype == torch.float16 and device.type == "cuda",
        bool(compile_on),
        bool(channels_last),
        workers,
        torch_threads,
    )


@contextlib.contextmanager
def _process_settings(runtime: _Runtime, settings: TrainingSettings) -> Iterator[None]:
    """Thread count and determinism flags for the run, restored afterwards (they are process-global)."""
    with limited_threads(runtime.torch_threads), determinism(runtime.device, settings.deterministic):
        yield


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


def _finite_or_none(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@dataclass
class _EpochProgress:
    """The running sums of the epoch in progress (added to ``TrainingState.partial`` when a signal stops it)."""

    started: float  # perf_counter() when this attempt entered the epoch
    loss_sum: torch.Tensor
    data_wait: float = 0.0
    train_done: float = 0.0  # perf_counter() at the end of the training phase


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
        stop: StopRequest,
    ) -> None:
        from ..loss import build_loss
        from ..network import build_network, deep_supervision_scales, deep_supervision_weights

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
        self.labels = LabelModel.from_dataset_json(dataset_json)
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
            runtime.workers,
            preprocessed_data_digest(preprocessed_dir, train_ids + val_ids),
            previous_stage_digest(self.previous_stage_files) if self.previous_stage_files else None,
        )

        self.num_input_channels = len(dataset_json["channel_names"]) + (
            len(self.labels.foreground_labels) if self.is_cascaded else 0
        )
        architecture = config["architecture"]
        strides = (architecture.get("arch_kwargs") or architecture)["strides"]
        # deep_supervision false (nnUNetTrainerNoDeepSupervision): one output, one target, no loss wrapper
        self.deep_supervision = bool(settings.deep_supervision)
        self.ds_scales = deep_supervision_scales(strides) if self.deep_supervision else None
        if settings.deterministic:
            seed_everything(settings.seed)
        self.network = build_network(
            architecture, self.num_input_channels, self.labels.num_outputs, self.deep_supervision
        )
        if settings.pretrained_weights:  # fine-tuning; a resumed run replaces these weights by its own state
            load_pretrained_weights(self.network, settings.pretrained_weights)
        self.network.to(self.device)
        if runtime.channels_last:
            self.network.to(memory_format=self._memory_format())  # type: ignore[call-overload]
        self.model: Callable[..., Any] = torch.compile(self.network) if runtime.compile else self.network
        self.optimizer = build_optimizer(settings, self.network.parameters())
        self.grad_scaler = torch.amp.GradScaler("cuda") if runtime.use_grad_scaler else None
        weights = deep_supervision_weights(len(self.ds_scales)) if self.ds_scales is not None else None
        self.loss = build_loss(
            batch_dice=bool(config.get("batch_dice", False)),
            ignore_label=self.labels.ignore_label,
            deep_supervision_weights=[float(w) for w in weights] if weights is not None else None,
            loss=settings.loss,
            **self._regions_kwargs(),
        )

        self.state = TrainingState(signature=self.signature)  # the progress of the run (restored on resume)
        self.best_weights: dict[str, torch.Tensor] | None = None  # in memory until the next checkpoint
        self.stop = stop  # set by the signal handlers that train_fold installs
        self._persistent_iterators: tuple[Any, Any] | None = None
        # the state-dir plot is first drawn after PLOT_INTERVAL_S (a short run only gets the final one: a plot and
        # matplotlib's import cost about a second, much of a tiny job's time)
        self._last_plot = time.monotonic()

    # ---- helpers ----------------------------------------------------------------------------------------------
    def _memory_format(self) -> torch.memory_format:
        return channels_last_format(len(self.patch_size))

    def _regions_kwargs(self) -> dict[str, Any]:
        return {"regions": self.labels.regions} if self.labels.regions is not None else {}

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast_context(self.device, self.runtime.autocast_dtype)

    def _weights_cpu(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.network.state_dict().items()}

    # ---- data -------------------------------------------------------------------------------------------------
    def _make_iterators(self, seed: int | None) -> tuple[Any, Any]:
        from ..augmentation import make_data_iterators
        from ..preprocessing import load_case

        load_previous = None
        if self.is_cascaded and self.previous_stage_files is not None:
            load_previous = functools.partial(_load_previous_stage, self.previous_stage_files)
        return make_data_iterators(
            self.train_ids,
            self.val_ids,
            functools.partial(load_case, str(self.preprocessed_dir), mmap=True),
            self.patch_size,
            int(self.config["batch_size"]),
            self.ds_scales,
            self.runtime.workers,
            labels=self.labels,
            use_mask_for_norm=self.config.get("use_mask_for_norm"),
            is_cascaded=self.is_cascaded,
            load_previous_stage=load_previous,
            oversample_foreground_percent=float(self.settings.oversample_foreground_percent),
            probabilistic_oversampling=bool(self.settings.probabilistic_oversampling),
            augmentation=self.settings.augmentation,
            seed=seed,
            pin_memory=self.device.type == "cuda",
        )

    @contextlib.contextmanager
    def _epoch_iterators(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        """Deterministic runs draw each epoch's batches from ``(seed, epoch)``: resumable without loader state."""
        if self.settings.deterministic:
            from ..sampling import derive_seed

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

    def _loss_target(self, target: list[torch.Tensor]) -> list[torch.Tensor] | torch.Tensor:
        """One target per head with deep supervision; the single full-resolution target without it."""
        return target if self.deep_supervision else target[0]

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
            loss = self.loss(output, self._loss_target(target))
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
        from ..loss import pseudo_dice_counts

        data, target = self._to_device(batch)
        with self._autocast():
            output = self.model(data)
            loss = self.loss(output, self._loss_target(target))
        top = output[0] if isinstance(output, (list, tuple)) else output
        tp, fp, fn = pseudo_dice_counts(top, target[0], self.labels.ignore_label, **self._regions_kwargs())
        return loss.detach(), tp, fp, fn

    # ---- state ------------------------------------------------------------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.state_dir / STATE_FILE

    def _drop_stale_best_files(self) -> None:
        for stale in self.state_dir.glob(f"{BEST_FILE_PREFIX}*.pt"):
            if stale.name != self.state.best_file:
                stale.unlink(missing_ok=True)

    def save_state(self) -> None:
        """Write ``checkpoint_latest.pt`` (and a pending best-weights file first), then drop stale best files."""
        state = self.state
        if self.best_weights is not None:
            name = f"{BEST_FILE_PREFIX}{state.best_epoch}.pt"
            atomic_torch_save(
                {
                    "network_weights": self.best_weights,
                    "epoch": state.best_epoch,
                    "ema_pseudo_dice": state.best_ema,
                },
                self.state_dir / name,
            )
            state.best_file, self.best_weights = name, None
        snapshot = dataclasses.replace(
            state,
            signature=self.signature,
            network_weights=self.network.state_dict(),
            optimizer_state=self.optimizer.state_dict(),
            grad_scaler_state=self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            rng=capture_rng_states(),
            saved_at=_utc_now(),
            nnsnake_version=__version__,
        )
        atomic_torch_save(snapshot.to_checkpoint(), self.state_path)
        self._drop_stale_best_files()

    def load_state(self) -> bool:
        """Resume from ``checkpoint_latest.pt`` if present; refuse a state of a different run. True if resumed."""
        if not self.state_path.is_file():
            return False
        try:
            checkpoint = torch.load(self.state_path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RuntimeError(
                f"{self.state_path}: cannot be read ({err}); it was written atomically, so the file was damaged "
                f"afterwards. Delete {self.state_dir} to start this training over."
            ) from err
        stored = checkpoint.get("signature", {}) if isinstance(checkpoint, dict) else {}
        finished = stored.get("epochs") is not None and checkpoint.get("epoch") == stored.get("epochs")
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
        loaded = TrainingState.from_checkpoint(checkpoint)
        self.network.load_state_dict(loaded.network_weights or {})
        self.optimizer.load_state_dict(loaded.optimizer_state or {})
        if self.grad_scaler is not None and loaded.grad_scaler_state:
            self.grad_scaler.load_state_dict(loaded.grad_scaler_state)
        restore_rng_states(loaded.rng or {})
        self.state = dataclasses.replace(
            loaded.progress_only(), attempt=loaded.attempt + (0 if finished else 1)
        )
        best_file = self.state.best_file
        if best_file is not None and not (self.state_dir / best_file).is_file():
            raise RuntimeError(
                f"{self.state_dir / best_file} (best weights named by {self.state_path}) is "
                f"missing; delete {self.state_dir} to start this training over"
            )
        self._drop_stale_best_files()
        return True

    # ---- outputs ----------------------------------------------------------------------------------------------
    def model_payload(
        self, weights: Mapping[str, torch.Tensor], epoch: int, ema: float | None
    ) -> dict[str, Any]:
        """``model_final.pt`` / ``model_best.pt``: weights plus what inference needs to rebuild the network."""
        trainer_name, exact = nnunet_trainer_name(self.settings)
        return {
            "format": MODEL_FORMAT,
            "network_weights": {k: v.detach().cpu() for k, v in weights.items()},
            "init": {
                "configuration": self.configuration,
                "architecture": self.config["architecture"],
                "patch_size": self.patch_size,
                "num_input_channels": self.num_input_channels,
                "num_outputs": self.labels.num_outputs,
                # [] (no test-time mirroring) after training without mirroring, as nnU-Net's variants store None
                "inference_allowed_mirroring_axes": list(
                    training_mirror_axes(self.settings.augmentation, self.patch_size)
                ),
                "trainer_name": trainer_name,
                "trainer_name_exact": exact,
                "training_variant": variant_of(self.settings),
                "labels": dict(self.dataset_json["labels"]),
                "channel_names": dict(self.dataset_json["channel_names"]),
                "plans_sha256": sha256_of(self.plans),
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
        history = self.state.history
        written = {}
        if self.settings.save_best:
            if self.state.best_file is not None:
                best = torch.load(
                    self.state_dir / self.state.best_file, map_location="cpu", weights_only=True
                )
                payload = self.model_payload(best["network_weights"], best["epoch"], best["ema_pseudo_dice"])
            else:  # no epoch ever had a defined pseudo-Dice: the final weights are the best we know
                payload = self.model_payload(self.network.state_dict(), self.settings.epochs - 1, None)
            atomic_torch_save(payload, self.output_dir / MODEL_BEST)
            written["model_best"] = str(self.output_dir / MODEL_BEST)
        plot_progress(history, self.output_dir / PROGRESS_PNG)
        write_json(self.output_dir / LOG_JSON, history)
        last = history[-1] if history else {}
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
    def _interrupt(self, where: str, epoch_progress: _EpochProgress) -> None:
        """Add the epoch's running sums to the state, save it and leave with a non-zero exit status."""
        partial = self.state.partial
        partial["train_loss_sum"] += float(epoch_progress.loss_sum)
        partial["elapsed_s"] += time.perf_counter() - epoch_progress.started
        partial["data_wait_s"] += epoch_progress.data_wait
        self.save_state()
        signum = int(self.stop.signum or signal.SIGTERM)
        message = (
            f"training interrupted by {signal.Signals(signum).name} {where}; state saved to "
            f"{self.state_path}; run the same command again to continue"
        )
        log.error(message)
        raise TrainingInterrupted(signum, message)

    def run(self) -> dict[str, Any]:
        settings = self.settings
        resumed_from = (self.state.epoch, self.state.iteration)
        try:
            while self.state.epoch < settings.epochs:
                self._run_epoch()
        finally:
            self._close_iterators()
        outputs = self.write_outputs()
        last = self.state.history[-1] if self.state.history else {}
        return {
            "epochs": settings.epochs,
            "resumed_from_epoch": resumed_from[0] if resumed_from != (0, 0) else None,
            "final_ema_pseudo_dice": last.get("ema_pseudo_dice"),
            "best_ema_pseudo_dice": self.state.best_ema,
            "best_epoch": self.state.best_epoch,
            "outputs": outputs,
            "runtime": self.runtime.describe(),
        }

    def _run_epoch(self) -> None:
        """One epoch (or the rest of an interrupted one): train phase, validation phase, record."""
        settings, state = self.settings, self.state
        lr = learning_rate(settings.lr_schedule, state.epoch, settings.epochs, settings.initial_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        epoch_progress = _EpochProgress(
            time.perf_counter(), torch.zeros((), dtype=torch.float64, device=self.device)
        )
        if state.iteration == 0:
            state.partial = {
                "train_loss_sum": 0.0,
                "elapsed_s": 0.0,
                "data_wait_s": 0.0,
                "started_at": _utc_now(),
            }
        with self._epoch_iterators(state.epoch) as (train_iterator, val_iterator):
            self._train_phase(train_iterator, epoch_progress)
            val_losses, counts = self._validation_phase(val_iterator, epoch_progress)
        if self.stop.requested:  # the signal came during the last validation batch
            self._interrupt(f"at the end of epoch {state.epoch}", epoch_progress)
        self._record(lr, epoch_progress, val_losses, counts)

    def _train_phase(self, train_iterator: Iterator[dict], epoch_progress: _EpochProgress) -> None:
        """The epoch's remaining training iterations; a stop request saves the state between two of them."""
        settings, state = self.settings, self.state
        if settings.deterministic and 0 < state.iteration < settings.iterations_per_epoch:
            for _ in range(state.iteration):  # replay the batch stream up to where the run stopped
                next(train_iterator)
        bar = progress(
            total=settings.iterations_per_epoch,
            description=f"epoch {state.epoch}",
            unit="it",
            initial=state.iteration,
            leave=False,
            terminal_only=True,
        )
        self.network.train()
        while state.iteration < settings.iterations_per_epoch:
            if self.stop.requested:
                self._interrupt(
                    f"in epoch {state.epoch} before training iteration {state.iteration}", epoch_progress
                )
            waited = time.perf_counter()
            batch = self._next_batch(train_iterator)
            epoch_progress.data_wait += time.perf_counter() - waited
            if batch is None:
                continue  # stop requested; handled at the top of the loop
            epoch_progress.loss_sum += self.train_step(batch)
            state.iteration += 1
            bar.update(1)
        bar.close()
        epoch_progress.train_done = time.perf_counter()

    def _validation_phase(
        self, val_iterator: Iterator[dict], epoch_progress: _EpochProgress
    ) -> tuple[list[torch.Tensor], np.ndarray | None]:
        """Validation losses and the summed ``(tp, fp, fn)`` counts (3, classes) of the epoch's batches."""
        self.network.eval()
        val_losses = []
        counts: np.ndarray | None = None
        with torch.no_grad():
            for v in range(self.settings.val_iterations):
                if self.stop.requested:
                    self._interrupt(
                        f"in epoch {self.state.epoch} during validation (batch {v})", epoch_progress
                    )
                batch = self._next_batch(val_iterator)
                if batch is None:
                    continue
                loss, tp, fp, fn = self.validation_step(batch)
                val_losses.append(loss)
                stacked = np.stack([_as_numpy(tp), _as_numpy(fp), _as_numpy(fn)]).astype(np.float64)
                counts = stacked if counts is None else counts + stacked
        return val_losses, counts

    def _record(
        self,
        lr: float,
        epoch_progress: _EpochProgress,
        val_losses: Sequence[torch.Tensor],
        counts: np.ndarray | None,
    ) -> None:
        """Close the epoch: log entry, best epoch, checkpoint, state-dir log and plot, log line, callback."""
        settings, state = self.settings, self.state
        epoch = state.epoch
        ended = time.perf_counter()
        train_loss = (
            state.partial["train_loss_sum"] + float(epoch_progress.loss_sum)
        ) / settings.iterations_per_epoch
        val_loss = float(torch.stack(list(val_losses)).double().mean())
        tp, fp, fn = counts.tolist() if counts is not None else ([], [], [])
        dice = global_dice(tp, fp, fn)
        mean_fg = nanmean(dice)
        ema = ema_update(state.ema, mean_fg)
        state.ema = ema
        improved = not math.isnan(ema) and (state.best_ema is None or ema > state.best_ema)
        epoch_time = state.partial["elapsed_s"] + (ended - epoch_progress.started)
        data_wait = round(state.partial["data_wait_s"] + epoch_progress.data_wait, 3)
        entry = {
            "epoch": epoch,
            "train_loss": _finite_or_none(train_loss),
            "val_loss": _finite_or_none(val_loss),
            "pseudo_dice": {
                name: _finite_or_none(d) for name, d in zip(self.labels.output_names, dice, strict=True)
            },
            "mean_fg_dice": _finite_or_none(mean_fg),
            "ema_pseudo_dice": _finite_or_none(ema),
            "lr": lr,
            "epoch_time_s": round(epoch_time, 3),
            "train_time_s": round(
                state.partial["elapsed_s"] + (epoch_progress.train_done - epoch_progress.started), 3
            ),
            "data_wait_s": data_wait,
            "started_at": state.partial["started_at"],
            "finished_at": _utc_now(),
            "new_best": bool(improved),
            "attempt": state.attempt,
        }
        state.history.append(entry)
        if improved:
            state.best_ema, state.best_epoch = float(ema), epoch
            if settings.save_best:
                self.best_weights = self._weights_cpu()
        state.epoch, state.iteration, state.partial = epoch + 1, 0, {}
        every = settings.checkpoint_every
        if state.epoch == settings.epochs or (every and state.epoch % every == 0):
            self.save_state()
        write_json(self.state_dir / LOG_JSON, state.history)
        if time.monotonic() - self._last_plot >= PLOT_INTERVAL_S:  # a plot costs ~1 s: not after short epochs
            plot_progress(state.history, self.state_dir / PROGRESS_PNG)
            self._last_plot = time.monotonic()
        log.info(
            "epoch %d/%d: train loss %.4f, val loss %.4f, pseudo Dice %s, EMA %.4f%s, lr %.3g, %.1f s%s",
            epoch + 1,
            settings.epochs,
            train_loss,
            val_loss,
            "[" + ", ".join(f"{d:.4f}" for d in dice) + "]",
            ema,
            " (new best)" if improved else "",
            lr,
            epoch_time,
            f" ({data_wait:.1f} s waiting for data)" if data_wait > 0.05 * epoch_time else "",
        )
        if self.epoch_callback is not None:
            self.epoch_callback(entry)


# --------------------------------------------------------------------------------------------------------------
# public entry points


def _fold_inputs(
    preprocessed_dir: Path,
    config: Mapping[str, Any],
    configuration: str,
    splits: list[dict[str, list[str]]],
    fold: int | str,
    previous_stage_dir: str | os.PathLike | Sequence[str | os.PathLike] | None,
) -> tuple[list[str], list[str], dict[str, Path] | None]:
    """The fold's training and validation cases and (cascade) previous-stage files, checked before anything
    starts, so a missing case or prediction is reported at once."""
    from ..preprocessing import stored_case_ids
    from ..splits import fold_cases

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
    if not config.get("previous_stage"):
        return train_ids, val_ids, None
    if previous_stage_dir is None:
        raise ValueError(
            f"{configuration} is a cascade stage (previous_stage {config['previous_stage']!r}): pass "
            "previous_stage_dir, the folder of the previous stage's out-of-fold predictions"
        )
    return train_ids, val_ids, previous_stage_files(previous_stage_dir, train_ids + val_ids)


def _announce(trainer: _Trainer, resumed: bool) -> None:
    """One log line saying whether the run starts, resumes or only rewrites its outputs."""
    if resumed and trainer.state.epoch >= trainer.settings.epochs:
        log.info(
            "%s: training already finished (%d epochs); writing the outputs again",
            trainer.state_dir,
            trainer.settings.epochs,
        )
    elif resumed:
        log.info(
            "resuming %s fold %s at epoch %d%s (attempt %d)",
            trainer.configuration,
            trainer.fold,
            trainer.state.epoch,
            f", iteration {trainer.state.iteration}" if trainer.state.iteration else "",
            trainer.state.attempt,
        )
    else:
        log.info(
            "training %s fold %s: %d train / %d val cases, %d epochs x %d iterations",
            trainer.configuration,
            trainer.fold,
            len(trainer.train_ids),
            len(trainer.val_ids),
            trainer.settings.epochs,
            trainer.settings.iterations_per_epoch,
        )


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
    """Train one fold of one configuration (docs/method.md §5), resuming from ``state_dir`` if a checkpoint is there.

    ``preprocessed_dir`` holds this configuration's preprocessed cases; ``previous_stage_dir`` (cascade only)
    the folder(s) of the 3d_lowres out-of-fold predictions ``<case>.npy`` at this configuration's preprocessed
    shape (the workflow passes one folder per lowres fold).
    ``epoch_callback`` is called with each finished epoch's log entry after its checkpoint was written.
    Returns a summary (best/final EMA, output paths, the runtime used). Raises :class:`TrainingInterrupted`
    (a ``SystemExit`` with status 128 + signal) after SIGTERM/SIGINT/SIGUSR1 once the state is saved.
    """
    from ..planning import resolve_configuration

    settings = settings or TrainingSettings()
    preprocessed_dir, output_dir, state_dir = Path(preprocessed_dir), Path(output_dir), Path(state_dir)
    config = resolve_configuration(dict(plans), configuration)
    train_ids, val_ids, previous_stage = _fold_inputs(
        preprocessed_dir, config, configuration, splits, fold, previous_stage_dir
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    stop = StopRequest()
    with (
        exclusive_lock(state_dir / LOCK_FILE, wait=True),
        handle_signals(stop),
        workers_die_with_trainer(),
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
        _announce(trainer, trainer.load_state())
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
