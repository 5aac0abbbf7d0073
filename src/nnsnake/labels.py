"""The one label model: what the ``labels`` of ``dataset.json`` mean to every stage.

nnU-Net has two label modes. In *label mode* each integer value of the label map is a class; the network has one
output channel per label (background included) and its outputs are turned into a label map with softmax and
argmax. In *region mode* (some label value is a list of more than one integer, e.g. BraTS' whole tumour
``[1, 2, 3]``) each output channel is one, possibly overlapping, region; outputs go through a sigmoid, and a
label map is painted region by region (``p > 0.5``) with the label ``regions_class_order`` gives it, later
regions winning. A label named ``ignore`` marks voxels that are not annotated: it is no class, no region and no
output channel, and it is left out of losses and metrics.

:class:`LabelModel` is built once from ``dataset.json`` (:meth:`LabelModel.from_dataset_json`) and answers
every question a stage asks about labels: foreground labels, regions, the ignore label, the number of output
channels, the nonlinearity, the keys the evaluation and the oversampling use, the training target of a label
map and the label map of network outputs. No other module interprets ``dataset.json["labels"]``. The rules are
nnU-Net 2.8.1's (its ``LabelManager``); docs/method.md, "Labels, regions and the ignore label", describes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from .errors import LabelDefinitionError

IGNORE_NAME = "ignore"
BACKGROUND_NAME = "background"

LabelOrRegion = int | tuple[int, ...]
"""A label value, or a region: the tuple of label values whose union it is."""


def _values(value: Any) -> tuple[int, ...]:
    """The label values of one ``labels`` entry (an int, or a list of ints for a region)."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return (int(value),)


def _as_label_or_region(value: Any) -> LabelOrRegion:
    """nnU-Net's form of an entry: lists become tuples (even of one element), scalars stay ints."""
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    return int(value)


def label_or_region_key(value: Any) -> str:
    """The ``summary.json`` key of a label or region, as nnU-Net writes it: ``"1"``, ``"(1, 2)"``, ``"(3,)"``."""
    return str(_as_label_or_region(value))


