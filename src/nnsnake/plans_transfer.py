"""Plans transfer for fine-tuning (``planning.transfer_plans_from``, docs/method.md §5.11).

Pretrained weights fit only a network of the same architecture, so a fine-tuning dataset is planned with the
pretraining dataset's plans, as nnU-Net's ``nnUNetv2_move_plans_between_datasets`` does: everything (spacing,
transpose, patch and batch size, architecture, normalisation schemes, resampling, even the foreground intensity
properties that CT normalisation clips and scales with) comes from the source, so the fine-tuning data reaches
the network exactly as the pretraining data did. Changed are only the dataset name, the plans name, the data
identifiers (nnU-Net's rule) and the image reader, chosen for this dataset's files. Labels are not part of the
plans: training reads them from this dataset's dataset.json, and only the segmentation heads depend on them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

PathLike = str | os.PathLike
INTENSITY_SOURCES = ("source", "target")


def _data_identifier(identifier: str, source_plans_name: str, target_plans_name: str) -> str:
    """nnU-Net's rule: a source-plans prefix is replaced by the target plans name, anything else prefixed by it."""
    if identifier.startswith(source_plans_name):
        return target_plans_name + identifier[len(source_plans_name) :]
    return f"{target_plans_name}_{identifier}"


def check_channels(
    source_plans: Mapping[str, Any], target_dataset_json: Mapping[str, Any], source: str
) -> None:
    """The target's channels must be the ones the source plans normalise: the same count and, channel by channel,
    the normalisation scheme nnU-Net would choose for the target's channel name (CT vs z-score, ...).

    Raises :class:`ConfigError` naming ``source``, the channel and both values.
    """
    from .planning import determine_normalization

    channels = dict(target_dataset_json.get("channel_names") or target_dataset_json.get("modality") or {})
    if not channels:
        raise ConfigError("planning.transfer_plans_from: this dataset's dataset.json has no channel_names")
    wanted, _ = determine_normalization(dict(target_dataset_json), 1.0)  # the mask choice stays the source's
    for name, config in (source_plans.get("configurations") or {}).items():
        schemes = config.get("normalization_schemes")
        if schemes is None:  # inherits them (3d_lowres, cascade)
            continue
        if len(schemes) != len(channels):
            raise ConfigError(
                f"planning.transfer_plans_from: {source} normalises {len(schemes)} input channel(s) "
                f"({name}: {schemes}) but this dataset has {len(channels)} ({', '.join(channels.values())}); "
                "pretrained weights need the same channels in the same order"
            )
        for index, (planned, expected) in enumerate(zip(schemes, wanted, strict=True)):
            if planned != expected:
                channel = list(channels.values())[index]
                raise ConfigError(
                    f"planning.transfer_plans_from: channel {index} ({channel!r}) of this dataset is normalised "
                    f"with {expected}, but {source} ({name}) normalises channel {index} with {planned}; the "
                    "pretraining data had another modality in this channel: check channel_names and the channel "
                    "order in dataset.json"
                )


def transfer_plans(
    source_plans: Mapping[str, Any],
    target_dataset_json: Mapping[str, Any],
    target_fingerprint: Mapping[str, Any] | None,
    target_dataset_name: str,
    plans_name: str | None = None,
    *,
    intensity_properties: str = "source",
    source: str = "the source plans",
) -> dict[str, Any]:
    """The source plans moved to this dataset (``nnUNetv2_move_plans_between_datasets``; same result on the same
    inputs, key order included).

    ``plans_name``: the new plans name (nnU-Net's ``-tp``; default the source's, then the data identifiers stay
    as they are). ``intensity_properties``: ``source`` (nnU-Net: CT clip/mean/std of the pretraining data, which
    the pretrained network was trained with) or ``target`` (those of ``target_fingerprint``, e.g. when the source
    has no CT channel statistics worth keeping). ``source`` names the plans file in errors.
    """
    from .imageio import reader_name

    if intensity_properties not in INTENSITY_SOURCES:
        raise ConfigError(
            f"planning.transfer_intensity_properties must be one of {INTENSITY_SOURCES}, not {intensity_properties!r}"
        )
    for key in ("configurations", "plans_name"):
        if key not in source_plans:
            raise ConfigError(
                f"planning.transfer_plans_from: {source} has no {key!r}; give a plans.json written by nnsnake or "
                "nnU-Net (nnUNet_preprocessed/<Dataset>/<plans>.json)"
            )
    check_channels(source_plans, target_dataset_json, source)
    plans = copy.deepcopy(dict(source_plans))
    source_name = str(plans["plans_name"])
    target_name = plans_name or source_name
    plans["dataset_name"] = target_dataset_name
    if target_name != source_name:
        for config in plans["configurations"].values():
            if "data_identifier" in config:
                config["data_identifier"] = _data_identifier(
                    config["data_identifier"], source_name, target_name
                )
    plans["image_reader_writer"] = reader_name(str(target_dataset_json["file_ending"]))
    plans["plans_name"] = target_name
    if intensity_properties == "target":
        if not target_fingerprint or "foreground_intensity_properties_per_channel" not in target_fingerprint:
            raise ConfigError(
                "planning.transfer_intensity_properties: target needs this dataset's fingerprint "
                "(foreground_intensity_properties_per_channel)"
            )
        plans["foreground_intensity_properties_per_channel"] = copy.deepcopy(
            dict(target_fingerprint["foreground_intensity_properties_per_channel"])
        )
    return plans


def transfer_plans_from_file(
    source_plans_path: PathLike,
    dataset_dir: PathLike,
    fingerprint_path: PathLike | None = None,
    plans_name: str | None = None,
    intensity_properties: str = "source",
) -> dict[str, Any]:
    """:func:`transfer_plans` from files: another dataset's plans.json (nnsnake's or nnU-Net's), this raw
    dataset folder (its name and dataset.json) and, for ``intensity_properties="target"``, its fingerprint."""
    from .dataset import load_dataset_json
    from .jsonio import read_json

    path = Path(source_plans_path)
    if not path.is_file():
        raise ConfigError(
            f"planning.transfer_plans_from: {path} does not exist; give the pretraining dataset's plans.json "
            "(nnsnake: results/<Dataset>/plans.json; nnU-Net: nnUNet_preprocessed/<Dataset>/nnUNetPlans.json)"
        )
    fingerprint = read_json(fingerprint_path) if fingerprint_path is not None else None
    return transfer_plans(
        read_json(path),
        load_dataset_json(dataset_dir),
        fingerprint,
        Path(dataset_dir).name,
        plans_name,
        intensity_properties=intensity_properties,
        source=str(path),
    )
