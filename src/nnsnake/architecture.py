"""A configuration's network as numbers: the plans' ``architecture`` entry read and checked, and what follows from it
without building anything (input channels, parameter count).

Torch-free, so that steps which only need these numbers (the selection's cost of a candidate) load no torch;
:func:`nnsnake.network.build_network` builds the modules from the same :class:`UNetSpec`, and a test checks that
:func:`parameter_count` equals the built network's count for every plan we ship fixtures of.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .labels import LabelModel

# conv_op strings nnU-Net writes into plans (and the short forms people type by hand) -> spatial dimensions.
CONV_DIMS = {
    "torch.nn.modules.conv.Conv2d": 2,
    "torch.nn.modules.conv.Conv3d": 3,
    "torch.nn.Conv2d": 2,
    "torch.nn.Conv3d": 3,
    "Conv2d": 2,
    "Conv3d": 3,
}
NONLINS = {"torch.nn.LeakyReLU", "torch.nn.modules.activation.LeakyReLU", "LeakyReLU"}


@dataclass(frozen=True)
class UNetSpec:
    """The topology and layer settings of a PlainConvUNet (``residual`` false) or ResidualEncoderUNet."""

    residual: bool
    features: list[int]
    kernels: list[list[int]]
    strides: list[list[int]]
    n_encoder: list[int]  # convs per stage (plain) or residual blocks per stage (ResEnc)
    n_conv_decoder: list[int]
    dim: int
    conv_bias: bool
    norm_eps: float
    norm_affine: bool
    negative_slope: float
    dropout_p: float


def arch_kwargs(architecture: Mapping[str, Any]) -> Mapping[str, Any]:
    """Accept both a full ``architecture`` entry (with ``arch_kwargs``) and the bare kwargs dict."""
    return architecture["arch_kwargs"] if "arch_kwargs" in architecture else architecture


def unet_spec(architecture: Mapping[str, Any]) -> UNetSpec:
    """Read a configuration's ``architecture`` entry of the plans; a clear error names what is missing or not
    supported.

    ``network_class_name`` chooses ResidualEncoderUNet (ResEnc plans, ``n_blocks_per_stage``) or PlainConvUNet
    (classic plans, ``n_conv_per_stage``; also when only bare arch kwargs are given).
    """
    kw = arch_kwargs(architecture)
    class_name = str(architecture.get("network_class_name", "")).rsplit(".", 1)[-1]
    if class_name not in ("", "PlainConvUNet", "ResidualEncoderUNet"):
        raise ValueError(
            f"architecture: network_class_name {architecture['network_class_name']!r} is not supported; "
            "nnsnake builds PlainConvUNet and ResidualEncoderUNet"
        )
    residual = class_name == "ResidualEncoderUNet"
    try:
        n_stages = int(kw["n_stages"])
        features = [int(f) for f in kw["features_per_stage"]]
        kernels = [[int(k) for k in ks] for ks in kw["kernel_sizes"]]
        strides = [[int(s) for s in st] for st in kw["strides"]]
        conv_op = kw.get("conv_op") or ("torch.nn.modules.conv.Conv3d" if len(kernels[0]) == 3 else "Conv2d")
        n_encoder = kw["n_blocks_per_stage"] if residual else kw.get("n_conv_per_stage", [2] * n_stages)
        n_conv_dec = kw.get("n_conv_per_stage_decoder", [1 if residual else 2] * (n_stages - 1))
    except KeyError as err:
        raise ValueError(
            f"architecture: arch_kwargs lacks {err}; regenerate the plans (docs/method.md §3.5(c))"
        ) from None
    if isinstance(n_encoder, int):
        n_encoder = [n_encoder] * n_stages
    if isinstance(n_conv_dec, int):
        n_conv_dec = [n_conv_dec] * (n_stages - 1)
    if len(features) != n_stages:
        raise ValueError(
            f"architecture: n_stages is {n_stages} but features_per_stage has {len(features)} entries"
        )
    if conv_op not in CONV_DIMS:
        raise ValueError(
            f"architecture: conv_op {conv_op!r} is not supported; use one of {sorted(CONV_DIMS)}"
        )
    norm_op = kw.get("norm_op")
    if norm_op is not None and "InstanceNorm" not in str(norm_op):
        raise ValueError(
            f"architecture: norm_op {norm_op!r} is not supported; nnsnake's U-Net uses InstanceNorm"
        )
    nonlin = kw.get("nonlin")
    if nonlin is not None and str(nonlin) not in NONLINS:
        raise ValueError(f"architecture: nonlin {nonlin!r} is not supported; nnsnake's U-Net uses LeakyReLU")
    norm_kwargs = kw.get("norm_op_kwargs") or {}
    nonlin_kwargs = kw.get("nonlin_kwargs") or {}
    dropout_kwargs = kw.get("dropout_op_kwargs") or {}
    return UNetSpec(
        residual=residual,
        features=features,
        kernels=kernels,
        strides=strides,
        n_encoder=[int(n) for n in n_encoder],
        n_conv_decoder=[int(n) for n in n_conv_dec],
        dim=CONV_DIMS[conv_op],
        conv_bias=bool(kw.get("conv_bias", True)),
        norm_eps=float(norm_kwargs.get("eps", 1e-5)),
        norm_affine=bool(norm_kwargs.get("affine", True)),
        negative_slope=float(nonlin_kwargs.get("negative_slope", 0.01)),
        dropout_p=float(dropout_kwargs.get("p", 0.0)) if kw.get("dropout_op") else 0.0,
    )


def num_input_channels(
    plans: Mapping[str, Any], configuration: str | Mapping[str, Any], dataset_json: Mapping[str, Any]
) -> int:
    """Image channels, plus one one-hot channel per foreground label for a cascade stage (labels even in
    regions mode, as nnU-Net and nnsnake's trainer do). ``configuration``: a name in ``plans`` or resolved."""
    from .planning import configuration_entry

    n = len(dataset_json["channel_names"])
    if configuration_entry(plans, configuration).get("previous_stage"):
        n += len(LabelModel.from_dataset_json(dataset_json).foreground_labels)
    return n


def _conv_unit(spec: UNetSpec, in_channels: int, out_channels: int, kernel: Sequence[int], bias: bool) -> int:
    """A conv followed by instance norm (weights, optional bias, the norm's affine scale and shift)."""
    norm = 2 * out_channels if spec.norm_affine else 0
    return in_channels * out_channels * math.prod(kernel) + (out_channels if bias else 0) + norm


def parameter_count(architecture: Mapping[str, Any], input_channels: int, num_outputs: int) -> int:
    """Trainable parameters of the network :func:`nnsnake.network.build_network` builds from ``architecture``
    (every deep-supervision head included, as the built network always has them)."""
    spec = unet_spec(architecture)
    ones = [1] * spec.dim
    total = 0
    channels = input_channels
    if spec.residual:  # stem, then residual blocks (conv1, conv2, a 1x1 projection when the width changes)
        total += _conv_unit(spec, channels, spec.features[0], spec.kernels[0], spec.conv_bias)
        channels = spec.features[0]
        for width, kernel, blocks in zip(spec.features, spec.kernels, spec.n_encoder, strict=True):
            for _ in range(blocks):
                total += _conv_unit(spec, channels, width, kernel, spec.conv_bias)
                total += _conv_unit(spec, width, width, kernel, spec.conv_bias)
                if channels != width:
                    total += _conv_unit(spec, channels, width, ones, False)
                channels = width
    else:
        for width, kernel, convs in zip(spec.features, spec.kernels, spec.n_encoder, strict=True):
            for _ in range(convs):
                total += _conv_unit(spec, channels, width, kernel, spec.conv_bias)
                channels = width
    n_stages = len(spec.features)
    for level in range(n_stages - 1):  # transposed conv, convs on [upsampled, skip], 1x1 head
        skip = n_stages - 2 - level
        here, below = spec.features[skip], spec.features[skip + 1]
        total += below * here * math.prod(spec.strides[skip + 1]) + (here if spec.conv_bias else 0)
        channels = 2 * here
        for _ in range(spec.n_conv_decoder[level]):
            total += _conv_unit(spec, channels, here, spec.kernels[skip], spec.conv_bias)
            channels = here
        total += here * num_outputs + num_outputs
    return total
