"""Export of predicted logits back to the raw image's geometry (docs/method.md §7.3, §5.8).

:func:`export_prediction` undoes preprocessing (resample to the cropped raw shape, un-crop, un-transpose) and writes
the label map with the input's exact spacing, origin and direction; optionally the probabilities as ``.npz`` plus
the case properties as JSON (never pickle).

Deliberate differences from nnU-Net 2.8.1 (results agree to rounding):

* logits are resampled channel by channel in float32 and the argmax is streamed, so only one resampled channel
  (plus the running maximum) is in memory: peak RAM grows with the image, not with image x classes;
* with ``save_probabilities`` the softmax is streamed too (the resampled logits wait in a scratch file beside the
  output) and the ``.npz`` is written one class at a time, with the same content as one ``savez_compressed``;
* properties are written as ``<case>.json`` without the training-only ``class_locations``; the cascade's
  next-stage segmentation is a ``.npy`` file.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from ..jsonio import write_json
from ..labels import LabelModel
from ..planning import configuration_entry

PROPERTIES_NOT_EXPORTED = ("class_locations",)
REQUIRED_PROPERTIES = (
    "spacing",
    "shape_before_cropping",
    "bbox_used_for_cropping",
    "shape_after_cropping_and_before_resampling",
)

TensorOrArray = torch.Tensor | np.ndarray
PathLike = str | os.PathLike


# --------------------------------------------------------------------------------------------------------------
# logits -> label map


def _segmentation_streaming(
    channels: Iterator[np.ndarray], labels: LabelModel, shape: Sequence[int]
) -> np.ndarray:
    """Label map from resampled logits seen one channel at a time (argmax, or regions painted in order)."""
    return labels.segmentation_from_logit_channels(channels, shape)


def _probabilities(logits: np.ndarray, labels: LabelModel) -> np.ndarray:
    """Softmax (label mode) or sigmoid (regions) over axis 0, in place on float32 logits."""
    return labels.probabilities_from_logits(logits)


def segmentation_from_probabilities(probabilities: np.ndarray, labels: LabelModel) -> np.ndarray:
    """Label map of ``(K, *spatial)`` probabilities: argmax, or regions > 0.5 painted in order."""
    return labels.segmentation_from_probabilities(probabilities)


# --------------------------------------------------------------------------------------------------------------
# geometry


def _transposed(values: Sequence[Any], order: Sequence[int]) -> list[Any]:
    return [values[i] for i in order]


def _resampling_source_spacing(
    plans: Mapping[str, Any], configuration: Mapping[str, Any], properties: Mapping[str, Any]
) -> list[float]:
    """Spacing the network worked at: the config's, or for 2d the raw slice spacing plus the in-plane one."""
    spacing = [float(s) for s in configuration["spacing"]]
    n_dims = len(properties["shape_after_cropping_and_before_resampling"])
    if len(spacing) == n_dims:
        return spacing
    raw_transposed = _transposed(properties["spacing"], plans["transpose_forward"])
    return [float(raw_transposed[0]), *spacing]


def _resample_channels(
    logits: TensorOrArray,
    new_shape: Sequence[int],
    current_spacing: Sequence[float],
    new_spacing: Sequence[float],
) -> Iterator[np.ndarray]:
    """Yield each channel resampled with the probabilities scheme (order 1, separate-z automatic), as float32.

    One channel at a time, so only one float64 work copy exists at once.
    """
    from ..resampling import resample_data_or_seg_to_shape

    for c in range(logits.shape[0]):
        channel = logits[c : c + 1]
        channel = channel.float().numpy() if isinstance(channel, torch.Tensor) else channel.astype(np.float32)
        if tuple(channel.shape[1:]) != tuple(new_shape):
            channel = resample_data_or_seg_to_shape(
                channel,
                list(new_shape),
                list(current_spacing),
                list(new_spacing),
                is_seg=False,
                order=1,
                order_z=0,
                force_separate_z=None,
            )
        yield np.asarray(channel[0], dtype=np.float32)


def _bbox_slices(bbox: Sequence[Sequence[int]]) -> tuple[slice, ...]:
    return tuple(slice(int(lo), int(hi)) for lo, hi in bbox)


