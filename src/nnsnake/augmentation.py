"""The nnU-Net augmentation pipeline (docs/method.md §5.5) built from batchgeneratorsv2 transforms, and the data
iterators that run sampling + augmentation in background worker processes (§5.4).

Every probability and range below is a constant of the method; ``tests/test_augmentation.py`` pins them.
The transforms act on one sample at a time (``image`` (C, *P0), ``segmentation`` (1 or 2, *P0)); the
deep-supervision targets (§5.3) are made here too, so the trainer receives a list of targets per batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from batchgeneratorsv2.helpers.scalar_type import RandomScalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.nnunet.random_binary_operator import ApplyRandomBinaryOperatorTransform
from batchgeneratorsv2.transforms.nnunet.seg_to_onehot import MoveSegAsOneHotToDataTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
from batchgeneratorsv2.transforms.spatial.spatial import SpatialTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.pseudo2d import Convert2DTo3DTransform, Convert3DTo2DTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from batchgeneratorsv2.transforms.utils.remove_label import RemoveLabelTransform
from batchgeneratorsv2.transforms.utils.seg_to_regions import ConvertSegmentationToRegionsTransform
from scipy.ndimage import generate_binary_structure, label

from .labels import LabelModel
from .sampling import (
    CASE_CACHE_BYTES,
    OVERSAMPLE_FOREGROUND_PERCENT,
    SEG_PAD_VALUE,
    LoadCase,
    LoadPreviousStage,
    PatchDataLoader,
    derive_seed,
    initial_patch_size,
    probabilistic_oversampling_p,
    rotation_and_dummy_2d,
)

# §5.5, one constant per table cell
P_ROTATION = 0.2
P_SCALING = 0.2
P_ELASTIC = 0.0
SCALING_RANGE = (0.7, 1.4)
# Ties between labels in the resampled segmentation go to the lower label (plain argmax), as the method
# states. batchgeneratorsv2 >= 0.3.6 defaults to 'nearest', which nnunetv2 2.8.1 inherits by not setting it.
SEG_TIEBREAK = "lowest"
P_NOISE = 0.1
NOISE_SIGMA_RANGE = (0.0, 0.1)
P_BLUR = 0.2
BLUR_SIGMA_RANGE = (0.5, 1.0)
BLUR_P_PER_CHANNEL = 0.5
P_BRIGHTNESS = 0.15
BRIGHTNESS_RANGE = (0.75, 1.25)
P_CONTRAST = 0.15
CONTRAST_RANGE = (0.75, 1.25)
P_LOW_RESOLUTION = 0.25
LOW_RESOLUTION_SCALE = (0.5, 1.0)
LOW_RESOLUTION_P_PER_CHANNEL = 0.5
P_GAMMA_INVERTED = 0.1
P_GAMMA = 0.3
GAMMA_RANGE = (0.7, 1.5)
P_BINARY_OPERATOR = 0.4
BINARY_OPERATOR_STREL_SIZE = (1.0, 8.0)
BINARY_OPERATOR_P_PER_LABEL = 0.5
P_REMOVE_COMPONENT = 0.2
REMOVE_COMPONENT_MAX_FRACTION = 0.15
REMOVE_COMPONENT_P_PER_LABEL = 0.5


def deep_supervision_scales(strides: Sequence[Sequence[int]]) -> list[list[float]]:
    """Target scale per segmentation head, highest resolution first: ``1 / cumprod(strides)`` minus the last."""
    cumulative = np.cumprod(np.asarray(strides, dtype=float), axis=0)
    return [[float(v) for v in 1 / row] for row in cumulative[:-1]]


class RemoveRandomConnectedComponentTransform(ImageOnlyTransform):
    """Step 14 (cascade): delete one small connected component from previous-stage one-hot channels.

    Teaches the cascade not to trust the low-resolution prediction blindly. Each channel is picked with
    ``p_per_channel``; one component is chosen uniformly among those smaller than ``max_fraction`` of the patch
    and set to 0 (no refill with another class). Components use full connectivity. Written here because
    batchgeneratorsv2's version depends on acvl_utils.
    """

    def __init__(self, channel_idx: Sequence[int], max_fraction: float, p_per_channel: float) -> None:
        super().__init__()
        self.channel_idx = [int(c) for c in channel_idx]
        self.max_fraction = float(max_fraction)
        self.p_per_channel = float(p_per_channel)

    def get_parameters(self, **data_dict: Any) -> dict:
        chosen = torch.rand(len(self.channel_idx)) < self.p_per_channel
        return {"channels": [c for c, take in zip(self.channel_idx, chosen.tolist(), strict=True) if take]}

    def _apply_to_image(self, img: torch.Tensor, **params: Any) -> torch.Tensor:
        for channel in params["channels"]:
            mask = (img[channel] != 0).numpy()
            if not mask.any():
                continue
            components, _ = label(mask, structure=generate_binary_structure(mask.ndim, mask.ndim))
            sizes = np.bincount(components.ravel())[1:]
            small = np.flatnonzero(sizes < mask.size * self.max_fraction) + 1
            if small.size:
                removed = small[np.random.randint(small.size)]  # noqa: NPY002 (global stream of the transforms)
                img[channel][torch.from_numpy(components == removed)] = 0
        return img


def _spatial_transform(patch_size: Sequence[int], rotation: RandomScalar) -> SpatialTransform:
    kwargs: dict[str, Any] = dict(
        patch_size=tuple(int(p) for p in patch_size),
        patch_center_dist_from_border=0,
        random_crop=False,  # centre crop of the enlarged patch; the loader already chose the location
        p_elastic_deform=P_ELASTIC,
        p_rotation=P_ROTATION,
        rotation=rotation,
        p_rot_per_axis=1,
        p_scaling=P_SCALING,
        scaling=SCALING_RANGE,
        p_synchronize_scaling_across_axes=1,
        bg_style_seg_sampling=False,
        mode_seg="bilinear",
        border_mode_seg="constant",
        padding_value_seg=SEG_PAD_VALUE,
        mode_image="bilinear",
        padding_mode_image="zeros",
        align_corners=False,
    )
    if "seg_tiebreak" in inspect.signature(SpatialTransform.__init__).parameters:
        kwargs["seg_tiebreak"] = SEG_TIEBREAK  # older batchgeneratorsv2 always break ties to the lower label
    return SpatialTransform(**kwargs)


def _label_transforms(
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    is_cascaded: bool,
    labels: LabelModel | None,
    augment_cascade: bool,
) -> list[BasicTransform]:
    """Steps 11-16: shared by training and validation (validation without the cascade augmentations).

    ``labels`` None stands for a plain label map (no regions, no ignore label); the cascade needs the label
    model for the previous stage's one-hot channels.
    """
    transforms: list[BasicTransform] = [RemoveLabelTransform(SEG_PAD_VALUE, 0)]
    if is_cascaded:
        if labels is None or not labels.foreground_labels:
            raise ValueError(
                "the cascade needs labels with foreground_labels (the labels without background)"
            )
        foreground = [int(label) for label in labels.foreground_labels]
        transforms.append(
            MoveSegAsOneHotToDataTransform(
                source_channel_idx=1, all_labels=foreground, remove_channel_from_source=True
            )
        )
        if augment_cascade:
            previous_stage_channels = list(range(-len(foreground), 0))
            transforms.append(
                RandomTransform(
                    ApplyRandomBinaryOperatorTransform(
                        channel_idx=previous_stage_channels,
                        strel_size=BINARY_OPERATOR_STREL_SIZE,
                        p_per_label=BINARY_OPERATOR_P_PER_LABEL,
                    ),
                    apply_probability=P_BINARY_OPERATOR,
                )
            )
            transforms.append(
                RandomTransform(
                    RemoveRandomConnectedComponentTransform(
                        channel_idx=previous_stage_channels,
                        max_fraction=REMOVE_COMPONENT_MAX_FRACTION,
                        p_per_channel=REMOVE_COMPONENT_P_PER_LABEL,
                    ),
                    apply_probability=P_REMOVE_COMPONENT,
                )
            )
    if labels is not None and labels.regions is not None:
        ignore = [labels.ignore_label] if labels.ignore_label is not None else []
        region_list = [*labels.regions, *ignore]  # the ignore channel last, as the region loss expects
        transforms.append(ConvertSegmentationToRegionsTransform(regions=region_list, channel_in_seg=0))
    if deep_supervision_scales is not None:
        transforms.append(DownsampleSegForDSTransform(ds_scales=[list(s) for s in deep_supervision_scales]))
    return transforms


def _intensity_transforms(dummy_2d: bool, time_blur_methods: bool) -> list[BasicTransform]:
    """Steps 2-9 of the training pipeline: noise, blur, brightness, contrast, low resolution, gamma."""
    transforms: list[BasicTransform] = []
    transforms.append(
        RandomTransform(
            GaussianNoiseTransform(
                noise_variance=NOISE_SIGMA_RANGE,
                p_per_channel=1,
                synchronize_channels=True,
            ),
            apply_probability=P_NOISE,
        )
    )
    transforms.append(
        RandomTransform(
            GaussianBlurTransform(
                blur_sigma=BLUR_SIGMA_RANGE,
                synchronize_channels=False,
                synchronize_axes=False,
                p_per_channel=BLUR_P_PER_CHANNEL,
                benchmark=time_blur_methods,
            ),
            apply_probability=P_BLUR,
        )
    )
    transforms.append(
        RandomTransform(
            MultiplicativeBrightnessTransform(
                multiplier_range=BGContrast(BRIGHTNESS_RANGE),
                synchronize_channels=False,
                p_per_channel=1,
            ),
            apply_probability=P_BRIGHTNESS,
        )
    )
    transforms.append(
        RandomTransform(
            ContrastTransform(
                contrast_range=BGContrast(CONTRAST_RANGE),
                preserve_range=True,
                synchronize_channels=False,
                p_per_channel=1,
            ),
            apply_probability=P_CONTRAST,
        )
    )
    transforms.append(
        RandomTransform(
            SimulateLowResolutionTransform(
                scale=LOW_RESOLUTION_SCALE,
                synchronize_channels=False,
                synchronize_axes=True,
                ignore_axes=(0,) if dummy_2d else None,
                allowed_channels=None,
                p_per_channel=LOW_RESOLUTION_P_PER_CHANNEL,
            ),
            apply_probability=P_LOW_RESOLUTION,
        )
    )
    transforms.append(
        RandomTransform(
            GammaTransform(
                gamma=BGContrast(GAMMA_RANGE),
                p_invert_image=1,
                synchronize_channels=False,
                p_per_channel=1,
                p_retain_stats=1,
            ),
            apply_probability=P_GAMMA_INVERTED,
        )
    )
    transforms.append(
        RandomTransform(
            GammaTransform(
                gamma=BGContrast(GAMMA_RANGE),
                p_invert_image=0,
                synchronize_channels=False,
                p_per_channel=1,
                p_retain_stats=1,
            ),
            apply_probability=P_GAMMA,
        )
    )
    return transforms


def training_transforms(
    patch_size: Sequence[int],
    rotation_ranges: RandomScalar,
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    mirror_axes: Sequence[int] | None,
    dummy_2d: bool,
    use_mask_for_norm: Sequence[bool] | None = None,
    is_cascaded: bool = False,
    labels: LabelModel | None = None,
    time_blur_methods: bool = True,
) -> ComposeTransforms:
    """The training pipeline of §5.5 in the table's order, applied to one enlarged patch per call.

    ``labels`` (the dataset's label model) decides the label steps: region targets, the ignore label, the
    cascade's one-hot channels; None means a plain label map without regions or ignore label.

    ``time_blur_methods`` lets the blur pick FFT or direct convolution per shape by timing both (faster, as in
    nnU-Net); turn it off for bit-reproducible runs, since the two differ in the last bits.
    """
    transforms: list[BasicTransform] = []
    if dummy_2d:
        transforms.append(Convert3DTo2DTransform())
        spatial_patch = tuple(patch_size)[1:]
    else:
        spatial_patch = tuple(patch_size)
    transforms.append(_spatial_transform(spatial_patch, rotation_ranges))
    if dummy_2d:
        transforms.append(Convert2DTo3DTransform())

    transforms += _intensity_transforms(dummy_2d, time_blur_methods)
    if mirror_axes:
        transforms.append(MirrorTransform(allowed_axes=tuple(int(a) for a in mirror_axes)))
    if use_mask_for_norm is not None and any(use_mask_for_norm):
        transforms.append(
            MaskImageTransform(
                apply_to_channels=[c for c, masked in enumerate(use_mask_for_norm) if masked],
                channel_idx_in_seg=0,
                set_outside_to=0,
            )
        )
    transforms += _label_transforms(deep_supervision_scales, is_cascaded, labels, augment_cascade=True)
    return ComposeTransforms(transforms)


def validation_transforms(
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    is_cascaded: bool = False,
    labels: LabelModel | None = None,
) -> ComposeTransforms:
    """Validation patches get only the label steps (11, 12, 15, 16): no spatial or intensity augmentation."""
    return ComposeTransforms(
        _label_transforms(deep_supervision_scales, is_cascaded, labels, augment_cascade=False)
    )


def training_pipeline(
    augmentation: str,
    patch_size: Sequence[int],
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    use_mask_for_norm: Sequence[bool] | None = None,
    is_cascaded: bool = False,
    labels: LabelModel | None = None,
    time_blur_methods: bool = True,
) -> tuple[tuple[int, ...], ComposeTransforms]:
    """The patch the training loader reads and the transforms it applies, for ``training.augmentation``.

    ``default``: the enlarged patch ``P0`` and the full pipeline (§5.5). ``no_mirroring`` (nnUNetTrainerNoMirroring):
    the same without the mirror step. ``none`` (nnUNetTrainerNoDA): the plain patch and the validation pipeline:
    no spatial, intensity or mirror transform and no MaskImage, only the label steps. Test-time mirroring follows
    :func:`~nnsnake.training.variants.training_mirror_axes` (off for both variants).
    """
    from .training.variants import training_mirror_axes

    if augmentation == "none":
        return tuple(int(p) for p in patch_size), validation_transforms(
            deep_supervision_scales, is_cascaded, labels
        )
    mirror_axes = training_mirror_axes(augmentation, patch_size)
    rotation, dummy_2d = rotation_and_dummy_2d(patch_size)
    transforms = training_transforms(
        patch_size,
        rotation,
        deep_supervision_scales,
        mirror_axes or None,
        dummy_2d,
        use_mask_for_norm,
        is_cascaded,
        labels,
        time_blur_methods=time_blur_methods,
    )
    return initial_patch_size(patch_size, rotation, dummy_2d), transforms


# --------------------------------------------------------------------------------------------------------
# Iterators
# --------------------------------------------------------------------------------------------------------
class BatchIterator:
    """Endless batches from a ``PatchDataLoader``, built in-process (``workers=0``) or in worker processes.

    Worker processes use batchgenerators' augmenters: ``NonDetMultiThreadedAugmenter`` normally (batches in
    whatever order workers finish, like nnU-Net), ``MultiThreadedAugmenter`` for a seeded loader (round-robin
    over workers, so the batch sequence is reproducible). Call ``close()`` (or use ``with``) to stop workers.
    """

    def __init__(self, loader: PatchDataLoader, workers: int, num_cached: int, pin_memory: bool = False):
        self.loader = loader
        self.workers = int(workers)
        if self.workers <= 0:
            self._augmenter: Any = SingleThreadedAugmenter(loader, None)
        elif loader.seed is not None:
            seeds = [derive_seed(loader.seed, 1000 + i) for i in range(self.workers)]
            self._augmenter = MultiThreadedAugmenter(
                loader,
                None,
                self.workers,
                num_cached_per_queue=max(2, num_cached // self.workers),
                seeds=seeds,
                pin_memory=pin_memory,
                wait_time=0.002,
            )
        else:
            self._augmenter = NonDetMultiThreadedAugmenter(
                loader,
                None,
                self.workers,
                num_cached=num_cached,
                seeds=None,
                pin_memory=pin_memory,
                wait_time=0.002,
            )

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._augmenter)

    def rng_state(self) -> dict[str, torch.Tensor]:
        """Random state of in-process loading; with workers, restart the iterator with a new seed instead."""
        if self.workers > 0:
            raise RuntimeError(
                "worker processes hold their own random state; for reproducible resumes with "
                "workers, rebuild the iterators each epoch with derive_seed(seed, epoch)"
            )
        return self.loader.rng_state()

    def set_rng_state(self, state: Mapping[str, torch.Tensor]) -> None:
        if self.workers > 0:
            raise RuntimeError("cannot set the random state of worker processes; use workers=0")
        self.loader.set_rng_state(state)

    def close(self) -> None:
        finish = getattr(self._augmenter, "_finish", None)
        if finish is not None:
            finish()

    def __enter__(self) -> BatchIterator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_data_iterators(
    train_ids: Sequence[str],
    val_ids: Sequence[str],
    load_case: LoadCase,
    patch_size: Sequence[int],
    batch_size: int,
    deep_supervision_scales: Sequence[Sequence[float]] | None,
    workers: int,
    val_workers: int | None = None,
    *,
    labels: LabelModel,
    use_mask_for_norm: Sequence[bool] | None = None,
    is_cascaded: bool = False,
    load_previous_stage: LoadPreviousStage | None = None,
    oversample_foreground_percent: float = OVERSAMPLE_FOREGROUND_PERCENT,
    probabilistic_oversampling: bool = False,
    augmentation: str = "default",
    seed: int | None = None,
    pin_memory: bool = False,
    case_cache_bytes: int = CASE_CACHE_BYTES,
) -> tuple[BatchIterator, BatchIterator]:
    """Training and validation batch iterators of a configuration (§5.4-5.5), ready for the trainer.

    ``workers`` training worker processes (0: build batches in the calling process); ``val_workers`` defaults
    to ``max(1, workers // 2)``, or 0 when ``workers`` is 0. ``labels`` (the dataset's label model) gives the
    targets (labels or regions), the ignore label and the cascade's one-hot channels.
    ``case_cache_bytes`` bounds the cases each process keeps in memory (0: read every patch from ``load_case``).
    ``seed`` makes both streams reproducible (training and validation get different derived seeds; with
    workers the batch order is then round-robin over workers, and the blur does not choose its method by timing).
    Each batch is ``{'data': float32 (B, C, *P), 'target': list per deep-supervision scale (or one tensor
    without deep supervision), 'keys': case ids}``.

    Trainer variants (docs/method.md §5.12): ``probabilistic_oversampling`` forces each sample with the
    probability :func:`~nnsnake.sampling.probabilistic_oversampling_p` instead of the last samples of a batch
    (both loaders, as nnU-Net); ``augmentation`` ``no_mirroring`` drops the mirror step, ``none`` trains on the
    validation pipeline with the plain patch (nnUNetTrainerNoDA).
    """
    if is_cascaded and load_previous_stage is None:
        raise ValueError("the cascade needs load_previous_stage (the 3d_lowres out-of-fold predictions)")
    common: dict[str, Any] = dict(
        load_case=load_case,
        batch_size=batch_size,
        patch_size=patch_size,
        oversample_foreground_percent=(
            probabilistic_oversampling_p(batch_size, oversample_foreground_percent)
            if probabilistic_oversampling
            else oversample_foreground_percent
        ),
        probabilistic_oversampling=probabilistic_oversampling,
        load_previous_stage=load_previous_stage if is_cascaded else None,
        has_ignore_label=labels.has_ignore_label,
        case_cache_bytes=case_cache_bytes,
    )
    sampling_patch, train_transforms = training_pipeline(
        augmentation,
        patch_size,
        deep_supervision_scales,
        use_mask_for_norm,
        is_cascaded,
        labels,
        time_blur_methods=seed is None,
    )
    train_loader = PatchDataLoader(
        train_ids,
        sampling_patch_size=sampling_patch,
        seed=None if seed is None else derive_seed(seed, 0),
        transforms=train_transforms,
        **common,
    )
    val_loader = PatchDataLoader(
        val_ids,
        sampling_patch_size=patch_size,
        seed=None if seed is None else derive_seed(seed, 1),
        transforms=validation_transforms(deep_supervision_scales, is_cascaded, labels),
        **common,
    )
    if val_workers is None:
        val_workers = max(1, workers // 2) if workers > 0 else 0
    train = BatchIterator(train_loader, workers, num_cached=max(6, workers // 2), pin_memory=pin_memory)
    val = BatchIterator(val_loader, val_workers, num_cached=max(3, val_workers // 4), pin_memory=pin_memory)
    return train, val
