"""Resampling equals nnunetv2 2.8.1's ``resample_data_or_seg_to_shape`` (fixtures from make_reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
from skimage.transform import resize

from nnsnake.resampling import (
    compute_new_shape,
    nearest_indices,
    resample_data_or_seg_to_shape,
    resample_data_or_seg_to_spacing,
    separate_z_axis,
)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    with np.load(fixtures_dir / "preprocessing" / "resampling_reference.npz", allow_pickle=False) as f:
        arrays = dict(f)
    cases = []
    i = 0
    while f"c{i}_data" in arrays:
        g = arrays[f"c{i}_geometry"]
        cases.append(
            {
                "data": arrays[f"c{i}_data"],
                "seg": arrays[f"c{i}_seg"],
                "new_shape": tuple(int(v) for v in g[3:6]),
                "spacing": g[6:9],
                "new_spacing": g[9:12],
                "out_data": arrays[f"c{i}_out_data"],
                "out_prob": arrays[f"c{i}_out_prob"],
                "out_seg": arrays[f"c{i}_out_seg"],
            }
        )
        i += 1
    assert len(cases) >= 9
    return cases


def test_images_match_nnunetv2(reference):
    for case in reference:
        args = (case["new_shape"], case["spacing"], case["new_spacing"])
        for work_dtype, tolerance in ((np.float32, 1e-5), (np.float64, 1e-6)):
            out = resample_data_or_seg_to_shape(case["data"], *args, work_dtype=work_dtype)
            assert out.shape == case["out_data"].shape and out.dtype == np.float32
            for c in range(out.shape[0]):
                error = np.abs(out[c] - case["out_data"][c]).max()
                assert error < tolerance * case["out_data"][c].std(), (
                    case["spacing"],
                    case["new_spacing"],
                    error,
                )
        probabilities = resample_data_or_seg_to_shape(case["data"], *args, order=1)
        np.testing.assert_allclose(probabilities, case["out_prob"], rtol=0, atol=1e-5)


def test_label_maps_match_nnunetv2_exactly(reference):
    for case in reference:
        out = resample_data_or_seg_to_shape(
            case["seg"], case["new_shape"], case["spacing"], case["new_spacing"], is_seg=True, order=1
        )
        assert out.dtype == case["seg"].dtype
        np.testing.assert_array_equal(out, case["out_seg"])


def test_cubic_matches_skimage_on_long_axes():
    """Axes longer than one BLAS band (128 rows), up and down, each axis position."""
    rng = np.random.default_rng(3)
    for shape, new_shape in (
        ((150, 9, 7), (263, 8, 7)),
        ((6, 140, 9), (6, 131, 12)),
        ((5, 7, 300), (4, 7, 170)),
    ):
        image = rng.standard_normal((1, *shape)).astype(np.float32)
        expected = resize(image[0].astype(np.float64), new_shape, order=3, mode="edge", anti_aliasing=False)
        out = resample_data_or_seg_to_shape(image, new_shape, (1, 1, 1), (1, 1, 1), work_dtype=np.float64)
        assert np.abs(out[0] - expected).max() < 1e-6


@pytest.mark.parametrize(
    ("current", "new", "force", "expected"),
    [
        ((1, 1, 1), (1.5, 1.5, 1.5), None, None),
        ((4, 1, 1), (2, 1, 1), None, 0),  # current spacing anisotropic (> 3)
        ((3, 1, 1), (3, 1, 1), None, None),  # exactly 3 is not above the threshold
        ((1, 5, 1), (1, 5, 1), None, 1),
        ((1, 1, 3.5), (1, 1, 1), None, 2),
        ((2, 1, 1), (4, 0.75, 0.75), None, 0),  # only the new spacing is anisotropic
        ((4, 4, 1), (4, 4, 1), None, None),  # two axes share the largest spacing
        ((4, 4, 4), (1, 1, 1), True, None),  # forced, but no single thick axis
        ((2, 1, 1), (2, 1, 1), True, 0),
        ((5, 1, 1), (5, 1, 1), False, None),
    ],
)
def test_separate_z_decision(current, new, force, expected):
    assert separate_z_axis(current, new, force) == expected


def test_separate_z_threshold_is_configurable():
    assert separate_z_axis((2.5, 1, 1), (2.5, 1, 1), None, separate_z_anisotropy_threshold=2) == 0


def test_seg_resampling_keeps_minus_one_and_only_input_labels():
    seg = np.zeros((1, 6, 20, 20), np.int16)
    seg[0, :, :4] = -1
    seg[0, 2:5, 8:14, 6:12] = 2
    seg[0, 3, 10:12, 8:10] = 7
    out = resample_data_or_seg_to_shape(
        seg, (15, 31, 27), (3.5, 1, 1), (1.4, 0.65, 0.74), is_seg=True, order=1
    )
    assert out.dtype == np.int16
    assert set(np.unique(out)) <= {-1, 0, 2, 7}
    assert (out == -1).any() and (out == 2).any()
    # the -1 band stays where it was (first 4 of 20 rows -> about the first 6 of 31)
    assert (out[0, :, :5] == -1).all() and not (out[0, :, 8:] == -1).any()


def test_seg_tie_goes_to_nearest_neighbour():
    """Halving 2 voxels to 1 samples exactly between them (0.5 / 0.5): the nearest input voxel (the second) wins,
    not the smallest label (plain argmax) and not the largest (the old ``>= 0.5`` overwrite)."""
    for pair, expected in (([0, 5], 5), ([5, 0], 0)):
        seg = np.array(pair, dtype=np.int8).reshape(1, 1, 1, 2)
        out = resample_data_or_seg_to_shape(seg, (1, 1, 1), (1, 1, 1), (1, 1, 2), is_seg=True, order=1)
        assert out.reshape(-1).tolist() == [expected]


def test_unchanged_shape_returns_input():
    data = np.ones((2, 4, 5, 6), np.float32)
    assert resample_data_or_seg_to_shape(data, (4, 5, 6), (1, 1, 1), (1, 1, 1)) is data


def test_compute_new_shape_rounds_like_python():
    assert compute_new_shape((5, 10, 7), (1, 1, 1), (0.4, 1, 2)) == (12, 10, 4)  # 12.5 -> 12, 3.5 -> 4
    with pytest.raises(ValueError):
        compute_new_shape((5, 10), (1, 1, 1), (1, 1, 1))


def test_to_spacing_uses_compute_new_shape():
    data = np.random.default_rng(0).random((1, 8, 10, 12)).astype(np.float32)
    out = resample_data_or_seg_to_spacing(data, (1, 1, 1), (0.5, 2, 1))
    assert out.shape == (1, 16, 5, 12)


def test_nearest_indices_follow_scipy():
    from scipy import ndimage

    for n_in in (1, 2, 5, 13):
        for n_out in (1, 3, 8, 26):
            expected = ndimage.zoom(
                np.arange(n_in, dtype=float), n_out / n_in, order=0, mode="nearest", grid_mode=True
            )
            np.testing.assert_array_equal(nearest_indices(n_in, n_out), expected.astype(int))
