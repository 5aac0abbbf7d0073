"""Preprocessing equals nnunetv2 2.8.1's, and the store is atomic and incremental.

Reference values come from tests/fixtures/preprocessing/make_reference.py (run with the nnunetv2 anchor venv):
``demo/`` holds nnunetv2's full output for small cases whose raw files are in ``inputs/`` (runs everywhere);
``shared/`` holds compact summaries for cases of the shared datasets (runs when ../shared/data exists).
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from nnsnake import jsonio, preprocessing
from nnsnake.labels import LabelModel
from nnsnake.normalization import NormalizationError, normalize, normalize_channel, scheme_for_channel_name
from nnsnake.preprocessing import (
    PreprocessingError,
    case_files,
    load_case,
    preprocess_case,
    preprocess_dataset,
    sample_class_locations,
    save_case,
    stored_case_ids,
)
from nnsnake.sampling import crop_with_pad

PROPERTY_KEYS = (
    "spacing",
    "shape_before_cropping",
    "bbox_used_for_cropping",
    "shape_after_cropping_and_before_resampling",
)
DEMO_CONFIGURATIONS = ("3d_fullres", "2d")


def key_text(key) -> str:
    return ",".join(str(k) for k in key) if isinstance(key, tuple) else str(key)


def location_digest(class_locations: dict) -> dict:
    out = {}
    for key, coords in class_locations.items():
        coords = np.ascontiguousarray(np.asarray(coords, dtype=np.int64))
        out[key_text(key)] = {
            "count": int(len(coords)),
            "sha256": hashlib.sha256(coords.tobytes()).hexdigest() if len(coords) else None,
        }
    return out


def assert_data_close(data: np.ndarray, expected: np.ndarray, stds) -> None:
    assert data.shape == expected.shape and data.dtype == np.float32
    for c in range(data.shape[0]):
        error = float(np.abs(data[c].astype(np.float64) - expected[c]).max())
        assert error < 1e-4 * stds[c], f"channel {c}: max abs difference {error} >= 1e-4 * std {stds[c]}"


def assert_properties_equal(properties: dict, expected: dict) -> None:
    for key in PROPERTY_KEYS:
        np.testing.assert_allclose(
            np.asarray(properties[key], dtype=float),
            np.asarray(expected[key], dtype=float),
            rtol=0,
            atol=0,
            err_msg=key,
        )


# ------------------------------------------------------------------------------------------------------------------
# against nnunetv2: small raw cases shipped with the tests


@pytest.fixture(scope="module")
def demo(fixtures_dir):
    root = fixtures_dir / "preprocessing"
    return {
        "root": root,
        "plans": json.loads((root / "demo_plans.json").read_text()),
        "dataset_json": json.loads((root / "demo_dataset.json").read_text()),
    }


@pytest.mark.parametrize("name", ["aniso", "masked"])
@pytest.mark.parametrize("configuration", DEMO_CONFIGURATIONS)
def test_demo_cases_match_nnunetv2(demo, name, configuration):
    """aniso: transposed, CT-normalised, separate-z resampling; masked: nonzero crop, masked z-score, joint
    resampling of all axes, ignore label (class locations of all annotated voxels)."""
    root = demo["root"]
    data, seg, properties = preprocess_case(
        [root / "inputs" / f"{name}_0000.nii.gz"],
        root / "inputs" / f"{name}.nii.gz",
        demo["plans"][name],
        configuration,
        demo["dataset_json"][name],
    )
    with np.load(root / "demo" / f"{name}_{configuration}.npz", allow_pickle=False) as f:
        expected_data, expected_seg = f["data"], f["seg"]
    expected = json.loads((root / "demo" / f"{name}_{configuration}.json").read_text())
    assert_data_close(data, expected_data, [c.std() for c in expected_data])
    assert seg.shape == expected_seg.shape and np.issubdtype(seg.dtype, np.signedinteger)
    np.testing.assert_array_equal(seg, expected_seg)
    assert_properties_equal(properties, expected)
    assert location_digest(properties["class_locations"]) == expected["class_locations"]
    assert properties["sitk_stuff"]["spacing"]  # the geometry needed to write predictions back


def test_demo_resamples_as_intended(demo):
    """Guard the fixture itself: the aniso case really is resampled (and the 2d config keeps the slices)."""
    root = demo["root"]
    expected = json.loads((root / "demo" / "aniso_3d_fullres.json").read_text())
    with np.load(root / "demo" / "aniso_3d_fullres.npz") as f:
        shape_3d = f["data"].shape
    with np.load(root / "demo" / "aniso_2d.npz") as f:
        shape_2d = f["data"].shape
    cropped = expected["shape_after_cropping_and_before_resampling"]
    assert shape_3d[1] > cropped[0] and shape_2d[1] == cropped[0] and shape_2d[2:] != tuple(cropped[1:])


# ------------------------------------------------------------------------------------------------------------------
# against nnunetv2: the shared datasets (summaries of nnunetv2's preprocessed cases)


def _shared_cases(fixtures_dir: Path) -> list[tuple[str, str, str]]:
    root = fixtures_dir / "preprocessing" / "shared"
    return sorted((p.parts[-3], p.parts[-2], p.stem) for p in root.glob("*/*/*.json"))


SHARED_CASES = _shared_cases(Path(__file__).resolve().parent / "fixtures")


def test_shared_fixtures_cover_every_dataset_and_configuration():
    datasets = {d for d, _, _ in SHARED_CASES}
    assert {
        "Dataset004_Hippocampus",
        "Dataset301_BraTS2015DeepMedic",
        "Dataset303_BraTSVariedSpacing",
        "Dataset009_SpleenCTCrop",
        "Dataset201_ISBI2012EM",
    } <= datasets
    for dataset in datasets:
        plans = json.loads(
            (Path(__file__).parent / "fixtures" / "nnunetv2" / dataset / "nnUNetPlans.json").read_text()
        )
        planned = {c for c, v in plans["configurations"].items() if "inherits_from" not in v}
        assert planned == {c for d, c, _ in SHARED_CASES if d == dataset}, dataset


@pytest.mark.shared
@pytest.mark.parametrize(("dataset", "configuration", "case_id"), SHARED_CASES)
def test_shared_datasets_match_nnunetv2(shared_data, fixtures_dir, dataset, configuration, case_id):
    from nnsnake.dataset import discover_cases

    raw = shared_data / dataset
    plans = json.loads((fixtures_dir / "nnunetv2" / dataset / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((raw / "dataset.json").read_text())
    files = discover_cases(raw, dataset_json)[0][case_id]
    data, seg, properties = preprocess_case(files.images, files.label, plans, configuration, dataset_json)

    folder = fixtures_dir / "preprocessing" / "shared" / dataset / configuration
    expected = json.loads((folder / f"{case_id}.json").read_text())
    with np.load(folder / f"{case_id}.npz", allow_pickle=False) as f:
        arrays = dict(f)
    assert list(data.shape) == expected["shape"]
    stds = [s[1] for s in expected["channel_stats"]]
    stride = expected["subsample_stride"]
    subsample = (slice(None), *[slice(None, None, stride)] * (data.ndim - 1))
    assert_data_close(data[subsample], arrays["data_subsample"], stds)
    for c, (mean, std, lo, hi) in enumerate(expected["channel_stats"]):
        channel = data[c].astype(np.float64)
        assert abs(channel.mean() - mean) < 1e-5 * std
        assert abs(channel.std() - std) < 1e-5 * std
        assert abs(channel.min() - lo) < 1e-4 * std and abs(channel.max() - hi) < 1e-4 * std
    if "seg" in arrays:
        assert seg.shape == arrays["seg"].shape
        assert np.mean(seg == arrays["seg"]) >= 0.9999
    else:
        assert np.mean(seg[subsample] == arrays["seg_subsample"]) >= 0.9999
    labels, counts = np.unique(seg, return_counts=True)
    for label, count in zip(labels.tolist(), counts.tolist(), strict=True):
        assert abs(count - expected["seg_label_counts"].get(str(label), 0)) <= 1e-4 * seg.size
    assert_properties_equal(properties, expected["properties"])
    assert location_digest(properties["class_locations"]) == expected["class_locations"]


# ------------------------------------------------------------------------------------------------------------------
# class locations


def test_class_location_counts_and_draws():
    seg = np.zeros((60, 60, 60), np.int8)
    seg[:3, :4, :5] = 1  # 60 voxels: all of them
    seg[10:40, 0:50, 0:20] = 2  # 30000 voxels: 10000
    seg[40:, :, :] = 3  # 20 * 3600 = 72000 voxels: ... still 10000 (1 % = 720)
    locations = sample_class_locations(seg, [1, 2, 3, 4])
    assert [len(locations[k]) for k in (1, 2, 3, 4)] == [60, 10000, 10000, 0]
    assert locations[4].shape == (0, 3)
    for label in (1, 2, 3):
        coords = locations[label]
        assert coords.dtype == np.int32 and coords.shape[1] == 3
        assert (seg[tuple(coords.T)] == label).all()
        assert len(np.unique(coords, axis=0)) == len(coords)  # drawn without replacement
    big = np.ones((120, 100, 100), np.int8)  # 1.2 M voxels: 1 % = 12000 > 10000
    assert len(sample_class_locations(big, [1])[1]) == 12000
    # deterministic: one RandomState(1234) per case
    again = sample_class_locations(seg, [1, 2, 3, 4])
    assert all(np.array_equal(locations[k], again[k]) for k in locations)


def class_location_keys(dataset_json):
    return LabelModel.from_dataset_json(dataset_json).class_location_keys


def test_class_location_keys():
    labels = {"background": 0, "b": 2, "a": 1}
    assert class_location_keys({"labels": labels}) == [1, 2]
    assert class_location_keys({"labels": {**labels, "ignore": 3}}) == [1, 2, (-1, 0, 1, 2)]
    regions = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
    assert class_location_keys({"labels": regions, "regions_class_order": [1, 2, 3]}) == [
        (1, 2, 3),
        (2, 3),
        3,
    ]


def test_region_locations_union_of_labels():
    seg = np.zeros((10, 10), np.int8)
    seg[0, :3] = 2
    seg[5, :4] = 3
    locations = sample_class_locations(seg, [(2, 3), 3])
    assert len(locations[(2, 3)]) == 7 and len(locations[3]) == 4
    assert set(seg[tuple(locations[(2, 3)].T)].tolist()) == {2, 3}


# ------------------------------------------------------------------------------------------------------------------
# normalisation


def test_scheme_for_channel_name():
    assert scheme_for_channel_name("CT") == "CTNormalization"
    assert scheme_for_channel_name("ct") == "CTNormalization"
    assert scheme_for_channel_name("noNorm") == "NoNormalization"
    assert scheme_for_channel_name("rescale_to_0_1") == "RescaleTo01Normalization"
    assert scheme_for_channel_name("rgb_to_0_1") == "RGBTo01Normalization"
    assert scheme_for_channel_name("T2 FLAIR") == "ZScoreNormalization"


def test_normalization_schemes():
    x = np.array([[-2000.0, 0.0, 100.0, 5000.0]], dtype=np.float32)
    ct = normalize_channel(
        x.copy(),
        "CTNormalization",
        intensity_properties={
            "mean": 100.0,
            "std": 50.0,
            "percentile_00_5": -100.0,
            "percentile_99_5": 300.0,
        },
    )
    np.testing.assert_allclose(ct, [[-4.0, -2.0, 0.0, 4.0]])
    z = normalize_channel(x.copy(), "ZScoreNormalization")
    assert abs(z.mean()) < 1e-6 and abs(z.std() - 1) < 1e-6
    np.testing.assert_allclose(
        normalize_channel(x.copy(), "RescaleTo01Normalization"), [[0, 2000 / 7000, 2100 / 7000, 1]], rtol=1e-6
    )
    np.testing.assert_allclose(
        normalize_channel(np.array([0.0, 51.0, 255.0], np.float32), "RGBTo01Normalization"), [0, 0.2, 1]
    )
    with pytest.raises(NormalizationError, match="0, 255"):
        normalize_channel(x.copy(), "RGBTo01Normalization")
    assert normalize_channel(x.copy(), "NoNormalization").tolist() == x.tolist()
    with pytest.raises(NormalizationError, match="unknown"):
        normalize_channel(x.copy(), "Whatever")
    with pytest.raises(NormalizationError, match="intensity properties"):
        normalize_channel(x.copy(), "CTNormalization")


def test_masked_zscore_leaves_outside_untouched():
    data = np.array([[[0.0, 0.0, 2.0, 4.0, 6.0]]], dtype=np.float32)  # (C=1, 1, 5)
    seg = np.array([[[-1, -1, 0, 1, 0]]], dtype=np.int8)
    out = normalize(data.copy(), seg, ["ZScoreNormalization"], [True])
    np.testing.assert_allclose(out[0, 0], [0, 0, -np.sqrt(1.5), 0, np.sqrt(1.5)], rtol=1e-6)
    unmasked = normalize(data.copy(), seg, ["ZScoreNormalization"], [False])
    assert unmasked[0, 0, 0] != 0
    with pytest.raises(NormalizationError, match="channel"):
        normalize(data.copy(), seg, ["ZScoreNormalization", "CTNormalization"], [False, False])


# ------------------------------------------------------------------------------------------------------------------
# the store


def _case(seed: int = 0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal((2, 6, 7, 8)).astype(np.float32)
    seg = rng.integers(-1, 3, (1, 6, 7, 8)).astype(np.int8)
    properties = {
        "spacing": [1.0, 2.0, 3.0],
        "shape_before_cropping": [6, 7, 8],
        "bbox_used_for_cropping": [[0, 6], [0, 7], [0, 8]],
        "shape_after_cropping_and_before_resampling": [6, 7, 8],
        "class_locations": sample_class_locations(seg[0], [1, 2, (-1, 0, 1, 2)]),
    }
    return data, seg, properties


def test_save_and_load_roundtrip(tmp_path):
    data, seg, properties = _case()
    save_case(tmp_path, "case_a", data, seg, properties, store="npy")
    for use_mmap in (False, True):
        d, s, p = load_case(tmp_path, "case_a", mmap=use_mmap)
        np.testing.assert_array_equal(d, data)
        np.testing.assert_array_equal(s, seg)
        assert d.dtype == np.float32 and s.dtype == np.int8
        assert d.flags.writeable != use_mmap and s.flags.writeable != use_mmap  # memory maps are read-only
        assert set(p["class_locations"]) == {1, 2, (-1, 0, 1, 2)}
        for key, coords in properties["class_locations"].items():
            np.testing.assert_array_equal(p["class_locations"][key], coords)
        assert p["spacing"] == [1.0, 2.0, 3.0]
    assert stored_case_ids(tmp_path) == ["case_a"]
    big = (
        np.random.default_rng(1).standard_normal((2, 64, 128, 80)).astype(np.float32)
    )  # > 4 MiB: memory-mapped
    save_case(
        tmp_path, "case_big", big, seg[:, :1, :1, :1], {**properties, "class_locations": {}}, store="npy"
    )
    d, _, p = load_case(tmp_path, "case_big", mmap=True)
    owner = d
    while isinstance(owner, np.ndarray):
        owner = owner.base
    owner = owner.obj if isinstance(owner, memoryview) else owner
    assert isinstance(owner, mmap.mmap) and not d.flags.writeable and p["class_locations"] == {}
    np.testing.assert_array_equal(d[:, 5:40, 60:, ::3], big[:, 5:40, 60:, ::3])
    assert oct(case_files(tmp_path, "case_a")["data"].stat().st_mode & 0o777) != oct(0o600)
    with pytest.raises(FileNotFoundError, match="case_b"):
        load_case(tmp_path, "case_b")


def test_interrupted_save_leaves_no_complete_case(tmp_path, monkeypatch):
    data, seg, properties = _case()
    save_case(tmp_path, "case_a", data, seg, properties, store="npy")
    real_save = np.save
    calls = {"n": 0}

    def failing_save(fh, array, allow_pickle=False):
        calls["n"] += 1
        if calls["n"] == 2:  # the segmentation
            raise OSError("disk full")
        real_save(fh, array, allow_pickle=allow_pickle)

    monkeypatch.setattr(preprocessing.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_case(tmp_path, "case_a", data * 2, seg, properties, store="npy")
    assert stored_case_ids(tmp_path) == []  # the old JSON went first, so the half-new case is not complete
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left


# ------------------------------------------------------------------------------------------------------------------
# the blosc2 store


def test_blosc2_chunks_and_blocks_fit_the_patch():
    chunks, blocks = preprocessing.blosc2_chunks_and_blocks((2, 200, 300, 250), 4, [96, 160, 128])
    assert chunks[0] == blocks[0] == 1  # one channel per block
    assert math.prod(blocks) * 4 <= preprocessing.BLOSC2_BLOCK_BYTES
    assert math.prod(chunks) * 4 <= preprocessing.BLOSC2_CHUNK_BYTES
    assert all(
        c % b == 0 and c <= 1.5 * p for c, b, p in zip(chunks[1:], blocks[1:], [96, 160, 128], strict=True)
    )
    small = preprocessing.blosc2_chunks_and_blocks((1, 5, 30, 40), 1, [40, 56, 40])  # clamped to the image
    assert small == ((1, 5, 30, 40), (1, 5, 30, 40))
    assert preprocessing.blosc2_chunks_and_blocks((1, 9, 300, 300), 4, [256, 256])[1][1] == 1  # 2d: one slice


def test_blosc2_store_roundtrip_and_patch_reads(tmp_path, monkeypatch):
    """The blosc2 store gives the arrays back exactly, whole or per patch (equal to the npy store's reads),
    read-only when lazy; a store change removes the other format's files."""
    data, seg, properties = _case()
    big = np.random.default_rng(3).standard_normal((2, 40, 70, 90)).astype(np.float32)
    big[:, :, :50] = -0.5  # a constant background, as normalised images have
    big_seg = np.random.default_rng(4).integers(-1, 3, (1, 40, 70, 90)).astype(np.int8)
    save_case(tmp_path / "npy", "case_big", big, big_seg, {**properties, "class_locations": {}}, store="npy")
    save_case(tmp_path, "case_a", data, seg, properties, store="blosc2", patch_size=[4, 4, 4])
    save_case(
        tmp_path, "case_big", big, big_seg, {**properties, "class_locations": {}}, patch_size=[16, 32, 32]
    )
    assert sorted(p.name for p in tmp_path.glob("case_big*")) == [
        "case_big.b2nd",
        "case_big.json",
        "case_big_locations.npy",
        "case_big_seg.b2nd",
    ]
    for use_mmap in (False, True):
        d, s, p = load_case(tmp_path, "case_a", mmap=use_mmap)
        np.testing.assert_array_equal(d, data)
        np.testing.assert_array_equal(s, seg)
        assert d.dtype == np.float32 and s.dtype == np.int8 and d.flags.writeable != use_mmap
        np.testing.assert_array_equal(p["class_locations"][1], properties["class_locations"][1])
    monkeypatch.setattr(preprocessing, "MMAP_MIN_BYTES", 2**20)  # smaller arrays are read whole
    lazy, lazy_seg, _ = load_case(tmp_path, "case_big", mmap=True)
    assert (
        isinstance(lazy, preprocessing.Blosc2CaseArray)
        and lazy.shape == big.shape
        and lazy.nbytes == big.nbytes
    )
    mapped, mapped_seg, _ = load_case(tmp_path / "npy", "case_big", mmap=True)
    rng = np.random.default_rng(0)
    for _ in range(5):
        lower = [int(rng.integers(-5, n - 3)) for n in big.shape[1:]]
        patch = crop_with_pad(lazy, lower, [16, 32, 32], 0.0, np.float32)
        np.testing.assert_array_equal(patch, crop_with_pad(mapped, lower, [16, 32, 32], 0.0, np.float32))
        patch_seg = crop_with_pad(lazy_seg, lower, [16, 32, 32], -1, np.int16)
        np.testing.assert_array_equal(patch_seg, crop_with_pad(mapped_seg, lower, [16, 32, 32], -1, np.int16))
    assert not lazy[:, 3:9].flags.writeable
    np.testing.assert_array_equal(np.asarray(lazy), big)
    assert (tmp_path / "case_big.b2nd").stat().st_size < big.nbytes / 2  # compressed
    save_case(tmp_path, "case_big", big, big_seg, {**properties, "class_locations": {}}, store="npy")
    assert not list(tmp_path.glob("case_big*.b2nd")) and stored_case_ids(tmp_path) == ["case_a", "case_big"]
    np.testing.assert_array_equal(load_case(tmp_path, "case_big")[0], big)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_loader_batches_are_the_same_from_both_stores(tmp_path, monkeypatch):
    """A training loader reading patch by patch (no case cache) draws identical batches from either store."""
    import torch

    from nnsnake.sampling import PatchDataLoader

    monkeypatch.setattr(preprocessing, "MMAP_MIN_BYTES", 2**16)  # lazy reads even for these small cases
    rng = np.random.default_rng(7)
    for case_id in ("a", "b"):
        data = rng.standard_normal((2, 24, 40, 36)).astype(np.float32)
        seg = rng.integers(0, 3, (1, 24, 40, 36)).astype(np.int8)
        properties = {"class_locations": sample_class_locations(seg[0], [1, 2])}
        for store in ("npy", "blosc2"):
            save_case(tmp_path / store, case_id, data, seg, properties, store=store, patch_size=[16, 16, 16])
    batches = {}
    for store in ("npy", "blosc2"):
        loader = PatchDataLoader(
            ["a", "b"],
            lambda cid, store=store: load_case(tmp_path / store, cid, mmap=True),
            2,
            (16, 16, 16),
            seed=0,
            case_cache_bytes=0,
        )
        batches[store] = [loader.generate_train_batch() for _ in range(4)]
    for npy, blosc in zip(batches["npy"], batches["blosc2"], strict=True):
        assert npy["keys"] == blosc["keys"]
        assert torch.equal(npy["data"], blosc["data"]) and torch.equal(npy["target"], blosc["target"])


def test_interrupted_blosc2_save_leaves_no_complete_case(tmp_path, monkeypatch):
    import blosc2

    data, seg, properties = _case()
    save_case(tmp_path, "case_a", data, seg, properties, store="blosc2")
    real_asarray = blosc2.asarray

    def failing_asarray(array, **kwargs):
        if array.dtype == np.int8:  # the segmentation, after the data
            open(kwargs["urlpath"], "wb").write(b"partial")
            raise OSError("disk full")
        return real_asarray(array, **kwargs)

    monkeypatch.setattr(blosc2, "asarray", failing_asarray)
    with pytest.raises(OSError, match="disk full"):
        save_case(tmp_path, "case_a", data * 2, seg, properties, store="blosc2")
    assert stored_case_ids(tmp_path) == []
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------------------------------
# a whole dataset: incremental, parallel, failures


@pytest.fixture
def raw_dataset(tmp_path, demo):
    """Three small cases (the demo inputs plus a copy) in nnU-Net raw layout."""
    raw = tmp_path / "raw"
    (raw / "imagesTr").mkdir(parents=True)
    (raw / "labelsTr").mkdir()
    inputs = demo["root"] / "inputs"
    for case, source in (("c1", "masked"), ("c2", "aniso"), ("c3", "masked")):
        shutil.copy(inputs / f"{source}_0000.nii.gz", raw / "imagesTr" / f"{case}_0000.nii.gz")
        label = (inputs / f"{source}.nii.gz").read_bytes()
        (raw / "labelsTr" / f"{case}.nii.gz").write_bytes(label)
    dataset_json = {**demo["dataset_json"]["masked"], "numTraining": 3}
    (raw / "dataset.json").write_text(json.dumps(dataset_json))
    return raw, dataset_json, demo["plans"]["masked"]


def _mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_preprocess_dataset_is_incremental(raw_dataset, tmp_path):
    raw, dataset_json, plans = raw_dataset
    out = tmp_path / "pre"
    manifest = preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, processes=2, progress=False)
    assert sorted(manifest["cases"]) == ["c1", "c2", "c3"] and manifest["data_identifier"]
    assert manifest["cases"]["c1"] == manifest["cases"]["c3"]
    first = _mtimes(out)
    assert len(first) == 12  # 4 files per case, nothing else

    again = preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, progress=False)
    assert again == manifest and _mtimes(out) == first  # nothing recomputed

    image = raw / "imagesTr" / "c2_0000.nii.gz"
    os.utime(image, ns=(image.stat().st_atime_ns, image.stat().st_mtime_ns + 10**9))
    preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, progress=False)
    changed = {k for k, v in _mtimes(out).items() if first[k] != v}
    assert changed and all(k.startswith("c2") for k in changed)

    edited = json.loads(json.dumps(plans))
    edited["configurations"]["3d_fullres"]["spacing"] = [1.5, 1.5, 1.5]
    resampled = preprocess_dataset(raw, dataset_json, edited, "3d_fullres", out, progress=False)
    assert resampled["cases"]["c1"]["shape"] != manifest["cases"]["c1"]["shape"]

    (raw / "labelsTr" / "c3.nii.gz").unlink()
    (raw / "imagesTr" / "c3_0000.nii.gz").unlink()
    preprocess_dataset(raw, {**dataset_json, "numTraining": 2}, edited, "3d_fullres", out, progress=False)
    assert stored_case_ids(out) == ["c1", "c2"] and not list(out.glob("c3*"))


