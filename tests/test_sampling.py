"""Patch sampling (docs/method.md §5.4) and patch geometry (§5.5) on synthetic in-memory cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nnsnake.sampling import (
    PatchDataLoader,
    crop_with_pad,
    derive_seed,
    forced_foreground_count,
    initial_patch_size,
    mirror_axes,
    rotation_and_dummy_2d,
)


def make_case(shape, blobs=(), channels=1, fill=None):
    """A case with data = noise (or ``fill``) and seg labels in the given boxes ``(label, slices)``."""
    rng = np.random.default_rng(abs(hash(shape)) % 2**32)
    data = rng.normal(size=(channels, *shape)).astype(np.float32) if fill is None else fill.astype(np.float32)
    seg = np.zeros((1, *shape), dtype=np.int16)
    for label, box in blobs:
        seg[(0, *box)] = label
    locations = {label: np.argwhere(seg[0] == label) for label in np.unique(seg) if label > 0}
    return data, seg, {"class_locations": locations}


def loader_for(cases, batch_size, patch_size, sampling_patch_size=None, **kwargs):
    return PatchDataLoader(
        list(cases), lambda cid: cases[cid], batch_size, patch_size, sampling_patch_size, **kwargs
    )


# ---------------------------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------------------------
# reference values from nnunetv2 2.8.1 (configure_rotation_dummyDA_mirroring_and_inital_patch_size)
REFERENCE_GEOMETRY = [
    # patch, dummy_2d, max rotation (deg), initial patch
    ((40, 56, 40), False, 30, (73, 80, 64)),  # Hippocampus 3d_fullres
    ((56, 40), False, 180, (65, 65)),  # Hippocampus 2d
    ((28, 192, 192), True, 180, (28, 225, 225)),  # SpleenCTCrop 3d_fullres
    ((96, 160, 160), False, 30, (191, 257, 219)),  # BraTS 3d_fullres
    ((96, 160, 128), False, 30, (191, 238, 186)),
    ((512, 512), False, 180, (602, 602)),  # ISBI 2d
    ((64, 32), False, 15, (82, 37)),
    ((16, 50, 30), True, 180, (16, 58, 58)),
]


@pytest.mark.parametrize("patch, dummy_2d, degrees, expected", REFERENCE_GEOMETRY)
def test_rotation_dummy_2d_and_initial_patch_match_nnunet(patch, dummy_2d, degrees, expected):
    rotation, is_dummy = rotation_and_dummy_2d(patch)
    assert is_dummy == dummy_2d
    assert rotation == pytest.approx((-math.radians(degrees), math.radians(degrees)))
    assert initial_patch_size(patch, rotation, is_dummy) == expected


def test_dummy_2d_and_2d_rotation_thresholds_are_strict():
    assert rotation_and_dummy_2d((10, 30, 30))[1] is False  # max/P[0] == 3 is not > 3
    assert rotation_and_dummy_2d((10, 31, 30))[1] is True
    assert rotation_and_dummy_2d((60, 40))[0][1] == pytest.approx(math.pi)  # ratio 1.5 is not > 1.5
    assert rotation_and_dummy_2d((61, 40))[0][1] == pytest.approx(math.radians(15))
    assert rotation_and_dummy_2d((40, 10, 40))[1] is False  # only the first axis counts as the coarse one
    with pytest.raises(ValueError, match="2 or 3 axes"):
        rotation_and_dummy_2d((4, 4, 4, 4))


def test_initial_patch_caps_rotation_at_90_degrees_and_accepts_scalar():
    assert initial_patch_size((40, 56, 40), math.pi, False) == initial_patch_size(
        (40, 56, 40), math.pi / 2, False
    )
    assert initial_patch_size((40, 56, 40), 0.0, False) == (47, 65, 47)  # only the 1/0.85 margin
    assert initial_patch_size((20, 64, 64), (-math.pi, math.pi), True)[0] == 20


def test_mirror_axes_are_all_spatial_axes():
    assert mirror_axes((40, 56, 40)) == (0, 1, 2)
    assert mirror_axes((56, 40)) == (0, 1)


# ---------------------------------------------------------------------------------------------------------
# oversampling
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch_size, forced", [(2, 1), (9, 3), (366, 121), (1, 0), (3, 1)])
def test_forced_foreground_count(batch_size, forced):
    assert forced_foreground_count(batch_size) == forced
    loader = loader_for({"a": make_case((8, 8, 8))}, batch_size, (4, 4, 4))
    positions = [j for j in range(batch_size) if loader.force_foreground(j)]
    assert positions == list(range(batch_size - forced, batch_size))  # the last samples of each batch


@pytest.mark.parametrize("batch_size, forced", [(2, 1), (9, 3)])
def test_oversampling_ratio_over_many_batches(batch_size, forced):
    # one voxel of foreground in a 40^3 volume: random 6^3 patches almost never see it
    cases = {
        f"c{i}": make_case((40, 40, 40), [(1 + i % 2, (slice(5 + i, 6 + i), slice(30, 31), slice(9, 10)))])
        for i in range(4)
    }
    loader = loader_for(cases, batch_size, (6, 6, 6), seed=3)
    n_batches, fg_per_position, drawn = 300, np.zeros(batch_size), []
    for _ in range(n_batches):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (batch_size, 1, 6, 6, 6)
        fg_per_position += (batch["target"] > 0).flatten(1).any(1).numpy()
        drawn += batch["keys"]
    assert np.all(fg_per_position[batch_size - forced :] == n_batches)  # every forced sample holds foreground
    assert fg_per_position[: batch_size - forced].sum() < 0.05 * n_batches * (batch_size - forced)
    # cases are drawn uniformly with replacement
    counts = np.array([drawn.count(c) for c in cases])
    assert counts.sum() == n_batches * batch_size
    assert np.all(np.abs(counts / counts.sum() - 0.25) < 0.05)


def test_oversampling_bs366_gives_121_foreground_patches():
    cases = {"c": make_case((30, 30, 30), [(1, (slice(3, 4), slice(20, 21), slice(25, 26)))])}
    batch = loader_for(cases, 366, (4, 4), seed=0).generate_train_batch()
    has_fg = (batch["target"] > 0).flatten(1).any(1).numpy()
    assert has_fg[245:].all()
    assert has_fg[:245].sum() < 30  # a random slice + crop rarely meets a single voxel


def test_forced_sample_is_centred_on_a_voxel_of_a_present_class():
    # label 1 one voxel, label 2 one voxel, label 3 has no locations (absent): classes 1 and 2 equally often
    shape = (30, 30, 30)
    data, seg, props = make_case(
        shape, [(1, (slice(15, 16),) * 3), (2, (slice(10, 11), slice(20, 21), slice(5, 6)))]
    )
    props["class_locations"][3] = np.zeros((0, 3), dtype=np.int64)
    loader = loader_for({"c": (data, seg, props)}, 2, (8, 8, 8), sampling_patch_size=(10, 12, 14), seed=1)
    seen = {1: 0, 2: 0}
    for _ in range(200):
        target = loader.generate_train_batch()["target"][1, 0]
        labels = set(np.unique(target.numpy())) - {0, -1}
        assert len(labels) == 1
        label = labels.pop()
        seen[label] += 1
        if label == 1:  # lower = voxel - P0 // 2 puts the voxel at P0 // 2 (no clamp needed here)
            assert tuple(np.argwhere(target.numpy() == 1)[0]) == (5, 6, 7)
    assert seen[1] > 70 and seen[2] > 70


def test_forced_sample_lower_corner_is_clamped_to_lower_bound_only():
    # foreground at the very corner: the lower bound clamps; near the upper edge nothing clamps, padding fills
    shape = (20, 20, 20)
    case = make_case(shape, [(1, (slice(0, 1),) * 3)])
    loader = loader_for(
        {"c": case}, 1, (6, 6, 6), sampling_patch_size=(10, 10, 10), oversample_foreground_percent=1.0
    )
    lower = loader.lower_corner(shape, True, case[2]["class_locations"])
    assert lower == [-2, -2, -2]  # lb = -(10 - 6) // 2
    case = make_case(shape, [(1, (slice(19, 20),) * 3)])
    lower = loader.lower_corner(shape, True, case[2]["class_locations"])
    assert lower == [14, 14, 14]  # 19 - 5, beyond ub = 20 + 2 - 10 = 12


def test_case_without_foreground_falls_back_to_random_crop():
    cases = {"empty": make_case((12, 12, 12))}
    assert cases["empty"][2]["class_locations"] == {}
    loader = loader_for(cases, 3, (6, 6, 6), seed=0)
    batch = loader.generate_train_batch()
    assert batch["data"].shape == (3, 1, 6, 6, 6)
    assert (batch["target"] == 0).all()


def test_json_style_class_locations_are_accepted():
    data, seg, props = make_case((20, 20, 20), [(2, (slice(4, 5),) * 3)])
    props = {"class_locations": {"2": props["class_locations"][2].tolist()}}
    loader = loader_for({"c": (data, seg, props)}, 1, (4, 4, 4), oversample_foreground_percent=1.0, seed=0)
    assert (loader.generate_train_batch()["target"] == 2).sum() == 1


def test_class_locations_with_channel_column_are_rejected():
    data, seg, props = make_case((20, 20, 20), [(1, (slice(4, 5),) * 3)])
    props["class_locations"][1] = np.array([[0, 4, 4, 4]])
    loader = loader_for({"c": (data, seg, props)}, 1, (4, 4, 4), oversample_foreground_percent=1.0)
    with pytest.raises(ValueError, match="without a channel column"):
        loader.generate_train_batch()


# ---------------------------------------------------------------------------------------------------------
# patch extraction
# ---------------------------------------------------------------------------------------------------------
def test_crop_with_pad_values():
    array = np.arange(2 * 4 * 5, dtype=np.float32).reshape(2, 4, 5)
    out = crop_with_pad(array, (-1, 3), (3, 4), -7, np.float32)
    assert out.shape == (2, 3, 4)
    expected = np.full((2, 3, 4), -7, dtype=np.float32)
    expected[:, 1:3, 0:2] = array[:, 0:2, 3:5]
    np.testing.assert_array_equal(out, expected)
    assert (crop_with_pad(array, (10, 10), (2, 2), 5, np.int16) == 5).all()  # fully outside


def test_lower_corner_ranges_training_and_validation():
    shape = (20, 20, 20)
    case = make_case(shape)
    train = loader_for({"c": case}, 1, (10, 10, 10), sampling_patch_size=(16, 16, 16), seed=0)
    lowers = np.array([train.lower_corner(shape, False, {}) for _ in range(2000)])
    # need_to_pad = 6: lower in [-3, 20 + 3 - 16]
    assert lowers.min() == -3 and lowers.max() == 7
    val = loader_for({"c": case}, 1, (10, 10, 10), seed=0)
    lowers = np.array([val.lower_corner(shape, False, {}) for _ in range(2000)])
    assert lowers.min() == 0 and lowers.max() == 10


def test_small_case_is_padded_data_zero_seg_minus_one():
    shape = (10, 10, 10)
    data = np.ones((2, *shape), dtype=np.float32)
    seg = np.ones((1, *shape), dtype=np.int16)
    props = {"class_locations": {1: np.argwhere(seg[0] == 1)}}
    loader = loader_for({"c": (data, seg, props)}, 2, (12, 12, 12), sampling_patch_size=(16, 16, 16), seed=0)
    for _ in range(5):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (2, 2, 16, 16, 16) and batch["target"].dtype == torch.int16
        random_sample_data, random_sample_seg = batch["data"][0], batch["target"][0]
        # shape + need_to_pad (4) < 16, so need_to_pad grows to 6 and the only lower corner is -3
        inside = (slice(None), slice(3, 13), slice(3, 13), slice(3, 13))
        assert (random_sample_data[inside] == 1).all() and (random_sample_seg[inside] == 1).all()
        assert random_sample_data.sum() == 2 * 1000
        assert (random_sample_seg == -1).sum() == 16**3 - 1000


def test_2d_loader_takes_one_slice_and_forced_slice_holds_foreground():
    shape = (12, 20, 20)
    fill = np.broadcast_to(
        np.arange(1, 13, dtype=np.float32)[None, :, None, None], (1, *shape)
    )  # slice z: z + 1
    case = make_case(shape, [(1, (slice(7, 8), slice(5, 15), slice(5, 15)))], fill=fill)
    loader = loader_for({"c": case}, 6, (8, 8), sampling_patch_size=(10, 10), seed=2)
    slices = []
    for _ in range(60):
        batch = loader.generate_train_batch()
        assert batch["data"].shape == (6, 1, 10, 10) and batch["target"].shape == (6, 1, 10, 10)
        for j in range(6):
            values = set(torch.unique(batch["data"][j]).tolist()) - {0.0}  # 0: in-plane padding
            assert len(values) == 1  # one slice, singleton axis dropped
            slices.append(int(values.pop()) - 1)
            if j >= 4:
                assert slices[-1] == 7 and (batch["target"][j] == 1).any()
    random_slices = [s for i, s in enumerate(slices) if i % 6 < 4]
    assert set(random_slices) == set(range(12))


def test_cascade_previous_stage_is_seg_channel_one_padded_minus_one():
    shape = (8, 8, 8)
    case = make_case(shape, [(1, (slice(2, 5),) * 3)])
    previous = np.full(shape, 2, dtype=np.uint8)
    loader = loader_for({"c": case}, 1, (10, 10, 10), load_previous_stage=lambda cid: previous, seed=0)
    target = loader.generate_train_batch()["target"]
    assert target.shape == (1, 2, 10, 10, 10)
    assert (target[0, 1] == 2).sum() == 8**3 and (target[0, 1] == -1).sum() == 10**3 - 8**3
    assert torch.equal(target[0, 0] == -1, target[0, 1] == -1)
    bad = loader_for({"c": case}, 1, (4, 4, 4), load_previous_stage=lambda cid: np.zeros((4, 4, 4)))
    with pytest.raises(ValueError, match="previous-stage"):
        bad.generate_train_batch()


def test_ignore_label_centres_random_samples_on_annotated_voxels():
    shape = (40, 40, 40)
    data, seg, props = make_case(shape, [(1, (slice(30, 31),) * 3)])
    seg[0, 5, 5, 5] = 3  # the only annotated non-foreground voxel; label 3 plays the ignore label elsewhere
    props["class_locations"][-1] = np.array([[5, 5, 5], [30, 30, 30]])
    loader = loader_for({"c": (data, seg, props)}, 3, (6, 6, 6), has_ignore_label=True, seed=0)
    for _ in range(30):
        target = loader.generate_train_batch()["target"]
        assert ((target == 1) | (target == 3)).flatten(1).any(1).all()


def test_case_cache_serves_repeated_cases_and_respects_its_budget():
    cases = {f"c{i}": make_case((10, 10, 10)) for i in range(4)}  # 4000 + 2000 bytes each
    calls = []

    def load(case_id):
        calls.append(case_id)
        return cases[case_id]

    cached = PatchDataLoader(list(cases), load, 8, (4, 4, 4), case_cache_bytes=13_000, seed=0)
    uncached = PatchDataLoader(list(cases), cases.__getitem__, 8, (4, 4, 4), case_cache_bytes=0, seed=0)
    for _ in range(20):
        a, b = cached.generate_train_batch(), uncached.generate_train_batch()
        assert torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
        assert len(cached._case_cache) <= 2 and cached._case_cache_used <= 13_000
    assert 4 <= len(calls) < 160  # a hit for every case still held
    roomy = PatchDataLoader(list(cases), load, 8, (4, 4, 4), seed=0)
    calls.clear()
    for _ in range(20):
        roomy.generate_train_batch()
    assert sorted(calls) == sorted(cases)  # each case opened once


def test_bad_case_shapes_name_the_case():
    loader = PatchDataLoader(["x"], lambda cid: (np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), {}), 1, (2, 2))
    with pytest.raises(ValueError, match="case x"):
        loader.generate_train_batch()
    with pytest.raises(ValueError, match="at least one case"):
        PatchDataLoader([], lambda cid: None, 1, (2, 2))


# ---------------------------------------------------------------------------------------------------------
# randomness
# ---------------------------------------------------------------------------------------------------------
def test_seeded_loader_is_reproducible_and_leaves_global_rng_alone():
    cases = {
        f"c{i}": make_case((20, 24, 28), [(1, (slice(3, 9), slice(4, 10), slice(5, 12)))]) for i in range(3)
    }
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()  # noqa: NPY002
    a = loader_for(cases, 4, (8, 8, 8), (12, 12, 12), seed=5).generate_train_batch()
    b = loader_for(cases, 4, (8, 8, 8), (12, 12, 12), seed=5).generate_train_batch()
    c = loader_for(cases, 4, (8, 8, 8), (12, 12, 12), seed=6).generate_train_batch()
    assert (
        a["keys"] == b["keys"] and torch.equal(a["data"], b["data"]) and torch.equal(a["target"], b["target"])
    )
    assert not torch.equal(a["data"], c["data"])
    assert np.array_equal(np.random.get_state()[1], np_state[1])  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_rng_state_roundtrip_resumes_the_stream(tmp_path):
    cases = {f"c{i}": make_case((20, 24, 28)) for i in range(3)}
    loader = loader_for(cases, 2, (8, 8, 8), (12, 12, 12), seed=9)
    loader.generate_train_batch()
    torch.save(loader.rng_state(), tmp_path / "rng.pt")
    expected = [loader.generate_train_batch()["data"] for _ in range(3)]
    fresh = loader_for(cases, 2, (8, 8, 8), (12, 12, 12), seed=1)
    fresh.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    for want in expected:
        assert torch.equal(fresh.generate_train_batch()["data"], want)
    with pytest.raises(RuntimeError, match="without a seed"):
        loader_for(cases, 2, (8, 8, 8)).rng_state()


def test_worker_streams_differ_and_derive_from_the_seed():
    assert derive_seed(1, 0) != derive_seed(1, 1) != derive_seed(2, 0)
    cases = {f"c{i}": make_case((20, 24, 28)) for i in range(3)}
    worker0, worker1 = (loader_for(cases, 2, (8, 8, 8), seed=4) for _ in range(2))
    in_process = loader_for(cases, 2, (8, 8, 8), seed=4)
    worker0.set_thread_id(0)
    worker1.set_thread_id(1)
    first = worker0.generate_train_batch()["data"]
    assert torch.equal(first, in_process.generate_train_batch()["data"])
    assert not torch.equal(first, worker1.generate_train_batch()["data"])


# ---------------------------------------------------------------------------------------------------------
# regions and the ignore label (extensions §3.6, §4.3): keys as the preprocessing stores them
# ---------------------------------------------------------------------------------------------------------
ANNOTATED = (
    -1,
    0,
    1,
    2,
)  # nnU-Net's annotated key: -1 and every label, of a dataset with labels 0, 1, 2 + ignore


def centre(loader, lower):
    return tuple(lo + s // 2 for lo, s in zip(lower, loader.sampling_patch_size, strict=True))


def test_ignore_label_random_samples_are_centred_on_annotated_voxels():
    """Not forced: a voxel of the annotated key is the centre (never the foreground keys, never a random crop)."""
    shape = (40, 40, 40)
    locations = {
        (1, 2): np.array([[30, 30, 30]]),
        2: np.array([[30, 30, 30]]),
        ANNOTATED: np.array([[10, 12, 14], [20, 22, 24]]),
    }
    loader = loader_for({"c": make_case(shape)}, 1, (6, 6, 6), has_ignore_label=True)
    np.random.seed(0)  # noqa: NPY002 - the sampler draws from the global stream, as nnU-Net's
    centres = {centre(loader, loader.lower_corner(shape, False, locations)) for _ in range(50)}
    assert centres == {(10, 12, 14), (20, 22, 24)}


def test_without_ignore_label_random_samples_are_random_crops():
    shape = (40, 40, 40)
    locations = {1: np.array([[10, 12, 14]])}
    loader = loader_for({"c": make_case(shape)}, 1, (6, 6, 6))
    np.random.seed(0)  # noqa: NPY002
    centres = {centre(loader, loader.lower_corner(shape, False, locations)) for _ in range(50)}
    assert len(centres) > 40


def test_forced_samples_drop_the_annotated_key_when_other_keys_exist():
    """Forced: uniform over the non-empty keys; the annotated key only when it is the only one."""
    shape = (40, 40, 40)
    loader = loader_for({"c": make_case(shape)}, 1, (6, 6, 6), has_ignore_label=True)
    np.random.seed(1)  # noqa: NPY002
    locations = {
        (1, 2): np.array([[10, 10, 10]]),
        2: np.array([[30, 30, 30]]),
        ANNOTATED: np.array([[20, 20, 20]]),
    }
    seen = [centre(loader, loader.lower_corner(shape, True, locations)) for _ in range(400)]
    assert set(seen) == {(10, 10, 10), (30, 30, 30)}
    assert (
        150 < seen.count((10, 10, 10)) < 250
    )  # both regions equally often (nested regions favour inner ones)
    only_annotated = {(1, 2): np.zeros((0, 3)), 2: np.zeros((0, 3)), ANNOTATED: np.array([[20, 20, 20]])}
    assert centre(loader, loader.lower_corner(shape, True, only_annotated)) == (20, 20, 20)


def test_case_without_annotated_voxels_warns_and_crops_randomly():
    shape = (20, 20, 20)
    loader = loader_for({"c": make_case(shape)}, 1, (6, 6, 6), has_ignore_label=True)
    locations = {1: np.zeros((0, 3)), ANNOTATED: np.zeros((0, 3))}
    with pytest.warns(UserWarning, match="no annotated voxel"):
        lower = loader.lower_corner(shape, False, locations)
    assert all(0 <= lo <= 14 for lo in lower)
    lower = loader.lower_corner(shape, True, locations)  # forced, nothing eligible: random crop, no warning
    assert all(0 <= lo <= 14 for lo in lower)


def test_stored_region_and_ignore_locations_drive_the_loader(tmp_path):
    """Through the store: tuple keys (one-label regions included) and nnU-Net's key order come back."""
    from nnsnake.labels import LabelModel
    from nnsnake.preprocessing import load_case, sample_class_locations, save_case

    labels = LabelModel.from_dataset_json(
        {
            "labels": {"background": 0, "hippocampus": [1, 2], "posterior": [2], "ignore": 3},
            "regions_class_order": [1, 2],
        }
    )
    seg = np.full((1, 20, 20, 20), 3, dtype=np.int8)  # ignored everywhere except one corner
    seg[0, :5, :5, :5] = 0
    seg[0, 2, 2, 2] = 1
    seg[0, 3, 3, 3] = 2
    seg[0, 0, 0, 0] = -1  # outside the nonzero mask: annotated background
    locations = sample_class_locations(seg[0], labels.class_location_keys)
    assert list(locations) == [(1, 2), (2,), ANNOTATED]
    save_case(tmp_path, "c", np.zeros((1, 20, 20, 20), np.float32), seg, {"class_locations": locations})
    stored = load_case(tmp_path, "c")[2]["class_locations"]
    assert list(stored) == list(locations)
    for key in locations:
        np.testing.assert_array_equal(stored[key], locations[key])
    loader = PatchDataLoader(
        ["c"], lambda cid: load_case(tmp_path, cid), 3, (4, 4, 4), has_ignore_label=True, seed=0
    )
    for _ in range(20):
        target = loader.generate_train_batch()["target"]
        assert (target != 3).flatten(1).any(1).all()  # every patch, forced or not, holds annotated voxels
        assert ((target == 1) | (target == 2)).flatten(1)[2].any()  # the forced one holds a region
