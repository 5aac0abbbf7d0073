"""The augmentation pipeline (docs/method.md §5.5): every step, probability and range, and the batch iterators."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnsnake.augmentation import (
    RemoveRandomConnectedComponentTransform,
    deep_supervision_scales,
    make_data_iterators,
    training_transforms,
    validation_transforms,
)
from nnsnake.labels import LabelModel
from nnsnake.sampling import initial_patch_size, rotation_and_dummy_2d

HIPPO_3D = (40, 56, 40)
HIPPO_STRIDES_3D = [[1, 1, 1], [2, 2, 2], [2, 2, 2], [2, 2, 2]]
ROT_30 = (-math.radians(30), math.radians(30))
LABELS = LabelModel.from_dataset_json({"labels": {"background": 0, "core": 1, "rim": 2}})
# foreground labels [1, 2], regions [[1, 2], [2]], ignore label 3
REGION_LABELS = LabelModel.from_dataset_json(
    {"labels": {"background": 0, "whole": [1, 2], "core": 2, "ignore": 3}, "regions_class_order": [1, 2]}
)


def steps(compose):
    """(class name, apply probability, transform) per step; probability 1 for unconditional steps."""
    out = []
    for t in compose.transforms:
        if isinstance(t, RandomTransform):
            out.append((type(t.transform).__name__, t.apply_probability, t.transform))
        else:
            out.append((type(t).__name__, 1, t))
    return out


def bg_range(value):
    assert isinstance(value, BGContrast)
    return tuple(value.contrast_range)


# The §5.5 table, written out independently of the implementation: name, probability, attributes.
INTENSITY_TABLE = [
    (
        "GaussianNoiseTransform",
        0.1,
        dict(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
    ),
    (
        "GaussianBlurTransform",
        0.2,
        dict(blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False, p_per_channel=0.5),
    ),
    (
        "MultiplicativeBrightnessTransform",
        0.15,
        dict(multiplier_range=(0.75, 1.25), synchronize_channels=False, p_per_channel=1),
    ),
    (
        "ContrastTransform",
        0.15,
        dict(contrast_range=(0.75, 1.25), preserve_range=True, synchronize_channels=False, p_per_channel=1),
    ),
    (
        "SimulateLowResolutionTransform",
        0.25,
        dict(
            scale=(0.5, 1),
            synchronize_channels=False,
            synchronize_axes=True,
            allowed_channels=None,
            p_per_channel=0.5,
        ),
    ),
    (
        "GammaTransform",
        0.1,
        dict(
            gamma=(0.7, 1.5), p_invert_image=1, synchronize_channels=False, p_per_channel=1, p_retain_stats=1
        ),
    ),
    (
        "GammaTransform",
        0.3,
        dict(
            gamma=(0.7, 1.5), p_invert_image=0, synchronize_channels=False, p_per_channel=1, p_retain_stats=1
        ),
    ),
]


def check_attributes(transform, expected):
    for name, want in expected.items():
        got = getattr(transform, name)
        if isinstance(got, BGContrast):
            got = bg_range(got)
        if isinstance(want, tuple):
            assert tuple(got) == pytest.approx(want), name
        else:
            assert got == want, name


def check_spatial(transform, patch, rotation):
    assert type(transform).__name__ == "SpatialTransform"
    assert tuple(transform.patch_size) == tuple(patch)
    assert transform.random_crop is False  # centre crop of the enlarged patch
    assert transform.p_elastic_deform == 0
    assert transform.p_rotation == 0.2 and transform.p_scaling == 0.2
    assert tuple(transform.rotation) == pytest.approx(rotation)
    assert transform.p_rot_per_axis == 1  # all axes rotate
    assert tuple(transform.scaling) == pytest.approx((0.7, 1.4))
    assert transform.p_synchronize_scaling_across_axes == 1  # one scale for all axes
    assert transform.mode_seg == "bilinear" and transform.mode_image == "bilinear"
    assert transform.border_mode_seg == "constant" and transform.padding_value_seg == -1
    assert transform.padding_mode_image == "zeros" and transform.align_corners is False
    if hasattr(transform, "seg_tiebreak"):
        assert transform.seg_tiebreak == "lowest"  # ties go to the lower label


def test_training_pipeline_3d_matches_the_table():
    ds = deep_supervision_scales(HIPPO_STRIDES_3D)
    pipeline = steps(training_transforms(HIPPO_3D, ROT_30, ds, (0, 1, 2), False))
    names = [s[0] for s in pipeline]
    assert names == ["SpatialTransform"] + [row[0] for row in INTENSITY_TABLE] + [
        "MirrorTransform",
        "RemoveLabelTransform",
        "DownsampleSegForDSTransform",
    ]
    check_spatial(pipeline[0][2], HIPPO_3D, ROT_30)
    for (name, p, attrs), (got_name, got_p, transform) in zip(INTENSITY_TABLE, pipeline[1:8], strict=True):
        assert got_name == name and got_p == p
        check_attributes(transform, attrs)
    assert pipeline[5][2].ignore_axes is None
    assert pipeline[2][2].benchmark is True
    assert tuple(pipeline[8][2].allowed_axes) == (0, 1, 2)
    remove = pipeline[9][2]
    assert (remove.label_value, remove.set_to, remove.segmentation_channels) == (-1, 0, None)
    assert pipeline[10][2].ds_scales == [[1, 1, 1], [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]]
    assert all(p == 1 for _, p, _ in pipeline[8:])


def test_training_pipeline_dummy_2d():
    patch = (20, 64, 64)
    rotation, dummy = rotation_and_dummy_2d(patch)
    assert dummy
    pipeline = steps(training_transforms(patch, rotation, None, (0, 1, 2), dummy, time_blur_methods=False))
    names = [s[0] for s in pipeline]
    assert names[:3] == ["Convert3DTo2DTransform", "SpatialTransform", "Convert2DTo3DTransform"]
    check_spatial(pipeline[1][2], (64, 64), (-math.pi, math.pi))  # in-plane patch, ±180°
    low_res = pipeline[3 + 4][2]
    assert type(low_res).__name__ == "SimulateLowResolutionTransform" and tuple(low_res.ignore_axes) == (0,)
    assert pipeline[4][2].benchmark is False
    assert names[-1] == "RemoveLabelTransform"  # no deep supervision: no downsampling step


def test_mask_cascade_and_region_steps_in_order():
    pipeline = steps(
        training_transforms(
            HIPPO_3D,
            ROT_30,
            [[1, 1, 1], [0.5, 0.5, 0.5]],
            (0, 1, 2),
            False,
            use_mask_for_norm=[True, False, True],
            is_cascaded=True,
            labels=REGION_LABELS,
        )
    )
    names = [s[0] for s in pipeline]
    assert names[8:] == [
        "MirrorTransform",
        "MaskImageTransform",
        "RemoveLabelTransform",
        "MoveSegAsOneHotToDataTransform",
        "ApplyRandomBinaryOperatorTransform",
        "RemoveRandomConnectedComponentTransform",
        "ConvertSegmentationToRegionsTransform",
        "DownsampleSegForDSTransform",
    ]
    mask = pipeline[9][2]
    assert (mask.apply_to_channels, mask.channel_idx_in_seg, mask.set_outside_to) == ([0, 2], 0, 0)
    move = pipeline[11][2]
    assert (move.source_channel_idx, list(move.all_labels), move.remove_channel_from_source) == (
        1,
        [1, 2],
        True,
    )
    _, p_binary, binary = pipeline[12]
    assert p_binary == 0.4 and sorted(binary.channel_idx) == [-2, -1]
    assert tuple(binary.strel_size) == (1, 8) and binary.p_per_label == 0.5
    assert sorted(f.__name__ for f in binary.any_of_these) == sorted(
        ["binary_dilation_torch", "binary_erosion_torch", "binary_closing_torch", "binary_opening_torch"]
    )
    _, p_remove, remove = pipeline[13]
    assert p_remove == 0.2 and remove.channel_idx == [-2, -1]
    assert remove.max_fraction == 0.15 and remove.p_per_channel == 0.5
    regions = pipeline[14][2]
    assert [r.tolist() for r in regions.regions] == [[1, 2], [2], [3]]  # ignore label appended last
    masked = steps(training_transforms(HIPPO_3D, ROT_30, None, (0, 1, 2), False, use_mask_for_norm=[False]))
    assert "MaskImageTransform" not in [s[0] for s in masked]


def test_validation_pipeline_contents():
    ds = [[1, 1], [0.5, 0.5]]
    assert [s[0] for s in steps(validation_transforms(ds))] == [
        "RemoveLabelTransform",
        "DownsampleSegForDSTransform",
    ]
    names = [s[0] for s in steps(validation_transforms(ds, True, REGION_LABELS))]
    assert names == [
        "RemoveLabelTransform",
        "MoveSegAsOneHotToDataTransform",
        "ConvertSegmentationToRegionsTransform",
        "DownsampleSegForDSTransform",
    ]
    with pytest.raises(ValueError, match="foreground_labels"):
        validation_transforms(None, is_cascaded=True)
    image = torch.randn(1, 6, 7, 8)
    seg = torch.randint(-1, 3, (1, 6, 7, 8), dtype=torch.int16)
    out = validation_transforms(None)(image=image.clone(), segmentation=seg.clone())
    assert torch.equal(out["image"], image)  # no augmentation of validation patches
    assert torch.equal(out["segmentation"], torch.where(seg == -1, 0, seg))


def test_bg_contrast_draws_half_below_one():
    np.random.seed(0)  # noqa: NPY002 (BGContrast draws from the global stream)
    draws = np.array([BGContrast((0.75, 1.25))() for _ in range(4000)])
    assert draws.min() >= 0.75 and draws.max() <= 1.25
    assert abs((draws < 1).mean() - 0.5) < 0.03


def test_deep_supervision_scales():
    assert deep_supervision_scales([[1, 1], [2, 2], [2, 1], [2, 2]]) == [[1, 1], [0.5, 0.5], [0.25, 0.5]]


def test_training_pipeline_output_shapes_and_labels():
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    rotation, dummy = rotation_and_dummy_2d(HIPPO_3D)
    enlarged = initial_patch_size(HIPPO_3D, rotation, dummy)
    pipeline = training_transforms(
        HIPPO_3D, rotation, deep_supervision_scales(HIPPO_STRIDES_3D), (0, 1, 2), dummy
    )
    for _ in range(3):
        seg = torch.zeros((1, *enlarged), dtype=torch.int16)
        seg[0, 20:50, 20:60, 20:40] = 1
        seg[0, 30:40, 30:40, 25:35] = 2
        seg[0, :3] = -1
        out = pipeline(image=torch.randn((2, *enlarged)), segmentation=seg)
        assert out["image"].shape == (2, *HIPPO_3D) and out["image"].dtype == torch.float32
        assert [tuple(t.shape) for t in out["segmentation"]] == [
            (1, 40, 56, 40),
            (1, 20, 28, 20),
            (1, 10, 14, 10),
        ]
        for target in out["segmentation"]:
            assert set(torch.unique(target).tolist()) <= {0, 1, 2}


def test_pipeline_reproduces_nnunetv2_outputs_for_the_same_random_stream(fixtures_dir):
    """Same transforms, same order, same draws: nnunetv2 2.8.1's outputs for 16 seeds (make_reference.py)."""
    ref = np.load(fixtures_dir / "augmentation" / "nnunetv2_training_transforms.npz")
    patch = tuple(int(v) for v in ref["patch"])
    rotation, dummy = rotation_and_dummy_2d(patch)
    assert initial_patch_size(patch, rotation, dummy) == ref["image"].shape[1:]
    pipeline = training_transforms(
        patch,
        rotation,
        [[1.0, 1.0, 1.0], [0.5, 0.5, 0.5]],
        (0, 1, 2),
        dummy,
        use_mask_for_norm=[False],
        time_blur_methods=False,
    )
    for seed in ref["seeds"]:
        np.random.seed(seed)  # noqa: NPY002 (the transforms draw from the global streams)
        torch.manual_seed(seed)
        out = pipeline(
            image=torch.from_numpy(ref["image"].copy()), segmentation=torch.from_numpy(ref["seg"].copy())
        )
        np.testing.assert_allclose(out["image"].numpy(), ref[f"image_{seed}"], rtol=1e-5, atol=1e-5)
        for level, target in enumerate(out["segmentation"]):
            np.testing.assert_array_equal(target.numpy(), ref[f"seg_{seed}_{level}"])


