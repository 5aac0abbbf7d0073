"""Whole prediction pipelines: raw cases to raw-geometry label maps, and preprocessed validation cases (docs/method.md §9, §5.10).

:func:`predict_from_raw` preprocesses, predicts (:func:`~nnsnake.inference.sliding_window.predict_sliding_window`
with every fold) and exports (:func:`~nnsnake.inference.export.export_prediction`) case by case; preprocessing of
the next case and export of finished ones overlap with prediction in background threads. How to predict (device,
mirroring, step, autocast, tiles per pass) comes in one :class:`~nnsnake.inference.settings.InferenceSettings`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from .. import runtime
from ..labels import LabelModel
from ..planning import configuration_entry
from .checkpoints import load_fold_networks
from .export import export_next_stage_segmentation, export_prediction, prediction_paths
from .settings import PIPELINE_KEYWORDS, InferenceSettings, with_legacy_keywords
from .sliding_window import predict_sliding_window

PathLike = str | os.PathLike

# A library call never picks a GPU on its own: claiming one is the caller's job (runtime.compute_device).
LIBRARY_DEFAULTS = InferenceSettings(device="cpu")


# keywords the pipelines took before InferenceSettings, and the settings field each one became
def one_hot_previous_stage(
    seg: np.ndarray, dataset_json: Mapping[str, Any], dtype: type = np.float32
) -> np.ndarray:
    """One-hot ``(n_foreground_labels, *spatial)`` of a previous-stage label map ``(1, *spatial)`` (cascade input;
    voxels marked -1 outside the nonzero mask are zero in every channel)."""
    return LabelModel.from_dataset_json(dataset_json).one_hot_previous_stage(seg, dtype)


def _predict_case(
    networks: nn.Module | Sequence[nn.Module],
    data: np.ndarray,
    config: Mapping[str, Any],
    mirror_axes: Sequence[int] | None,
    settings: InferenceSettings,
    device: torch.device,
) -> torch.Tensor:
    """Logits of one preprocessed case with the settings' mirroring, step, tiles per pass and autocast."""
    return predict_sliding_window(
        networks,
        data,
        config["patch_size"],
        mirror_axes if settings.mirroring else None,
        settings.step_size,
        device,
        tile_batch=settings.tile_batch,
        autocast=settings.autocast,
    )


# --------------------------------------------------------------------------------------------------------------
# raw cases (§9)


def case_ids_from_files(image_files: Sequence[Sequence[PathLike]], file_ending: str) -> list[str]:
    """Case id of each case's first channel file ``{CASE}_0000{ending}``."""
    ids = []
    for files in image_files:
        name = Path(files[0]).name
        if not name.endswith(file_ending) or not re.fullmatch(r".+_\d{4}", name[: -len(file_ending)]):
            raise ValueError(f"{files[0]}: expected a file named <case>_0000{file_ending}")
        ids.append(name[: -len(file_ending) - 5])
    return ids


class _RawCase(NamedTuple):
    case_id: str
    image_files: list[str]
    previous: Path | None  # the previous stage's raw-geometry label file (cascade)
    output: Path  # the segmentation file to write


def _raw_cases_to_predict(
    image_paths_per_case: Mapping[str, Sequence[PathLike]] | Sequence[Sequence[PathLike]],
    output_dir: Path,
    configuration: str,
    config: Mapping[str, Any],
    file_ending: str,
    previous_stage_dir: PathLike | None,
    save_probabilities: bool,
    continue_prediction: bool,
) -> list[_RawCase]:
    """The cases still to predict, in order; checks the cascade's previous-stage files before any work starts."""
    if isinstance(image_paths_per_case, Mapping):
        cases = {str(k): list(v) for k, v in image_paths_per_case.items()}
    else:
        lists = [list(v) for v in image_paths_per_case]
        cases = dict(zip(case_ids_from_files(lists, file_ending), lists, strict=True))
    if config.get("previous_stage") and previous_stage_dir is None:
        raise ValueError(
            f"configuration {configuration!r} is a cascade stage: pass previous_stage_dir with the "
            f"predictions of {config['previous_stage']!r}"
        )
    todo = []
    for case_id, files in cases.items():
        paths = prediction_paths(output_dir / case_id, file_ending)
        wanted = [paths["segmentation"]] + ([paths["probabilities"]] if save_probabilities else [])
        if continue_prediction and all(p.is_file() for p in wanted):
            continue
        previous = (
            Path(previous_stage_dir) / f"{case_id}{file_ending}" if previous_stage_dir is not None else None
        )
        todo.append(_RawCase(case_id, [str(f) for f in files], previous, paths["segmentation"]))
    missing = [
        str(case.previous) for case in todo if case.previous is not None and not case.previous.is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"previous-stage predictions missing: {', '.join(missing[:5])}; predict these cases "
            f"with {config.get('previous_stage')!r} first"
        )
    return todo


