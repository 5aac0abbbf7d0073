"""The training signature: what a stored state must match to be resumed, and how a mismatch is explained.

The signature's keys and hashes are part of the on-disk state (``checkpoint_latest.pt``): they must stay the
same for the same run, also across renames of settings (the key ``num_workers`` is kept for ``workers``), or
states written by an earlier version would be refused.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..jsonio import dumps, read_json
from ..labels import LabelModel
from .pretrained import pretrained_signature
from .settings import STATE_FORMAT, TrainingSettings
from .variants import VARIANT_DEFAULTS, non_default_variant


def sha256_of(obj: Any, keep_label_order: bool = True) -> str:
    """SHA-256 of the canonical JSON text of ``obj``."""
    return hashlib.sha256(dumps(obj, keep_label_order).encode("utf-8")).hexdigest()


_SIGNATURE_MEANING = {
    "format": "the checkpoint format of nnsnake",
    "configuration": "the configuration name",
    "configuration_sha256": "the resolved configuration in plans.json (patch, batch size, network, spacing...)",
    "labels_sha256": "labels / channel_names / regions_class_order in dataset.json",
    "fold": "the fold",
    "cases_sha256": "the fold's training/validation cases (splits.json)",
    "data_sha256": "the preprocessed images/labels of the fold's cases",
    "previous_stage_sha256": "the previous stage's (3d_lowres) predictions of the fold's cases",
    "pretrained_weights_sha256": "the content of the pretrained weights file (training.pretrained_weights)",
}


def training_signature(
    configuration: str,
    config: Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    fold: int | str,
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    settings: TrainingSettings,
    workers: int,
    data_sha256: str | None = None,
    previous_stage_sha256: str | None = None,
) -> dict[str, Any]:
    """What a checkpoint must match to be resumed: everything that defines the run's trajectory.

    Settings that only change speed (threads, device, autocast, compile) may change between attempts; in
    deterministic mode the seed and the (resolved) number of workers define the batch stream and are part of it.
    The entries of ``dataset_json`` are hashed as they are written (a changed file restarts the run).
    """
    labels = {k: dataset_json.get(k) for k in ("labels", "channel_names", "regions_class_order")}
    # Region mode numbers its outputs in file order, so the order is part of the run; label mode hashes the
    # sorted entries, as before regions existed (existing checkpoints stay resumable).
    region_mode = LabelModel.from_dataset_json(dataset_json).has_regions
    return {
        "format": STATE_FORMAT,
        "configuration": configuration,
        "configuration_sha256": sha256_of(config),
        "labels_sha256": sha256_of(labels, keep_label_order=region_mode),
        "fold": str(fold),
        "cases_sha256": sha256_of({"train": list(train_ids), "val": list(val_ids)}),
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
        # the key keeps the setting's former name: states written before the rename still resume
        "num_workers": int(workers) if settings.deterministic else None,
        **pretrained_signature(settings.pretrained_weights),  # nothing without it: older states still resume
        # trainer variants only where they differ from nnU-Net's default trainer: a state written before they
        # existed (or with the defaults) has the same signature, and resumes
        **non_default_variant(settings),
    }


def preprocessed_data_digest(preprocessed_dir: str | os.PathLike, case_ids: Sequence[str]) -> str:
    """One digest of the stored content digests of these cases: retraining follows a changed image or label."""
    from ..preprocessing import case_files

    digests = {}
    for case_id in sorted(case_ids):
        record = read_json(case_files(preprocessed_dir, case_id)["properties"])
        digests[case_id] = record.get("sha256")
    return sha256_of(digests)


def previous_stage_digest(files: Mapping[str, Path]) -> str:
    """One digest of the previous-stage predictions' contents: a cascade run restarts when lowres changed."""
    digests = {}
    for case_id in sorted(files):
        sha = hashlib.sha256()
        with open(files[case_id], "rb") as fh:
            for block in iter(functools.partial(fh.read, 1 << 20), b""):
                sha.update(block)
        digests[case_id] = sha.hexdigest()
    return sha256_of(digests)


def signature_differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Human-readable list of what differs between a stored and the current signature."""
    out = []
    for key in sorted(set(stored) | set(current)):
        # an absent variant key means its default (see training_signature)
        old, new = stored.get(key, VARIANT_DEFAULTS.get(key)), current.get(key, VARIANT_DEFAULTS.get(key))
        if old == new:
            continue
        if key.endswith("_sha256") or key in _SIGNATURE_MEANING:
            out.append(f"{_SIGNATURE_MEANING.get(key, key)} changed")
        else:
            out.append(f"{key}: {old!r} -> {new!r}")
    return out
