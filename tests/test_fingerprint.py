"""Fingerprint (docs/method.md §2): identical to nnunetv2's dataset_fingerprint.json on every shared dataset."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from nnsnake.fingerprint import (
    CaseFingerprint,
    aggregate_case_fingerprint_file,
    aggregate_fingerprints,
    extract_fingerprint,
    intensity_properties,
    write_case_fingerprints,
)
from nnsnake.jsonio import read_json

DATASETS = [
    "Dataset004_Hippocampus",
    "Dataset009_SpleenCTCrop",
    "Dataset201_ISBI2012EM",
    "Dataset301_BraTS2015DeepMedic",
    "Dataset303_BraTSVariedSpacing",
    "Dataset902_TotalSegExampleCT",
]


@pytest.mark.parametrize("batch_entries", [7, 1 << 20])
def test_streamed_order_statistics_equal_numpy(batch_entries: int) -> None:
    """The two-pass histogram statistics of (value, count) pairs spread over cases equal numpy's on the expanded
    sample: negatives, zeros of both signs, ties across cases, values sharing a coarse bin, one batch or many."""
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(9):
        values = rng.normal(scale=300, size=rng.integers(0, 80)).astype(np.float32)
        values[: values.size // 4] = np.float32(1.5) + np.float32(2**-20) * rng.integers(
            0, 3, values.size // 4
        )
        cases.append((values, rng.integers(1, 40, size=values.size)))
    cases.append((np.array([-0.0, 0.0, -1e-30], np.float32), np.array([5, 3, 1])))
    expanded = np.concatenate([np.repeat(v.astype(np.float64), c) for v, c in cases])
    props = intensity_properties(lambda: iter(cases), batch_entries=batch_entries)
    assert props["median"] == float(np.median(expanded))
    assert props["percentile_00_5"] == float(np.percentile(expanded, 0.5))
    assert props["percentile_99_5"] == float(np.percentile(expanded, 99.5))
    assert (props["min"], props["max"]) == (expanded.min(), expanded.max())
    assert props["mean"] == pytest.approx(float(expanded.mean()), rel=1e-12)
    assert props["std"] == pytest.approx(float(expanded.std()), rel=1e-12)
    assert list(props) == ["max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std"]
    empty = intensity_properties(lambda: iter([(np.zeros(0, np.float32), np.zeros(0, np.int64))]))
    assert all(math.isnan(v) for v in empty.values())


def test_case_fingerprint_file_is_aggregated_in_bounded_memory(tmp_path: Path) -> None:
    """The fingerprint step's memory does not grow with the cases: the file's 300 cases x 20,000 (value, count)
    pairs (72 MB as float32 + int64 arrays) are aggregated in one batch's worth of memory, to the same result as
    the cases held in memory."""
    import tracemalloc

    rng = np.random.default_rng(0)
    fingerprints = {
        f"case_{i:03d}": CaseFingerprint(
            spacing=[1.0, 1.0, 2.0],
            shape_after_crop=[10, 20, 30],
            relative_size_after_cropping=0.5 + i / 1000,
            sampled_values=[rng.normal(size=20_000).astype(np.float32)],
            sampled_counts=[rng.integers(1, 5, size=20_000)],
        )
        for i in range(300)
    }
    path = tmp_path / "case_fingerprints.npz"
    write_case_fingerprints(path, fingerprints)
    in_memory = aggregate_fingerprints([fingerprints[c] for c in sorted(fingerprints)], 1)
    # a file of the first format (cases concatenated per channel) from an earlier verify is still read
    ordered = [fingerprints[c] for c in sorted(fingerprints)]
    np.savez(
        tmp_path / "format1.npz",
        format=np.array("nnsnake-case-fingerprints-1"),
        case_ids=np.array(sorted(fingerprints)),
        spacings=np.array([f.spacing for f in ordered]),
        shapes_after_crop=np.array([f.shape_after_crop for f in ordered]),
        relative_sizes=np.array([f.relative_size_after_cropping for f in ordered]),
        offsets_0=np.cumsum([0] + [f.sampled_values[0].size for f in ordered]),
        values_0=np.concatenate([f.sampled_values[0] for f in ordered]),
        counts_0=np.concatenate([f.sampled_counts[0] for f in ordered]),
    )
    assert aggregate_case_fingerprint_file(tmp_path / "format1.npz", sorted(fingerprints)) == in_memory
    del fingerprints, ordered
    tracemalloc.start()
    from_file = aggregate_case_fingerprint_file(path, [f"case_{i:03d}" for i in range(300)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert from_file == in_memory
    assert peak < 25e6, peak  # one batch of 2^18 pairs with its temporaries, and the histograms


@pytest.mark.parametrize(("kept", "block"), [(1 << 22, 1 << 16), (5000, 700), (0, 1000)])
def test_seed_draws_equal_choice_channel_after_channel(monkeypatch, kept: int, block: int) -> None:
    """Channels in a row get the counts of successive RandomState(1234).choice calls (nnU-Net's draws), for
    populations where no masked word is skipped (2^k), about half are (2^k + 1), none is drawn at all (1), the
    channel ends inside a block or on its last word; also when the draws run past the words a process keeps,
    and for a second case in the same process (the kept words reused)."""
    from nnsnake import fingerprint

    monkeypatch.setattr(fingerprint, "_SEED_WORDS_KEPT", kept)
    monkeypatch.setattr(fingerprint, "_DRAW_BLOCK", block)
    monkeypatch.setattr(fingerprint, "_seed_words", np.zeros(0, dtype=np.uint32))
    monkeypatch.setattr(fingerprint, "_seed_state_after_kept", None)
    populations = [777, 1, 65536, 65537, 2, 3, (1 << 20) + 3, 5]
    samples = [12_345, 10, 5000, 40_000, 7, 1, 3000, 100_003]
    for _case in range(2):
        reference = np.random.RandomState(fingerprint.SAMPLING_SEED)
        draws = fingerprint.SeedDraws()
        for population, n in zip(populations, samples, strict=True):
            expected = np.bincount(reference.choice(population, n, replace=True), minlength=population)
            np.testing.assert_array_equal(draws.counts(population, n), expected)


def test_seed_draws_of_a_large_foreground_draw_only_the_words_they_need(monkeypatch) -> None:
    """A few draws from a large foreground (a big CT's) take about as many words as they need, not a block
    sized by the foreground: the kept words stay few."""
    from nnsnake import fingerprint

    monkeypatch.setattr(fingerprint, "_seed_words", np.zeros(0, dtype=np.uint32))
    monkeypatch.setattr(fingerprint, "_seed_state_after_kept", None)
    population = (1 << 22) + 1  # every other masked word is skipped
    expected = np.bincount(
        np.random.RandomState(1234).choice(population, 1000, replace=True), minlength=population
    )
    np.testing.assert_array_equal(fingerprint.SeedDraws().counts(population, 1000), expected)
    assert fingerprint._seed_words.size < 10_000


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