def predict_from_raw(
    image_paths_per_case: Mapping[str, Sequence[PathLike]] | Sequence[Sequence[PathLike]],
    output_dir: PathLike,
    checkpoint_paths: Sequence[PathLike],
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    *,
    settings: InferenceSettings | None = None,
    save_probabilities: bool = False,
    continue_prediction: bool = False,
    previous_stage_dir: PathLike | None = None,
    overlap: bool = True,
    progress: bool = True,
    **legacy: Any,
) -> list[dict[str, Path]]:
    """Segment raw cases with the folds of one configuration: preprocess, predict, export, case by case.

    ``image_paths_per_case`` maps case id → channel files (or is a list of channel-file lists named
    ``{CASE}_XXXX{ending}``). ``settings``: device, mirroring, step size, autocast, tiles per pass (default
    :data:`LIBRARY_DEFAULTS`, on the CPU; its ``threads`` are applied by the caller's
    :func:`nnsnake.runtime.compute_device`). ``continue_prediction`` skips cases whose outputs exist.
    ``previous_stage_dir`` holds the previous stage's raw-geometry label files for a cascade configuration. With
    ``overlap`` the next case is preprocessed and finished cases are exported in background threads while the
    network runs (at most one case ahead and two exports behind, so memory stays bounded). Returns the written
    paths, in case order. The loose keywords ``use_mirroring``, ``step_size``, ``device``, ``batch_tiles`` and
    ``autocast`` are deprecated (``legacy``): they update ``settings`` with a warning.
    """
    from ..preprocessing import preprocess_case

    settings = with_legacy_keywords(
        "predict_from_raw", settings or LIBRARY_DEFAULTS, legacy, PIPELINE_KEYWORDS
    )
    config = configuration_entry(plans, configuration)
    todo = _raw_cases_to_predict(
        image_paths_per_case,
        Path(output_dir),
        configuration,
        config,
        dataset_json["file_ending"],
        previous_stage_dir,
        save_probabilities,
        continue_prediction,
    )
    if not todo:
        return []
    device = runtime.select_device(settings.device)
    networks, mirror_axes = load_fold_networks(checkpoint_paths, plans, configuration, dataset_json, device)
    labels = LabelModel.from_dataset_json(dataset_json)

    def prepare(case: _RawCase) -> tuple[np.ndarray, dict[str, Any]]:
        previous = str(case.previous) if case.previous else None
        data, seg, properties = preprocess_case(
            case.image_files, previous, plans, configuration, dataset_json, class_locations=False
        )
        if previous is not None:
            data = np.concatenate([data, labels.one_hot_previous_stage(seg, data.dtype.type)])
        return data, properties

    def predict(data: np.ndarray) -> torch.Tensor:
        return _predict_case(networks, data, config, mirror_axes, settings, device)

    def export(logits: torch.Tensor, properties: dict[str, Any], output: Path) -> dict[str, Path]:
        return export_prediction(logits, properties, plans, config, dataset_json, output, save_probabilities)

    return _run_overlapped(todo, prepare, predict, export, overlap, progress)


