"""Dataset fingerprint (docs/method.md §2), in nnU-Net's ``dataset_fingerprint.json`` format.

Per case: read, crop to the nonzero region, record spacing and cropped shape, and draw
``int(1e8 // n_cases)`` foreground intensities per channel with replacement from ``RandomState(1234)``
(fresh per case, channels in order), exactly as nnU-Net does. nnU-Net then concatenates up to 10^8 samples
and sorts them for percentiles. We get the *same* statistics without materialising the samples: a draw with
replacement is fully described by how often each foreground voxel was drawn, so each case returns its
distinct drawn values with their counts and the percentiles are exact weighted order statistics, found by
two histogram passes over the cases (:func:`intensity_properties`) rather than one sort of everything. This is
what makes the step fast, and its memory the same for 50 cases as for 5000.
"""

from __future__ import annotations

import math
import os
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import CaseFiles, training_cases
from .imageio import read_images, read_seg
from .parallel import process_pool, processes_argument

TOTAL_FOREGROUND_SAMPLES = 10e7  # nnU-Net's num_foreground_voxels_for_intensitystats
SAMPLING_SEED = 1234
_DRAW_CHUNK = 1 << 22  # draws (or words) at once: bounds a draw's memory, whatever its size


@dataclass
class CaseFingerprint:
    spacing: list[float]
    shape_after_crop: list[int]
    relative_size_after_cropping: float
    # per channel: distinct sampled foreground values and how often each was drawn
    sampled_values: list[np.ndarray]
    sampled_counts: list[np.ndarray]


# The words of RandomState(SAMPLING_SEED) are the same for every case: a process keeps the first ones.
_SEED_WORDS_KEPT = 1 << 22  # 16 MB: all a case needs up to ~2.5 million draws per channel (>= 40 cases)
_seed_words = np.zeros(0, dtype=np.uint32)
_seed_state_after_kept: dict[str, Any] | None = None
_DRAW_BLOCK = 1 << 16  # words masked and counted at once (256 KB: stays in cache)


def _kept_seed_words(upto: int) -> np.ndarray:
    """The seed's first ``min(upto, _SEED_WORDS_KEPT)`` words (or more, if kept already), extending the kept
    ones when needed."""
    global _seed_words, _seed_state_after_kept
    want = min(upto, _SEED_WORDS_KEPT)
    if _seed_words.size < want:
        rs = np.random.RandomState(SAMPLING_SEED)
        if _seed_state_after_kept is not None:
            rs.set_state(_seed_state_after_kept)
        more = rs.randint(
            0,
            1 << 32,
            size=min(max(want, 2 * _seed_words.size), _SEED_WORDS_KEPT) - _seed_words.size,
            dtype=np.uint32,
        )
        _seed_words = np.concatenate([_seed_words, more])
        _seed_state_after_kept = rs.get_state(legacy=False)
    return _seed_words