def test_preprocess_dataset_syncs_once_instead_of_per_file(raw_dataset, tmp_path, monkeypatch):
    """The cases' files are written without an fsync each (milliseconds per file) and flushed by one filesystem
    sync at the end, before the manifest is returned; a run with nothing to do syncs nothing."""
    raw, dataset_json, plans = raw_dataset
    fsyncs, syncs = [], []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (fsyncs.append(fd), real_fsync(fd)))
    monkeypatch.setattr(jsonio, "sync_filesystem", lambda path: syncs.append(Path(path)))
    out = tmp_path / "pre"
    preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, processes=1, progress=False)
    assert fsyncs == [] and syncs == [out]
    preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, processes=1, progress=False)
    assert syncs == [out]
    monkeypatch.undo()
    jsonio.sync_filesystem(out)  # the real call works on a folder


def _case_taking(case_id: str, seconds: float) -> dict:
    time.sleep(seconds)
    return {"case": case_id}


def test_parallel_cases_report_progress_as_each_finishes(monkeypatch):
    """The progress bar moves when a case finishes, not when the last one does."""
    monkeypatch.setattr(preprocessing, "_preprocess_and_save", _case_taking)
    finished: list[float] = []
    jobs = [("quick", 0.0), ("slow", 2.0), ("quick2", 0.0)]
    results = preprocessing._run_jobs(jobs, 2, lambda n: finished.append(time.monotonic()))
    assert sorted(case for case, _ in results) == ["quick", "quick2", "slow"]
    assert len(finished) == 3 and finished[-1] - finished[0] > 1.0


