"""Entry functions of the data rules: verify, fingerprint, plan, splits, preprocess (docs/method.md §1–§4, §6).

Each reads its input files, calls the stage's library function and writes its output atomically (the JSON that
marks the step as done). ``processes`` is the number of worker processes over cases (``num_processes`` is its
deprecated name).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..deprecation import renamed_keywords
from ..jsonio import read_json, write_json

if TYPE_CHECKING:
    from ..dataset import VerificationReport

log = logging.getLogger("nnsnake")


@renamed_keywords(num_processes="processes")
def verify(dataset_dir: str | os.PathLike, output: str | os.PathLike, processes: int = 1) -> dict[str, Any]:
    """Verify a raw dataset; write the report only if it is usable, else raise listing every problem."""
    from ..dataset import discover_cases, load_dataset_json, verify_dataset

    start = time.perf_counter()
    report = verify_dataset(dataset_dir, processes, progress=True)
    for warning in report.warnings:
        log.warning(warning)
    for problem in report.problems:
        log.error(str(problem))
    report.raise_if_failed()
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
    dataset_dir: str | os.PathLike, output: str | os.PathLike, processes: int = 1
) -> dict[str, Any]:
    """Extract the dataset fingerprint (spacings, shapes, foreground intensities) into ``output``."""
    from ..fingerprint import extract_fingerprint

    start = time.perf_counter()
    result = extract_fingerprint(dataset_dir, processes, progress=True)
    write_json(output, result)
    log.info("fingerprint of %d cases in %.1f s", len(result["spacings"]), time.perf_counter() - start)
    return result


def plan(
    fingerprint_path: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    output: str | os.PathLike,
    gpu_memory_target_gb: float = 8.0,
    overwrite_target_spacing: list[float] | None = None,
) -> dict[str, Any]:
    """Plan every configuration from the fingerprint and write ``plans.json``; log each one's planned memory."""
    from ..dataset import load_dataset_json
    from ..imageio import reader_name
    from ..labels import LabelModel
    from ..planning import estimated_vram_gb, plan_experiment

    dataset_json = load_dataset_json(dataset_dir)
    plans = plan_experiment(
        read_json(fingerprint_path),
        dataset_json,
        dataset_name=Path(dataset_dir).name,
        gpu_memory_target_gb=gpu_memory_target_gb,
        overwrite_target_spacing=overwrite_target_spacing,
        image_reader_writer=reader_name(dataset_json["file_ending"]),
    )
    write_json(output, plans)
    labels = LabelModel.from_dataset_json(dataset_json)
    n_label_keys = (
        len(labels.names) + labels.has_ignore_label
    )  # every labels entry, as nnU-Net's planner counts
    for name, cfg in plans["configurations"].items():
        if "patch_size" in cfg:
            log.info(
                "%s: patch %s, batch %s, spacing %s, planned GPU memory %.1f GB",
                name,
                cfg["patch_size"],
                cfg["batch_size"],
                cfg["spacing"],
                estimated_vram_gb(cfg, n_label_keys),
            )
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