class SeedDraws:
    """``RandomState(SAMPLING_SEED).choice(foreground, n, replace=True)`` for a case's channels in turn, as
    draw counts per foreground voxel, equal to nnU-Net's draws: 3-4x faster for many small cases (Hippocampus),
    1.3x for a few large ones (BraTS).

    The legacy ``choice`` draws an index from one 32-bit Mersenne Twister word masked to the smallest all-ones
    mask covering ``n_foreground - 1``, skipping (and consuming) a word whose masked value is too large; each
    channel continues the stream where the previous one stopped. ``randint`` does that one word at a time:
    3-5 ms of the 384,615 draws per Hippocampus case and channel, 146 ms per BraTS channel. Here the words come
    in blocks (``randint`` over the full 32-bit range returns them unmasked), masking, skipping and counting are
    vectorised, and the stream's first words, the same for every case, are kept by the process.
    """

    def __init__(self) -> None:
        self._position = 0  # words of the stream consumed so far
        self._beyond_kept: np.random.RandomState | None = None  # the stream past the kept words
        self._ahead = np.zeros(0, dtype=np.uint32)  # words past the kept ones, drawn but not consumed yet

    def _words(self, n: int) -> np.ndarray:
        """The stream's next ``n`` words (not consumed: see :meth:`_consume`)."""
        kept = _kept_seed_words(self._position + n)
        if self._position + n <= kept.size:
            return kept[self._position : self._position + n]
        head = kept[self._position :]
        missing = n - head.size - self._ahead.size
        if missing > 0:
            if self._beyond_kept is None:
                self._beyond_kept = np.random.RandomState(SAMPLING_SEED)
                if _seed_state_after_kept is not None:  # None: nothing kept, the stream from its start
                    self._beyond_kept.set_state(_seed_state_after_kept)
            fresh = self._beyond_kept.randint(0, 1 << 32, size=missing, dtype=np.uint32)
            self._ahead = np.concatenate([self._ahead, fresh])
        return np.concatenate([head, self._ahead[: n - head.size]])

    def _consume(self, n: int) -> None:
        past_kept = max(0, self._position + n - max(self._position, _seed_words.size))
        self._ahead = self._ahead[past_kept:]
        self._position += n

    def counts(self, n_foreground: int, n_samples: int) -> np.ndarray:
        """How often each of ``n_foreground`` voxels is drawn in the channel's ``n_samples`` draws."""
        if n_foreground > 1 << 32:
            raise ValueError(f"{n_foreground} foreground voxels: more than a 32-bit draw can index")
        if n_foreground == 1:
            return np.array([n_samples], dtype=np.int64)  # randint(0, 1) consumes no word
        highest = n_foreground - 1
        mask = np.uint32((1 << highest.bit_length()) - 1)
        accepted_share = n_foreground / (int(mask) + 1)  # over one half
        # a block: words for the draws still to make (a little more), in cache-sized pieces while a block's
        # histogram is small against it, and never more than _DRAW_CHUNK words in memory
        largest_block = min(max(_DRAW_BLOCK, 2 * (int(mask) + 1)), _DRAW_CHUNK)
        counts = np.zeros(n_foreground, dtype=np.int64)
        masked = np.empty(largest_block, dtype=np.uint32)
        remaining = n_samples
        while remaining > 0:
            words = self._words(min(largest_block, int(remaining / accepted_share * 1.02) + 256))
            values = np.bitwise_and(words, mask, out=masked[: words.size])
            accepted = values <= highest
            drawn = int(np.count_nonzero(accepted))
            used = words.size
            if drawn >= remaining:  # this block completes the channel: stop after its last needed word
                used = int(np.flatnonzero(accepted)[remaining - 1]) + 1
                drawn = remaining
            # skipped (too large) values land past n_foreground
            counts += np.bincount(values[:used], minlength=int(mask) + 1)[:n_foreground]
            self._consume(used)
            remaining -= drawn
        return counts


def samples_per_case(n_cases: int) -> int:
    """Foreground intensities drawn per case and channel: nnU-Net's 10^8 spread over the cases."""
    return int(TOTAL_FOREGROUND_SAMPLES // n_cases)


def fingerprint_case(files: CaseFiles, n_samples: int) -> CaseFingerprint:
    """Fingerprint one case: spacing, cropped shape, relative size and sampled foreground intensities."""
    if files.label is None:
        raise ValueError(f"case of {files.images[0]} has no label file; run the verify rule")
    data, props = read_images(files.images)
    seg, _ = read_seg(files.label)
    return fingerprint_arrays(data, props["spacing"], seg, n_samples)


def fingerprint_arrays(
    data: np.ndarray, spacing: Sequence[float], seg: np.ndarray, n_samples: int
) -> CaseFingerprint:
    """Fingerprint one case from its arrays already in memory (``(C, *spatial)`` float32 images, ``(1, ...)``
    label map): what :func:`fingerprint_case` computes after reading, and the verify step computes on the
    arrays it has just checked, so the dataset is read once for both."""
    from .cropping import crop_to_nonzero  # scipy: not for the fingerprint job, which only aggregates

    original_size = int(np.prod(data.shape[1:]))
    data, seg, _ = crop_to_nonzero(data, seg)
    foreground = seg[0] > 0
    draws = SeedDraws()  # one stream per case, channels in order
    values, counts = [], []
    for channel in data:
        fg = channel[foreground]
        if fg.size == 0:
            values.append(np.zeros(0, np.float32))
            counts.append(np.zeros(0, np.int64))
            continue
        drawn = draws.counts(fg.size, n_samples)
        keep = drawn > 0
        values.append(fg[keep])
        counts.append(drawn[keep])
    return CaseFingerprint(
        spacing=[float(s) for s in spacing],
        shape_after_crop=[int(s) for s in data.shape[1:]],
        relative_size_after_cropping=float(np.prod(data.shape[1:]) / original_size),
        sampled_values=values,
        sampled_counts=counts,
    )


def _lerp(a: float, b: float, t: float) -> float:
    """numpy's percentile interpolation formula (the two-sided form it uses for accuracy)."""
    diff = b - a
    return b - diff * (1 - t) if t >= 0.5 else a + diff * t


# Exact order statistics in bounded memory. Every float32 maps to a uint32 key that sorts as the numbers do; a
# weighted histogram of the keys' high 16 bits (pass 1) finds the bin of each wanted rank, a histogram of the low
# 16 bits inside those bins (pass 2) finds the value. Memory: two 65536-bin histograms per wanted bin and one batch
# of samples, whatever the number of cases; the result is what sorting the expanded sample would give.
_HALF_BITS = 16
_BINS = 1 << _HALF_BITS
BATCH_ENTRIES = 1 << 18  # (value, count) pairs handled at once: about 15 MB of temporaries
_PERCENTILES = {"median": 50.0, "percentile_00_5": 0.5, "percentile_99_5": 99.5}
INTENSITY_KEYS = ("max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std")

SampleSource = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]


