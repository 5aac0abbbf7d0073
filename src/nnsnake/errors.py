"""Every error nnsnake raises on purpose, under one base class.

An :class:`NnsnakeError` means the input, the configuration or the state on disk cannot be used as it is; its
message names the file (or case, or key) and the fix. The CLI prints such errors as one line; anything else that
escapes is a bug and shows its traceback. Each class also keeps the built-in base it had before the hierarchy
existed (``RuntimeError`` or ``ValueError``), so ``except RuntimeError`` in callers keeps working.
"""

from __future__ import annotations


class NnsnakeError(Exception):
    """Base of every deliberate nnsnake error: the message says what is wrong, where, and how to fix it."""


class ConfigError(NnsnakeError, ValueError):
    """A configuration value (config key, CLI flag, settings mapping) that nnsnake cannot use."""


class DeviceError(NnsnakeError, RuntimeError):
    """The requested compute device is not available here (no CUDA GPU, no MPS, a GPU index out of range)."""


class LabelDefinitionError(NnsnakeError, ValueError):
    """The ``labels`` of dataset.json cannot be interpreted (e.g. regions without ``regions_class_order``)."""


class DatasetError(NnsnakeError, RuntimeError):
    """The dataset cannot be used as it is; the message lists every problem with its file and fix."""


class ImageReadError(NnsnakeError, RuntimeError):
    """A file could not be read, or its channels do not fit together. The message names the file."""


class NormalizationError(NnsnakeError, ValueError):
    """A channel cannot be normalised as planned; the message names the channel (and the case, if known)."""


class PreprocessingError(NnsnakeError, RuntimeError):
    """A case could not be preprocessed; the message names the case and the reason."""


class SignatureMismatchError(NnsnakeError, RuntimeError):
    """The training state in ``state_dir`` belongs to a different training run."""


class TrainingLockedError(NnsnakeError, RuntimeError):
    """Another process is training the same fold (it holds the lock file)."""


class MetricsError(NnsnakeError, RuntimeError):
    """Inputs that cannot be evaluated (missing predictions, shape mismatch); the message names the files."""


class EvaluationError(NnsnakeError, RuntimeError):
    """Inputs of an evaluation step that do not fit together; the message names the file or case and the fix."""


class PredictionInputError(NnsnakeError, ValueError):
    """The input folder of a prediction cannot be used; the message lists every problem with its file."""


class SelectionError(NnsnakeError, RuntimeError):
    """Scores that cannot be compared (different case sets, nothing finite); the message names the candidate."""


class PostprocessingError(NnsnakeError, RuntimeError):
    """Inputs that cannot be postprocessed; the message names the case or file."""


class ModelFolderError(EvaluationError):
    """The ``-m`` folder of a prediction is neither a finished nnsnake results folder nor an nnU-Net trained-model
    folder, or lacks a file it needs; the message names the folder, what is missing and what was expected."""


class CheckpointError(NnsnakeError, RuntimeError):
    """A checkpoint file cannot be read (truncated, not a torch file, not the expected layout); the message
    names the file."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint's pickle names globals outside the allow-list of docs/method.md §15; it was refused before
    any of them was looked up, so nothing in the file ran. The message names the file and the globals."""