def test_three_shards_write_the_same_store_as_one(raw_dataset, tmp_path):
    """preprocessing.shards: each shard preprocesses a disjoint subset; together the files are byte-identical to
    one unsharded run, and the merged manifests equal its manifest."""
    raw, dataset_json, plans = raw_dataset
    whole = preprocess_dataset(raw, dataset_json, plans, "3d_fullres", tmp_path / "one", progress=False)
    parts = [
        preprocess_dataset(
            raw, dataset_json, plans, "3d_fullres", tmp_path / "sharded", progress=False, shard=i, shards=3
        )
        for i in range(3)
    ]
    assert [sorted(p["cases"]) for p in parts] == [["c1"], ["c2"], ["c3"]]
    assert preprocessing.merge_manifests(parts) == whole
    one = {p.name: p.read_bytes() for p in (tmp_path / "one").iterdir()}
    sharded = {p.name: p.read_bytes() for p in (tmp_path / "sharded").iterdir()}
    assert len(one) == 12 and one.keys() == sharded.keys()
    assert [k for k in one if one[k] != sharded[k]] == []
    assert preprocessing.shard_case_ids([f"c{i}" for i in range(10)], 1, 4) == ["c1", "c5", "c9"]
    with pytest.raises(ValueError, match="more than one shard"):
        preprocessing.merge_manifests([parts[0], parts[0]])
    with pytest.raises(ValueError, match="shard 3 of 3"):
        preprocessing.shard_case_ids(["c1"], 3, 3)


