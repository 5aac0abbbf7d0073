"""Fine-tuning: start a training from pretrained weights (``training.pretrained_weights``, docs/method.md §5.11).

nnU-Net's ``-pretrained_weights`` semantics: every layer of the new network except the segmentation heads is taken
from the file, which must hold each of them with the same shape (stem, encoder, decoder and upsamplers alike, so
the plans must match except for the class count); the heads keep their fresh initialisation, layers of the file
that the network lacks are ignored, and optimizer, epoch and schedule start fresh. The file is an nnsnake
``model_final.pt`` or an nnU-Net ``checkpoint_final.pth`` (PlainConvUNet or ResidualEncoderUNet), read by the
safe loader of :mod:`nnsnake.inference.nnunet_models` (nothing in a crafted pickle runs). The trainer calls
:func:`load_pretrained_weights` when it builds the network; a resumed run then replaces the weights by its own
state, so the file only shapes a fresh start. Its path and SHA-256 are part of the training signature
(:func:`pretrained_signature`), so other weights mean another run.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError

log = logging.getLogger("nnsnake")

PathLike = str | os.PathLike

# the segmentation heads (1x1 convs to the class logits): nnsnake's PlainConvUNet ``heads.k``, nnU-Net's and the
# ResidualEncoderUNet's ``decoder.seg_layers.k``. Their shapes depend on the class count, so they are never loaded.
_HEAD_KEY = re.compile(r"(^|\.)(heads|seg_layers)\.")
_TRANSFER_HINT = (
    "the plans must match the pretraining run's except for the labels: plan this dataset with the pretraining "
    "dataset's plans (config planning.transfer_plans_from: <pretraining results>/plans.json, or nnU-Net's "
    "nnUNetPlans.json), preprocess and train again"
)


def is_head(key: str) -> bool:
    """Whether a state-dict key belongs to a segmentation head (never transferred)."""
    return bool(_HEAD_KEY.search(key))


def _existing(path: PathLike) -> Path:
    file = Path(path)
    if not file.is_file():
        raise ConfigError(
            f"training.pretrained_weights: {file} does not exist; give an nnsnake model_final.pt or an nnU-Net "
            "checkpoint_final.pth"
        )
    return file


def weights_sha256(path: PathLike) -> str:
    """SHA-256 of the weights file's bytes (read once per training, when its signature is made)."""
    sha = hashlib.sha256()
    with open(_existing(path), "rb") as fh:
        for block in iter(functools.partial(fh.read, 1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def pretrained_signature(path: PathLike | None) -> dict[str, Any]:
    """The training-signature entries of ``training.pretrained_weights``: none without it (so states written
    before the setting existed stay resumable), else the path as configured and the file's SHA-256."""
    if not path:
        return {}
    return {"pretrained_weights": str(path), "pretrained_weights_sha256": weights_sha256(path)}


def _network_weights(path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The file's weights under its own names and where they come from (``nnU-Net`` or ``nnsnake``)."""
    from ..inference.nnunet_models import is_nnunet_checkpoint, load_checkpoint_safely

    checkpoint = load_checkpoint_safely(path)  # UnsafeCheckpointError / CheckpointError name the file
    weights = checkpoint.get("network_weights") if isinstance(checkpoint, Mapping) else None
    if not isinstance(weights, Mapping) or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(
            f"training.pretrained_weights: {path} holds no network_weights; give an nnsnake model_final.pt or an "
            "nnU-Net checkpoint_final.pth"
        )
    source = "nnU-Net" if is_nnunet_checkpoint(checkpoint) else "nnsnake"
    return dict(weights), source


def _in_network_names(network: nn.Module, weights: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, Any]]:
    """nnU-Net's keys under nnsnake's names: ``{our key: (the file's key, tensor)}``.

    Keys are renamed one at a time: a layer of a stage this network does not have cannot be renamed and stays
    under the file's name, where it is ignored like any other extra layer (the check then names what is missing).
    """
    from ..inference.nnunet_models import nnunet_weights_for

    renamed: dict[str, tuple[str, Any]] = {}
    for key, value in weights.items():
        try:
            mapped = nnunet_weights_for(network, {key: value})
        except (AttributeError, StopIteration, KeyError, IndexError):
            mapped = {key: value}
        for new_key, tensor in mapped.items():  # empty for an alias
            renamed[new_key] = (key, tensor)
    return renamed


def _shape(value: Any) -> list[int]:
    return [int(s) for s in value.shape]


def load_pretrained_weights(network: nn.Module, path: PathLike) -> dict[str, Any]:
    """Copy every non-head layer of ``path`` into ``network`` (nnU-Net's ``load_pretrained_weights``).

    Every key of the network's state dict that is not a segmentation head must be in the file with the same
    shape; otherwise :class:`~nnsnake.errors.ConfigError` names the layer and both shapes and says to transfer
    the plans. Returns a summary: source format, layers loaded, heads left at their initialisation, file layers
    ignored.
    """
    file = _existing(path)
    weights, source = _network_weights(file)
    if source == "nnU-Net":
        available = _in_network_names(network, weights)
    else:
        available = {k: (k, v) for k, v in weights.items()}
    target = network.state_dict()
    heads = [k for k in target if is_head(k)]
    loaded: dict[str, torch.Tensor] = {}
    for key, current in target.items():
        if key in heads:
            continue
        if key not in available:
            raise ConfigError(
                f"training.pretrained_weights: {file} has no layer {key} (shape {_shape(current)} in this "
                f"network); it was trained with another network architecture: {_TRANSFER_HINT}"
            )
        file_key, value = available[key]
        if _shape(value) != _shape(current):
            named = key if file_key == key else f"{key} ({file_key} in the file)"
            raise ConfigError(
                f"training.pretrained_weights: layer {named} has shape {_shape(value)} in {file} but "
                f"{_shape(current)} in this network; {_TRANSFER_HINT}"
            )
        loaded[key] = value.to(dtype=current.dtype)
    ignored = sorted(name for key, (name, _) in available.items() if key not in loaded and not is_head(key))
    with torch.no_grad():
        network.load_state_dict({**target, **loaded}, strict=True)
    summary = {
        "path": str(file),
        "source": source,
        "layers_loaded": len(loaded),
        "heads_initialised": heads,
        "file_layers_ignored": ignored,
    }
    log.info(
        "pretrained weights: %d layer(s) from %s (%s checkpoint); %d segmentation head tensor(s) keep their "
        "initialisation%s",
        len(loaded),
        file,
        source,
        len(heads),
        f", {len(ignored)} layer(s) of the file ignored" if ignored else "",
    )
    return summary
