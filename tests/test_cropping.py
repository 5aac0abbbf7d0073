"""Crop to the nonzero region (docs/method.md §2.2, §4.3): the hole filling equals scipy's binary_fill_holes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from nnsnake.cropping import OUTSIDE_MASK_LABEL, crop_to_nonzero, fill_holes, nonzero_mask


@pytest.mark.parametrize(
    "shape", [(40, 40), (12, 13, 14), (1, 9, 9), (7, 1, 8), (5, 6, 1), (4, 5, 6, 3), (1,), (9,)]
)
@pytest.mark.parametrize("density", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_fill_holes_equals_binary_fill_holes_on_random_masks(shape, density):
    rng = np.random.default_rng(abs(hash((shape, density))) % 2**32)
    for _ in range(5):
        mask = rng.random(shape) < density
        filled = fill_holes(mask)
        assert filled.dtype == bool and filled.shape == mask.shape
        np.testing.assert_array_equal(filled, ndimage.binary_fill_holes(mask))


def test_fill_holes_edge_cases():
    empty = np.zeros((6, 7, 8), bool)
    assert not fill_holes(empty).any()
    full = np.ones((6, 7, 8), bool)
    result = fill_holes(full)
    assert result.all() and result is not full  # a new array, as scipy returns
    # a hollow cube: the cavity is a hole, a tunnel to the border is not (face connectivity: a diagonal is no path)
    shell = np.zeros((9, 9, 9), bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False
    np.testing.assert_array_equal(fill_holes(shell), ndimage.binary_fill_holes(shell))
    assert fill_holes(shell)[4, 4, 4]
    tunnel = shell.copy()
    tunnel[4, 4, :3] = False
    assert not fill_holes(tunnel)[4, 4, 4]
    np.testing.assert_array_equal(fill_holes(tunnel), ndimage.binary_fill_holes(tunnel))
    diagonal = np.ones((5, 5), bool)
    diagonal[2, 2] = diagonal[1, 1] = False
    diagonal[0, 0] = False  # touches the border only diagonally through (1, 1)
    np.testing.assert_array_equal(fill_holes(diagonal), ndimage.binary_fill_holes(diagonal))


def test_nonzero_mask_and_crop():
    data = np.zeros((2, 10, 12, 8), np.float32)
    data[0, 2:7, 3:9, 1:6] = 1.0
    data[0, 4, 5, 3] = 0.0  # a hole inside the first channel, filled
    data[1, 8, 10, 6] = -3.0  # nonzero in the second channel only
    mask = nonzero_mask(data)
    assert mask[4, 5, 3] and mask[8, 10, 6] and mask.sum() == 5 * 6 * 5 + 1
    seg = np.zeros((1, 10, 12, 8), np.uint8)
    seg[0, 3, 4, 2] = 1
    cropped, cropped_seg, bbox = crop_to_nonzero(data, seg)
    assert bbox == [[2, 9], [3, 11], [1, 7]]
    assert cropped.shape == (2, 7, 8, 6) and cropped_seg.dtype == np.int16
    assert cropped_seg[0, 1, 1, 1] == 1 and cropped_seg[0, 6, 0, 0] == OUTSIDE_MASK_LABEL
    assert cropped_seg[0, 2, 2, 2] == 0  # the filled hole is inside the mask
