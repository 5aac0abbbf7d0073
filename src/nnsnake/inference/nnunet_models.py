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
import struct
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


# --------------------------------------------------------------------------------------------------------------
# weights: nnsnake's module names -> nnU-Net's (export)

_OWN_BLOCK_KEY = re.compile(r"(encoder|decoder)\.(\d+)\.(\d+)\.(\d+)\.(\w+)")
_OWN_LAYER_KEY = re.compile(r"(upsamplers|heads)\.(\d+)\.(\w+)")


def nnunet_network_weights(network: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``network``'s weights under dynamic_network_architectures' names, aliases included, in DNA's order: the
    state dict nnU-Net's strict ``load_state_dict`` accepts (the reverse of :func:`nnunet_weights_for`).

    ResidualEncoderUNet already has DNA's module names (``nnunet_state_dict``). For PlainConvUNet each conv block
    ``encoder.s.j`` / ``decoder.l.j`` (conv, [dropout], norm, activation) becomes
    ``encoder.stages.s.0.convs.j`` / ``decoder.stages.l.convs.j`` with ``conv.*``, ``norm.*`` and the
    ``all_modules.<position>.*`` aliases; the encoder appears again under ``decoder.encoder``, followed by the
    decoder stages, ``decoder.transpconvs`` and ``decoder.seg_layers``.
    """
    from ..network import PlainConvUNet, ResidualEncoderUNet

    if isinstance(network, ResidualEncoderUNet):
        return network.nnunet_state_dict()
    if not isinstance(network, PlainConvUNet):
        raise TypeError(f"{type(network).__name__}: no nnU-Net naming known for this network class")
    blocks: dict[str, dict[str, list[tuple[str, torch.Tensor]]]] = {"encoder": {}, "decoder": {}}
    layers: dict[str, list[tuple[str, torch.Tensor]]] = {"upsamplers": [], "heads": []}
    for key, value in network.state_dict().items():
        if match := _OWN_BLOCK_KEY.fullmatch(key):
            side, stage, conv, index, leaf = match.groups()
            base = (
                f"encoder.stages.{stage}.0.convs.{conv}"
                if side == "encoder"
                else f"decoder.stages.{stage}.convs.{conv}"
            )
            entries = blocks[side].setdefault(base, [])
            entries.append((f"{base}.{'conv' if index == '0' else 'norm'}.{leaf}", value))
            entries.append((f"{base}.all_modules.{index}.{leaf}", value))
        elif match := _OWN_LAYER_KEY.fullmatch(key):
            kind, level, leaf = match.groups()
            name = "transpconvs" if kind == "upsamplers" else "seg_layers"
            layers[kind].append((f"decoder.{name}.{level}.{leaf}", value))
        else:
            raise ValueError(f"{key}: no nnU-Net name for this PlainConvUNet parameter")

    def in_dna_order(side: str) -> list[tuple[str, torch.Tensor]]:
        ordered = []
        for entries in blocks[side].values():  # per block: conv and norm, then the all_modules aliases
            ordered += [e for e in entries if ".all_modules." not in e[0]]
            ordered += [e for e in entries if ".all_modules." in e[0]]
        return ordered

    encoder = in_dna_order("encoder")
    return dict(
        encoder
        + [(f"decoder.{k}", v) for k, v in encoder]
        + in_dna_order("decoder")
        + layers["upsamplers"]
        + layers["heads"]
    )


def nnunet_checkpoint(
    network_weights: Mapping[str, torch.Tensor],
    *,
    plans: Mapping[str, Any],
    configuration: str,
    dataset_json: Mapping[str, Any],
    fold: int | str,
    mirror_axes: Sequence[int] | None,
    epoch: int,
    trainer_name: str = "nnUNetTrainer",
    logging: Mapping[str, list[Any]] | None = None,
    best_ema: float | None = None,
) -> dict[str, Any]:
    """A ``checkpoint_final.pth`` dict in nnUNetTrainer.save_checkpoint's layout (§6.1 of the method notes):
    what ``nnUNetPredictor.initialize_from_trained_model_folder`` reads (``network_weights`` under DNA's names,
    ``trainer_name``, ``init_args.configuration``, ``inference_allowed_mirroring_axes``) plus the rest of the
    layout with plain values: no optimizer state (nnU-Net's predictor and pretrained-weights loader never read
    it), lists of floats in ``logging``, ``torch.device('cpu')`` as the device. Only tensors, containers,
    numbers, strings and torch.device: torch's weights-only loader reads it as it is.
    """
    empty_log = (
        "mean_fg_dice",
        "ema_fg_dice",
        "dice_per_class_or_region",
        "train_losses",
        "val_losses",
        "lrs",
        "epoch_start_timestamps",
        "epoch_end_timestamps",
    )
    return {
        "network_weights": dict(network_weights),
        "grad_scaler_state": None,
        "logging": {key: list((logging or {}).get(key, [])) for key in empty_log},
        "_best_ema": best_ema,
        "current_epoch": int(epoch),
        "init_args": {
            "plans": dict(plans),
            "configuration": configuration,
            "fold": fold if fold == "all" else int(fold),
            "dataset_json": dict(dataset_json),
            "device": torch.device("cpu"),
        },
        "trainer_name": trainer_name,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in mirror_axes)
        if mirror_axes is not None
        else None,
    }


# --------------------------------------------------------------------------------------------------------------
# postprocessing decisions in nnU-Net's files

NNUNET_POSTPROCESSING_MODULE = "nnunetv2.postprocessing.remove_connected_components"
NNUNET_POSTPROCESSING_FUNCTION = "remove_all_but_largest_component_from_segmentation"


def nnunet_postprocessing_steps(path: PathLike) -> list[dict[str, Any]]:
    """The steps of an nnU-Net ``postprocessing.json`` (find_best_configuration's decision) as nnsnake steps.

    Only the JSON twin is read: ``postprocessing.pkl`` is a pickle of function references and is never opened.
    Each step keeps the largest component of the union of its ``labels_or_regions`` (a label, a region, or a
    list of them), as nnU-Net's ``remove_all_but_largest_component_from_segmentation`` does.
    """
    from ..postprocessing import make_step

    path = Path(path)
    data = read_json(path)
    names, kwargs = data.get("postprocessing_fns"), data.get("postprocessing_kwargs")
    if not isinstance(names, list) or not isinstance(kwargs, list) or len(names) != len(kwargs):
        raise ModelFolderError(
            f"{path}: not nnU-Net's postprocessing.json (postprocessing_fns and postprocessing_kwargs, lists of "
            "equal length)"
        )
    steps = []
    for name, arguments in zip(names, kwargs, strict=True):
        short = str(name).rsplit(".", 1)[-1]
        extra = set(arguments) - {"labels_or_regions", "background_label"}
        if short != NNUNET_POSTPROCESSING_FUNCTION or extra or arguments.get("background_label", 0) != 0:
            raise ModelFolderError(
                f"{path}: postprocessing step {name}({arguments}) is not one nnsnake knows (it replays "
                f"{NNUNET_POSTPROCESSING_FUNCTION} with background 0); predict with --no-postprocessing"
            )
        steps.append(make_step(arguments["labels_or_regions"], "nnU-Net"))
    return steps


def _nnunet_kwargs(step: Mapping[str, Any]) -> dict[str, Any]:
    labels = [int(label) for label in step["labels"]]
    scope = step.get("scope")
    if scope == "all_foreground" or len(labels) != 1:
        return {"labels_or_regions": labels}
    return {"labels_or_regions": labels[0]}


def nnunet_postprocessing_json(decision: Mapping[str, Any]) -> dict[str, Any]:
    """nnsnake's postprocessing decision as nnU-Net's ``postprocessing.json``."""
    steps = list(decision.get("steps", []))
    record: dict[str, Any] = {
        "postprocessing_fns": [NNUNET_POSTPROCESSING_FUNCTION] * len(steps),
        "postprocessing_kwargs": [_nnunet_kwargs(step) for step in steps],
    }
    for key in ("input_folder", "postprocessed"):
        if key in decision:
            record[key] = decision[key]
    return record


def _pickled_str(text: str) -> bytes:
    raw = text.encode("utf-8")
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _pickled_int_or_list(value: int | list[int]) -> bytes:
    if isinstance(value, list):  # EMPTY_LIST, MARK, items, APPENDS
        return b"](" + b"".join(b"J" + struct.pack("<i", int(v)) for v in value) + b"e"
    return b"J" + struct.pack("<i", int(value))  # BININT


def nnunet_postprocessing_pickle(decision: Mapping[str, Any]) -> bytes:
    """The bytes of nnU-Net's ``postprocessing.pkl`` for a decision: the tuple (list of references to
    ``remove_all_but_largest_component_from_segmentation``, list of kwargs dicts), written opcode by opcode
    (pickle protocol 2). nnsnake never imports nnunetv2, and this names nothing but that one function, so
    ``nnUNetv2_apply_postprocessing -pp_pkl_file`` can replay the decision.
    """
    reference = f"c{NNUNET_POSTPROCESSING_MODULE}\n{NNUNET_POSTPROCESSING_FUNCTION}\n".encode()  # GLOBAL
    kwargs = [_nnunet_kwargs(step) for step in decision.get("steps", [])]
    functions = b"](" + reference * len(kwargs) + b"e"
    dicts = b"]("
    for arguments in kwargs:  # EMPTY_DICT, key, value, SETITEM
        dicts += (
            b"}" + _pickled_str("labels_or_regions") + _pickled_int_or_list(arguments["labels_or_regions"])
        )
        dicts += b"s"
    dicts += b"e"
    return b"\x80\x02" + functions + dicts + b"\x86."  # PROTO 2, TUPLE2, STOP


# --------------------------------------------------------------------------------------------------------------
# dataset results folders with inference_information.json (find_best_configuration's choice)

INFERENCE_INFORMATION = "inference_information.json"


@dataclass(frozen=True)
class NnunetSelection:
    """What ``nnUNetv2_find_best_configuration`` chose in a dataset results folder, checked: the member model
    folders (with the previous stage of a cascade member), the folds and the postprocessing steps."""

    path: Path
    selected: str
    members: list[NnunetModelFolder]
    previous: dict[str, NnunetModelFolder]  # member folder name -> its previous stage's folder
    folds: list[str]
    postprocessing_file: Path | None
    steps: list[dict[str, Any]] | None


def previous_stage_folder(
    folder: NnunetModelFolder, folds: Sequence[str], checkpoint: str
) -> NnunetModelFolder | None:
    """The model folder of a cascade stage's previous configuration: the sibling
    ``<Trainer>__<Plans>__<previous_stage>`` with the same folds (nnU-Net's inference instructions run it first
    and pass its segmentations with ``-prev_stage_predictions``); None for a configuration without one."""
    from ..planning import resolve_configuration

    previous = resolve_configuration(folder.plans, folder.configuration).get("previous_stage")
    if not previous:
        return None
    trainer, plans_name, _ = _name_parts(folder.path)
    sibling = folder.path.parent / f"{trainer}__{plans_name}__{previous}"
    if not sibling.is_dir():
        raise ModelFolderError(
            f"{folder.path}: {folder.configuration} is a cascade stage and needs the {previous} model "
            f"{sibling.name} beside it ({sibling} does not exist); copy it there or predict the stages with nnU-Net"
        )
    return read_nnunet_model_folder(sibling, folds, checkpoint)


def _postprocessing_json(
    dataset_dir: Path, best: Mapping[str, Any], member_ids: list[str], folds: list[str]
) -> Path:
    """Where the winner's postprocessing.json lies in ``dataset_dir``: ``postprocessing_file`` (an absolute path
    on the machine that ran find_best_configuration) re-rooted at the dataset folder, else nnU-Net's usual
    place (``<model>/crossval_results_folds_<f>/`` or ``ensembles/<id>/``)."""
    recorded = Path(str(best.get("postprocessing_file") or ""))
    parts = recorded.parts
    candidates = []
    if dataset_dir.name in parts:
        index = len(parts) - 1 - parts[::-1].index(dataset_dir.name)
        candidates.append(dataset_dir.joinpath(*parts[index + 1 :]).with_suffix(".json"))
    elif parts and not recorded.is_absolute():
        candidates.append((dataset_dir / recorded).with_suffix(".json"))
    fold_tag = "_".join(folds)
    if len(member_ids) == 1:
        candidates.append(
            dataset_dir / member_ids[0] / f"crossval_results_folds_{fold_tag}" / "postprocessing.json"
        )
    else:
        ensemble = "ensemble___" + "___".join(member_ids) + f"___{fold_tag}"
        candidates.append(dataset_dir / "ensembles" / ensemble / "postprocessing.json")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelFolderError(
        f"{dataset_dir}: the postprocessing of the selected model is missing: expected {candidates[0]} (nnsnake "
        "reads the JSON twin of postprocessing.pkl, never the pickle); copy it there, or predict with "
        "--no-postprocessing"
    )


def read_inference_information(
    path: PathLike,
    folds: Sequence[int | str] | None = None,
    checkpoint: str = "final",
    postprocess: bool = True,
) -> NnunetSelection:
    """Read and check an nnU-Net dataset results folder holding ``inference_information.json``.

    The selected configuration or ensemble (``best_model_or_ensemble.selected_model_or_models``: each member is
    ``<trainer>__<plans_identifier>__<configuration>`` in this folder), the folds the file names (``folds``
    overrides), every checkpoint scanned for unsafe content, a cascade member's previous stage, and (with
    ``postprocess``) the postprocessing steps read from ``postprocessing.json``. Raises
    :class:`ModelFolderError` naming what is missing.
    """
    dataset_dir = Path(path)
    information_file = dataset_dir / INFERENCE_INFORMATION
    information = read_json(information_file)
    best = information.get("best_model_or_ensemble") or {}
    chosen = best.get("selected_model_or_models")
    if not isinstance(chosen, list) or not chosen:
        raise ModelFolderError(
            f"{information_file}: no best_model_or_ensemble.selected_model_or_models; rerun "
            "nnUNetv2_find_best_configuration"
        )
    member_ids = [f"{m['trainer']}__{m['plans_identifier']}__{m['configuration']}" for m in chosen]
    crossval_folds = [str(f) for f in information.get("folds", [])]
    fold_names = [str(f) for f in folds] if folds else crossval_folds
    if not fold_names:
        raise ModelFolderError(f"{information_file}: names no folds; pass the folds to use with --folds")
    absent = [m for m in member_ids if not (dataset_dir / m).is_dir()]
    if absent:
        raise ModelFolderError(
            f"{information_file} selects {', '.join(member_ids)}, but {', '.join(absent)} is not in {dataset_dir}; "
            "copy the whole nnUNet_results dataset folder"
        )
    members = [read_nnunet_model_folder(dataset_dir / m, fold_names, checkpoint) for m in member_ids]
    previous = {}
    for member in members:
        stage = previous_stage_folder(member, fold_names, checkpoint)
        if stage is not None:
            previous[member.name] = stage
    steps = None
    pp_file = None
    if postprocess:
        pp_file = _postprocessing_json(dataset_dir, best, member_ids, crossval_folds or fold_names)
        steps = nnunet_postprocessing_steps(pp_file)
    selected = (
        member_ids[0]
        if len(member_ids) == 1
        else ("ensemble___" + "___".join(member_ids) + "___" + "_".join(crossval_folds or fold_names))
    )
    return NnunetSelection(dataset_dir, selected, members, previous, fold_names, pp_file, steps)