def _check_properties(properties: Mapping[str, Any]) -> None:
    missing = [k for k in REQUIRED_PROPERTIES if k not in properties]
    if missing:
        raise KeyError(
            f"case properties lack {missing}; they come from nnsnake.preprocessing (rerun preprocess)"
        )


def _uncrop_probabilities(
    probabilities: np.ndarray,
    labels: LabelModel,
    properties: Mapping[str, Any],
    crop: tuple[slice, ...],
    backward: Sequence[int],
) -> np.ndarray:
    """Probabilities in the raw shape and axis order: outside the crop, background is certain (label mode)."""
    full = np.zeros((labels.num_outputs, *[int(s) for s in properties["shape_before_cropping"]]), np.float32)
    if not labels.has_regions:
        full[0] = 1.0
    inside = (slice(None), *crop)
    full[inside] = probabilities
    return full.transpose([0, *(a + 1 for a in backward)])


@dataclass(frozen=True)
class _Geometry:
    """Where the network's grid sits in the raw image: the cropped shape to resample to, then crop and axes."""

    cropped_shape: list[int]
    current_spacing: list[float]
    target_spacing: list[float]
    raw_shape: list[int]  # shape before cropping, in the plan's (transposed) axis order
    crop: tuple[slice, ...]
    backward: list[int]

    def to_raw(self, cropped: np.ndarray, fill: float = 0) -> np.ndarray:
        """``cropped`` put back into the uncropped image (``fill`` outside), in the raw axis order."""
        full = np.full(self.raw_shape, fill, dtype=cropped.dtype)
        full[self.crop] = cropped
        return full.transpose(self.backward)


def _geometry(
    logits: TensorOrArray,
    properties: Mapping[str, Any],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    labels: LabelModel,
) -> _Geometry:
    _check_properties(properties)
    config = configuration_entry(plans, configuration)
    if logits.shape[0] != labels.num_outputs:
        raise ValueError(
            f"logits have {logits.shape[0]} channels but dataset.json implies {labels.num_outputs}"
        )
    return _Geometry(
        cropped_shape=[int(s) for s in properties["shape_after_cropping_and_before_resampling"]],
        current_spacing=_resampling_source_spacing(plans, config, properties),
        target_spacing=[float(s) for s in _transposed(properties["spacing"], plans["transpose_forward"])],
        raw_shape=[int(s) for s in properties["shape_before_cropping"]],
        crop=_bbox_slices(properties["bbox_used_for_cropping"]),
        backward=[int(a) for a in plans["transpose_backward"]],
    )