def _sort_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys ordered as the float32 values are (sign bit set for positives, all bits flipped for negatives)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    return np.where(bits >> np.uint32(31), ~bits, bits | np.uint32(0x80000000))


def _key_value(key: int) -> float:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array(bits, dtype=np.uint32).view(np.float32))


def _batches(samples: Iterable[tuple[np.ndarray, np.ndarray]], batch_entries: int) -> Iterator[tuple]:
    """(values float32, counts int64) in batches of about ``batch_entries`` pairs, empty pieces skipped."""
    values: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    size = 0
    for case_values, case_counts in samples:
        if case_values.size == 0:
            continue
        values.append(np.asarray(case_values, dtype=np.float32))
        counts.append(np.asarray(case_counts, dtype=np.int64))
        size += case_values.size
        if size >= batch_entries:
            yield np.concatenate(values), np.concatenate(counts)
            values, counts, size = [], [], 0
    if values:
        yield np.concatenate(values), np.concatenate(counts)


def _weighted_histogram(bins: np.ndarray, counts: np.ndarray) -> np.ndarray:
    # float64 weights are exact here: a channel has at most 10^8 draws
    return np.bincount(bins, weights=counts, minlength=_BINS).astype(np.int64)


def intensity_properties(samples: SampleSource, batch_entries: int = BATCH_ENTRIES) -> dict[str, float]:
    """mean/median/std/min/max/p0.5/p99.5 of one channel's pooled samples (NaN if none), in bounded memory.

    ``samples()`` yields each case's distinct drawn values and their draw counts, and is called twice (two
    passes). Order statistics are exact (numpy's percentile on the expanded sample); mean and std are float64
    sums, where nnU-Net's float32 sums of 10^8 samples differ from the exact value in the 7th digit.
    """
    n, total, low, high = 0, 0.0, math.inf, -math.inf
    coarse = np.zeros(_BINS, np.int64)
    for values, counts in _batches(samples(), batch_entries):
        n += int(counts.sum())
        total += float(np.dot(values.astype(np.float64), counts))
        low, high = min(low, float(values.min())), max(high, float(values.max()))
        coarse += _weighted_histogram(_sort_keys(values) >> np.uint32(_HALF_BITS), counts)
    if n == 0:
        return dict.fromkeys(INTENSITY_KEYS, float("nan"))
    mean = total / n
    ranks: dict[str, tuple[int, int, float]] = {}
    for name, q in _PERCENTILES.items():
        h = (n - 1) * (q / 100.0)
        rank = int(np.floor(h))
        ranks[name] = (rank, min(rank + 1, n - 1), h - rank)
    coarse_end = np.cumsum(coarse)
    bin_of = {k: int(np.searchsorted(coarse_end, k, side="right")) for r in ranks.values() for k in r[:2]}
    fine = {b: np.zeros(_BINS, np.int64) for b in set(bin_of.values())}
    squares = 0.0
    for values, counts in _batches(samples(), batch_entries):
        squares += float(np.dot((values.astype(np.float64) - mean) ** 2, counts))
        keys = _sort_keys(values)
        high_bits = keys >> np.uint32(_HALF_BITS)
        for b, histogram in fine.items():
            inside = high_bits == b
            if inside.any():
                histogram += _weighted_histogram(keys[inside] & np.uint32(_BINS - 1), counts[inside])

    def order_statistic(k: int) -> float:
        b = bin_of[k]
        below = int(coarse_end[b - 1]) if b else 0
        low_bits = int(np.searchsorted(np.cumsum(fine[b]), k - below, side="right"))
        return _key_value((b << _HALF_BITS) | low_bits)

    result = {"max": high, "mean": mean, "min": low, "std": float(np.sqrt(squares / n))}
    for name, (lo_rank, hi_rank, fraction) in ranks.items():
        result[name] = _lerp(order_statistic(lo_rank), order_statistic(hi_rank), fraction)
    return {key: result[key] for key in INTENSITY_KEYS}


