"""What the entry functions share: file names of the results layout, file helpers, deprecated keyword names.

Only light modules are imported here (no torch, no matplotlib), so that importing :mod:`nnsnake.steps` stays
cheap for the light rules; heavy modules are imported inside the functions that need them.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import EvaluationError
from ..jsonio import read_json
from ..parallel import process_pool

if TYPE_CHECKING:
    from ..inference import InferenceSettings
    from ..labels import LabelModel

log = logging.getLogger("nnsnake")

PathLike = str | os.PathLike

# the results layout (docs/architecture.md)
SUMMARY_FILE = "summary.json"
CROSSVAL_FILE = "crossval.json"
SELECTION_FILE = "selection.json"
BOOTSTRAP_FILE = "bootstrap.json"
BOOTSTRAP_PLOT = "bootstrap.png"
POSTPROCESSING_FILE = "postprocessing.json"
PLANS_FILE = "plans.json"
PREDICTION_RECORD = "prediction.json"
WORK_FOLDER = ".nnsnake_work"
# nnU-Net's candidate order (find_best_configuration's default -c); it decides exact ties
CONFIGURATION_ORDER = ("2d", "3d_fullres", "3d_lowres", "3d_cascade_fullres")
TRAINER_NAME = "nnsnake"


# --------------------------------------------------------------------------------------------------------------
# deprecated names (CONTRIBUTING.md, glossary)


def inference_settings(
    function: str, settings: InferenceSettings | Mapping[str, Any] | None, legacy: Mapping[str, Any]
) -> InferenceSettings:
    """``settings`` as :class:`~nnsnake.inference.InferenceSettings` (a mapping goes through ``from_mapping``),
    updated by the deprecated loose keywords in ``legacy``, each with a warning."""
    from ..inference import InferenceSettings
    from ..inference.settings import STEP_KEYWORDS, with_legacy_keywords

    if isinstance(settings, InferenceSettings):
        resolved = settings
    else:
        resolved = InferenceSettings.from_mapping(settings)
    return with_legacy_keywords(function, resolved, legacy, STEP_KEYWORDS, stacklevel=4)


# --------------------------------------------------------------------------------------------------------------
# files


def dataset_json_of(dataset: PathLike) -> dict[str, Any]:
    """dataset.json of a raw dataset folder (checked), or read from a dataset.json path."""
    from ..dataset import load_dataset_json

    path = Path(dataset)
    if path.is_file():
        return read_json(path)
    return load_dataset_json(path)


def reference_files(dataset_dir: PathLike, case_ids: Sequence[str]) -> dict[str, Path]:
    """The raw label file of each case (labelsTr, or the files dataset.json lists)."""
    from ..dataset import training_cases

    _, cases = training_cases(dataset_dir)
    unknown = [c for c in case_ids if c not in cases or cases[c].label is None]
    if unknown:
        raise EvaluationError(
            f"{dataset_dir}: no reference segmentation for case(s) {', '.join(unknown[:5])}; predictions and the "
            "dataset do not belong together (wrong dataset folder, or the dataset changed after training)"
        )
    return {c: Path(cases[c].label) for c in case_ids}  # type: ignore[arg-type]


def score_cases(
    predictions: Mapping[str, Path],
    references: Mapping[str, Path],
    labels: LabelModel,
    processes: int = 1,
) -> dict[str, Any]:
    """nnU-Net's summary (``metric_per_case``, ``mean``, ``foreground_mean``) of explicit case → file pairs."""
    from ..metrics import aggregate_metrics, compute_metrics_for_files

    evaluated = list(labels.evaluated)
    cases = sorted(predictions)
    jobs = [(str(references[c]), str(predictions[c]), evaluated, labels.ignore_label) for c in cases]
    if processes > 1 and len(jobs) > 1:
        with process_pool(min(processes, len(jobs))) as pool:
            entries = list(pool.map(compute_metrics_for_files, *zip(*jobs, strict=True)))
    else:
        entries = [compute_metrics_for_files(*job) for job in jobs]
    return aggregate_metrics(entries, evaluated)


def link_or_copy(source: Path, target: Path) -> None:
    """Put ``source`` at ``target`` as a hard link (no extra disk), or a copy where links are impossible;
    atomically, replacing what was there."""
    tmp = target.with_name(f".{target.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:
        shutil.copy2(source, tmp)
    os.replace(tmp, target)


def case_files(folder: Path, file_ending: str) -> dict[str, Path]:
    """``{case: segmentation file}`` of a prediction folder (hidden files skipped)."""
    from ..metrics import list_files_with_ending

    if not folder.is_dir():
        raise EvaluationError(
            f"{folder}: prediction folder does not exist; run the step that writes it first"
        )
    return {name[: -len(file_ending)]: folder / name for name in list_files_with_ending(folder, file_ending)}


def companions(segmentation: Path, file_ending: str) -> dict[str, Path]:
    """The segmentation, ``.npz`` probabilities and ``.json`` properties of one predicted case."""
    from ..inference import prediction_paths

    return prediction_paths(segmentation, file_ending)


def remove_case_outputs(
    folder: Path, case_id: str, file_ending: str, keep_segmentation: bool = False
) -> None:
    for kind, path in companions(folder / f"{case_id}{file_ending}", file_ending).items():
        if kind == "segmentation" and keep_segmentation:
            continue
        path.unlink(missing_ok=True)


def configuration_of(plans: Mapping[str, Any], configuration: str) -> dict[str, Any]:
    """A configuration of the plans with its inheritance resolved."""
    from ..planning import resolve_configuration

    return resolve_configuration(dict(plans), configuration)
