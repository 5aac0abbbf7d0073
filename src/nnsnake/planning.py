"""Experiment planning: from a dataset fingerprint to nnU-Net v2's plans (docs/method.md §3, §16).

The result has the structure, key names and string values of nnU-Net v2's plans files so a user can hold both
side by side. Every number is computed with the same float64 operations, in the same order, as nnU-Net 2.8.1's
planners, so spacings, median shapes, patch sizes and batch sizes agree to the last bit and voxel. One code path
serves all planners: the classic ``ExperimentPlanner`` (PlainConvUNet, ``nnUNetPlans``) and the residual-encoder
presets ``nnUNetPlannerResEncM/L/XL`` (ResidualEncoderUNet) differ only in the constants of a
:class:`PlannerPreset`. The GPU-memory model is nnU-Net's proxy (§3.5 d): the number of elements of all conv
output feature maps, computed analytically here instead of by instantiating the network.
"""

from __future__ import annotations

import copy
import functools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ConfigError
from .labels import LabelModel

# ---- constants of nnU-Net's default ExperimentPlanner (docs/method.md §3.1) ------------------------------------------
ANISO_THRESHOLD = 3
REFERENCE_VRAM_PROXY_3D = 560_000_000
REFERENCE_VRAM_PROXY_2D = 85_000_000
REFERENCE_GPU_MEMORY_GB = 8
REFERENCE_BATCH_SIZE_3D = 2
REFERENCE_BATCH_SIZE_2D = 12
BASE_NUM_FEATURES = 32
MAX_FEATURES_3D = 320
MAX_FEATURES_2D = 512
MIN_FEATURE_MAP_EDGE = 4
CONVS_PER_STAGE_ENCODER = 2
CONVS_PER_STAGE_DECODER = 2
MIN_BATCH_SIZE = 2
MAX_DATASET_FRACTION_PER_BATCH = 0.05
LOWRES_CREATION_THRESHOLD = 0.25
LOWRES_SPACING_STEP = 1.03
LOWRES_MIN_SIZE_RATIO = 2
USE_MASK_FOR_NORM_BELOW_RELATIVE_SIZE = 3 / 4.0
INITIAL_PATCH_VOXELS_3D = 256**3
INITIAL_PATCH_VOXELS_2D = 2048**2

PLANS_NAME = "nnUNetPlans"
PREPROCESSOR_NAME = "DefaultPreprocessor"
NETWORK_CLASS_NAME = "dynamic_network_architectures.architectures.unet.PlainConvUNet"
RESIDUAL_NETWORK_CLASS_NAME = "dynamic_network_architectures.architectures.unet.ResidualEncoderUNet"
CONV_OP_NAMES = {2: "torch.nn.modules.conv.Conv2d", 3: "torch.nn.modules.conv.Conv3d"}
NORM_OP_NAMES = {
    2: "torch.nn.modules.instancenorm.InstanceNorm2d",
    3: "torch.nn.modules.instancenorm.InstanceNorm3d",
}
RESAMPLING_FN_NAME = "resample_data_or_seg_to_shape"

# channel name (case-folded) -> (normalisation class name, whether a nonzero mask may be used); anything else
# gets z-scoring (docs/method.md §3.8)
NORMALIZATION_BY_CHANNEL_NAME = {
    "ct": ("CTNormalization", False),
    "nonorm": ("NoNormalization", False),
    "zscore": ("ZScoreNormalization", True),
    "rescale_to_0_1": ("RescaleTo01Normalization", False),
    "rgb_to_0_1": ("RGBTo01Normalization", False),
}
DEFAULT_NORMALIZATION = ("ZScoreNormalization", True)


# ---- planner presets (nnunet_v2_extensions.md §1.2) ------------------------------------------------------------
@dataclass(frozen=True)
class PlannerPreset:
    """The constants in which nnU-Net's planners differ; everything else (spacing, topology, lowres search,
    normalisation, resampling) is shared, so a preset is data rather than a planner subclass.

    ``gpu_memory_target_gb`` is both the default target and the memory the reference proxies correspond to
    (nnU-Net's ``UNet_reference_val_corresp_GB``); a user target scales the reference linearly.
    """

    planner: str  # nnU-Net's class name, written as experiment_planner_used
    plans_name: str
    network_class_name: str
    gpu_memory_target_gb: float
    reference_vram_proxy_3d: int
    reference_vram_proxy_2d: int
    max_dataset_fraction_per_batch: float
    encoder_depth_key: str  # arch_kwargs key: n_conv_per_stage (plain) or n_blocks_per_stage (residual)
    encoder_depth: tuple[int, ...]  # per stage, cut to n_stages
    decoder_depth: tuple[int, ...]  # convs per decoder stage, cut to n_stages - 1
    # the default planner shrinks the patch until batch 2 fits, the residual ones until the reference batch fits
    shrink_until_reference_batch_fits: bool
    # configurations whose data_identifier is always nnUNetPlans_<name> (the residual planners reuse the
    # default planner's preprocessed 2d and 3d_fullres data)
    shared_data_configurations: tuple[str, ...] = ()

    @property
    def residual(self) -> bool:
        return self.encoder_depth_key == "n_blocks_per_stage"

    def data_identifier(self, configuration: str) -> str:
        plans = PLANS_NAME if configuration in self.shared_data_configurations else self.plans_name
        return f"{plans}_{configuration}"

    def reference_vram_proxy(self, dim: int, gpu_memory_target_gb: float) -> float:
        """The proxy budget for a GPU target (nnU-Net's ``reference * target / corresp_GB``)."""
        reference = self.reference_vram_proxy_2d if dim == 2 else self.reference_vram_proxy_3d
        return reference * (gpu_memory_target_gb / self.gpu_memory_target_gb)