def test_preprocessed_case_matches_preprocess_case(raw_dataset, tmp_path):
    raw, dataset_json, plans = raw_dataset
    out = tmp_path / "pre"
    preprocess_dataset(raw, dataset_json, plans, "2d", out, case_ids=["c2"], progress=False)
    assert stored_case_ids(out) == ["c2"]
    data, seg, properties = load_case(out, "c2", mmap=True)
    expected = preprocess_case(
        [raw / "imagesTr" / "c2_0000.nii.gz"], raw / "labelsTr" / "c2.nii.gz", plans, "2d", dataset_json
    )
    np.testing.assert_array_equal(data, expected[0])
    np.testing.assert_array_equal(seg, expected[1])
    assert properties["bbox_used_for_cropping"] == expected[2]["bbox_used_for_cropping"]
    with pytest.raises(PreprocessingError, match="unknown case"):
        preprocess_dataset(raw, dataset_json, plans, "2d", out, case_ids=["nope"], progress=False)


@pytest.mark.parametrize("processes", [1, 2])
def test_failing_case_names_itself(raw_dataset, tmp_path, processes):
    raw, dataset_json, plans = raw_dataset
    (raw / "imagesTr" / "c2_0000.nii.gz").write_bytes(b"not an image")
    out = tmp_path / "pre"
    with pytest.raises(PreprocessingError, match="c2") as info:
        preprocess_dataset(raw, dataset_json, plans, "3d_fullres", out, processes=processes, progress=False)
    assert "c2_0000.nii.gz" in str(info.value)
    assert "c2" not in stored_case_ids(out)
    assert not list(out.glob("c2*")) and not [p for p in out.iterdir() if p.name.startswith(".")]