def test_spatial_step_pads_seg_with_minus_one_when_zooming_out():
    pipeline = training_transforms((16, 16, 16), ROT_30, None, (0, 1, 2), False)
    spatial = pipeline.transforms[0]
    spatial.p_scaling, spatial.scaling = 1.0, (1.4, 1.4)  # values > 1 zoom out: the view reaches past P0
    out = spatial(
        image=torch.ones((1, 18, 18, 18)), segmentation=torch.ones((1, 18, 18, 18), dtype=torch.int16)
    )
    assert out["segmentation"][0, 0, 0, 0] == -1 and out["image"][0, 0, 0, 0] == 0
    assert out["segmentation"][0, 8, 8, 8] == 1 and out["image"][0, 8, 8, 8] == pytest.approx(1)


def test_remove_random_connected_component_spares_large_components():
    np.random.seed(1)  # noqa: NPY002
    image = torch.zeros((2, 20, 20, 20))
    image[1, :12, :12, :12] = 1  # 1728 voxels = 21.6 % of the patch: never removed
    image[1, 15:17, 15:17, 15:17] = 1
    image[1, 18, 0, 18] = 1
    transform = RemoveRandomConnectedComponentTransform([1], max_fraction=0.15, p_per_channel=1)
    removed = []
    for _ in range(20):
        out = transform(image=image.clone())["image"]
        assert out[1, :12, :12, :12].all() and torch.equal(out[0], image[0])
        assert (
            out[1].sum() == image[1].sum() - 8 or out[1].sum() == image[1].sum() - 1
        )  # exactly one small one
        removed.append(int(image[1].sum() - out[1].sum()))
    assert set(removed) == {1, 8}


