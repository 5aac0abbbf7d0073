"""Entry functions of the data rules: verify, fingerprint, plan, splits, preprocess (config preprocessing.shards > 1:
preprocess_shard and merge_preprocess_shards) (docs/method.md §1–§4, §6).

Each reads its input files, calls the stage's library function and writes its output atomically (the JSON that
marks the step as done). ``processes`` is the number of worker processes over cases (``num_processes`` is its
deprecated name).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..deprecation import renamed_keywords
from ..errors import PreprocessingError
from ..jsonio import read_json, write_json

if TYPE_CHECKING:
    from ..dataset import VerificationReport

log = logging.getLogger("nnsnake")


@renamed_keywords(num_processes="processes")
def verify(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike,
    processes: int = 1,
    case_fingerprints: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Verify a raw dataset; write the report only if it is usable, else raise listing every problem.

    With ``case_fingerprints`` each case is also fingerprinted from the arrays just checked and the cases'
    fingerprints are written there (:func:`nnsnake.fingerprint.write_case_fingerprints`): the fingerprint step
    then aggregates them instead of reading every image a second time.
    """
    from ..dataset import discover_cases, load_dataset_json, verify_dataset

    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        sink = None
        if case_fingerprints is not None:
            from ..fingerprint import CaseFingerprintWriter

            sink = stack.enter_context(CaseFingerprintWriter(case_fingerprints)).add
        report = verify_dataset(dataset_dir, processes, progress=True, fingerprint_sink=sink)
        for warning in report.warnings:
            log.warning(warning)
        for problem in report.problems:
            log.error(str(problem))
        report.raise_if_failed()  # the writer then removes its partial file
    dataset_json = load_dataset_json(dataset_dir)
    cases, _ = discover_cases(dataset_dir, dataset_json)
    result = report.to_dict() | {"case_ids": sorted(cases)}
    write_json(output, result)
    log.info(
        "verified %d cases of %s in %.1f s: no problems",
        report.n_cases,
        report.dataset,
        time.perf_counter() - start,
    )
    return result


def check_dataset(
    dataset_dir: str | os.PathLike, output: str | os.PathLike | None = None, processes: int = 1
) -> VerificationReport:
    """Verify a raw dataset and return the report whatever it finds (``nnsnake verify``: the caller shows the
    problems); with ``output`` the report is also written as JSON."""
    from ..dataset import verify_dataset

    report = verify_dataset(dataset_dir, processes, progress=False)
    if output is not None:
        write_json(output, report.to_dict())
    return report