def _fingerprint_job(args: tuple[CaseFiles, int]) -> CaseFingerprint:
    return fingerprint_case(*args)


def extract_fingerprint(
    raw_dir: str | os.PathLike,
    processes: int = 1,
    progress: bool = False,
    *,
    num_processes: int | None = None,
) -> dict[str, Any]:
    """Fingerprint a verified raw dataset; returns nnU-Net's ``dataset_fingerprint.json`` content.

    ``processes`` worker processes read the cases (``num_processes`` is its deprecated name). The cases' samples
    are kept in memory here; the workflow's verify step streams them to a file instead
    (:class:`CaseFingerprintWriter`), which :func:`aggregate_case_fingerprint_file` reads in bounded memory.
    """
    from .runtime import progress as progress_bar  # imports torch: only when a fingerprint is computed

    processes = processes_argument(processes, num_processes, "extract_fingerprint")
    dataset_json, cases = training_cases(Path(raw_dir))
    n_samples = samples_per_case(len(cases))
    jobs = [(cases[cid], n_samples) for cid in sorted(cases)]
    if processes > 1:
        with process_pool(processes) as pool:
            fingerprints = pool.map(_fingerprint_job, jobs, chunksize=2)
            results = list(
                progress_bar(fingerprints, total=len(jobs), description="fingerprint", enabled=progress)
            )
    else:
        fingerprints = map(_fingerprint_job, jobs)
        results = list(
            progress_bar(fingerprints, total=len(jobs), description="fingerprint", enabled=progress)
        )
    return aggregate_fingerprints(results, len(dataset_json["channel_names"]))


def _fingerprint_json(
    spacings: Sequence[Sequence[float]],
    shapes_after_crop: Sequence[Sequence[int]],
    relative_sizes: Sequence[float],
    channel_samples: Sequence[SampleSource],
) -> dict[str, Any]:
    return {
        "foreground_intensity_properties_per_channel": {
            str(c): intensity_properties(samples) for c, samples in enumerate(channel_samples)
        },
        "median_relative_size_after_cropping": float(np.median(np.asarray(relative_sizes, dtype=np.float64))),
        "shapes_after_crop": [[int(s) for s in shape] for shape in shapes_after_crop],
        "spacings": [[float(s) for s in spacing] for spacing in spacings],
    }


def aggregate_fingerprints(results: Sequence[CaseFingerprint], n_channels: int) -> dict[str, Any]:
    """nnU-Net's ``dataset_fingerprint.json`` content from the cases' fingerprints (in sorted case order)."""

    def channel(c: int) -> SampleSource:
        return lambda: ((r.sampled_values[c], r.sampled_counts[c]) for r in results)

    return _fingerprint_json(
        [r.spacing for r in results],
        [r.shape_after_crop for r in results],
        [r.relative_size_after_cropping for r in results],
        [channel(c) for c in range(n_channels)],
    )


# On-disk form of the cases' fingerprints (the verify step's second output, read by the fingerprint step): an
# uncompressed .npz of plain arrays (no pickle), written one case at a time so neither step holds the dataset's
# samples. Case i (in the order written; "case_ids" says which) has, per channel c, "values_c_i" (float32: the
# distinct drawn foreground values) and "counts_c_i" (int32: how often each was drawn); "spacings",
# "shapes_after_crop" and "relative_sizes" hold one row per case, "n_channels" the channel count.
CASE_FINGERPRINTS_FORMAT = "nnsnake-case-fingerprints-2"
# The first format (one array per channel, the cases concatenated, "offsets_c" saying where each starts) is still
# read, so that a results folder verified before stays valid.
_CASE_FINGERPRINTS_FORMAT_1 = "nnsnake-case-fingerprints-1"