_RESENC_ENCODER_BLOCKS = (1, 3, 4, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6)
_RESENC_DECODER_CONVS = (1,) * 12


def _resenc_preset(
    suffix: str, gb: float, proxy_3d: int, proxy_2d: int, max_fraction: float
) -> PlannerPreset:
    return PlannerPreset(
        planner=f"nnUNetPlannerResEnc{suffix}" if suffix else "ResEncUNetPlanner",
        plans_name=f"nnUNetResEncUNet{suffix}Plans",
        network_class_name=RESIDUAL_NETWORK_CLASS_NAME,
        gpu_memory_target_gb=gb,
        reference_vram_proxy_3d=proxy_3d,
        reference_vram_proxy_2d=proxy_2d,
        max_dataset_fraction_per_batch=max_fraction,
        encoder_depth_key="n_blocks_per_stage",
        encoder_depth=_RESENC_ENCODER_BLOCKS,
        decoder_depth=_RESENC_DECODER_CONVS,
        shrink_until_reference_batch_fits=True,
        shared_data_configurations=("2d", "3d_fullres"),
    )


PLANNER_PRESETS: dict[str, PlannerPreset] = {
    p.planner: p
    for p in (
        PlannerPreset(
            planner="ExperimentPlanner",
            plans_name=PLANS_NAME,
            network_class_name=NETWORK_CLASS_NAME,
            gpu_memory_target_gb=REFERENCE_GPU_MEMORY_GB,
            reference_vram_proxy_3d=REFERENCE_VRAM_PROXY_3D,
            reference_vram_proxy_2d=REFERENCE_VRAM_PROXY_2D,
            max_dataset_fraction_per_batch=MAX_DATASET_FRACTION_PER_BATCH,
            encoder_depth_key="n_conv_per_stage",
            encoder_depth=(CONVS_PER_STAGE_ENCODER,) * 14,
            decoder_depth=(CONVS_PER_STAGE_DECODER,) * 13,
            shrink_until_reference_batch_fits=False,
        ),
        _resenc_preset("", 8, 680_000_000, 135_000_000, MAX_DATASET_FRACTION_PER_BATCH),
        _resenc_preset("M", 8, 680_000_000, 135_000_000, 1.0),
        _resenc_preset("L", 24, 2_100_000_000, 380_000_000, 1.0),
        _resenc_preset("XL", 40, 3_600_000_000, 560_000_000, 1.0),
    )
}
DEFAULT_PLANNER = "ExperimentPlanner"


def get_planner_preset(planner: str | PlannerPreset = DEFAULT_PLANNER) -> PlannerPreset:
    """The preset of an nnU-Net planner class name (``ExperimentPlanner``, ``nnUNetPlannerResEncM``, ...)."""
    if isinstance(planner, PlannerPreset):
        return planner
    try:
        return PLANNER_PRESETS[planner]
    except KeyError:
        raise ValueError(f"unknown planner {planner!r}; use one of {sorted(PLANNER_PRESETS)}") from None


def planner_for_plans(plans: dict) -> PlannerPreset:
    """The preset that wrote a plans dict (by ``experiment_planner_used``, else by the network class)."""
    used = plans.get("experiment_planner_used")
    if used in PLANNER_PRESETS:
        return PLANNER_PRESETS[used]
    return _preset_for_network(plans.get("configurations", {}).values())


def _preset_for_network(configurations: Any) -> PlannerPreset:
    for configuration in configurations:
        name = str((configuration.get("architecture") or {}).get("network_class_name", ""))
        if name.endswith("ResidualEncoderUNet"):
            return PLANNER_PRESETS["nnUNetPlannerResEncM"]
    return PLANNER_PRESETS[DEFAULT_PLANNER]


# ---- dataset-level decisions -------------------------------------------------------------------------------
def determine_fullres_target_spacing(
    spacings: Sequence[Sequence[float]],
    shapes_after_crop: Sequence[Sequence[int]],
    overwrite_target_spacing: Sequence[float] | None = None,
) -> np.ndarray:
    """Median spacing, except that a clearly anisotropic axis gets its 10th percentile (docs/method.md §3.2).

    The median alone would make the few thick-slice cases of an anisotropic dataset dominate the interpolation;
    the 10th percentile keeps more resolution on that axis. Reader axis order, not transposed.
    """
    if overwrite_target_spacing is not None:
        target = np.array([float(s) for s in overwrite_target_spacing], dtype=np.float64)
        if target.ndim != 1 or len(target) != 3 or not np.all(target > 0):
            raise ValueError(
                f"overwrite_target_spacing must be three positive numbers, got {list(overwrite_target_spacing)}"
            )
        return target
    spacing_array = np.vstack([np.asarray(s, dtype=np.float64) for s in spacings])
    # np.percentile (not np.median): the two differ in the last bit when averaging two middle values
    target = np.percentile(spacing_array, 50, 0)
    target_size = np.percentile(np.vstack(shapes_after_crop), 50, 0)

    worst_axis = int(np.argmax(target))
    other_axes = [i for i in range(len(target)) if i != worst_axis]
    other_spacings = [target[i] for i in other_axes]
    other_sizes = [target_size[i] for i in other_axes]
    has_aniso_spacing = target[worst_axis] > ANISO_THRESHOLD * max(other_spacings)
    has_aniso_voxels = target_size[worst_axis] * ANISO_THRESHOLD < min(other_sizes)
    if has_aniso_spacing and has_aniso_voxels:
        spacing_of_that_axis = np.percentile(spacing_array[:, worst_axis], 10)
        # never let that axis become finer than the others
        if spacing_of_that_axis < max(other_spacings):
            spacing_of_that_axis = max(max(other_spacings), spacing_of_that_axis) + 1e-5
        target[worst_axis] = spacing_of_that_axis
    return target