# ---------------------------------------------------------------------------------------------------------
# iterators
# ---------------------------------------------------------------------------------------------------------
def synthetic_cases(n=4, shape=(36, 50, 38), channels=1, seed=0):
    rng = np.random.default_rng(seed)
    cases = {}
    for i in range(n):
        data = rng.normal(size=(channels, *shape)).astype(np.float32)
        seg = np.zeros((1, *shape), dtype=np.int16)
        seg[0, 10:20, 15:30, 10:20] = 1
        seg[0, 12:16, 18:22, 12:16] = 2
        locations = {label: np.argwhere(seg[0] == label) for label in (1, 2)}
        cases[f"case_{i}"] = (data, seg, {"class_locations": locations})
    return cases


def test_iterators_3d_shapes_and_seeded_determinism():
    cases = synthetic_cases()
    ids = sorted(cases)
    ds = deep_supervision_scales(HIPPO_STRIDES_3D)

    def make(seed):
        return make_data_iterators(
            ids[:3], ids[3:], cases.__getitem__, HIPPO_3D, 3, ds, workers=0, labels=LABELS, seed=seed
        )

    (train_a, val_a), (train_b, _), (train_c, _) = make(7), make(7), make(8)
    batch = next(train_a)
    assert batch["data"].shape == (3, 1, 40, 56, 40) and batch["data"].dtype == torch.float32
    assert [tuple(t.shape) for t in batch["target"]] == [
        (3, 1, 40, 56, 40),
        (3, 1, 20, 28, 20),
        (3, 1, 10, 14, 10),
    ]
    assert (batch["target"][0][2] > 0).any()  # the forced sample
    other = next(train_b)
    assert batch["keys"] == other["keys"] and torch.equal(batch["data"], other["data"])
    assert all(torch.equal(a, b) for a, b in zip(batch["target"], other["target"], strict=True))
    assert not torch.equal(batch["data"], next(train_c)["data"])
    val = next(val_a)
    assert val["keys"] == ["case_3"] * 3 and val["data"].shape == (3, 1, 40, 56, 40)

    state = train_a.rng_state()
    expected = next(train_a)["data"]
    train_a.set_rng_state(state)
    assert torch.equal(next(train_a)["data"], expected)