class CaseFingerprintWriter:
    """Writes cases' fingerprints to ``path`` as they come (memory: one case); the file appears only on
    :meth:`close`, so a failed step leaves no partial file. A context manager: closes on success, else aborts."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._zip = zipfile.ZipFile(self._tmp, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._case_ids: list[str] = []
        self._spacings: list[list[float]] = []
        self._shapes: list[list[int]] = []
        self._relative_sizes: list[float] = []
        self._n_channels: int | None = None

    def _member(self, name: str, array: np.ndarray) -> None:
        with self._zip.open(f"{name}.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array(fh, array, allow_pickle=False)

    def add(self, case_id: str, fingerprint: CaseFingerprint) -> None:
        n_channels = len(fingerprint.sampled_values)
        if self._n_channels is None:
            self._n_channels = n_channels
        elif n_channels != self._n_channels:
            raise ValueError(f"case {case_id} has {n_channels} channels, the others {self._n_channels}")
        i = len(self._case_ids)
        for c, (values, counts) in enumerate(
            zip(fingerprint.sampled_values, fingerprint.sampled_counts, strict=True)
        ):
            self._member(f"values_{c}_{i}", values.astype(np.float32, copy=False))
            self._member(f"counts_{c}_{i}", counts.astype(np.int32, copy=False))  # <= 10^8 draws
        self._case_ids.append(case_id)
        self._spacings.append(list(fingerprint.spacing))
        self._shapes.append(list(fingerprint.shape_after_crop))
        self._relative_sizes.append(fingerprint.relative_size_after_cropping)

    def close(self) -> None:
        """Write the per-case table and move the file into place."""
        self._member("format", np.array(CASE_FINGERPRINTS_FORMAT))
        self._member("n_channels", np.array(self._n_channels or 0, dtype=np.int64))
        self._member("case_ids", np.array(self._case_ids, dtype=str))
        self._member("spacings", np.array(self._spacings, dtype=np.float64))
        self._member("shapes_after_crop", np.array(self._shapes, dtype=np.int64))
        self._member("relative_sizes", np.array(self._relative_sizes, dtype=np.float64))
        self._zip.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._zip.close()
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> CaseFingerprintWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_case_fingerprints(path: str | os.PathLike, fingerprints: Mapping[str, CaseFingerprint]) -> None:
    """Write the cases' fingerprints (any order in, sorted case ids out), atomically."""
    with CaseFingerprintWriter(path) as writer:
        for case_id in sorted(fingerprints):
            writer.add(case_id, fingerprints[case_id])


def aggregate_case_fingerprint_file(path: str | os.PathLike, case_ids: Sequence[str]) -> dict[str, Any]:
    """nnU-Net's ``dataset_fingerprint.json`` content from a file of :class:`CaseFingerprintWriter`, for the
    cases ``case_ids`` (they must be exactly the file's). Each case's samples are read when the statistics need
    them (twice), so memory does not grow with the number of cases."""
    with np.load(path, allow_pickle=False) as npz:
        file_format = str(npz["format"]) if "format" in npz.files else None
        if file_format not in (CASE_FINGERPRINTS_FORMAT, _CASE_FINGERPRINTS_FORMAT_1):
            raise ValueError(f"{path}: not an nnsnake case-fingerprint file; rerun the verify step")
        stored = [str(c) for c in npz["case_ids"]]
        if sorted(stored) != sorted(case_ids):
            raise ValueError(
                f"{path} holds the fingerprints of other cases than the dataset's: rerun the verify step"
            )
        index = {cid: i for i, cid in enumerate(stored)}
        order = [index[cid] for cid in sorted(case_ids)]

        def channel(c: int) -> SampleSource:
            return lambda: ((npz[f"values_{c}_{i}"], npz[f"counts_{c}_{i}"]) for i in order)

        def concatenated_channel(c: int) -> SampleSource:  # format 1: whole arrays in memory
            offsets, values, counts = npz[f"offsets_{c}"], npz[f"values_{c}"], npz[f"counts_{c}"]
            return lambda: (
                (values[offsets[i] : offsets[i + 1]], counts[offsets[i] : offsets[i + 1]]) for i in order
            )

        if file_format == _CASE_FINGERPRINTS_FORMAT_1:
            n_channels = sum(1 for key in npz.files if key.startswith("offsets_"))
            channels = [concatenated_channel(c) for c in range(n_channels)]
        else:
            channels = [channel(c) for c in range(int(npz["n_channels"]))]
        return _fingerprint_json(
            npz["spacings"][order].tolist(),
            npz["shapes_after_crop"][order].tolist(),
            npz["relative_sizes"][order].tolist(),
            channels,
        )