def determine_transpose(target_spacing: Sequence[float] | np.ndarray) -> tuple[list[int], list[int]]:
    """Put the coarsest axis first (docs/method.md §3.3); ties go to the first axis. Returns (forward, backward)."""
    worst_axis = int(np.argmax(np.asarray(target_spacing)))
    forward = [worst_axis] + [i for i in range(3) if i != worst_axis]
    backward = [forward.index(i) for i in range(3)]
    return forward, backward


def compute_new_shape(
    old_shape: Sequence[int], old_spacing: Sequence[float], new_spacing: Sequence[float] | np.ndarray
) -> list[int]:
    """Shape after resampling to ``new_spacing``: round(old_spacing / new_spacing * old_shape) per axis."""
    if not len(old_shape) == len(old_spacing) == len(new_spacing):
        raise ValueError(
            f"shape {old_shape}, spacing {old_spacing} and target {new_spacing} differ in length"
        )
    return [
        int(round(float(i) / float(j) * float(k)))
        for i, j, k in zip(old_spacing, new_spacing, old_shape, strict=True)
    ]


def determine_normalization(
    dataset_json: dict, median_relative_size_after_cropping: float
) -> tuple[list[str], list[bool]]:
    """Normalisation class name and use-mask flag per channel (docs/method.md §3.8).

    The nonzero mask is only worth using when cropping removed a lot (median relative size < 3/4), i.e. when
    there is a large zero background (brain MRI) that would otherwise distort the z-score statistics.
    """
    channels = dataset_json.get("channel_names", dataset_json.get("modality"))
    if not channels:
        raise ValueError(
            "dataset.json has no 'channel_names' (or legacy 'modality'); add one entry per channel"
        )
    choices = [
        NORMALIZATION_BY_CHANNEL_NAME.get(str(name).casefold(), DEFAULT_NORMALIZATION)
        for name in channels.values()
    ]
    schemes = [name for name, _ in choices]
    if median_relative_size_after_cropping < USE_MASK_FOR_NORM_BELOW_RELATIVE_SIZE:
        use_mask = [mask_allowed for _, mask_allowed in choices]
    else:
        use_mask = [False] * len(choices)
    return schemes, use_mask


def resampling_settings() -> dict[str, Any]:
    """Resampling function names and kwargs written into every configuration (docs/method.md §3.9)."""
    return {
        "resampling_fn_data": RESAMPLING_FN_NAME,
        "resampling_fn_seg": RESAMPLING_FN_NAME,
        "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
        "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
        "resampling_fn_probabilities": RESAMPLING_FN_NAME,
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
    }


# ---- network topology and memory proxy ---------------------------------------------------------------------
def get_pool_and_conv_props(
    spacing: Sequence[float] | np.ndarray,
    patch_size: Sequence[float],
    min_feature_map_size: int = MIN_FEATURE_MAP_EDGE,
    max_numpool: int = 999999,
) -> tuple[list[int], list[list[int]], list[list[int]], list[int], list[int]]:
    """U-Net topology for a patch (docs/method.md §3.5 b).

    Pools an axis only while its feature map stays >= 2*min_feature_map_size and its current spacing is within a
    factor 2 of the finest valid axis, so anisotropic data is first pooled in-plane until the voxels are roughly
    isotropic. Returns ``(num_pool_per_axis, strides, kernel_sizes, padded_patch_size, must_be_divisible_by)``;
    stage 0 has stride 1 and the padded patch is rounded up to a multiple of ``2**num_pool`` per axis.
    """
    dim = len(spacing)
    current_spacing = [float(s) for s in spacing]
    current_size = [float(s) for s in patch_size]
    strides: list[list[int]] = [[1] * dim]
    kernel_sizes: list[list[int]] = []
    num_pool_per_axis = [0] * dim
    kernel = [1] * dim

    while True:
        valid = [i for i in range(dim) if current_size[i] >= 2 * min_feature_map_size]
        if not valid:
            break
        min_valid_spacing = min(current_spacing[i] for i in valid)
        valid = [i for i in valid if current_spacing[i] / min_valid_spacing < 2]
        valid = [i for i in valid if num_pool_per_axis[i] < max_numpool]
        if len(valid) == 1 and current_size[valid[0]] < 3 * min_feature_map_size:
            break
        if not valid:
            break
        min_spacing = min(current_spacing)
        for d in range(dim):
            if kernel[d] != 3 and current_spacing[d] / min_spacing < 2:
                kernel[d] = 3
        stride = [1] * dim
        for v in valid:
            stride[v] = 2
            num_pool_per_axis[v] += 1
            current_spacing[v] *= 2
            current_size[v] = math.ceil(current_size[v] / 2)
        strides.append(stride)
        kernel_sizes.append(list(kernel))

    must_be_divisible_by = [2**n for n in num_pool_per_axis]
    padded = [
        int(math.ceil(p / m) * m) if p % m else int(p)
        for p, m in zip(patch_size, must_be_divisible_by, strict=True)
    ]
    kernel_sizes.append([3] * dim)  # the bottleneck always gets a full 3x3(x3) kernel
    return num_pool_per_axis, strides, kernel_sizes, padded, must_be_divisible_by


