"""Dataset fingerprint (docs/method.md §2), in nnU-Net's ``dataset_fingerprint.json`` format.

Per case: read, crop to the nonzero region, record spacing and cropped shape, and draw
``int(1e8 // n_cases)`` foreground intensities per channel with replacement from ``RandomState(1234)``
(fresh per case, channels in order), exactly as nnU-Net does. nnU-Net then concatenates up to 10^8 samples
and sorts them for percentiles. We get the *same* statistics without materialising the samples: a draw with
replacement is fully described by how often each foreground voxel was drawn, so each case returns its
distinct drawn values with their counts and the percentiles are exact weighted order statistics. This is
what makes the step fast and light on memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import CaseFiles, training_cases
from .imageio import read_images, read_seg
from .parallel import process_pool, processes_argument

TOTAL_FOREGROUND_SAMPLES = 10e7  # nnU-Net's num_foreground_voxels_for_intensitystats
SAMPLING_SEED = 1234
_DRAW_CHUNK = 1 << 22  # draws per randint call; chunking yields the same stream as one call


@dataclass
class CaseFingerprint:
    spacing: list[float]
    shape_after_crop: list[int]
    relative_size_after_cropping: float
    # per channel: distinct sampled foreground values and how often each was drawn
    sampled_values: list[np.ndarray]
    sampled_counts: list[np.ndarray]


def _draw_counts(rs: np.random.RandomState, n_foreground: int, n_samples: int) -> np.ndarray:
    """How often each of ``n_foreground`` voxels is drawn in ``n_samples`` draws with replacement.

    Consumes ``rs`` exactly like ``rs.choice(values, n_samples, replace=True)`` does.
    """
    counts = np.zeros(n_foreground, dtype=np.int64)
    remaining = n_samples
    while remaining > 0:
        size = min(remaining, _DRAW_CHUNK)
        counts += np.bincount(rs.randint(0, n_foreground, size=size), minlength=n_foreground)
        remaining -= size
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
    rs = np.random.RandomState(SAMPLING_SEED)
    values, counts = [], []
    for channel in data:
        fg = channel[foreground]
        if fg.size == 0:
            values.append(np.zeros(0, np.float32))
            counts.append(np.zeros(0, np.int64))
            continue
        drawn = _draw_counts(rs, fg.size, n_samples)
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


class WeightedSample:
    """A multiset of values given as (value, count) pairs, with numpy-identical order statistics."""

    def __init__(self, values: np.ndarray, counts: np.ndarray):
        order = np.argsort(values, kind="stable")
        self.values = values[order].astype(np.float64)
        self.cumulative = np.cumsum(counts[order])
        self.n = int(self.cumulative[-1]) if self.cumulative.size else 0
        self._counts = counts[order]

    def order_statistic(self, k: int) -> float:
        return float(self.values[np.searchsorted(self.cumulative, k, side="right")])

    def percentile(self, q: float) -> float:
        h = (self.n - 1) * (q / 100.0)
        lo = int(np.floor(h))
        hi = min(lo + 1, self.n - 1)
        return _lerp(self.order_statistic(lo), self.order_statistic(hi), h - lo)

    def mean(self) -> float:
        return float(np.dot(self.values, self._counts) / self.n)

    def std(self) -> float:
        mean = self.mean()
        return float(np.sqrt(np.dot((self.values - mean) ** 2, self._counts) / self.n))


def intensity_properties(values: list[np.ndarray], counts: list[np.ndarray]) -> dict[str, float]:
    """mean/median/std/min/max/p0.5/p99.5 of the pooled samples of one channel (NaN if none)."""
    all_values = np.concatenate(values) if values else np.zeros(0)
    all_counts = np.concatenate(counts) if counts else np.zeros(0, np.int64)
    if all_values.size == 0:
        nan = float("nan")
        return dict.fromkeys(
            ("max", "mean", "median", "min", "percentile_00_5", "percentile_99_5", "std"), nan
        )
    sample = WeightedSample(all_values, all_counts)
    return {
        "max": float(sample.values[-1]),
        "mean": sample.mean(),
        "median": sample.percentile(50.0),
        "min": float(sample.values[0]),
        "percentile_00_5": sample.percentile(0.5),
        "percentile_99_5": sample.percentile(99.5),
        "std": sample.std(),
    }


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

    ``processes`` worker processes read the cases (``num_processes`` is its deprecated name).
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


def aggregate_fingerprints(results: Sequence[CaseFingerprint], n_channels: int) -> dict[str, Any]:
    """nnU-Net's ``dataset_fingerprint.json`` content from the cases' fingerprints (in sorted case order)."""
    properties = {
        str(c): intensity_properties(
            [r.sampled_values[c] for r in results], [r.sampled_counts[c] for r in results]
        )
        for c in range(n_channels)
    }
    return {
        "foreground_intensity_properties_per_channel": properties,
        "median_relative_size_after_cropping": float(
            np.median([r.relative_size_after_cropping for r in results])
        ),
        "shapes_after_crop": [r.shape_after_crop for r in results],
        "spacings": [r.spacing for r in results],
    }


# On-disk form of the cases' fingerprints (the verify step's second output, read by the fingerprint step): one
# .npz of plain arrays (no pickle), cases in sorted order. Per channel c the cases' distinct sampled values and
# their draw counts are concatenated ("values_c", "counts_c"); "offsets_c" (n_cases + 1) says where each starts.
CASE_FINGERPRINTS_FORMAT = "nnsnake-case-fingerprints-1"


def write_case_fingerprints(path: str | os.PathLike, fingerprints: Mapping[str, CaseFingerprint]) -> None:
    """Write the cases' fingerprints (any order in, sorted case ids out), atomically."""
    case_ids = sorted(fingerprints)
    results = [fingerprints[cid] for cid in case_ids]
    n_channels = len(results[0].sampled_values) if results else 0
    arrays: dict[str, np.ndarray] = {
        "format": np.array(CASE_FINGERPRINTS_FORMAT),
        "case_ids": np.array(case_ids, dtype=str),
        "spacings": np.array([r.spacing for r in results], dtype=np.float64),
        "shapes_after_crop": np.array([r.shape_after_crop for r in results], dtype=np.int64),
        "relative_sizes": np.array([r.relative_size_after_cropping for r in results], dtype=np.float64),
    }
    for c in range(n_channels):
        sizes = [r.sampled_values[c].size for r in results]
        arrays[f"offsets_{c}"] = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        arrays[f"values_{c}"] = np.concatenate([r.sampled_values[c] for r in results]).astype(np.float32)
        arrays[f"counts_{c}"] = np.concatenate([r.sampled_counts[c] for r in results]).astype(np.int64)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def read_case_fingerprints(path: str | os.PathLike) -> dict[str, CaseFingerprint]:
    """The cases' fingerprints written by :func:`write_case_fingerprints`, by case id (sorted)."""
    with np.load(path, allow_pickle=False) as npz:
        if "format" not in npz or str(npz["format"]) != CASE_FINGERPRINTS_FORMAT:
            raise ValueError(f"{path}: not an nnsnake case-fingerprint file; rerun the verify step")
        case_ids = [str(c) for c in npz["case_ids"]]
        n_channels = sum(1 for key in npz.files if key.startswith("offsets_"))
        channels = [(npz[f"offsets_{c}"], npz[f"values_{c}"], npz[f"counts_{c}"]) for c in range(n_channels)]
        spacings, shapes, sizes = npz["spacings"], npz["shapes_after_crop"], npz["relative_sizes"]
    return {
        cid: CaseFingerprint(
            spacing=[float(s) for s in spacings[i]],
            shape_after_crop=[int(s) for s in shapes[i]],
            relative_size_after_cropping=float(sizes[i]),
            sampled_values=[values[offsets[i] : offsets[i + 1]] for offsets, values, _ in channels],
            sampled_counts=[counts[offsets[i] : offsets[i + 1]] for offsets, _, counts in channels],
        )
        for i, cid in enumerate(case_ids)
    }
