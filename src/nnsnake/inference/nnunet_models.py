"""Models trained by nnU-Net v2: their checkpoints, read without running code, and their trained-model folders
(docs/method.md §15).

nnU-Net writes ``checkpoint_final.pth`` with plain pickle and reads it with ``weights_only=False``, so a crafted
file runs code the moment nnU-Net opens it. nnsnake reads these files with torch's weights-only unpickler plus
the few numpy value types real nnU-Net checkpoints hold (:data:`NUMPY_VALUE_GLOBALS`); the pickle is scanned
first, and a file naming any other global is refused (:class:`~nnsnake.errors.UnsafeCheckpointError`) before
anything of it is unpickled. A trained-model folder ``<Trainer>__<Plans>__<configuration>`` (plans.json,
dataset.json, ``fold_<k>/checkpoint_final.pth``) is read and checked as a whole by
:func:`read_nnunet_model_folder`, so a prediction fails before any work when something is missing or unsafe.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, ModelFolderError, UnsafeCheckpointError
from ..jsonio import read_json

PathLike = str | os.PathLike

# The numpy globals nnU-Net 2.x checkpoints contain besides torch's own: ``logging`` and ``_best_ema`` hold
# numpy.float32/float64 scalars, pickled as scalar(dtype, bytes). numpy 1 wrote the scalar under numpy.core.
NUMPY_VALUE_GLOBALS: tuple[str, ...] = (
    "numpy._core.multiarray.scalar",
    "numpy.core.multiarray.scalar",
    "numpy.dtype",
    "numpy.dtypes.Float32DType",
    "numpy.dtypes.Float64DType",
)
CHECKPOINT_NAMES = {"final": "checkpoint_final.pth", "best": "checkpoint_best.pth"}
_FOLD_FOLDER = re.compile(r"fold_(\d+)")
# what read_nnunet_model_folder and the error messages say an nnU-Net trained-model folder is
MODEL_FOLDER_LAYOUT = (
    "<Trainer>__<Plans>__<configuration>/ with plans.json, dataset.json, fold_<k>/checkpoint_final.pth"
)


def _numpy_allow_list() -> list[Any]:
    """:data:`NUMPY_VALUE_GLOBALS` as objects (or ``(object, pickled name)`` pairs) for ``safe_globals``."""
    import numpy as np

    try:
        multiarray = importlib.import_module("numpy._core.multiarray")
    except ImportError:  # numpy 1
        multiarray = importlib.import_module("numpy.core.multiarray")
    allowed: list[Any] = [
        (multiarray.scalar, name) for name in NUMPY_VALUE_GLOBALS if name.endswith(".scalar")
    ]
    allowed.append(np.dtype)
    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    for name in ("Float32DType", "Float64DType"):
        if dtypes is not None and hasattr(dtypes, name):
            allowed.append(getattr(dtypes, name))
    return allowed


def _allowing_numpy_values() -> contextlib.AbstractContextManager[Any]:
    """torch's weights-only allow-list extended by :data:`NUMPY_VALUE_GLOBALS` while the context is open
    (torch < 2.5 has no ``safe_globals``: its plain weights-only list, enough for nnsnake's own files)."""
    if not hasattr(torch.serialization, "safe_globals"):
        return contextlib.nullcontext()
    return torch.serialization.safe_globals(_numpy_allow_list())


def _unsafe_globals(path: Path) -> list[str]:
    """Globals of the file's pickle outside the allow-list, read from the opcodes (nothing is unpickled)."""
    if not zipfile.is_zipfile(path) or not hasattr(torch.serialization, "get_unsafe_globals_in_checkpoint"):
        return []  # legacy format or old torch: the weights-only unpickler itself refuses (and names) a global
    with _allowing_numpy_values():
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def _refusal(path: Path, names: Sequence[str]) -> UnsafeCheckpointError:
    listed = ", ".join(names)
    return UnsafeCheckpointError(
        f"{path}: refused, nothing of it was run: its pickle names {listed}, which a model checkpoint does not need "
        "(allowed: tensors, containers, numbers, strings, torch.device and the numpy scalar types of "
        "docs/method.md §15; torch >= 2.6 is needed for the numpy ones). Do not open this file with "
        "torch.load(weights_only=False) or with nnU-Net; ask its author for a clean copy"
    )


def check_checkpoint_safe(path: PathLike) -> None:
    """Refuse (:class:`UnsafeCheckpointError`) a checkpoint whose pickle names a global outside the allow-list.

    Only the pickle's opcodes are read (no object is built), so this is cheap enough to run on every fold of a
    model before a prediction starts. A broken file raises :class:`CheckpointError`.
    """
    path = Path(path)
    try:
        unsafe = _unsafe_globals(path)
    except (zipfile.BadZipFile, pickle.UnpicklingError, RuntimeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc
    if unsafe:
        raise _refusal(path, unsafe)


def load_checkpoint_safely(path: PathLike) -> Any:
    """Unpickle a torch checkpoint admitting only torch's weights-only types and :data:`NUMPY_VALUE_GLOBALS`.

    The file is scanned first (:func:`check_checkpoint_safe`); the load itself runs torch's weights-only
    unpickler, which would refuse any other global before looking it up. Both refusals raise
    :class:`UnsafeCheckpointError` naming the file and the globals; a broken file raises :class:`CheckpointError`.
    """
    path = Path(path)
    check_checkpoint_safe(path)
    broken: tuple[type[BaseException], ...] = (RuntimeError, OSError, EOFError, ValueError)  # torch's variety
    try:
        with _allowing_numpy_values():
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        names = re.findall(r"GLOBAL (\S+)", str(exc))
        if names:
            raise _refusal(path, names) from None
        raise UnsafeCheckpointError(f"{path}: refused by the weights-only unpickler ({exc})") from None
    except broken as exc:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({exc})") from exc


def is_nnunet_checkpoint(checkpoint: Mapping[str, Any]) -> bool:
    """Whether a loaded checkpoint has the layout of nnUNetTrainer.save_checkpoint (§6.1 of the method notes)."""
    return "network_weights" in checkpoint and ("init_args" in checkpoint or "trainer_name" in checkpoint)


def nnunet_checkpoint_as_nnsnake(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """An nnU-Net checkpoint in nnsnake's ``model_final.pt`` layout: the weights and an ``init`` that says what
    inference needs (the network itself is built from the model folder's plans.json, as nnU-Net does).

    nnU-Net's ``inference_allowed_mirroring_axes`` None (a no-mirroring trainer) means *no* mirroring, while
    nnsnake reads a missing entry as every axis; so None becomes the empty tuple.
    """
    init_args = checkpoint.get("init_args") or {}
    axes = checkpoint.get("inference_allowed_mirroring_axes")
    return {
        "network_weights": checkpoint["network_weights"],
        "init": {
            "source": "nnU-Net",
            "trainer_name": checkpoint.get("trainer_name"),
            "configuration": init_args.get("configuration"),
            "fold": str(init_args["fold"]) if "fold" in init_args else None,
            "epoch": checkpoint.get("current_epoch"),
            "inference_allowed_mirroring_axes": [int(a) for a in axes] if axes is not None else [],
        },
    }


# --------------------------------------------------------------------------------------------------------------
# trained-model folders


@dataclass(frozen=True)
class NnunetModelFolder:
    """A checked nnU-Net trained-model folder: what a prediction with some of its folds needs."""

    path: Path
    trainer: str
    plans_name: str
    configuration: str
    plans: dict[str, Any]
    dataset_json: dict[str, Any]
    folds: list[str]
    checkpoints: list[Path]

    @property
    def name(self) -> str:
        """The folder's name, ``<Trainer>__<Plans>__<configuration>`` (nnU-Net's model identifier)."""
        return self.path.name


def looks_like_nnunet_model_folder(path: PathLike) -> bool:
    """Whether ``path`` is laid out as an nnU-Net trained-model folder (plans.json, dataset.json, fold_* folders);
    whether it is usable is :func:`read_nnunet_model_folder`'s job."""
    folder = Path(path)
    return (
        (folder / "plans.json").is_file()
        and (folder / "dataset.json").is_file()
        and any(p.is_dir() and p.name.startswith("fold_") for p in folder.iterdir())
    )


def available_folds(folder: PathLike, checkpoint_name: str) -> list[str]:
    """The folds ``fold_<k>`` that hold ``checkpoint_name``, in numeric order; ``fold_all`` is left out, as
    nnU-Net's fold auto-detection does (it was trained on every case, so it is no cross-validation fold)."""
    found = []
    for sub in Path(folder).iterdir():
        match = _FOLD_FOLDER.fullmatch(sub.name)
        if match and (sub / checkpoint_name).is_file():
            found.append(match.group(1))
    return sorted(found, key=int)


def _name_parts(folder: Path) -> tuple[str, str, str]:
    parts = folder.name.split("__")
    if len(parts) != 3:
        raise ModelFolderError(
            f"{folder}: an nnU-Net trained-model folder is named <Trainer>__<Plans>__<configuration>, "
            f"not {folder.name!r}"
        )
    return parts[0], parts[1], parts[2]


def read_nnunet_model_folder(
    path: PathLike, folds: Sequence[int | str] | None = None, checkpoint: str = "final"
) -> NnunetModelFolder:
    """Read and check an nnU-Net trained-model folder before any prediction (``nnUNetv2_predict -m`` semantics).

    ``folds``: default every ``fold_<k>`` holding the checkpoint (``fold_all`` only when asked for, as ``all``).
    ``checkpoint``: ``final`` or ``best`` (nnU-Net's ``-chk``), or a file name. Every chosen checkpoint is scanned
    for unsafe globals; the first is loaded to learn the configuration it was trained for (nnU-Net takes it from
    the first fold too). plans.json and dataset.json come from the folder, not from the checkpoint, as in
    nnU-Net. Raises :class:`ModelFolderError` naming every missing file, :class:`UnsafeCheckpointError`.
    """
    folder = Path(path)
    trainer, plans_name, folder_configuration = _name_parts(folder)
    checkpoint_name = CHECKPOINT_NAMES.get(checkpoint, checkpoint)
    if not checkpoint_name.endswith(".pth"):
        raise ModelFolderError(
            f"checkpoint {checkpoint!r}: use final or best (or a file name such as checkpoint_final.pth)"
        )
    fold_names = [str(f) for f in folds] if folds else available_folds(folder, checkpoint_name)
    if not fold_names:
        raise ModelFolderError(f"{folder}: no fold_<k>/{checkpoint_name}; expected {MODEL_FOLDER_LAYOUT}")
    paths = [folder / f"fold_{f}" / checkpoint_name for f in fold_names]
    missing = [str(p) for p in [folder / "plans.json", folder / "dataset.json", *paths] if not p.is_file()]
    if missing:
        raise ModelFolderError(
            f"{len(missing)} file(s) of nnU-Net model {folder.name} are missing: {', '.join(missing[:6])}; "
            "choose other folds with --folds or another checkpoint with --checkpoint"
        )
    for p in paths:
        check_checkpoint_safe(p)
    first = load_checkpoint_safely(paths[0])
    if not isinstance(first, Mapping) or not is_nnunet_checkpoint(first):
        raise ModelFolderError(f"{paths[0]}: not an nnU-Net checkpoint (no network_weights and init_args)")
    plans = read_json(folder / "plans.json")
    configuration = str((first.get("init_args") or {}).get("configuration") or folder_configuration)
    if configuration not in plans.get("configurations", {}):
        raise ModelFolderError(
            f"{paths[0]} was trained for configuration {configuration!r}, which {folder / 'plans.json'} lacks "
            f"(it has {', '.join(sorted(plans.get('configurations', {})))})"
        )
    return NnunetModelFolder(
        path=folder,
        trainer=str(first.get("trainer_name") or trainer),
        plans_name=str(plans.get("plans_name") or plans_name),
        configuration=configuration,
        plans=plans,
        dataset_json=read_json(folder / "dataset.json"),
        folds=fold_names,
        checkpoints=paths,
    )


# --------------------------------------------------------------------------------------------------------------
# weights: nnU-Net's module names -> nnsnake's

# aliases nnU-Net's state dicts carry twice (the decoder's reference to the encoder, each block's all_modules)
_ALIAS_KEY = re.compile(r"(^decoder\.encoder\.)|(\.all_modules\.)")
_ENCODER_KEY = re.compile(r"encoder\.stages\.(\d+)\.0\.convs\.(\d+)\.(conv|norm)\.(\w+)")
_DECODER_KEY = re.compile(r"decoder\.stages\.(\d+)\.convs\.(\d+)\.(conv|norm)\.(\w+)")
_LAYER_KEY = re.compile(r"decoder\.(transpconvs|seg_layers)\.(\d+)\.(\w+)")


def _norm_index(blocks: torch.nn.Module, stage: str, conv: str) -> int:
    """Position of the norm in one of nnsnake's conv blocks (after the conv, and the dropout when there is one)."""
    from ..network import InstanceNorm

    block = blocks.get_submodule(f"{stage}.{conv}")
    return next(i for i, layer in enumerate(block.children()) if isinstance(layer, InstanceNorm))


def nnunet_weights_for(
    network: torch.nn.Module, weights: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """nnU-Net ``network_weights`` under the names of ``network``'s parameters.

    nnU-Net's PlainConvUNet (dynamic_network_architectures) and nnsnake's compute the same function with the same
    parameters in another module tree: ``encoder.stages.s.0.convs.j.{conv,norm}`` is ``encoder.s.j.{0,<norm>}``,
    ``decoder.stages.l.convs.j`` is ``decoder.l.j``, ``decoder.transpconvs.l`` is ``upsamplers.l`` and
    ``decoder.seg_layers.l`` is ``heads.l``; the aliases are dropped. Another network class gets the weights with
    only the aliases dropped (its module names must then be nnU-Net's); a strict load reports what does not fit.
    """
    from ..network import PlainConvUNet

    own = {k: v for k, v in weights.items() if not _ALIAS_KEY.search(k)}
    if not isinstance(network, PlainConvUNet):
        return own
    renamed: dict[str, torch.Tensor] = {}
    for key, value in own.items():
        if match := _ENCODER_KEY.fullmatch(key):
            stage, conv, part, leaf = match.groups()
            index = 0 if part == "conv" else _norm_index(network.encoder, stage, conv)
            renamed[f"encoder.{stage}.{conv}.{index}.{leaf}"] = value
        elif match := _DECODER_KEY.fullmatch(key):
            level, conv, part, leaf = match.groups()
            index = 0 if part == "conv" else _norm_index(network.decoder, level, conv)
            renamed[f"decoder.{level}.{conv}.{index}.{leaf}"] = value
        elif match := _LAYER_KEY.fullmatch(key):
            kind, level, leaf = match.groups()
            renamed[f"{'upsamplers' if kind == 'transpconvs' else 'heads'}.{level}.{leaf}"] = value
        else:
            renamed[key] = value  # left as it is: the strict load names it
    return renamed