@renamed_keywords(num_processes="processes")
def fingerprint(
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike,
    processes: int = 1,
    case_fingerprints: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Extract the dataset fingerprint (spacings, shapes, foreground intensities) into ``output``.

    ``case_fingerprints``: the verify step's per-case fingerprints of this dataset; they are aggregated (the
    same result, without reading the images again). Without it every case is read.
    """
    from ..fingerprint import aggregate_case_fingerprint_file, extract_fingerprint

    start = time.perf_counter()
    if case_fingerprints is None:
        result = extract_fingerprint(dataset_dir, processes, progress=True)
    else:
        from ..dataset import training_cases

        _, cases = training_cases(dataset_dir)
        result = aggregate_case_fingerprint_file(case_fingerprints, sorted(cases))
    write_json(output, result)
    log.info("fingerprint of %d cases in %.1f s", len(result["spacings"]), time.perf_counter() - start)
    return result


def plan(
    fingerprint_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike,
    gpu_memory_target_gb: float | None = 8.0,
    overwrite_target_spacing: list[float] | None = None,
    planner: str = "ExperimentPlanner",
    extra_configurations: Mapping[str, Mapping[str, Any]] | None = None,
    transfer_plans_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Plan every configuration from the fingerprint and write ``plans.json``; log each one's planned memory.

    ``planner`` is nnU-Net's planner class name (``ExperimentPlanner``, ``nnUNetPlannerResEncM``/``L``/``XL``);
    ``gpu_memory_target_gb`` None keeps the preset's own target. ``extra_configurations`` adds derived
    configurations (nnU-Net's ``inherits_from``, :func:`nnsnake.planning.add_extra_configurations`).
    ``transfer_plans_from``: take another dataset's plans instead of planning (nnU-Net's
    ``nnUNetv2_move_plans_between_datasets``, :mod:`nnsnake.plans_transfer`), under the planner's plans name.
    """
    from ..dataset import load_dataset_json
    from ..imageio import reader_name
    from ..labels import LabelModel
    from ..planning import add_extra_configurations, estimated_vram_gb, plan_experiment, resolve_configuration

    dataset_json = load_dataset_json(dataset_dir)
    if transfer_plans_from is not None:
        from ..planning import get_planner_preset
        from ..plans_transfer import transfer_plans_from_file

        plans = transfer_plans_from_file(
            transfer_plans_from,
            dataset_dir,
            fingerprint_path,
            plans_name=get_planner_preset(planner).plans_name,
        )
        log.info("plans transferred from %s", transfer_plans_from)
    else:
        plans = plan_experiment(
            read_json(fingerprint_path),
            dataset_json,
            dataset_name=Path(dataset_dir).name,
            gpu_memory_target_gb=gpu_memory_target_gb,
            overwrite_target_spacing=overwrite_target_spacing,
            image_reader_writer=reader_name(dataset_json["file_ending"]),
            planner=planner,
        )
    plans = add_extra_configurations(plans, extra_configurations)
    write_json(output, plans)
    labels = LabelModel.from_dataset_json(dataset_json)
    n_label_keys = (
        len(labels.names) + labels.has_ignore_label
    )  # every labels entry, as nnU-Net's planner counts
    for name in plans["configurations"]:
        cfg = resolve_configuration(plans, name)
        if "patch_size" in cfg:
            log.info(
                "%s: patch %s, batch %s, spacing %s, planned GPU memory %.1f GB",
                name,
                cfg["patch_size"],
                cfg["batch_size"],
                cfg["spacing"],
                estimated_vram_gb(cfg, n_label_keys, planner),
            )
    return plans


def derive_plans(
    plans_path: str | os.PathLike,
    extra_configurations: Mapping[str, Mapping[str, Any]],
    output: str | os.PathLike,
) -> dict[str, Any]:
    """Write a derived configuration's plans file: the planner's plans plus its ``inherits_from`` entries.

    Kept apart from plans.json so that adding or editing a derived configuration (config
    ``planning.extra_configurations``) changes no file the other configurations' jobs read.
    """
    from ..planning import add_extra_configurations

    plans = add_extra_configurations(read_json(plans_path), extra_configurations)
    write_json(output, plans)
    log.info("derived configuration(s) %s added to %s", ", ".join(extra_configurations), plans_path)
    return plans


def splits(
    verification_path: str | os.PathLike,
    output: str | os.PathLike,
    user_splits: str | os.PathLike | None = None,
) -> list[dict[str, list[str]]]:
    """The folds (``splits.json``): the user's splits if given, else nnU-Net's seeded 5-fold split."""
    from ..splits import splits_for_dataset

    case_ids = read_json(verification_path)["case_ids"]
    result = splits_for_dataset(case_ids, Path(user_splits) if user_splits else None)
    write_json(output, result)
    log.info(
        "%d folds over %d cases%s", len(result), len(case_ids), f" from {user_splits}" if user_splits else ""
    )
    return result


@renamed_keywords(num_processes="processes")
def preprocess(
    dataset_dir: str | os.PathLike,
    plans_path: str | os.PathLike,
    configuration: str,
    manifest_path: str | os.PathLike,
    processes: int = 1,
    store: str = "blosc2",
) -> dict[str, Any]:
    """Preprocess every training case for one configuration into the manifest's folder (``store``: blosc2 or
    npy); manifest last."""
    from ..dataset import load_dataset_json
    from ..preprocessing import preprocess_dataset

    start = time.perf_counter()
    out_dir = Path(manifest_path).parent
    manifest = preprocess_dataset(
        dataset_dir,
        load_dataset_json(dataset_dir),
        read_json(plans_path),
        configuration,
        out_dir,
        None,  # every training case
        processes,
        progress=True,
        store=store,
    )
    write_json(manifest_path, manifest)
    log.info("preprocessed %s in %.1f s", configuration, time.perf_counter() - start)
    return manifest