@dataclass(frozen=True)
class LabelModel:
    """What a dataset's labels mean for training, inference and evaluation (immutable; build it once).

    Attributes follow nnU-Net's ``LabelManager``:

    - ``names``: every ``labels`` entry except ``ignore``, in file order, as (name, label or region);
    - ``all_labels``: sorted unique label values, 0 included; ``foreground_labels``: without 0;
    - ``has_regions``: region mode (some value is a list with more than one element);
    - ``foreground_regions``: region mode: the regions in file order without background (lists as tuples);
      label mode: one single-label "region" ``(label,)`` per foreground label (what a painted label map can
      express, so code that walks regions also works for labels);
    - ``regions_class_order``: the label each region paints (region mode only, else empty);
    - ``ignore_label``: the value of the ``ignore`` entry, or None.
    """

    names: tuple[tuple[str, LabelOrRegion], ...]
    all_labels: tuple[int, ...]
    has_regions: bool
    foreground_regions: tuple[tuple[int, ...], ...]
    regions_class_order: tuple[int, ...]
    ignore_label: int | None

    # ------------------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_dataset_json(cls, dataset_json: Mapping[str, Any]) -> LabelModel:
        """The label model of a ``dataset.json`` mapping; raises :class:`LabelDefinitionError` when the regions
        cannot be painted back (``regions_class_order`` missing or of the wrong length)."""
        labels = dataset_json["labels"]
        ignore = labels.get(IGNORE_NAME)
        if isinstance(ignore, (list, tuple)):
            raise LabelDefinitionError(
                f"dataset.json: label 'ignore' is {ignore!r}; it must be one integer (the highest label value)"
            )
        entries = [(str(name), value) for name, value in labels.items() if name != IGNORE_NAME]
        has_regions = any(isinstance(v, (list, tuple)) and len(v) > 1 for _, v in entries)
        all_labels = tuple(sorted({i for _, v in entries for i in _values(v)}))
        foreground = tuple(i for i in all_labels if i != 0)
        if has_regions:
            regions = tuple(_values(v) for _, v in entries if set(_values(v)) != {0})
            order = dataset_json.get("regions_class_order")
            if order is None or len(order) != len(regions):
                raise LabelDefinitionError(
                    f"dataset.json defines {len(regions)} regions but regions_class_order is {order!r}; "
                    "add one label per region to regions_class_order (the label each region paints, in the "
                    "order of the labels entries)"
                )
            class_order = tuple(int(i) for i in order)
        else:
            regions = tuple((i,) for i in foreground)
            class_order = ()
        names = tuple((name, _as_label_or_region(value)) for name, value in entries)
        return cls(
            names, all_labels, has_regions, regions, class_order, int(ignore) if ignore is not None else None
        )

    # ------------------------------------------------------------------------------------------------------
    # what the network outputs

    @property
    def foreground_labels(self) -> tuple[int, ...]:
        return tuple(i for i in self.all_labels if i != 0)

    @property
    def has_ignore_label(self) -> bool:
        return self.ignore_label is not None

    @property
    def num_outputs(self) -> int:
        """Output channels (nnU-Net's segmentation heads): one per region, or one per label with background."""
        return len(self.foreground_regions) if self.has_regions else len(self.all_labels)

    @property
    def nonlinearity(self) -> Literal["softmax", "sigmoid"]:
        return "sigmoid" if self.has_regions else "softmax"

    @property
    def regions(self) -> list[int | list[int]] | None:
        """Region mode: the regions as the loss and the augmentation take them (a list of label values, or one
        value for a single-label region); label mode: None."""
        if not self.has_regions:
            return None
        return [list(r) if len(r) > 1 else r[0] for r in self.foreground_regions]

    @property
    def output_names(self) -> list[str]:
        """One name per scored output: each foreground region (region mode) or foreground label, for logs."""
        if self.has_regions:
            return [name for name, value in self.names if set(_values(value)) != {0}]
        by_value = {_values(value)[0]: name for name, value in self.names}
        return [by_value[label] for label in self.foreground_labels]

    @property
    def seg_dtype(self) -> type:
        """Smallest unsigned integer type of a label map."""
        return np.uint8 if max(self.all_labels, default=0) < 255 else np.uint16

    # ------------------------------------------------------------------------------------------------------
    # evaluation, oversampling, reports

    @property
    def evaluated(self) -> list[LabelOrRegion]:
        """What the metrics score (nnU-Net's ``foreground_regions`` or ``foreground_labels``): regions as tuples
        in file order, or the sorted foreground labels."""
        if self.has_regions:
            return [
                _as_label_or_region(value)
                for _, value in self.names
                if not (_values(value) == (0,) or set(_values(value)) == {0})
            ]
        return list(self.foreground_labels)

    @property
    def class_location_keys(self) -> list[LabelOrRegion]:
        """Keys the preprocessing samples voxel locations for (foreground oversampling): the foreground regions
        (tuple keys for list entries, int keys for scalars) or labels, plus the "annotated" key
        ``(-1, *all_labels)`` when there is an ignore label."""
        keys: list[LabelOrRegion]
        if self.has_regions:
            keys = [value for _, value in self.names if set(_values(value)) != {0}]
        else:
            keys = list(self.foreground_labels)
        if self.has_ignore_label:
            keys.append((-1, *self.all_labels))
        return keys

    def display_names(self) -> dict[str, str]:
        """``summary.json`` key of every scored label or region -> ``"<name> (<key>)"`` for report columns."""
        out: dict[str, str] = {}
        for name, value in self.names:
            if name == BACKGROUND_NAME or set(_values(value)) == {0}:
                continue
            key = label_or_region_key(value)
            out[key] = f"{name} {key}" if key.startswith("(") else f"{name} ({key})"
        return out

    # ------------------------------------------------------------------------------------------------------
    # conversions

    def region_mask(self, seg: np.ndarray, label_or_region: LabelOrRegion | Sequence[int]) -> np.ndarray:
        """Boolean mask of a label, or of the union of a region's labels, in a label map."""
        if isinstance(label_or_region, (tuple, list)):
            return np.isin(seg, label_or_region)
        return seg == label_or_region

    def one_hot_previous_stage(self, seg: np.ndarray, dtype: type = np.float32) -> np.ndarray:
        """One-hot ``(n_foreground_labels, *spatial)`` of a previous-stage label map ``(1, *spatial)`` (cascade
        input; always over foreground labels, also in region mode; -1 voxels are zero in every channel)."""
        return np.stack([seg[0] == label for label in self.foreground_labels]).astype(dtype)

    def to_training_target(self, seg: np.ndarray) -> np.ndarray:
        """Training target of a label map ``(1, *spatial)``: the map itself (label mode), or one boolean channel
        per region plus, with an ignore label, a last channel marking ignored voxels (region mode)."""
        if not self.has_regions:
            return seg
        channels = [np.isin(seg[0], region) for region in self.foreground_regions]
        if self.has_ignore_label:
            channels.append(seg[0] == self.ignore_label)
        return np.stack(channels)

    def probabilities_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """Softmax (label mode) or sigmoid (region mode) over axis 0, in place on float32 logits."""
        if self.has_regions:
            import torch  # torch's sigmoid, bit for bit what nnU-Net applies

            return torch.sigmoid_(torch.from_numpy(logits)).numpy()
        logits -= logits.max(axis=0, keepdims=True)
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=0, keepdims=True)
        return logits

    def segmentation_from_probabilities(self, probabilities: np.ndarray) -> np.ndarray:
        """Label map of ``(K, *spatial)`` probabilities: argmax, or regions > 0.5 painted in order."""
        if self.has_regions:
            seg: np.ndarray = np.zeros(probabilities.shape[1:], dtype=self.seg_dtype)
            for p, label in zip(probabilities, self.regions_class_order, strict=True):
                seg[p > 0.5] = label
            return seg
        return probabilities.argmax(axis=0).astype(self.seg_dtype)

    def segmentation_from_logit_channels(
        self, channels: Iterable[np.ndarray], shape: Sequence[int]
    ) -> np.ndarray:
        """Label map from logits seen one channel at a time, so memory holds one channel and the running maximum,
        not all channels: argmax (first maximum wins), or sigmoid > 0.5 painted in ``regions_class_order``."""
        seg: np.ndarray = np.zeros(tuple(shape), dtype=self.seg_dtype)
        if self.has_regions:
            import torch  # the exact sigmoid rounding of the network's own nonlinearity

            for channel, label in zip(channels, self.regions_class_order, strict=True):
                seg[torch.sigmoid(torch.from_numpy(channel)).numpy() > 0.5] = label
            return seg
        best: np.ndarray | None = None
        for c, channel in enumerate(channels):
            if best is None:
                best = np.array(channel, dtype=np.float32, copy=True)  # may be a view of the caller's logits
                continue
            better = channel > best  # strict: ties keep the first channel, like argmax
            seg[better] = c
            np.maximum(best, channel, out=best)
        return seg
