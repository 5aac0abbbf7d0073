"""Sliding-window prediction, fold ensembling and export back to raw geometry (docs/method.md §7.1–7.3, §9, §5.8).

The package's modules, in pipeline order: :mod:`.settings` (how to predict: :class:`InferenceSettings`),
:mod:`.checkpoints` (trained folds and their networks), :mod:`.sliding_window` (logits of one preprocessed case,
averaged over tiles, mirrorings and folds), :mod:`.export` (logits back to the raw image's geometry, files) and
:mod:`.predictor` (whole pipelines over raw or preprocessed cases). Every public name is re-exported here.
"""

from .checkpoints import (
    allowed_mirror_axes,
    load_checkpoint,
    load_fold_networks,
    network_from_checkpoint,
    num_input_channels,
)
from .export import (
    PROPERTIES_NOT_EXPORTED,
    PathLike,
    TensorOrArray,
    _probabilities,
    _segmentation_streaming,
    convert_logits_to_raw_geometry,
    export_next_stage_segmentation,
    export_prediction,
    exportable_properties,
    prediction_paths,
    save_probabilities_npz,
    segmentation_from_probabilities,
)
from .predictor import (
    LIBRARY_DEFAULTS,
    case_ids_from_files,
    one_hot_previous_stage,
    predict_from_raw,
    predict_preprocessed,
)
from .settings import AUTOCAST_CHOICES, InferenceSettings
from .sliding_window import (
    AUTO_BATCH_VOXELS,
    DEFAULT_STEP_SIZE,
    GAUSSIAN_SIGMA_SCALE,
    GAUSSIAN_VALUE_SCALING,
    _gaussian_map,
    _sliding_window_accumulate,
    compute_gaussian,
    mirror_combinations,
    predict_sliding_window,
    sliding_window_steps,
)

"""Deprecated alias, kept while callers outside the package move to :class:`nnsnake.labels.LabelModel`."""

__all__ = [
    "AUTOCAST_CHOICES",
    "AUTO_BATCH_VOXELS",
    "DEFAULT_STEP_SIZE",
    "GAUSSIAN_SIGMA_SCALE",
    "GAUSSIAN_VALUE_SCALING",
    "LIBRARY_DEFAULTS",
    "PROPERTIES_NOT_EXPORTED",
    "InferenceSettings",
    "PathLike",
    "TensorOrArray",
    "_gaussian_map",
    "_probabilities",
    "_segmentation_streaming",
    "_sliding_window_accumulate",
    "allowed_mirror_axes",
    "case_ids_from_files",
    "compute_gaussian",
    "convert_logits_to_raw_geometry",
    "export_next_stage_segmentation",
    "export_prediction",
    "exportable_properties",
    "load_checkpoint",
    "load_fold_networks",
    "mirror_combinations",
    "network_from_checkpoint",
    "num_input_channels",
    "one_hot_previous_stage",
    "predict_from_raw",
    "predict_preprocessed",
    "predict_sliding_window",
    "prediction_paths",
    "save_probabilities_npz",
    "segmentation_from_probabilities",
    "sliding_window_steps",
]