_SHARD_MANIFEST = re.compile(r"(\d+)_of_(\d+)\.json")


def _shard_manifest_parts(shard_manifest_path: str | os.PathLike) -> tuple[Path, int, int]:
    """``(preprocessed folder, shard, shards)`` of a shard manifest ``<folder>/shards/<shard>_of_<shards>.json``."""
    path = Path(shard_manifest_path)
    match = _SHARD_MANIFEST.fullmatch(path.name)
    if path.parent.name != "shards" or match is None:
        raise PreprocessingError(f"{path}: a shard manifest is <preprocessed folder>/shards/<i>_of_<n>.json")
    return path.parent.parent, int(match[1]), int(match[2])


def preprocess_shard(
    dataset_dir: str | os.PathLike,
    plans_path: str | os.PathLike,
    configuration: str,
    shard_manifest_path: str | os.PathLike,
    shard: int,
    shards: int,
    processes: int = 1,
    store: str = "blosc2",
) -> dict[str, Any]:
    """Shard ``shard`` of ``shards`` (0-based) of :func:`preprocess` (config ``preprocessing.shards``): its cases
    go into the preprocessed folder itself, ``<folder>/shards/<shard>_of_<shards>.json`` gets its manifest (last).
    Cases are identical to an unsharded run's; :func:`merge_preprocess_shards` makes the folder's manifest."""
    from ..dataset import load_dataset_json
    from ..preprocessing import preprocess_dataset

    start = time.perf_counter()
    folder, named_shard, named_shards = _shard_manifest_parts(shard_manifest_path)
    if (named_shard, named_shards) != (shard, shards):
        raise PreprocessingError(f"{shard_manifest_path}: not the manifest of shard {shard} of {shards}")
    manifest = preprocess_dataset(
        dataset_dir,
        load_dataset_json(dataset_dir),
        read_json(plans_path),
        configuration,
        folder,
        None,  # every training case of this shard
        processes,
        progress=True,
        store=store,
        shard=shard,
        shards=shards,
    )
    write_json(shard_manifest_path, manifest)
    log.info(
        "preprocessed shard %d of %d of %s (%d cases) in %.1f s",
        shard,
        shards,
        configuration,
        len(manifest["cases"]),
        time.perf_counter() - start,
    )
    return manifest


def merge_preprocess_shards(
    shard_manifest_paths: Sequence[str | os.PathLike], manifest_path: str | os.PathLike
) -> dict[str, Any]:
    """The preprocessed folder's ``manifest.json`` from its shards' manifests (written atomically): equal to the
    manifest of an unsharded :func:`preprocess`. They must be every shard (0 to n-1) of one count n, of this
    folder."""
    from ..preprocessing import merge_manifests

    folder = Path(manifest_path).parent
    paths = [Path(p) for p in shard_manifest_paths]
    named = [_shard_manifest_parts(p) for p in paths]
    if any(f.resolve() != folder.resolve() for f, _, _ in named):
        raise PreprocessingError(
            f"{folder}: shard manifests of another folder given: {[str(p) for p in paths]}"
        )
    counts = {n for _, _, n in named}
    if len(counts) != 1 or sorted(i for _, i, _ in named) != list(range(counts.pop())):
        raise PreprocessingError(
            f"{folder}: need the manifests of shards 0 to n-1 of one count n, got {sorted(p.name for p in paths)}"
        )
    manifest = merge_manifests([read_json(p) for p in paths])
    write_json(manifest_path, manifest)
    log.info("merged %d shard manifests: %d cases", len(paths), len(manifest["cases"]))
    return manifest
