"""Per-channel intensity normalisation (docs/method.md §3.8 for the choice, §4.5 for the arithmetic).

The plans name one scheme per channel (nnU-Net's class names, so plans stay comparable). The arithmetic is
nnU-Net's, in float32 and in the same order of operations, because preprocessed arrays are compared with
nnunetv2's to 1e-4 of a channel's standard deviation:

* ``CTNormalization``: clip to the dataset's foreground 0.5/99.5 percentiles, subtract the foreground mean,
  divide by ``max(std, 1e-8)`` (global statistics from the fingerprint; never masked);
* ``ZScoreNormalization``: per image; with ``use_mask_for_norm`` only voxels with ``seg >= 0`` (inside the
  filled nonzero mask, or labelled) are normalised, with their own mean and population std; the rest stays 0;
* ``RescaleTo01Normalization``: ``(x - min) / max(max - min, 1e-8)``;
* ``RGBTo01Normalization``: ``x / 255`` (values must lie in [0, 255]);
* ``NoNormalization``: cast to float32 only.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .errors import NormalizationError

EPSILON = 1e-8

# channel name (case-insensitive) -> scheme; anything else is z-scored (MRI, T1, FLAIR, ...)
SCHEME_BY_CHANNEL_NAME = {
    "ct": "CTNormalization",
    "nonorm": "NoNormalization",
    "zscore": "ZScoreNormalization",
    "rescale_to_0_1": "RescaleTo01Normalization",
    "rgb_to_0_1": "RGBTo01Normalization",
}
DEFAULT_SCHEME = "ZScoreNormalization"
SCHEMES_ALLOWING_MASK = frozenset({"ZScoreNormalization"})


def scheme_for_channel_name(channel_name: str) -> str:
    """The normalisation scheme nnU-Net picks for a ``channel_names`` value."""
    return SCHEME_BY_CHANNEL_NAME.get(str(channel_name).casefold(), DEFAULT_SCHEME)


def _zscore(image: np.ndarray, seg: np.ndarray | None, use_mask: bool) -> np.ndarray:
    if use_mask:
        if seg is None:
            raise NormalizationError("use_mask_for_norm needs the cropped segmentation (mask = seg >= 0)")
        mask = seg >= 0
        values = image[mask]
        mean = values.mean()
        std = values.std()
        image[mask] = (values - mean) / max(std, EPSILON)
        return image
    mean = image.mean()
    std = image.std()
    image -= mean
    image /= max(std, EPSILON)
    return image


def _ct(image: np.ndarray, properties: Mapping[str, Any] | None) -> np.ndarray:
    required = ("mean", "std", "percentile_00_5", "percentile_99_5")
    if properties is None or any(k not in properties for k in required):
        raise NormalizationError(
            f"CTNormalization needs the foreground intensity properties {required} from the fingerprint/plans"
        )
    np.clip(image, properties["percentile_00_5"], properties["percentile_99_5"], out=image)
    image -= properties["mean"]
    image /= max(properties["std"], EPSILON)
    return image


def _rescale_to_0_1(image: np.ndarray) -> np.ndarray:
    image -= image.min()
    image /= np.clip(image.max(), a_min=EPSILON, a_max=None)
    return image


def _rgb_to_0_1(image: np.ndarray) -> np.ndarray:
    lo, hi = float(image.min()), float(image.max())
    if lo < 0 or hi > 255:
        raise NormalizationError(
            f"RGBTo01Normalization expects 8-bit values in [0, 255], found [{lo}, {hi}]; "
            "use another channel name (e.g. 'rescale_to_0_1') for this channel"
        )
    image /= 255.0
    return image


def normalize_channel(
    image: np.ndarray,
    scheme: str,
    use_mask_for_norm: bool = False,
    seg: np.ndarray | None = None,
    intensity_properties: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """Normalise one channel (spatial array) with a named scheme; returns float32 (in place when possible).

    ``seg`` is the cropped segmentation of the case (spatial, -1 outside the nonzero mask); only z-score with
    ``use_mask_for_norm`` reads it. ``intensity_properties`` are the channel's foreground statistics.
    """
    image = image.astype(np.float32, copy=False)
    if scheme == "ZScoreNormalization":
        return _zscore(image, seg, bool(use_mask_for_norm))
    if scheme == "CTNormalization":
        return _ct(image, intensity_properties)
    if scheme == "RescaleTo01Normalization":
        return _rescale_to_0_1(image)
    if scheme == "RGBTo01Normalization":
        return _rgb_to_0_1(image)
    if scheme == "NoNormalization":
        return image
    known = sorted({*SCHEME_BY_CHANNEL_NAME.values(), DEFAULT_SCHEME})
    raise NormalizationError(f"unknown normalization scheme {scheme!r}; the plans may use one of {known}")


def normalize(
    data: np.ndarray,
    seg: np.ndarray | None,
    normalization_schemes: Sequence[str],
    use_mask_for_norm: Sequence[bool],
    foreground_intensity_properties_per_channel: Mapping[str, Mapping[str, Any]] | None = None,
) -> np.ndarray:
    """Normalise every channel of ``data`` (C, *spatial) float32 in place, as the configuration's plans say.

    ``seg`` is (1, *spatial) (or None when no scheme uses a mask); the intensity properties are the plans'
    ``foreground_intensity_properties_per_channel`` (keys ``"0"``, ``"1"``, ...).
    """
    n_channels = data.shape[0]
    if len(normalization_schemes) != n_channels or len(use_mask_for_norm) != n_channels:
        raise NormalizationError(
            f"the plans give {len(normalization_schemes)} normalization scheme(s) and {len(use_mask_for_norm)} "
            f"use_mask_for_norm value(s) for {n_channels} image channel(s); re-plan the dataset"
        )
    properties = foreground_intensity_properties_per_channel or {}
    for c in range(n_channels):
        try:
            data[c] = normalize_channel(
                data[c],
                normalization_schemes[c],
                use_mask_for_norm[c],
                None if seg is None else seg[0],
                properties.get(str(c)),
            )
        except NormalizationError as exc:
            raise NormalizationError(f"channel {c}: {exc}") from exc
    return data