def test_iterators_2d_shapes():
    cases = synthetic_cases(n=2)
    ds = deep_supervision_scales([[1, 1], [2, 2], [2, 2]])
    train, val = make_data_iterators(
        ["case_0"], ["case_1"], cases.__getitem__, (56, 40), 12, ds, workers=0, labels=LABELS
    )
    batch = next(train)
    assert batch["data"].shape == (12, 1, 56, 40)
    assert [tuple(t.shape) for t in batch["target"]] == [(12, 1, 56, 40), (12, 1, 28, 20)]
    assert all((batch["target"][0][j] > 0).any() for j in range(8, 12))  # 12 - round(12 * 0.67) = 4 forced
    assert next(val)["data"].shape == (12, 1, 56, 40)


def test_one_seeded_worker_reproduces_in_process_batches():
    cases = synthetic_cases(n=3, shape=(20, 24, 22))
    args = (sorted(cases), sorted(cases), cases.__getitem__, (16, 16, 16), 2, None)
    in_process, _ = make_data_iterators(*args, workers=0, labels=LABELS, seed=11)
    with make_data_iterators(*args, workers=1, labels=LABELS, seed=11)[0] as worker:
        deadline = time.time() + 30
        for _ in range(3):
            a, b = next(in_process), next(worker)
            assert a["keys"] == b["keys"] and torch.equal(a["data"], b["data"])
            assert torch.equal(a["target"], b["target"])
            assert time.time() < deadline
        with pytest.raises(RuntimeError, match="worker processes"):
            worker.rng_state()


def test_cascade_iterator_appends_previous_stage_one_hot():
    cases = synthetic_cases(n=2, shape=(20, 24, 22))
    previous = {cid: (case[1][0] > 0).astype(np.uint8) * 2 for cid, case in cases.items()}
    train, val = make_data_iterators(
        ["case_0"],
        ["case_1"],
        cases.__getitem__,
        (16, 16, 16),
        2,
        None,
        workers=0,
        is_cascaded=True,
        labels=LABELS,
        load_previous_stage=previous.__getitem__,
        seed=0,
    )
    for iterator in (train, val):
        batch = next(iterator)
        assert batch["data"].shape == (2, 3, 16, 16, 16) and batch["target"].shape == (2, 1, 16, 16, 16)
        assert set(torch.unique(batch["data"][:, 1:]).tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="load_previous_stage"):
        make_data_iterators(
            ["case_0"],
            ["case_1"],
            cases.__getitem__,
            (16, 16, 16),
            2,
            None,
            workers=0,
            is_cascaded=True,
            labels=LABELS,
        )
