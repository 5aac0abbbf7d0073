"""Fingerprint (docs/method.md §2): identical to nnunetv2's dataset_fingerprint.json on every shared dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnsnake.fingerprint import WeightedSample, _draw_counts, extract_fingerprint
from nnsnake.jsonio import read_json

DATASETS = [
    "Dataset004_Hippocampus",
    "Dataset009_SpleenCTCrop",
    "Dataset201_ISBI2012EM",
    "Dataset301_BraTS2015DeepMedic",
    "Dataset303_BraTSVariedSpacing",
    "Dataset902_TotalSegExampleCT",
]


def test_weighted_order_statistics_equal_numpy() -> None:
    """Percentiles of (value, count) pairs equal np.percentile on the expanded sample."""
    rng = np.random.default_rng(3)
    values = rng.normal(size=300).astype(np.float32)
    counts = rng.integers(1, 40, size=300)
    expanded = np.repeat(values.astype(np.float64), counts)
    sample = WeightedSample(values, counts)
    for q in (0.0, 0.5, 10, 50, 73.3, 99.5, 100):
        assert sample.percentile(q) == pytest.approx(float(np.percentile(expanded, q)), rel=1e-12, abs=1e-12)
    assert sample.mean() == pytest.approx(float(expanded.mean()), rel=1e-12)
    assert sample.std() == pytest.approx(float(expanded.std()), rel=1e-12)
    assert sample.percentile(50) == pytest.approx(float(np.median(expanded)), rel=1e-12)


def test_draw_counts_consume_the_rng_like_choice() -> None:
    """Counting draws gives the same multiset as RandomState.choice with replacement, chunked or not."""
    population = np.arange(1000, 1777, dtype=np.float64)
    drawn = np.random.RandomState(1234).choice(population, 12_345, replace=True)
    counts = _draw_counts(np.random.RandomState(1234), population.size, 12_345)
    np.testing.assert_array_equal(np.bincount((drawn - 1000).astype(int), minlength=population.size), counts)


@pytest.mark.parametrize("name", DATASETS)
def test_fingerprint_equals_nnunetv2(name: str, shared_data: Path, fixtures_dir: Path) -> None:
    reference_path = fixtures_dir / "nnunetv2" / name / "dataset_fingerprint.json"
    if not reference_path.exists():
        pytest.skip(f"no nnunetv2 fixture {reference_path}")
    reference = read_json(reference_path)
    ours = extract_fingerprint(shared_data / name, processes=2)
    assert ours["spacings"] == reference["spacings"]
    assert ours["shapes_after_crop"] == reference["shapes_after_crop"]
    assert ours["median_relative_size_after_cropping"] == pytest.approx(
        reference["median_relative_size_after_cropping"], rel=1e-12
    )
    ref_props = reference["foreground_intensity_properties_per_channel"]
    assert sorted(ours["foreground_intensity_properties_per_channel"]) == sorted(ref_props)
    for channel, props in ours["foreground_intensity_properties_per_channel"].items():
        for key, value in ref_props[channel].items():
            # nnU-Net sums 1e8 float32 samples; its mean/std carry float32 rounding, order statistics are exact
            tolerance = 1e-6 if key in ("mean", "std") else 1e-7
            assert math.isclose(props[key], value, rel_tol=tolerance, abs_tol=1e-9), (
                channel,
                key,
                props[key],
                value,
            )


@pytest.mark.parametrize(
    "name", ["Dataset201_ISBI2012EM", "Dataset301_BraTS2015DeepMedic", "Dataset303_BraTSVariedSpacing"]
)
def test_verify_pass_fingerprints_equal_the_fingerprint_step_reading_again(
    name: str, shared_data: Path, tmp_path: Path
) -> None:
    """The workflow's verify job fingerprints each case from the arrays it has just checked and the fingerprint
    job only aggregates them (one read of the dataset): the result is exactly extract_fingerprint's (2D and
    2-channel datasets included), written and read back through the case-fingerprint file."""
    from nnsnake import steps

    case_file = tmp_path / "case_fingerprints.npz"
    steps.verify(shared_data / name, tmp_path / "verification.json", processes=2, case_fingerprints=case_file)
    one_pass = steps.fingerprint(
        shared_data / name, tmp_path / "fingerprint.json", case_fingerprints=case_file
    )
    assert one_pass == extract_fingerprint(shared_data / name, processes=2)
    assert read_json(tmp_path / "fingerprint.json") == json.loads(json.dumps(one_pass))


def test_case_fingerprint_file_refuses_other_cases_and_other_files(shared_data: Path, tmp_path: Path) -> None:
    """A case-fingerprint file of another dataset, or a file that is not one, is refused by name."""
    from nnsnake import steps

    other = tmp_path / "other.npz"
    steps.verify(
        shared_data / "Dataset201_ISBI2012EM", tmp_path / "v.json", processes=1, case_fingerprints=other
    )
    with pytest.raises(ValueError, match="other cases"):
        steps.fingerprint(
            shared_data / "Dataset301_BraTS2015DeepMedic", tmp_path / "f.json", case_fingerprints=other
        )
    junk = tmp_path / "junk.npz"
    np.savez(junk, a=np.zeros(3))
    with pytest.raises(ValueError, match="not an nnsnake case-fingerprint file"):
        steps.fingerprint(shared_data / "Dataset201_ISBI2012EM", tmp_path / "f.json", case_fingerprints=junk)
    assert not (tmp_path / "f.json").exists()
