"""File-level entry points of the workflow's rules.

Each function reads its input files, calls the stage's library function and writes its outputs atomically.
The Snakemake scripts in ``workflow/scripts`` are thin adapters onto these, and the CLI and tests call them
directly, so everything a rule does can be run from Python.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from .jsonio import read_json, write_json

log = logging.getLogger("nnsnake")


def setup_logging(log_path: str | os.PathLike | None = None) -> None:
    """Log to stderr and, when given, to ``log_path`` (the rule's log file)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", handlers=handlers, force=True
    )

    def log_uncaught(exc_type, exc, tb):  # the reason a job failed belongs in its log file too
        log.critical("%s: %s", exc_type.__name__, exc, exc_info=(exc_type, exc, tb))

    sys.excepthook = log_uncaught


def verify(
    dataset_dir: str | os.PathLike, output: str | os.PathLike, num_processes: int = 1
) -> dict[str, Any]:
    """Verify a raw dataset; write the report only if it is usable, else raise listing every problem."""
    from .dataset import discover_cases, load_dataset_json, verify_dataset

    start = time.perf_counter()
    report = verify_dataset(dataset_dir, num_processes=num_processes, progress=True)
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


def fingerprint(
    dataset_dir: str | os.PathLike, output: str | os.PathLike, num_processes: int = 1
) -> dict[str, Any]:
    from .fingerprint import extract_fingerprint

    start = time.perf_counter()
    result = extract_fingerprint(dataset_dir, num_processes=num_processes, progress=True)
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
    from .dataset import load_dataset_json
    from .imageio import reader_name
    from .planning import estimated_vram_gb, plan_experiment

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
    n_label_keys = len(dataset_json["labels"])
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
    from .splits import splits_for_dataset

    case_ids = read_json(verification_path)["case_ids"]
    result = splits_for_dataset(case_ids, Path(user_splits) if user_splits else None)
    write_json(output, result)
    log.info(
        "%d folds over %d cases%s", len(result), len(case_ids), f" from {user_splits}" if user_splits else ""
    )
    return result


def preprocess(
    dataset_dir: str | os.PathLike,
    plans_path: str | os.PathLike,
    configuration: str,
    manifest_path: str | os.PathLike,
    num_processes: int = 1,
) -> dict[str, Any]:
    """Preprocess every training case for one configuration into the manifest's folder; manifest last."""
    from .dataset import load_dataset_json
    from .preprocessing import preprocess_dataset

    start = time.perf_counter()
    out_dir = Path(manifest_path).parent
    manifest = preprocess_dataset(
        dataset_dir,
        load_dataset_json(dataset_dir),
        read_json(plans_path),
        configuration,
        out_dir,
        num_processes=num_processes,
        progress=True,
    )
    write_json(manifest_path, manifest)
    log.info("preprocessed %s in %.1f s", configuration, time.perf_counter() - start)
    return manifest
