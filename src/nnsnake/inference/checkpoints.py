"""Trained folds: reading ``model_final.pt`` (or nnU-Net's ``checkpoint_final.pth``) and rebuilding the network it was trained with (docs/method.md §7.2).

A checkpoint is a plain state dict read with ``weights_only=True`` (never pickle); its ``init`` metadata says how
the network was built, so a fold predicts with its own architecture even when the plans have changed since.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..architecture import num_input_channels
from ..labels import LabelModel
from ..network import build_network, channels_last_format
from ..planning import configuration_entry

PathLike = str | os.PathLike


def load_checkpoint(path: PathLike) -> dict[str, Any]:
    """Read a fold's checkpoint and check its layout: nnsnake's ``model_final.pt`` (a plain state dict) or an
    nnU-Net ``checkpoint_final.pth``, which is returned in nnsnake's layout
    (:func:`~nnsnake.inference.nnunet_models.nnunet_checkpoint_as_nnsnake`).

    Both are read by :func:`~nnsnake.inference.nnunet_models.load_checkpoint_safely`: torch's weights-only
    unpickler plus the numpy scalar types nnU-Net's files hold; a file naming any other global is refused
    (:class:`~nnsnake.errors.UnsafeCheckpointError`) and nothing of it runs.
    """
    from ..errors import CheckpointError, UnsafeCheckpointError
    from .nnunet_models import is_nnunet_checkpoint, load_checkpoint_safely, nnunet_checkpoint_as_nnsnake

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found; train this fold first (rule train)")
    try:
        checkpoint = load_checkpoint_safely(path)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as exc:
        raise CheckpointError(
            f"{path}: cannot be loaded as a weights-only torch checkpoint ({exc.__cause__ or exc}); retrain the fold"
        ) from exc
    if isinstance(checkpoint, dict) and is_nnunet_checkpoint(checkpoint):
        return nnunet_checkpoint_as_nnsnake(checkpoint)
    if not isinstance(checkpoint, dict) or "network_weights" not in checkpoint:
        raise ValueError(f"{path}: not an nnsnake checkpoint (no 'network_weights' entry); retrain the fold")
    return checkpoint


def _clean_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop wrappers' key prefixes (torch.compile's ``_orig_mod.``, DDP's ``module.``)."""
    return {re.sub(r"^(_orig_mod\.|module\.)+", "", k): v for k, v in weights.items()}


def network_from_checkpoint(
    checkpoint: Mapping[str, Any] | PathLike,
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    device: str | torch.device = "cpu",
) -> tuple[nn.Module, dict[str, Any]]:
    """Build the configuration's network without deep supervision and load a fold's weights into it.

    The checkpoint's ``init`` metadata may name ``architecture``, ``num_input_channels``, ``num_outputs`` and
    ``inference_allowed_mirroring_axes``; missing entries are derived from the plans and dataset. Returns the
    network (eval mode, on ``device``) and the metadata.
    """
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "checkpoint"
    ckpt = load_checkpoint(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint
    init = dict(ckpt.get("init") or {})
    config = configuration_entry(plans, configuration)
    n_inputs = int(init.get("num_input_channels", num_input_channels(plans, config, dataset_json)))
    n_outputs = int(init.get("num_outputs", LabelModel.from_dataset_json(dataset_json).num_outputs))
    # the architecture the weights were trained with, when the checkpoint records it
    architecture = init.get("architecture") or config.get("architecture", config)
    network = build_network(architecture, n_inputs, n_outputs, False)
    if hasattr(network, "set_deep_supervision"):
        network.set_deep_supervision(False)
    weights = _clean_state_dict(ckpt["network_weights"])
    if init.get("source") == "nnU-Net":
        from .nnunet_models import nnunet_weights_for

        weights = nnunet_weights_for(network, weights)
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        trainer = init.get("trainer_name")
        hint = (
            f"; nnU-Net trainer {trainer} may build another network than the plans' {_network_class(config)} "
            "(nnsnake builds what plans.json describes)"
            if trainer
            else "; was it trained with another plans.json?"
        )
        raise RuntimeError(f"{source}: weights do not fit the network of this plan ({exc}){hint}") from exc
    network.to(device).eval()
    if torch.device(device).type == "cpu":
        # oneDNN's convolutions and nnsnake's CPU instance norm are faster on channels-last (Hippocampus
        # 3d_fullres forward, 2 threads: 137 vs 150 ms per tile); the inputs follow in _forward_tiles
        # (torch's stubs lack Module.to's memory_format keyword)
        network.to(memory_format=channels_last_format(len(config["patch_size"])))  # type: ignore[call-overload]
    return network, init


def _network_class(config: Mapping[str, Any]) -> str:
    architecture = config.get("architecture") or {}
    return str(architecture.get("network_class_name", "PlainConvUNet")).rsplit(".", 1)[-1]


def load_fold_networks(
    checkpoint_paths: Sequence[PathLike],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    device: str | torch.device = "cpu",
) -> tuple[list[nn.Module], tuple[int, ...]]:
    """Networks of several folds (for logit averaging) and the mirror axes allowed for inference."""
    if not checkpoint_paths:
        raise ValueError("no checkpoint given: pass the folds' model_final.pt files")
    config = configuration_entry(plans, configuration)
    networks, mirror_axes = [], None
    for path in checkpoint_paths:
        network, init = network_from_checkpoint(path, plans, config, dataset_json, device)
        networks.append(network)
        if mirror_axes is None and init.get("inference_allowed_mirroring_axes") is not None:
            mirror_axes = allowed_mirror_axes(init, config)  # the first fold that records them decides
    if mirror_axes is None:
        mirror_axes = allowed_mirror_axes({}, config)
    return networks, mirror_axes


def allowed_mirror_axes(init: Mapping[str, Any], configuration: Mapping[str, Any]) -> tuple[int, ...]:
    """The mirror axes a fold allows at inference (its checkpoint's ``inference_allowed_mirroring_axes``; every
    axis of the patch when the checkpoint does not say)."""
    axes = init.get("inference_allowed_mirroring_axes")
    if axes is None:
        return tuple(range(len(configuration["patch_size"])))
    return tuple(int(a) for a in axes)