def _run_overlapped(
    todo: Sequence[_RawCase],
    prepare: Callable[[_RawCase], tuple[np.ndarray, dict[str, Any]]],
    predict: Callable[[np.ndarray], torch.Tensor],
    export: Callable[[torch.Tensor, dict[str, Any], Path], dict[str, Path]],
    overlap: bool,
    progress: bool,
) -> list[dict[str, Path]]:
    """prepare → predict → export for every case, preparing one case ahead and exporting up to two behind."""
    with _Background(overlap) as preprocessing, _Background(overlap) as exporting:
        written: list[dict[str, Path]] = []
        pending: list[Future] = []
        upcoming = preprocessing.submit(prepare, todo[0])
        for index in runtime.progress(range(len(todo)), total=len(todo), enabled=progress):
            data, properties = upcoming.result()
            if index + 1 < len(todo):
                upcoming = preprocessing.submit(prepare, todo[index + 1])
            logits = predict(data)
            del data
            while len(pending) >= 2:  # back-pressure: each pending export holds a case's logits
                written.append(pending.pop(0).result())
            pending.append(exporting.submit(export, logits, properties, todo[index].output))
            del logits
        written.extend(p.result() for p in pending)
    return written


class _Background:
    """A one-thread executor, or (``enabled=False``) one that runs each task at once in the caller's thread."""

    def __init__(self, enabled: bool) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1) if enabled else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except BaseException as exc:  # delivered at .result(), as from a thread
            future.set_exception(exc)
        return future

    def __enter__(self) -> _Background:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------------------------------------------
# preprocessed cases (§5.10)


def predict_preprocessed(
    preprocessed_dir: PathLike,
    case_ids: Sequence[str],
    output_dir: PathLike,
    networks: nn.Module | Sequence[nn.Module],
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    *,
    mirror_axes: Sequence[int] | None,
    settings: InferenceSettings | None = None,
    save_probabilities: bool = True,
    previous_stage_segs: Callable[[str], np.ndarray] | None = None,
    next_stage: tuple[PathLike, PathLike] | None = None,
    progress: bool = True,
    **legacy: Any,
) -> list[dict[str, Path]]:
    """Final validation (§5.10): predict preprocessed cases and export them to raw geometry.

    ``mirror_axes``: the axes the networks allow (:func:`~nnsnake.inference.checkpoints.allowed_mirror_axes`),
    used when ``settings.mirroring`` is on (None: no mirroring). ``settings``: as for :func:`predict_from_raw`
    (the networks must already be on its device). ``previous_stage_segs(case_id)`` returns the cascade's
    previous-stage label map ``(1, *spatial)`` in the preprocessed geometry (its one-hot is appended to the
    data). ``next_stage = (preprocessed folder of the next stage, output folder)`` additionally writes the
    cascade input ``<case>.npy`` at the next stage's shape (§5.8). The loose keywords ``step_size``, ``device``,
    ``batch_tiles`` and ``autocast`` are deprecated (``legacy``).
    """
    from ..preprocessing import load_case

    settings = with_legacy_keywords(
        "predict_preprocessed", settings or LIBRARY_DEFAULTS, legacy, PIPELINE_KEYWORDS
    )
    device = runtime.select_device(settings.device)
    config = configuration_entry(plans, configuration)
    labels = LabelModel.from_dataset_json(dataset_json)
    written = []
    for case_id in runtime.progress(case_ids, total=len(case_ids), enabled=progress):
        data, _seg, properties = load_case(preprocessed_dir, case_id)
        data = np.asarray(data, dtype=np.float32)
        if previous_stage_segs is not None:
            data = np.concatenate([data, labels.one_hot_previous_stage(previous_stage_segs(case_id))])
        logits = _predict_case(networks, data, config, mirror_axes, settings, device)
        del data
        out = export_prediction(
            logits, properties, plans, config, dataset_json, Path(output_dir) / case_id, save_probabilities
        )
        if next_stage is not None:
            next_preprocessed, next_output = next_stage
            next_data, _, _ = load_case(next_preprocessed, case_id, mmap=True)  # only its shape is needed
            out["next_stage"] = export_next_stage_segmentation(
                logits, next_data.shape[1:], plans, config, dataset_json, Path(next_output) / f"{case_id}.npy"
            )
        written.append(out)
    return written