def convert_logits_to_raw_geometry(
    logits: TensorOrArray,
    properties: Mapping[str, Any],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    return_probabilities: bool = False,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segmentation (and optionally probabilities) in the raw image's shape and axis order (§7.3 steps 1–5).

    Without probabilities the memory is bounded by one resampled channel; with them the whole (K, *raw) array is
    returned (for ensembling): :func:`export_prediction` streams them to disk instead.
    """
    labels = LabelModel.from_dataset_json(dataset_json)
    geometry = _geometry(logits, properties, plans, configuration, labels)
    channels = _resample_channels(
        logits, geometry.cropped_shape, geometry.current_spacing, geometry.target_spacing
    )
    probabilities = None
    if return_probabilities:
        resampled = np.empty((labels.num_outputs, *geometry.cropped_shape), dtype=np.float32)
        for c, channel in enumerate(channels):
            resampled[c] = channel
        probabilities = labels.probabilities_from_logits(resampled)
        seg_cropped = labels.segmentation_from_probabilities(probabilities)
    else:
        seg_cropped = labels.segmentation_from_logit_channels(channels, geometry.cropped_shape)
    seg = geometry.to_raw(seg_cropped)
    if probabilities is not None:
        probabilities = _uncrop_probabilities(
            probabilities, labels, properties, geometry.crop, geometry.backward
        )
    return seg, probabilities


# --------------------------------------------------------------------------------------------------------------
# bounded probabilities: one class at a time


class _ScratchChannels:
    """Float32 channels of one shape parked in an unlinked scratch file (plain reads and writes, no mmap, so
    they cost disk and page cache, not resident memory)."""

    def __init__(self, shape: Sequence[int], directory: Path) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.nbytes = int(np.prod(self.shape)) * 4
        self._file = tempfile.TemporaryFile(dir=directory, buffering=0)

    def __enter__(self) -> _ScratchChannels:
        return self

    def __exit__(self, *exc: object) -> None:
        self._file.close()

    def write(self, index: int, channel: np.ndarray) -> None:
        view = np.ascontiguousarray(channel, dtype=np.float32).data.cast("B")
        self._file.seek(index * self.nbytes)
        while view:
            view = view[self._file.write(view) :]

    def read(self, index: int) -> np.ndarray:
        out = np.empty(self.shape, dtype=np.float32)
        view = out.data.cast("B")
        self._file.seek(index * self.nbytes)
        while view:
            n = self._file.readinto(view)
            if not n:
                raise OSError(f"scratch file ended early reading channel {index}")
            view = view[n:]
        return out


def _softmax_channels(
    channels: Iterator[np.ndarray], n_channels: int, shape: Sequence[int], scratch_dir: Path
) -> Iterator[np.ndarray]:
    """Softmax over channels seen one at a time, yielded one at a time; the same float32 operations in the same
    order as :meth:`LabelModel.probabilities_from_logits` (max, subtract, exp, sequential sum, divide), so the
    values are identical."""
    with _ScratchChannels(shape, scratch_dir) as scratch:
        maximum: np.ndarray | None = None
        for c, channel in enumerate(channels):
            scratch.write(c, channel)
            maximum = np.array(channel, dtype=np.float32) if maximum is None else np.maximum(maximum, channel)
        if maximum is None:
            raise ValueError("no logit channels to export")
        total = np.zeros(tuple(shape), dtype=np.float32)
        for c in range(n_channels):
            exp = scratch.read(c)
            exp -= maximum
            np.exp(exp, out=exp)
            total += exp
            scratch.write(c, exp)
        del maximum
        for c in range(n_channels):
            probability = scratch.read(c)
            probability /= total
            yield probability


def _probability_channels(
    logits: TensorOrArray, labels: LabelModel, geometry: _Geometry, scratch_dir: Path, seg: np.ndarray
) -> Iterator[np.ndarray]:
    """Probability channels in the raw geometry, one at a time, while painting the cropped label map ``seg``
    exactly as :meth:`LabelModel.segmentation_from_probabilities` would (argmax, or regions > 0.5 in order)."""
    channels = _resample_channels(
        logits, geometry.cropped_shape, geometry.current_spacing, geometry.target_spacing
    )
    if labels.has_regions:
        import torch  # torch's sigmoid, bit for bit the network's nonlinearity

        for channel, label in zip(channels, labels.regions_class_order, strict=True):
            probability = torch.sigmoid_(torch.from_numpy(channel)).numpy()
            seg[probability > 0.5] = label
            yield geometry.to_raw(probability)
        return
    best: np.ndarray | None = None
    probabilities = _softmax_channels(channels, labels.num_outputs, geometry.cropped_shape, scratch_dir)
    for c, probability in enumerate(probabilities):
        if best is None:
            best = probability.copy()
        else:
            better = probability > best  # strict: ties keep the first class, like argmax
            seg[better] = c
            np.maximum(best, probability, out=best)
        yield geometry.to_raw(probability, fill=1.0 if c == 0 else 0.0)  # outside the crop: background


def _write_npz_channels(
    fh: IO[bytes], name: str, shape: Sequence[int], channels: Iterator[np.ndarray]
) -> None:
    """A compressed ``.npz`` with one float32 array ``name`` of ``shape`` whose first-axis slices arrive one at a
    time (``np.load`` reads it exactly as if ``np.savez_compressed`` had written the whole array)."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False}
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, allowZip64=True) as archive:
        with archive.open(f"{name}.npy", "w", force_zip64=True) as entry:
            np.lib.format.write_array_header_2_0(entry, {**header, "shape": tuple(int(s) for s in shape)})
            count = 0
            for channel in channels:
                if tuple(channel.shape) != tuple(shape[1:]):
                    raise ValueError(
                        f"channel of shape {channel.shape} does not fit an array of shape {shape}"
                    )
                entry.write(np.ascontiguousarray(channel, dtype=np.float32).data.cast("B"))
                count += 1
            if count != shape[0]:
                raise ValueError(f"{count} channels written for an array of shape {shape}")


