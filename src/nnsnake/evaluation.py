"""Kept for old imports: the evaluation entry functions now live in :mod:`nnsnake.steps`.

``validate_fold`` is :func:`nnsnake.steps.validate`, ``crossval`` / ``ensemble_crossval`` are in
:mod:`nnsnake.steps.crossval`, ``select`` and ``decide_postprocessing`` (:func:`nnsnake.steps.postprocess`) in
:mod:`nnsnake.steps.select`, ``predict_folder`` (:func:`nnsnake.steps.predict`) and ``verify_prediction_inputs``
in :mod:`nnsnake.steps.predict`. New code imports them from :mod:`nnsnake.steps`.
"""

from __future__ import annotations

from .errors import EvaluationError, PredictionInputError
from .steps._common import (
    BOOTSTRAP_FILE,
    BOOTSTRAP_PLOT,
    CONFIGURATION_ORDER,
    CROSSVAL_FILE,
    PLANS_FILE,
    POSTPROCESSING_FILE,
    PREDICTION_RECORD,
    SELECTION_FILE,
    SUMMARY_FILE,
    TRAINER_NAME,
    WORK_FOLDER,
)
from .steps.crossval import crossval, ensemble_crossval
from .steps.predict import predict_folder, verify_prediction_inputs
from .steps.select import decide_postprocessing, select
from .steps.validate import validate_fold

__all__ = [
    "BOOTSTRAP_FILE",
    "BOOTSTRAP_PLOT",
    "CONFIGURATION_ORDER",
    "CROSSVAL_FILE",
    "PLANS_FILE",
    "POSTPROCESSING_FILE",
    "PREDICTION_RECORD",
    "SELECTION_FILE",
    "SUMMARY_FILE",
    "TRAINER_NAME",
    "WORK_FOLDER",
    "EvaluationError",
    "PredictionInputError",
    "crossval",
    "decide_postprocessing",
    "ensemble_crossval",
    "predict_folder",
    "select",
    "validate_fold",
    "verify_prediction_inputs",
]
