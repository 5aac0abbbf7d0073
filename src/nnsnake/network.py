"""nnU-Net v2's networks (docs/method.md §5.2, §16), built from a configuration's ``architecture`` entry.

``PlainConvUNet`` (the classic plans) and ``ResidualEncoderUNet`` (the ResEnc M/L/XL presets). The topology
(stages, features, kernels, strides, convs or residual blocks per stage) comes from the plans, so a user can hold
our plans beside nnU-Net's and get the same network: same parameter count, same output shapes, the same
deep-supervision heads. The modules are deliberately flat (lists of ``nn.Sequential``) so that ``torch.compile``
traces them without graph breaks and channels-last tensors flow through ``torch.cat`` unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn import functional as F  # noqa: N812 (the usual name)

from .architecture import unet_spec

# torch's channels-last group-norm kernel (aten/src/ATen/native/cpu/group_norm_kernel.cpp, torch 2.x) vectorises
# over the channels only from this many voxels per map on (its ``feature_map_threshold``); below it, with one
# channel per group, it walks every channel separately across the map.
_GROUP_NORM_CL_MIN_VOXELS = 1024


def _channels_last(x: torch.Tensor) -> torch.memory_format | None:
    """The channels-last format ``x`` is laid out in, or None (plain contiguous or anything else)."""
    fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(x.dim())
    if fmt is None or x.is_contiguous() or not x.is_contiguous(memory_format=fmt):
        return None
    return fmt


def _instance_norm_cl_forward(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Instance norm of a channels-last CPU map: output, and per-(sample, channel) mean and 1/std, shape (N, C).

    Large maps take torch's group-norm kernel (one channel per group, vectorised over the channels); small ones
    (below ``_GROUP_NORM_CL_MIN_VOXELS``, where that kernel goes channel by channel) batch norm per sample, whose
    channels-last kernel is vectorised over the channels at any size.
    """
    n, c = x.shape[0], x.shape[1]
    voxels = x[0, 0].numel()
    if voxels >= _GROUP_NORM_CL_MIN_VOXELS:
        return torch.ops.aten.native_group_norm(x, weight, bias, n, c, voxels, c, eps)
    parts = [
        torch.ops.aten.native_batch_norm(xi, weight, bias, None, None, True, 0.0, eps) for xi in x.split(1)
    ]
    return (
        torch.cat([p[0] for p in parts]),
        torch.stack([p[1] for p in parts]),
        torch.stack([p[2] for p in parts]),
    )