def export_probabilities_streamed(
    logits: TensorOrArray,
    properties: Mapping[str, Any],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    probabilities_path: PathLike,
) -> np.ndarray:
    """Write the ``.npz`` probabilities in the raw geometry one class at a time and return the segmentation
    (raw geometry), equal to :func:`convert_logits_to_raw_geometry` with ``return_probabilities=True`` but with
    memory bounded by a few channels instead of all of them."""
    labels = LabelModel.from_dataset_json(dataset_json)
    geometry = _geometry(logits, properties, plans, configuration, labels)
    path = Path(probabilities_path)
    seg_cropped: np.ndarray = np.zeros(geometry.cropped_shape, dtype=labels.seg_dtype)
    raw_shape = [geometry.raw_shape[a] for a in geometry.backward]
    channels = _probability_channels(logits, labels, geometry, path.parent, seg_cropped)
    _write_atomically(
        path, lambda fh: _write_npz_channels(fh, "probabilities", [labels.num_outputs, *raw_shape], channels)
    )
    return geometry.to_raw(seg_cropped)


# --------------------------------------------------------------------------------------------------------------
# files


def _strip_ending(path: Path, file_ending: str) -> Path:
    name = path.name
    return path.with_name(name[: -len(file_ending)] if name.endswith(file_ending) else name)


def prediction_paths(output_path: PathLike, file_ending: str) -> dict[str, Path]:
    """The files :func:`export_prediction` writes for one case: segmentation, ``.npz`` and ``.json`` beside it."""
    path = Path(output_path)
    if not path.name.endswith(file_ending):
        path = path.with_name(path.name + file_ending)
    stem = _strip_ending(path, file_ending)
    return {
        "segmentation": path,
        "probabilities": stem.with_name(stem.name + ".npz"),
        "properties": stem.with_name(stem.name + ".json"),
    }


def _write_atomically(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it, so no half file is ever left."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_probabilities_npz(path: PathLike, probabilities: np.ndarray) -> None:
    """``np.savez_compressed(path, probabilities=...)`` through a temporary file, so no half file is left."""
    _write_atomically(Path(path), lambda fh: np.savez_compressed(fh, probabilities=probabilities))


def exportable_properties(properties: Mapping[str, Any]) -> dict[str, Any]:
    """Case properties for the JSON beside a prediction (without the bulky training-only class locations)."""
    return {k: v for k, v in properties.items() if k not in PROPERTIES_NOT_EXPORTED}


def export_prediction(
    logits: TensorOrArray,
    properties: Mapping[str, Any],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    output_path: PathLike,
    save_probabilities: bool = False,
) -> dict[str, Path]:
    """Write the segmentation of one case in its raw geometry (and with ``save_probabilities`` the ``.npz``
    probabilities plus a properties ``.json``). ``output_path`` is the segmentation file, with or without the
    dataset's file ending. Returns the paths written."""
    from ..imageio import write_seg

    paths = prediction_paths(output_path, dataset_json["file_ending"])
    written: dict[str, Path] = {}
    if save_probabilities:
        seg = export_probabilities_streamed(
            logits, properties, plans, configuration, dataset_json, paths["probabilities"]
        )
        write_json(paths["properties"], exportable_properties(properties))
        written.update(probabilities=paths["probabilities"], properties=paths["properties"])
    else:
        seg, _ = convert_logits_to_raw_geometry(logits, properties, plans, configuration, dataset_json)
    write_seg(seg, paths["segmentation"], dict(properties))
    written["segmentation"] = paths["segmentation"]
    return written


def export_next_stage_segmentation(
    logits: TensorOrArray,
    target_shape: Sequence[int],
    plans: Mapping[str, Any],
    configuration: str | Mapping[str, Any],
    dataset_json: Mapping[str, Any],
    output_path: PathLike,
) -> Path:
    """Cascade input (§5.8): lowres logits resampled to the fullres preprocessed shape, as a uint8/16 ``.npy``.

    As in nnU-Net, the separate-z decision uses the low-resolution configuration's spacing for both sides.
    """
    config = configuration_entry(plans, configuration)
    labels = LabelModel.from_dataset_json(dataset_json)
    spacing = [float(s) for s in config["spacing"]]
    channels = _resample_channels(logits, target_shape, spacing, spacing)
    seg: np.ndarray = labels.segmentation_from_logit_channels(channels, target_shape)
    path = Path(output_path)
    _write_atomically(path, lambda fh: np.save(fh, seg[None]))
    return path