def features_per_stage(n_stages: int, dim: int) -> list[int]:
    """32 features doubled per stage, capped at 320 (3D) / 512 (2D)."""
    max_features = MAX_FEATURES_3D if dim == 3 else MAX_FEATURES_2D
    return [min(max_features, BASE_NUM_FEATURES * 2**i) for i in range(n_stages)]


def _feature_map_sizes(patch_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[int]:
    """Voxels per stage: each stage floors the previous size by its stride (the convs pad to keep size)."""
    sizes = []
    size = [int(s) for s in patch_size]
    for stride in strides:
        size = [s // st for s, st in zip(size, stride, strict=True)]
        sizes.append(math.prod(size))
    return sizes


def _decoder_proxy(
    sizes: Sequence[int],
    features: Sequence[int],
    n_conv_per_stage_decoder: Sequence[int],
    num_label_keys: int,
) -> int:
    """Decoder convs plus the transposed conv that upsamples into each level, and one segmentation head."""
    total = 0
    for i in range(len(sizes) - 1):
        total += (n_conv_per_stage_decoder[i] + 1) * features[i] * sizes[i]
    return total + num_label_keys * sizes[0]


def estimate_vram_proxy(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    num_label_keys: int,
    n_conv_per_stage: Sequence[int] | None = None,
    n_conv_per_stage_decoder: Sequence[int] | None = None,
) -> int:
    """nnU-Net's GPU-memory proxy: elements of every conv output feature map of a PlainConvUNet (docs/method.md §3.5 d).

    Batch and input channels are not counted; nor are norm/nonlinearity outputs or deep-supervision heads.
    ``num_label_keys`` counts every entry of dataset.json's labels (background and ignore included), as in
    nnU-Net.
    """
    n_stages = len(strides)
    if len(features) != n_stages:
        raise ValueError(f"{len(features)} feature counts for {n_stages} stages")
    n_conv_per_stage = list(n_conv_per_stage or [CONVS_PER_STAGE_ENCODER] * n_stages)
    n_conv_per_stage_decoder = list(n_conv_per_stage_decoder or [CONVS_PER_STAGE_DECODER] * (n_stages - 1))
    sizes = _feature_map_sizes(patch_size, strides)
    total = sum(n_conv_per_stage[i] * features[i] * sizes[i] for i in range(n_stages))  # bottleneck included
    return total + _decoder_proxy(sizes, features, n_conv_per_stage_decoder, num_label_keys)


def estimate_vram_proxy_residual(
    patch_size: Sequence[int],
    strides: Sequence[Sequence[int]],
    features: Sequence[int],
    num_label_keys: int,
    n_blocks_per_stage: Sequence[int],
    n_conv_per_stage_decoder: Sequence[int],
) -> int:
    """The same proxy for a ResidualEncoderUNet (nnunet_v2_extensions.md §1.3).

    Stem conv, then per residual block two conv outputs; the first block of a stage adds the skip's output when
    it changes channels or size (pooling and/or the 1x1 projection). The decoder is the plain one.
    """
    n_stages = len(strides)
    if not len(features) == len(n_blocks_per_stage) == n_stages:
        raise ValueError(
            f"{len(features)} feature counts, {len(n_blocks_per_stage)} depths for {n_stages} stages"
        )
    sizes = _feature_map_sizes(patch_size, strides)
    total = features[0] * sizes[0]  # stem
    channels, size = features[0], sizes[0]
    for s in range(n_stages):
        skip_changes = channels != features[s] or size != sizes[s] or any(st != 1 for st in strides[s])
        total += (2 * n_blocks_per_stage[s] + int(skip_changes)) * features[s] * sizes[s]
        channels, size = features[s], sizes[s]
    return total + _decoder_proxy(sizes, features, n_conv_per_stage_decoder, num_label_keys)


def _architecture_proxy(architecture: dict, patch_size: Sequence[int], num_label_keys: int) -> int:
    """The proxy of the network an ``architecture`` entry of the plans describes."""
    arch = architecture["arch_kwargs"]
    if str(architecture.get("network_class_name", "")).endswith("ResidualEncoderUNet"):
        return estimate_vram_proxy_residual(
            patch_size,
            arch["strides"],
            arch["features_per_stage"],
            num_label_keys,
            arch["n_blocks_per_stage"],
            arch["n_conv_per_stage_decoder"],
        )
    return estimate_vram_proxy(
        patch_size,
        arch["strides"],
        arch["features_per_stage"],
        num_label_keys,
        arch["n_conv_per_stage"],
        arch["n_conv_per_stage_decoder"],
    )


def _reference_batch_size(dim: int) -> int:
    return REFERENCE_BATCH_SIZE_2D if dim == 2 else REFERENCE_BATCH_SIZE_3D


def estimated_vram_gb(
    configuration: dict, num_label_keys: int, planner: str | PlannerPreset | None = None
) -> float:
    """The GPU memory (GB) nnU-Net's planner implicitly budgets for a configuration at its batch size.

    This is the planner's linear model (the proxy at the reference batch size equals the preset's reference
    memory), not a measurement: real use also depends on cuDNN workspaces, AMP and torch.compile. Resolve
    inheritance first. Without ``planner`` the network class decides (ResidualEncoderUNet: the M preset, whose
    8 GB scale L and XL follow within 6 %).
    """
    preset = get_planner_preset(planner) if planner is not None else _preset_for_network([configuration])
    patch = configuration["patch_size"]
    dim = len(patch)
    proxy = _architecture_proxy(configuration["architecture"], patch, num_label_keys)
    # the planner treats proxy * batch_size == reference proxy * reference batch size as "fills the target"
    reference_load = preset.reference_vram_proxy(dim, preset.gpu_memory_target_gb) * _reference_batch_size(
        dim
    )
    return preset.gpu_memory_target_gb * proxy * configuration["batch_size"] / reference_load


# ---- one configuration -------------------------------------------------------------------------------------
def _architecture(
    dim: int, strides: list[list[int]], kernel_sizes: list[list[int]], preset: PlannerPreset
) -> dict:
    n_stages = len(strides)
    if n_stages > len(preset.encoder_depth):
        raise ValueError(
            f"{n_stages} stages, but {preset.planner} defines at most {len(preset.encoder_depth)}"
        )
    return {
        "network_class_name": preset.network_class_name,
        "arch_kwargs": {
            "n_stages": n_stages,
            "features_per_stage": features_per_stage(n_stages, dim),
            "conv_op": CONV_OP_NAMES[dim],
            "kernel_sizes": [list(k) for k in kernel_sizes],
            "strides": [list(s) for s in strides],
            preset.encoder_depth_key: list(preset.encoder_depth[:n_stages]),
            "n_conv_per_stage_decoder": list(preset.decoder_depth[: n_stages - 1]),
            "conv_bias": True,
            "norm_op": NORM_OP_NAMES[dim],
            "norm_op_kwargs": {"eps": 1e-05, "affine": True},
            "dropout_op": None,
            "dropout_op_kwargs": None,
            "nonlin": "torch.nn.LeakyReLU",
            "nonlin_kwargs": {"inplace": True},
        },
        "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
    }


def get_plans_for_configuration(
    spacing: Sequence[float],
    median_shape: Sequence[float],
    data_identifier: str,
    approximate_n_voxels_dataset: float,
    num_label_keys: int,
    normalization_schemes: list[str],
    use_mask_for_norm: list[bool],
    gpu_memory_target_gb: float | None = None,
    cache: dict | None = None,
    planner: str | PlannerPreset = DEFAULT_PLANNER,
) -> dict:
    """Patch size, topology and batch size for one configuration (docs/method.md §3.5, §16).

    Starts from a 256^3 (2048^2) voxel patch that is isotropic in mm and clipped to the median image, then shrinks
    the axis that is largest relative to the median image until the memory proxy fits the GPU budget. Leftover
    budget goes into the batch size, capped so one batch covers at most the preset's fraction of the dataset's
    voxels (5 %; all of it for ResEnc M/L/XL). ``gpu_memory_target_gb`` defaults to the preset's target.
    ``median_shape`` is written back unchanged (nnU-Net keeps floats for fullres/2d and ints for lowres).
    """
    preset = get_planner_preset(planner)
    if gpu_memory_target_gb is None:
        gpu_memory_target_gb = preset.gpu_memory_target_gb
    dim = len(spacing)
    if dim not in (2, 3):
        raise ValueError(f"spacing must have 2 or 3 entries, got {list(spacing)}")
    if not all(s > 0 for s in spacing):
        raise ValueError(f"spacing must be > 0, got {list(spacing)}")
    cache = {} if cache is None else cache
    spacing_array = np.asarray(spacing, dtype=np.float64)
    median_clip = list(median_shape[:dim])

    inverse = 1 / spacing_array
    initial_voxels = INITIAL_PATCH_VOXELS_3D if dim == 3 else INITIAL_PATCH_VOXELS_2D
    initial_patch = [round(i) for i in inverse * (initial_voxels / np.prod(inverse)) ** (1 / dim)]
    initial_patch = [min(i, j) for i, j in zip(initial_patch, median_clip, strict=True)]

    def topology_and_proxy(
        patch: Sequence[float],
    ) -> tuple[list[int], list[int], list[list[int]], list[list[int]], int]:
        _, strides, kernels, padded, divisible_by = get_pool_and_conv_props(spacing_array, patch)
        key = (tuple(padded), tuple(map(tuple, strides)))
        if key not in cache:
            architecture = _architecture(dim, strides, kernels, preset)
            cache[key] = _architecture_proxy(architecture, padded, num_label_keys)
        return padded, divisible_by, strides, kernels, cache[key]

    patch_size, divisible_by, strides, kernels, proxy = topology_and_proxy(initial_patch)
    reference = preset.reference_vram_proxy(dim, gpu_memory_target_gb)
    ref_bs = _reference_batch_size(dim)

    def too_large(proxy: int) -> bool:
        """The default planner stops once batch 2 fits, the residual ones once the reference batch (2 / 12) does."""
        if preset.shrink_until_reference_batch_fits:
            return proxy > reference
        return proxy / ref_bs * 2 > reference

    while too_large(proxy):
        ratios = [p / m for p, m in zip(patch_size, median_clip, strict=True)]
        axis = max(i for i in range(dim) if ratios[i] == max(ratios))  # ties: the last axis
        # subtract the divisor of the *reduced* patch, so sizes such as 224 (between 256 and 192) are not skipped
        tentative = list(patch_size)
        tentative[axis] -= divisible_by[axis]
        tentative_divisor = get_pool_and_conv_props(spacing_array, tentative)[4]
        patch_size = list(patch_size)
        patch_size[axis] -= tentative_divisor[axis]
        if patch_size[axis] < 1:
            raise ValueError(
                f"no patch fits the GPU memory target of {gpu_memory_target_gb} GB for {data_identifier}; "
                "raise gpu_memory_target_gb"
            )
        patch_size, divisible_by, strides, kernels, proxy = topology_and_proxy(patch_size)

    batch_size = round((reference / proxy) * ref_bs)
    batch_size_dataset_cap = round(
        approximate_n_voxels_dataset
        * preset.max_dataset_fraction_per_batch
        / np.prod(patch_size, dtype=np.float64)
    )
    batch_size = max(min(batch_size, batch_size_dataset_cap), MIN_BATCH_SIZE)

    plan = {
        "data_identifier": data_identifier,
        "preprocessor_name": PREPROCESSOR_NAME,
        "batch_size": int(batch_size),
        "patch_size": [int(p) for p in patch_size],
        "median_image_size_in_voxels": [_plain_number(m) for m in median_shape],
        "spacing": [float(s) for s in spacing_array],
        "normalization_schemes": list(normalization_schemes),
        "use_mask_for_norm": [bool(u) for u in use_mask_for_norm],
    }
    plan.update(resampling_settings())
    plan["architecture"] = _architecture(dim, strides, kernels, preset)
    return plan


def _plain_number(value: Any) -> int | float:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    return float(value)


# ---- the whole dataset -------------------------------------------------------------------------------------
def plan_experiment(
    fingerprint: dict,
    dataset_json: dict,
    dataset_name: str,
    gpu_memory_target_gb: float | None = None,
    overwrite_target_spacing: list[float] | None = None,
    image_reader_writer: str = "SimpleITKIO",
    planner: str | PlannerPreset = DEFAULT_PLANNER,
) -> dict:
    """All configurations of one nnU-Net planner (docs/method.md §3.6, §16), as a plans dict in nnU-Net's format.

    ``planner`` is nnU-Net's class name: ``ExperimentPlanner`` (``nnUNetPlans``, PlainConvUNet) or
    ``nnUNetPlannerResEncM`` / ``L`` / ``XL`` (``nnUNetResEncUNet{M,L,XL}Plans``, ResidualEncoderUNet).
    ``gpu_memory_target_gb`` overrides the preset's target (8 / 8 / 24 / 40 GB), as nnU-Net's
    ``-gpu_memory_target`` does. ``fingerprint`` has the keys of nnU-Net's ``dataset_fingerprint.json``.
    Configurations: ``2d`` always; ``3d_fullres`` unless the images are 2D; ``3d_lowres`` + ``3d_cascade_fullres``
    when the fullres patch covers less than 25 % of the median image and a coarser spacing makes the images at
    least 2x smaller.
    """
    preset = get_planner_preset(planner)
    spacings, shapes = _checked_inputs(fingerprint, dataset_json, dataset_name)
    num_training = dataset_json["numTraining"]
    normalization_schemes, use_mask_for_norm = determine_normalization(
        dataset_json, fingerprint["median_relative_size_after_cropping"]
    )
    plan_configuration = functools.partial(
        _plan_configuration,
        num_label_keys=_num_label_keys(dataset_json),
        normalization_schemes=normalization_schemes,
        use_mask_for_norm=use_mask_for_norm,
        gpu_memory_target_gb=gpu_memory_target_gb,
        cache={},
        preset=preset,
    )

    fullres_spacing = determine_fullres_target_spacing(spacings, shapes, overwrite_target_spacing)
    transpose_forward, transpose_backward = determine_transpose(fullres_spacing)
    fullres_spacing_transposed = fullres_spacing[transpose_forward]

    new_shapes = [
        compute_new_shape(shape, spacing, fullres_spacing)
        for spacing, shape in zip(spacings, shapes, strict=True)
    ]
    new_median_shape_transposed = np.median(new_shapes, 0)[transpose_forward]
    n_voxels_dataset = float(np.prod(new_median_shape_transposed, dtype=np.float64) * num_training)

    plan_3d_fullres = plan_3d_lowres = None
    if new_median_shape_transposed[0] != 1:
        plan_3d_fullres, plan_3d_lowres = _plan_3d(
            fullres_spacing_transposed,
            new_median_shape_transposed,
            n_voxels_dataset,
            num_training,
            plan_configuration,
        )
    plan_2d = plan_configuration(
        fullres_spacing_transposed[1:], new_median_shape_transposed[1:], "2d", n_voxels_dataset
    )
    plan_2d["batch_dice"] = True

    median_spacing = np.median(np.asarray(spacings, dtype=np.float64), 0)[transpose_forward]
    median_shape = np.median(np.asarray(shapes), 0)[transpose_forward]
    return {
        "dataset_name": dataset_name,
        "plans_name": preset.plans_name,
        "original_median_spacing_after_transp": [float(s) for s in median_spacing],
        "original_median_shape_after_transp": [int(round(s)) for s in median_shape],
        "image_reader_writer": image_reader_writer,
        "transpose_forward": [int(i) for i in transpose_forward],
        "transpose_backward": [int(i) for i in transpose_backward],
        "configurations": _configurations(plan_2d, plan_3d_fullres, plan_3d_lowres),
        "experiment_planner_used": preset.planner,
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": copy.deepcopy(
            fingerprint["foreground_intensity_properties_per_channel"]
        ),
    }


def _checked_inputs(fingerprint: dict, dataset_json: dict, dataset_name: str) -> tuple[list, list]:
    """The fingerprint's spacings and cropped shapes, after checking that the planner has what it needs."""
    for key in (
        "spacings",
        "shapes_after_crop",
        "median_relative_size_after_cropping",
        "foreground_intensity_properties_per_channel",
    ):
        if key not in fingerprint:
            raise KeyError(f"fingerprint of {dataset_name} lacks '{key}'; recompute the fingerprint")
    for key in ("labels", "numTraining"):
        if key not in dataset_json:
            raise KeyError(f"dataset.json of {dataset_name} lacks '{key}'")
    spacings = fingerprint["spacings"]
    shapes = fingerprint["shapes_after_crop"]
    if len(spacings) == 0 or len(spacings) != len(shapes):
        raise ValueError(
            f"fingerprint of {dataset_name} has {len(spacings)} spacings and {len(shapes)} shapes; recompute it"
        )
    return spacings, shapes


def _num_label_keys(dataset_json: dict) -> int:
    """The entries of dataset.json's labels, background and ignore included: what nnU-Net's planner counts as
    the segmentation head's channels in its memory estimate (also in region mode), so the plans match."""
    labels = LabelModel.from_dataset_json(dataset_json)
    return len(labels.names) + int(labels.has_ignore_label)


def _plan_configuration(
    spacing: Any,
    median_shape: Any,
    name: str,
    n_voxels: float,
    *,
    num_label_keys: int,
    normalization_schemes: list[str],
    use_mask_for_norm: list[bool],
    gpu_memory_target_gb: float | None,
    cache: dict,
    preset: PlannerPreset,
) -> dict:
    """One configuration with the dataset-wide settings; ``cache`` shares topology estimates between calls."""
    return get_plans_for_configuration(
        spacing,
        median_shape,
        preset.data_identifier(name),
        n_voxels,
        num_label_keys,
        normalization_schemes,
        use_mask_for_norm,
        gpu_memory_target_gb,
        cache,
        preset,
    )


def _plan_3d(
    spacing: Any, median_shape: Any, n_voxels_dataset: float, num_training: int, plan_configuration: Any
) -> tuple[dict, dict | None]:
    """The 3d_fullres configuration and, when the images are large for its patch, a 3d_lowres one (§3.6.2);
    batch Dice goes to the configuration that sees the whole image at once."""
    plan_3d_fullres = plan_configuration(spacing, median_shape, "3d_fullres", n_voxels_dataset)
    plan_3d_lowres = _search_lowres(plan_3d_fullres, spacing, median_shape, num_training, plan_configuration)
    if plan_3d_lowres is not None:
        plan_3d_lowres["batch_dice"] = False
        plan_3d_fullres["batch_dice"] = True
    else:
        plan_3d_fullres["batch_dice"] = False
    return plan_3d_fullres, plan_3d_lowres


def _configurations(
    plan_2d: dict, plan_3d_fullres: dict | None, plan_3d_lowres: dict | None
) -> dict[str, dict]:
    """The plans' configurations in nnU-Net's order, the cascade linking 3d_lowres to 3d_fullres."""
    configurations: dict[str, dict] = {"2d": plan_2d}
    if plan_3d_lowres is not None:
        configurations["3d_lowres"] = plan_3d_lowres
        plan_3d_lowres["next_stage"] = "3d_cascade_fullres"
    if plan_3d_fullres is not None:
        configurations["3d_fullres"] = plan_3d_fullres
        if plan_3d_lowres is not None:
            configurations["3d_cascade_fullres"] = {
                "inherits_from": "3d_fullres",
                "previous_stage": "3d_lowres",
            }
    return configurations


def _search_lowres(plan_3d_fullres, fullres_spacing, fullres_median_shape, num_training, plan_configuration):
    """Coarsen the spacing by x1.03 steps until the patch covers >= 25 % of the median image (docs/method.md §3.6.2).

    Axes more than 2x finer than the coarsest are coarsened first. Returns None when no lowres configuration is
    needed or it would not be at least 2x smaller than fullres.
    """
    fullres_median_voxels = np.prod(fullres_median_shape, dtype=np.float64)
    median_voxels = fullres_median_voxels
    voxels_in_patch: np.number = np.prod(plan_3d_fullres["patch_size"], dtype=np.float64)
    lowres_spacing = np.array(fullres_spacing, dtype=np.float64)
    plan_3d_lowres = None
    while voxels_in_patch / median_voxels < LOWRES_CREATION_THRESHOLD:
        ratio_to_coarsest = max(lowres_spacing) / lowres_spacing
        if np.any(ratio_to_coarsest > 2):
            lowres_spacing[ratio_to_coarsest > 2] *= LOWRES_SPACING_STEP
        else:
            lowres_spacing *= LOWRES_SPACING_STEP
        lowres_median = fullres_spacing / lowres_spacing * fullres_median_shape
        median_voxels = np.prod(lowres_median, dtype=np.float64)
        plan_3d_lowres = plan_configuration(
            lowres_spacing,
            tuple(round(i) for i in lowres_median),
            "3d_lowres",
            float(np.prod(median_voxels) * num_training),
        )
        voxels_in_patch = np.prod(plan_3d_lowres["patch_size"], dtype=np.int64)
    if fullres_median_voxels / median_voxels < LOWRES_MIN_SIZE_RATIO:
        return None
    return plan_3d_lowres


# ---- reading plans -----------------------------------------------------------------------------------------
def resolve_configuration(plans: dict, name: str) -> dict:
    """A configuration with its ``inherits_from`` chain applied (child keys win), as nnU-Net resolves it.

    Lets users add entries such as ``{"3d_fullres_bs40": {"inherits_from": "3d_fullres", "batch_size": 40}}``.
    """
    configurations = plans.get("configurations", {})
    chain: list[str] = []
    current = name
    while True:
        if current not in configurations:
            where = f" (inherited by {chain[-1]})" if chain else ""
            raise KeyError(
                f"configuration '{current}'{where} is not in the plans; available: {sorted(configurations)}"
            )
        if current in chain:
            raise ValueError(f"circular inherits_from in plans: {' -> '.join([*chain, current])}")
        chain.append(current)
        parent = configurations[current].get("inherits_from")
        if parent is None:
            break
        current = parent
    resolved: dict = {}
    for configuration_name in reversed(chain):
        resolved.update(copy.deepcopy(configurations[configuration_name]))
    return resolved


def configuration_entry(
    plans: Mapping[str, Any], configuration: str | Mapping[str, Any]
) -> Mapping[str, Any]:
    """``configuration`` itself when it already is a resolved entry, else its entry in ``plans`` resolved."""
    if isinstance(configuration, Mapping):
        return configuration
    return resolve_configuration(dict(plans), configuration)


def merge_custom_configurations(new_plans: dict, old_plans: dict | None) -> dict:
    """Keep configurations of an existing plans file that the planner does not generate (docs/method.md §3.6.6).

    Custom entries (e.g. ``3d_fullres_bs40``) survive re-planning; regenerated names are replaced.
    """
    merged = copy.deepcopy(new_plans)
    if old_plans:
        for config_name, config in old_plans.get("configurations", {}).items():
            if config_name not in merged["configurations"]:
                merged["configurations"][config_name] = copy.deepcopy(config)
    return merged


# ---- derived configurations ---------------------------------------------------------------------------------
# characters a configuration name may hold: it becomes a wildcard value, a folder name and part of candidate ids
_CONFIGURATION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def add_extra_configurations(plans: dict, extra: Mapping[str, Mapping[str, Any]] | None) -> dict:
    """The plans with derived configurations added (config ``planning.extra_configurations``).

    Each entry is nnU-Net's ``inherits_from`` form, e.g. ``{"3d_fullres_bs24": {"inherits_from": "3d_fullres",
    "batch_size": 24}}``: resolved as nnU-Net resolves it (the parent's keys, then the child's, a shallow merge),
    it shares the parent's preprocessed data unless it sets its own ``data_identifier``, and it is trained like any
    configuration. A name the planner already makes, a missing parent (for example ``3d_lowres`` on a dataset whose
    plan has none) or a cycle is a :class:`~nnsnake.errors.ConfigError` naming the entry.
    """
    merged = copy.deepcopy(plans)
    if not extra:
        return merged
    configurations = merged["configurations"]
    generated = set(configurations)
    for name, entry in extra.items():
        where = f"planning.extra_configurations.{name}"
        if name in generated:
            raise ConfigError(
                f"{where}: the {merged.get('experiment_planner_used', 'planner')} already makes a configuration "
                f"named {name}; give the derived configuration another name (e.g. {name}_custom)"
            )
        if not _CONFIGURATION_NAME.match(name) or "__" in name or name.startswith("ensemble_"):
            raise ConfigError(
                f"{where}: the name must be letters, digits, '_', '.', '-' (no '__', not starting with "
                "'ensemble_'): it becomes a folder name and part of candidate names"
            )
        if not isinstance(entry, Mapping) or not entry.get("inherits_from"):
            raise ConfigError(
                f"{where}: give the configuration it derives from, e.g. {{inherits_from: 3d_fullres, batch_size: 24}}"
            )
        configurations[name] = copy.deepcopy(dict(entry))
    for name, entry in extra.items():
        parent = entry["inherits_from"]
        if parent not in configurations:
            raise ConfigError(
                f"planning.extra_configurations.{name}: inherits_from {parent}, which the plan of "
                f"{merged.get('dataset_name', 'this dataset')} does not contain (it has {sorted(generated)}); "
                "derive from one of those or drop the entry for this dataset"
            )
        try:
            resolve_configuration(merged, name)
        except (KeyError, ValueError) as err:
            raise ConfigError(f"planning.extra_configurations.{name}: {err}") from None
    return merged


def preprocessed_data_owner(plans: Mapping[str, Any], configuration: str) -> str:
    """The configuration whose preprocessed folder holds ``configuration``'s data.

    nnU-Net names preprocessed data by ``data_identifier``: a cascade stage or a derived configuration inherits
    its parent's identifier and so reads the parent's data. The owner is the first configuration of the plans
    that defines that identifier itself (no ``inherits_from``); one that sets its own identifier owns its data.
    """
    wanted = resolve_configuration(dict(plans), configuration).get("data_identifier")
    for name, entry in plans["configurations"].items():
        if "inherits_from" not in entry and entry.get("data_identifier") == wanted:
            return name
    return configuration


# what preprocessing reads from a configuration and from the plans as a whole
_PREPROCESSING_KEYS = (
    "spacing",
    "normalization_schemes",
    "use_mask_for_norm",
    "resampling_fn_data",
    "resampling_fn_data_kwargs",
    "resampling_fn_seg",
    "resampling_fn_seg_kwargs",
    "resampling_fn_probabilities",
    "resampling_fn_probabilities_kwargs",
)
_PLANS_PREPROCESSING_KEYS = ("transpose_forward", "foreground_intensity_properties_per_channel")


def same_preprocessing(
    plans_a: Mapping[str, Any], name_a: str, plans_b: Mapping[str, Any], name_b: str
) -> bool:
    """Whether two configurations (of the same or of two planners' plans) preprocess to identical data: the
    residual-encoder planners' 2d and 3d_fullres normally reuse the default planner's folder, as nnU-Net does,
    but only when spacing, normalisation, resampling and axis order really agree (transferred plans may not)."""
    a = resolve_configuration(dict(plans_a), name_a)
    b = resolve_configuration(dict(plans_b), name_b)
    return all(a.get(k) == b.get(k) for k in _PREPROCESSING_KEYS) and all(
        plans_a.get(k) == plans_b.get(k) for k in _PLANS_PREPROCESSING_KEYS
    )