class _ChannelsLastInstanceNorm(torch.autograd.Function):
    """Instance norm on channels-last CPU maps with a fast backward: batch-norm backward, one sample at a time.

    The gradient of a sample's instance norm is the batch-norm gradient of that sample alone (same statistics, the
    channels' affine weights); torch's channels-last batch-norm backward is vectorised over the channels, its
    group-norm backward with one channel per group is not. Forward as :func:`_instance_norm_cl_forward`.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
    ) -> torch.Tensor:
        y, mean, rstd = _instance_norm_cl_forward(x, weight, bias, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.eps = eps
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, rstd = ctx.saved_tensors
        fmt = _channels_last(x)
        grad = grad.contiguous(memory_format=fmt if fmt is not None else torch.contiguous_format)
        mask = list(ctx.needs_input_grad[:3])
        grads = [
            torch.ops.aten.native_batch_norm_backward(
                gi, xi, weight, None, None, mean[i], rstd[i], True, ctx.eps, mask
            )
            for i, (gi, xi) in enumerate(zip(grad.split(1), x.split(1), strict=True))
        ]
        grad_x = torch.cat([g[0] for g in grads]) if mask[0] else None
        grad_w = torch.stack([g[1] for g in grads]).sum(0) if mask[1] else None
        grad_b = torch.stack([g[2] for g in grads]).sum(0) if mask[2] else None
        return grad_x, grad_w, grad_b, None


class InstanceNorm(nn.Module):
    """Instance norm: per-sample, per-channel statistics, one affine scale/shift per channel (2D or 3D).

    The same function and parameters as nnU-Net's ``InstanceNorm3d`` (``weight``, ``bias``: state dicts load both
    ways); only the CPU kernels differ, chosen by layout. On CUDA: torch's instance norm, as in nnU-Net.

    On the CPU the U-Nets train in channels-last (``training.trainer._runtime``), where torch's instance norm
    copies through a contiguous batch norm and its group norm with one channel per group has a slow backward:

    * channels-last float32/64 maps: :class:`_ChannelsLastInstanceNorm` -- forward by torch's group-norm kernel
      on maps of at least 1024 voxels (its vectorised branch), else batch norm per sample; backward always by
      batch-norm backward per sample. Per layer, forward + backward, one thread, relative to torch's instance
      norm on the contiguous map (``benchmarks/norm_layers.py``, ResEnc M Hippocampus 3d_fullres, batch 2):
      this path 0.61-0.66x on the 2x32x40x56x40 ... 2x128x10x14x10 maps, 1.2x on 2x256x5x7x5; group norm on
      channels-last (nnsnake before #13) 2.9-3.7x; instance norm on channels-last 2.0-5.1x, on a contiguous
      copy 2.0-4.0x, plain tensor ops (var_mean, addcmul; autograd's backward) 2.9-4.7x. Forward alone, group
      norm on channels-last is 0.14-0.42x from 1024 voxels but 3.75x on 2x256x5x7x5 (batch norm: 0.42x).
    * contiguous maps (channels-last switched off) and bf16/fp16 (autocast): torch's group norm with one channel
      per group, 0.34-0.74x of its instance norm.

    Whole network, forward + backward, one thread, CPU time relative to group norm on channels-last (minimum of
    interleaved repeats; ``--network``): ResEnc M Hippocampus 3d_fullres (batch 2) 0.93-0.95 (contiguous layout
    with group norm: 1.03-1.07), plain 3d_fullres 0.92-0.95 (1.02-1.08), plain 2d at the planned batch 366
    0.75-0.77 (0.87-1.00), ResEnc M 2d at batch 64 0.80-0.86 (0.84-0.89); ResEnc M 3d_fullres with two threads
    0.95 wall time (contiguous 1.04).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__()
        self.num_features, self.eps, self.affine = int(num_features), float(eps), bool(affine)
        if self.affine:
            self.weight = nn.Parameter(torch.ones(self.num_features))
            self.bias = nn.Parameter(torch.zeros(self.num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if (
            x.dtype in (torch.float32, torch.float64)
            and (self.weight is None or self.weight.dtype == x.dtype)
            and _channels_last(x) is not None
        ):
            if torch.is_grad_enabled() and (
                x.requires_grad or (self.weight is not None and self.weight.requires_grad)
            ):
                return _ChannelsLastInstanceNorm.apply(x, self.weight, self.bias, self.eps)
            return _instance_norm_cl_forward(x, self.weight, self.bias, self.eps)[0]
        return F.group_norm(x, self.num_features, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def _norm_layer(dim: int, channels: int, eps: float, affine: bool) -> nn.Module:
    """Instance norm for 2D and 3D feature maps alike (:class:`InstanceNorm`)."""
    return InstanceNorm(channels, eps=eps, affine=affine)


class ConvNormAct(nn.Sequential):
    """Conv (stride, padding (k-1)//2) -> [dropout] -> instance norm -> leaky ReLU, the unit of every stage."""

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        *,
        conv_bias: bool,
        norm_eps: float,
        norm_affine: bool,
        negative_slope: float,
        dropout_p: float,
    ) -> None:
        # Callable: torch's stubs want fixed-length tuples per dimension, the plans give sequences
        conv_cls: Callable[..., nn.Module] = nn.Conv3d if dim == 3 else nn.Conv2d
        layers: list[nn.Module] = [
            conv_cls(
                in_channels,
                out_channels,
                tuple(kernel_size),
                tuple(stride),
                padding=tuple((k - 1) // 2 for k in kernel_size),
                bias=conv_bias,
            )
        ]
        if dropout_p > 0:
            layers.append((nn.Dropout3d if dim == 3 else nn.Dropout2d)(dropout_p, inplace=True))
        layers.append(_norm_layer(dim, out_channels, norm_eps, norm_affine))
        # out of place: in place on the norm's output makes autograd copy the whole map back (CopySlices),
        # about 7 % of a CPU training step; the values are identical
        layers.append(nn.LeakyReLU(negative_slope, inplace=False))
        super().__init__(*layers)


class _SegmentationNetwork(nn.Module):
    """What both U-Nets share: the topology check, the per-conv settings and the deep-supervision switch."""

    def _setup(
        self,
        dim: int,
        n_stages: int,
        num_outputs: int,
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        per_stage: list[tuple[str, Sequence[int], int]],
        deep_supervision: bool,
        **block: Any,
    ) -> dict[str, Any]:
        """Check the topology, record the attributes, and return the settings every conv block takes."""
        _check_topology(dim, n_stages, kernel_sizes, strides, per_stage)
        self.dim = dim
        self.num_outputs = num_outputs
        self.strides = [list(map(int, s)) for s in strides]
        self._deep_supervision = deep_supervision
        return block

    @property
    def deep_supervision(self) -> bool:
        return self._deep_supervision

    def set_deep_supervision(self, enabled: bool) -> None:
        """Training wants every head; inference and the final validation only the full-resolution one."""
        self._deep_supervision = bool(enabled)


class PlainConvUNet(_SegmentationNetwork):
    """Encoder of strided-conv stages, decoder of transposed-conv upsampling + skip concat + convs, 1x1 heads.

    With deep supervision ``forward`` returns one logit map per decoder stage, highest resolution first
    (``n_stages - 1`` maps); without it only the full-resolution logits.
    """

    def __init__(
        self,
        input_channels: int,
        num_outputs: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        *,
        dim: int,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_affine: bool = True,
        negative_slope: float = 0.01,
        dropout_p: float = 0.0,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        block = self._setup(
            dim,
            n_stages,
            num_outputs,
            kernel_sizes,
            strides,
            [
                ("n_conv_per_stage", n_conv_per_stage, n_stages),
                ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1),
            ],
            deep_supervision,
            conv_bias=conv_bias,
            norm_eps=norm_eps,
            norm_affine=norm_affine,
            negative_slope=negative_slope,
            dropout_p=dropout_p,
        )

        encoder = []
        channels = input_channels
        for stage in range(n_stages):
            convs = []
            for j in range(n_conv_per_stage[stage]):
                convs.append(
                    ConvNormAct(
                        dim,
                        channels,
                        features_per_stage[stage],
                        kernel_sizes[stage],
                        strides[stage] if j == 0 else [1] * dim,
                        **block,
                    )
                )
                channels = features_per_stage[stage]
            encoder.append(nn.Sequential(*convs))
        self.encoder = nn.ModuleList(encoder)

        # Decoder lists run from the bottleneck upwards (order of computation): level 0 upsamples the
        # bottleneck to skip level n_stages-2.
        transp_cls: Callable[..., nn.Module] = nn.ConvTranspose3d if dim == 3 else nn.ConvTranspose2d
        conv_cls: Callable[..., nn.Module] = nn.Conv3d if dim == 3 else nn.Conv2d
        upsamplers, decoder, heads = [], [], []
        for level in range(n_stages - 1):
            skip = n_stages - 2 - level
            below = features_per_stage[skip + 1]
            here = features_per_stage[skip]
            stride = tuple(strides[skip + 1])
            upsamplers.append(transp_cls(below, here, stride, stride, bias=conv_bias))
            convs = []
            channels = 2 * here
            for _ in range(n_conv_per_stage_decoder[level]):
                convs.append(ConvNormAct(dim, channels, here, kernel_sizes[skip], [1] * dim, **block))
                channels = here
            decoder.append(nn.Sequential(*convs))
            heads.append(conv_cls(here, num_outputs, 1, 1, 0, bias=True))
        self.upsamplers = nn.ModuleList(upsamplers)
        self.decoder = nn.ModuleList(decoder)
        self.heads = nn.ModuleList(heads)
        self.apply(_kaiming_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        skips = []
        for stage in self.encoder:
            x = stage(x)
            skips.append(x)
        n_levels = len(self.decoder)
        outputs = []
        for level in range(n_levels):
            x = self.upsamplers[level](x)
            x = torch.cat((x, skips[n_levels - 1 - level]), dim=1)
            x = self.decoder[level](x)
            if self._deep_supervision or level == n_levels - 1:
                outputs.append(self.heads[level](x))
        if not self._deep_supervision:
            return outputs[0]
        outputs.reverse()
        return outputs


# ---- ResidualEncoderUNet (nnunet_v2_extensions.md §2) --------------------------------------------------------
# Module and parameter names are dynamic_network_architectures' (``encoder.stages.1.blocks.0.conv1.conv.weight``),
# so nnU-Net's weights load without renaming. Its two kinds of alias keys (every conv block's ``all_modules.<i>``
# and the whole encoder again under ``decoder.encoder``) are not registered: state_dict() holds each parameter
# once, nnunet_state_dict() adds the aliases for files meant for nnU-Net, and load_state_dict() accepts both.
_RESENC_ALIAS_KEY = re.compile(r"(^decoder\.encoder\.)|((^|\.)all_modules\.\d+\.)")


class ConvDropoutNormReLU(nn.Module):
    """Conv (padding (k-1)//2) -> [dropout] -> instance norm -> [leaky ReLU], with DNA's attribute names.

    ``negative_slope=None`` leaves out the nonlinearity (a residual block's second conv, its skip projection).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        *,
        conv_bias: bool,
        norm_eps: float,
        norm_affine: bool,
        negative_slope: float | None,
        dropout_p: float = 0.0,
    ) -> None:
        super().__init__()
        conv_cls: Callable[..., nn.Module] = nn.Conv3d if dim == 3 else nn.Conv2d
        self.conv = conv_cls(
            in_channels,
            out_channels,
            tuple(kernel_size),
            tuple(stride),
            padding=tuple((k - 1) // 2 for k in kernel_size),
            bias=conv_bias,
        )
        self.dropout: nn.Module | None = (
            (nn.Dropout3d if dim == 3 else nn.Dropout2d)(dropout_p, inplace=True) if dropout_p > 0 else None
        )
        self.norm = _norm_layer(dim, out_channels, norm_eps, norm_affine)
        # out of place, as in PlainConvUNet (faster backward on the CPU, identical values)
        self.nonlin: nn.Module | None = (
            nn.LeakyReLU(negative_slope, inplace=False) if negative_slope is not None else None
        )

    def layers(self) -> list[nn.Module]:
        """The layers in DNA's ``all_modules`` order (the indices of its alias keys)."""
        return [m for m in (self.conv, self.dropout, self.norm, self.nonlin) if m is not None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.dropout is not None:
            x = self.dropout(x)
        x = self.norm(x)
        if self.nonlin is not None:
            x = self.nonlin(x)
        return x


class StackedConvBlocks(nn.Module):
    """``convs.0 ...``: the first conv carries the stride (the stem, a decoder stage)."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.convs = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x)


class BasicBlockD(nn.Module):
    """ResNet-D basic block: ``LeakyReLU(conv2(conv1(x)) + skip(x))``.

    The skip averages with kernel = stride when the block downsamples and projects with a bias-free 1x1 conv + norm
    when the channels change; otherwise it is the identity (no module, as in DNA).
    """

    def __init__(
        self,
        dim: int,
        in_channels: int,
        out_channels: int,
        kernel_size: Sequence[int],
        stride: Sequence[int],
        block: dict[str, Any],
    ) -> None:
        super().__init__()
        ones = [1] * dim
        self.conv1 = ConvDropoutNormReLU(dim, in_channels, out_channels, kernel_size, stride, **block)
        no_nonlin = {**block, "negative_slope": None, "dropout_p": 0.0}
        self.conv2 = ConvDropoutNormReLU(dim, out_channels, out_channels, kernel_size, ones, **no_nonlin)
        self.nonlin2 = nn.LeakyReLU(block["negative_slope"], inplace=False)
        skip: list[nn.Module] = []
        if any(int(s) != 1 for s in stride):
            pool_cls: Callable[..., nn.Module] = nn.AvgPool3d if dim == 3 else nn.AvgPool2d
            skip.append(pool_cls(tuple(stride), tuple(stride)))
        if in_channels != out_channels:
            projection = {**no_nonlin, "conv_bias": False}
            skip.append(ConvDropoutNormReLU(dim, in_channels, out_channels, ones, ones, **projection))
        self.skip: nn.Module | None = nn.Sequential(*skip) if skip else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.skip is None else self.skip(x)
        return self.nonlin2(self.conv2(self.conv1(x)) + residual)


class StackedResidualBlocks(nn.Module):
    """``blocks.0 ...``: block 0 downsamples and changes the width, the others keep both."""

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResidualEncoder(nn.Module):
    """Stem conv (no downsampling), then residual stages downsampling with their first block's strided conv1."""

    def __init__(
        self,
        input_channels: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_blocks_per_stage: Sequence[int],
        dim: int,
        block: dict[str, Any],
    ) -> None:
        super().__init__()
        ones = [1] * dim
        stem = ConvDropoutNormReLU(dim, input_channels, features_per_stage[0], kernel_sizes[0], ones, **block)
        self.stem = StackedConvBlocks([stem])
        stages = []
        channels = features_per_stage[0]
        for s, width in enumerate(features_per_stage):
            blocks = [BasicBlockD(dim, channels, width, kernel_sizes[s], strides[s], block)]
            blocks += [
                BasicBlockD(dim, width, width, kernel_sizes[s], ones, block)
                for _ in range(n_blocks_per_stage[s] - 1)
            ]
            stages.append(StackedResidualBlocks(blocks))
            channels = width
        self.stages = nn.Sequential(*stages)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return skips


class UNetDecoder(nn.Module):
    """Transposed-conv upsampling, concatenation [upsampled, skip], plain convs and a 1x1 head per level.

    The lists run from the bottleneck upwards (order of computation); every head is built so that weights trained
    with deep supervision load without it.
    """

    def __init__(
        self,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_conv_per_stage_decoder: Sequence[int],
        num_outputs: int,
        dim: int,
        block: dict[str, Any],
    ) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        transp_cls: Callable[..., nn.Module] = nn.ConvTranspose3d if dim == 3 else nn.ConvTranspose2d
        conv_cls: Callable[..., nn.Module] = nn.Conv3d if dim == 3 else nn.Conv2d
        stages, transpconvs, seg_layers = [], [], []
        # built in DNA's order (transposed conv, convs, head per level) so that a seed gives DNA's initial weights
        for level in range(n_stages - 1):
            skip = n_stages - 2 - level
            here, stride = features_per_stage[skip], tuple(strides[skip + 1])
            transpconvs.append(
                transp_cls(features_per_stage[skip + 1], here, stride, stride, bias=block["conv_bias"])
            )
            convs = [
                ConvDropoutNormReLU(
                    dim, 2 * here if j == 0 else here, here, kernel_sizes[skip], [1] * dim, **block
                )
                for j in range(n_conv_per_stage_decoder[level])
            ]
            stages.append(StackedConvBlocks(convs))
            seg_layers.append(conv_cls(here, num_outputs, 1, 1, 0, bias=True))
        self.stages = nn.ModuleList(stages)
        self.transpconvs = nn.ModuleList(transpconvs)
        self.seg_layers = nn.ModuleList(seg_layers)

    def forward(self, skips: list[torch.Tensor], deep_supervision: bool) -> torch.Tensor | list[torch.Tensor]:
        x = skips[-1]
        n_levels = len(self.stages)
        outputs = []
        for level in range(n_levels):
            x = self.transpconvs[level](x)
            x = torch.cat((x, skips[-(level + 2)]), dim=1)
            x = self.stages[level](x)
            if deep_supervision or level == n_levels - 1:
                outputs.append(self.seg_layers[level](x))
        if not deep_supervision:
            return outputs[0]
        outputs.reverse()
        return outputs


class ResidualEncoderUNet(_SegmentationNetwork):
    """nnU-Net's ResidualEncoderUNet (the ResEnc M/L/XL presets): residual encoder, the plain U-Net decoder.

    With deep supervision ``forward`` returns one logit map per decoder stage, highest resolution first; without
    it only the full-resolution logits. Initialised as nnU-Net does (He-normal, slope 0.01; the second norm of every
    residual block zero so each block starts as ``LeakyReLU(skip(x))``); with the same seed before construction
    the initial weights equal dynamic_network_architectures' bit for bit.
    """

    def __init__(
        self,
        input_channels: int,
        num_outputs: int,
        features_per_stage: Sequence[int],
        kernel_sizes: Sequence[Sequence[int]],
        strides: Sequence[Sequence[int]],
        n_blocks_per_stage: Sequence[int],
        n_conv_per_stage_decoder: Sequence[int],
        *,
        dim: int,
        conv_bias: bool = True,
        norm_eps: float = 1e-5,
        norm_affine: bool = True,
        negative_slope: float = 0.01,
        dropout_p: float = 0.0,
        deep_supervision: bool = True,
    ) -> None:
        super().__init__()
        n_stages = len(features_per_stage)
        block = self._setup(
            dim,
            n_stages,
            num_outputs,
            kernel_sizes,
            strides,
            [
                ("n_blocks_per_stage", n_blocks_per_stage, n_stages),
                ("n_conv_per_stage_decoder", n_conv_per_stage_decoder, n_stages - 1),
            ],
            deep_supervision,
            conv_bias=conv_bias,
            norm_eps=norm_eps,
            norm_affine=norm_affine,
            negative_slope=negative_slope,
            dropout_p=dropout_p,
        )
        self.encoder = ResidualEncoder(
            input_channels, features_per_stage, kernel_sizes, strides, n_blocks_per_stage, dim, block
        )
        self.decoder = UNetDecoder(
            features_per_stage, kernel_sizes, strides, n_conv_per_stage_decoder, num_outputs, dim, block
        )
        self._register_load_state_dict_pre_hook(_drop_resenc_aliases)
        self._initialize()

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        return self.decoder(self.encoder(x), self._deep_supervision)

    @torch.no_grad()
    def _initialize(self) -> None:
        """He init in the order DNA's ``apply`` visits the layers, so the random stream is the same.

        DNA reaches every conv twice per pass (as ``conv`` and as ``all_modules.0``) and the encoder twice (as
        ``encoder`` and ``decoder.encoder``); the values of a repeated draw replace the earlier ones.
        """

        def visit(module: nn.Module) -> None:
            for child in module.children():
                visit(child)
            if isinstance(module, ConvDropoutNormReLU):
                for layer in module.layers():
                    visit(layer)
            _kaiming_init(module)

        visit(self.encoder)
        visit(self.encoder)
        visit(self.decoder)
        for module in self.modules():
            norm = module.conv2.norm if isinstance(module, BasicBlockD) else None
            if isinstance(norm, InstanceNorm) and norm.weight is not None and norm.bias is not None:
                nn.init.zeros_(norm.weight)
                nn.init.zeros_(norm.bias)

    def nnunet_state_dict(self) -> dict[str, torch.Tensor]:
        """The state dict with every alias key DNA's module tree has (and nnU-Net's strict loaders demand), in DNA's
        order: per conv block ``conv.*, norm.*, all_modules.<i>.*``, the encoder again under ``decoder.encoder``.

        Aliases share the tensors of the canonical keys (``torch.save`` stores each once).
        """
        canonical = self.state_dict()
        encoder = dict(_with_aliases(self.encoder, "encoder.", canonical))
        decoder = dict(_with_aliases(self.decoder, "decoder.", canonical))
        return {**encoder, **{f"decoder.{k}": v for k, v in encoder.items()}, **decoder}


def _with_aliases(
    module: nn.Module, prefix: str, canonical: Mapping[str, torch.Tensor]
) -> Iterator[tuple[str, torch.Tensor]]:
    """``module``'s canonical entries in registration order, each conv block followed by its all_modules aliases."""
    for name, _ in module.named_parameters(prefix=prefix[:-1], recurse=False):
        yield name, canonical[name]
    for child_name, child in module.named_children():
        yield from _with_aliases(child, f"{prefix}{child_name}.", canonical)
    if isinstance(module, ConvDropoutNormReLU):
        for index, layer in enumerate(module.layers()):
            for leaf, _ in layer.named_parameters():
                yield (
                    f"{prefix}all_modules.{index}.{leaf}",
                    canonical[f"{prefix}{_layer_name(module, layer)}.{leaf}"],
                )


def _layer_name(block: ConvDropoutNormReLU, layer: nn.Module) -> str:
    return next(name for name, child in block.named_children() if child is layer)


def _drop_resenc_aliases(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-time hook: drop nnU-Net's alias keys, so nnU-Net's full state dicts load strictly as well."""
    for key in [k for k in state_dict if k.startswith(prefix) and _RESENC_ALIAS_KEY.search(k[len(prefix) :])]:
        del state_dict[key]


def _check_topology(
    dim: int,
    n_stages: int,
    kernel_sizes: Sequence[Sequence[int]],
    strides: Sequence[Sequence[int]],
    depths: Sequence[tuple[str, Sequence[int], int]],
) -> None:
    """Clear errors for arch_kwargs whose lists do not fit the number of stages or the conv dimension."""
    for name, value, expected in (
        ("kernel_sizes", kernel_sizes, n_stages),
        ("strides", strides, n_stages),
        *depths,
    ):
        if len(value) != expected:
            raise ValueError(
                f"architecture: {name} has {len(value)} entries but {expected} are needed for "
                f"{n_stages} stages; fix the plans' arch_kwargs"
            )
    if n_stages < 2:
        raise ValueError("architecture: a U-Net needs at least 2 stages (n_stages >= 2)")
    for name, seq in (("kernel_sizes", kernel_sizes), ("strides", strides)):
        if any(len(v) != dim for v in seq):
            raise ValueError(
                f"architecture: every entry of {name} must have {dim} values for a {dim}D conv_op"
            )


def channels_last_format(spatial_dims: int) -> torch.memory_format:
    """The channels-last memory format for a network with ``spatial_dims`` (2 or 3) spatial axes."""
    return torch.channels_last_3d if spatial_dims == 3 else torch.channels_last


def _kaiming_init(module: nn.Module) -> None:
    """He-normal init with the leaky-ReLU slope 0.01 on conv / transposed-conv weights, zero biases (§5.2)."""
    if isinstance(module, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        nn.init.kaiming_normal_(module.weight, a=1e-2)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def build_network(
    architecture: dict[str, Any],
    num_input_channels: int,
    num_outputs: int,
    deep_supervision: bool = True,
) -> PlainConvUNet | ResidualEncoderUNet:
    """Instantiate the network described by a configuration's ``architecture`` entry of the plans.

    ``network_class_name`` chooses ResidualEncoderUNet (ResEnc plans, ``n_blocks_per_stage``) or PlainConvUNet
    (classic plans, ``n_conv_per_stage``; also when only bare arch kwargs are given); the entry is read by
    :func:`nnsnake.architecture.unet_spec`. ``num_outputs`` is the number of labels including background (or of
    regions); for the cascade ``num_input_channels`` already counts the previous stage's one-hot channels.
    """
    spec = unet_spec(architecture)
    network_cls = ResidualEncoderUNet if spec.residual else PlainConvUNet
    return network_cls(
        num_input_channels,
        num_outputs,
        spec.features,
        spec.kernels,
        spec.strides,
        spec.n_encoder,
        spec.n_conv_decoder,
        dim=spec.dim,
        conv_bias=spec.conv_bias,
        norm_eps=spec.norm_eps,
        norm_affine=spec.norm_affine,
        negative_slope=spec.negative_slope,
        dropout_p=spec.dropout_p,
        deep_supervision=deep_supervision,
    )


def count_parameters(network: nn.Module) -> int:
    """Parameters of a network, each counted once (a naive sum over nnU-Net's state dict counts aliases twice)."""
    return sum(p.numel() for p in network.parameters())


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Per-head target scale factors: ``1 / cumprod(strides)`` without the bottleneck entry (§5.3)."""
    cumulative = np.cumprod(np.asarray(strides, dtype=np.float64), axis=0)
    return [[float(v) for v in row] for row in (1.0 / cumulative)[:-1]]


def deep_supervision_weights(n_heads: int) -> np.ndarray:
    """Loss weight per head, ``1/2^k`` halving towards low resolution, lowest head 0, normalised to sum 1."""
    if n_heads < 1:
        raise ValueError("deep_supervision_weights: need at least one head")
    weights = np.array([1.0 / 2**k for k in range(n_heads)])
    if n_heads > 1:
        weights[-1] = 0.0
    return weights / weights.sum()
