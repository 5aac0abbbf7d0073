"""nnU-Net's trainer variants as orthogonal training settings (docs/method.md §5.12).

nnU-Net expresses a changed loss, optimiser, schedule, augmentation or sampling rule as a subclass of its trainer
(``nnUNetTrainerTopk10Loss``, ``nnUNetTrainerNoMirroring``, ...). nnsnake makes each of them a key of the
``training`` settings, so they combine freely and can differ per configuration. This module owns the choices,
their defaults, the optimiser they build and the nnU-Net trainer name a combination corresponds to (recorded in
``model_final.pt``; §6.3 of the extensions spec: nnU-Net builds the inference network from that name).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

import torch

if TYPE_CHECKING:
    from .settings import TrainingSettings

_OptimizerT = TypeVar("_OptimizerT", bound=torch.optim.Optimizer)

LOSS_CHOICES = ("dice_ce", "ce", "dice", "topk10", "dice_topk10")
OPTIMIZER_CHOICES = ("sgd", "adam", "adamw")
LR_SCHEDULE_CHOICES = ("poly", "cosine", "warmup_poly")
AUGMENTATION_CHOICES = ("default", "none", "no_mirroring")

VARIANT_DEFAULTS: dict[str, Any] = {
    "loss": "dice_ce",
    "optimizer": "sgd",
    "lr_schedule": "poly",
    "augmentation": "default",
    "deep_supervision": True,
    "oversample_foreground_percent": 0.33,
    "probabilistic_oversampling": False,
}
"""The variant keys and nnU-Net's defaults. A run with all of these is exactly ``nnUNetTrainer``."""

# one nnU-Net class per single non-default choice
_LOSS_TRAINERS = {
    "ce": "nnUNetTrainerCELoss",
    "dice": "nnUNetTrainerDiceLoss",
    "topk10": "nnUNetTrainerTopk10Loss",
    "dice_topk10": "nnUNetTrainerDiceTopK10Loss",
}
_OPTIMIZER_TRAINERS = {"adam": "nnUNetTrainerVanillaAdam", "adamw": "nnUNetTrainerAdam"}
_ADAM_LR_SUFFIX = {1e-2: "", 1e-3: "1en3", 3e-4: "3en4"}
_SCHEDULE_TRAINERS = {"cosine": "nnUNetTrainerCosAnneal", "warmup_poly": "nnUNetTrainer_warmup"}
_AUGMENTATION_TRAINERS = {"none": "nnUNetTrainerNoDA", "no_mirroring": "nnUNetTrainerNoMirroring"}
_EPOCH_TRAINERS = (1, 5, 10, 20, 50, 100, 250, 500, 750, 2000, 4000, 8000)
_EPOCH_NO_MIRRORING_TRAINERS = (250, 2000, 4000, 8000)
DEFAULT_TRAINER = "nnUNetTrainer"


def variant_of(settings: TrainingSettings) -> dict[str, Any]:
    """The variant keys of ``settings`` (all of them, defaults included), as JSON values."""
    return {key: getattr(settings, key) for key in VARIANT_DEFAULTS}


def non_default_variant(settings: TrainingSettings) -> dict[str, Any]:
    """Only the variant keys that differ from nnU-Net's default trainer."""
    return {k: v for k, v in variant_of(settings).items() if v != VARIANT_DEFAULTS[k]}


def check_variant(values: Mapping[str, Any]) -> list[str]:
    """Problems with the variant keys of a settings mapping (empty when they are valid)."""
    problems = []
    for key, choices in (
        ("loss", LOSS_CHOICES),
        ("optimizer", OPTIMIZER_CHOICES),
        ("lr_schedule", LR_SCHEDULE_CHOICES),
        ("augmentation", AUGMENTATION_CHOICES),
    ):
        if values[key] not in choices:
            problems.append(f"{key} must be one of {list(choices)} (got {values[key]!r})")
    for key in ("deep_supervision", "probabilistic_oversampling"):
        if not isinstance(values[key], bool):
            problems.append(f"{key} must be true or false (got {values[key]!r})")
    percent = values["oversample_foreground_percent"]
    if isinstance(percent, bool) or not isinstance(percent, (int, float)) or not 0 <= percent <= 1:
        problems.append(
            f"oversample_foreground_percent must be a number in [0, 1] (the forced-foreground share of a batch), "
            f"got {percent!r}"
        )
    return problems


def nnunet_trainer_name(settings: TrainingSettings) -> tuple[str, bool]:
    """The nnU-Net trainer class this run corresponds to, and whether it is exact.

    Exact means nnunetv2 2.8.1 has one class that trains the same way: the default, a single variant key (with
    ``initial_lr`` 1e-3 / 3e-4 for the Adam trainers' ``1en3`` / ``3en4`` classes), or a non-default ``epochs``
    alone (``nnUNetTrainer_<N>epochs``, with ``_NoMirroring`` for 250, 2000, 4000, 8000). Other combinations
    have no class; they get ``nnUNetTrainer``, which builds the same network (all these variants do), so a
    model exported to nnU-Net still loads. Iterations per epoch, weight decay and momentum are not considered.
    """
    changed = non_default_variant(settings)
    epochs = int(settings.epochs)
    lr = float(settings.initial_lr)
    adam = changed.get("optimizer") in _OPTIMIZER_TRAINERS
    if lr != 1e-2 and not (adam and lr in _ADAM_LR_SUFFIX):
        return DEFAULT_TRAINER, False
    if epochs != 1000:
        if lr != 1e-2:
            return DEFAULT_TRAINER, False
        if not changed and epochs in _EPOCH_TRAINERS:
            return f"nnUNetTrainer_{epochs}epoch{'' if epochs == 1 else 's'}", True
        if changed == {"augmentation": "no_mirroring"} and epochs in _EPOCH_NO_MIRRORING_TRAINERS:
            return f"nnUNetTrainer_{epochs}epochs_NoMirroring", True
        return DEFAULT_TRAINER, False
    if not changed:
        return DEFAULT_TRAINER, lr == 1e-2
    if len(changed) != 1:
        return DEFAULT_TRAINER, False
    ((key, value),) = changed.items()
    if key == "optimizer":
        return _OPTIMIZER_TRAINERS[value] + _ADAM_LR_SUFFIX[lr], True
    if lr != 1e-2:
        return DEFAULT_TRAINER, False
    name = {
        "loss": _LOSS_TRAINERS,
        "lr_schedule": _SCHEDULE_TRAINERS,
        "augmentation": _AUGMENTATION_TRAINERS,
    }.get(key, {}).get(value)
    if name is not None:
        return name, True
    if key == "deep_supervision":
        return "nnUNetTrainerNoDeepSupervision", True
    if key == "probabilistic_oversampling":
        return "nnUNetTrainer_probabilisticOversampling", True
    return DEFAULT_TRAINER, False  # another oversampling share: no class


def training_mirror_axes(augmentation: str, patch_size: Iterable[int]) -> tuple[int, ...]:
    """Mirror axes of training augmentation and of test-time mirroring: every spatial axis by default, none for
    ``none`` (nnUNetTrainerNoDA) and ``no_mirroring`` (nnUNetTrainerNoMirroring), in training and inference."""
    if augmentation not in AUGMENTATION_CHOICES:
        raise ValueError(f"augmentation must be one of {list(AUGMENTATION_CHOICES)} (got {augmentation!r})")
    return () if augmentation in ("none", "no_mirroring") else tuple(range(len(list(patch_size))))


def _undecorated(method: Any) -> Any:
    """The function under one ``functools.wraps`` decorator (itself when there is none)."""
    return getattr(method, "__wrapped__", method)


def _without_dynamo_guards(base: type[_OptimizerT], module_name: str) -> type[_OptimizerT]:
    """``base`` with its methods run past torch's dynamo-disabling decorators: the same numbers, a faster start.

    Torch wraps ``step`` (``_use_grad_for_differentiable``) and ``add_param_group``, ``zero_grad``, ``state_dict``,
    ``load_state_dict`` (``torch._disable_dynamo``) so that ``torch.compile`` leaves the optimiser alone; the first
    call of any of them imports ``torch._dynamo``: about 830 modules, 1.2 s of every training process, which nnsnake
    never compiles. The subclass calls the wrapped functions directly (``step`` under ``torch.no_grad``, which is
    what the wrapper sets for a non-differentiable optimiser); if a torch version keeps no ``__wrapped__``, the
    decorated method runs, only slower to start. State dicts are ``base``'s, so checkpoints load in either class.
    The class keeps ``base``'s name; ``module_name`` is where this module keeps it, so pickle finds the class.
    """
    plain_step = _undecorated(base.step)
    plain_add_param_group = _undecorated(base.add_param_group)
    plain_zero_grad = _undecorated(base.zero_grad)
    plain_state_dict = _undecorated(base.state_dict)
    plain_load_state_dict = _undecorated(base.load_state_dict)

    class Optimizer(base):  # type: ignore[valid-type, misc]
        def step(self, closure: Any = None) -> Any:
            with torch.no_grad():
                return plain_step(self, closure)

        def add_param_group(self, param_group: dict[str, Any]) -> None:
            plain_add_param_group(self, param_group)

        def zero_grad(self, set_to_none: bool = True) -> None:
            plain_zero_grad(self, set_to_none)

        def state_dict(self) -> dict[str, Any]:
            return plain_state_dict(self)

        def load_state_dict(self, state_dict: dict[str, Any]) -> None:
            plain_load_state_dict(self, state_dict)

    Optimizer.__name__, Optimizer.__qualname__, Optimizer.__module__ = base.__name__, module_name, __name__
    return Optimizer


_SGD = _without_dynamo_guards(torch.optim.SGD, "_SGD")
_ADAM = _without_dynamo_guards(torch.optim.Adam, "_ADAM")
_ADAMW = _without_dynamo_guards(torch.optim.AdamW, "_ADAMW")


def build_optimizer(
    settings: TrainingSettings, parameters: Iterable[torch.nn.Parameter]
) -> torch.optim.Optimizer:
    """The optimiser of ``settings.optimizer`` at ``initial_lr`` (the schedule sets the lr of each epoch).

    * ``sgd``: SGD, Nesterov momentum ``momentum`` (0.99), weight decay ``weight_decay`` (3e-5): nnUNetTrainer;
    * ``adam``: torch ``Adam`` with L2 weight decay ``weight_decay``: nnUNetTrainerVanillaAdam;
    * ``adamw``: ``AdamW`` (decoupled weight decay ``weight_decay``) with AMSGrad: nnUNetTrainerAdam.

    Each is a subclass of the torch class that starts without importing ``torch._dynamo``
    (``_without_dynamo_guards``).
    """
    lr, decay = float(settings.initial_lr), float(settings.weight_decay)
    if settings.optimizer == "sgd":
        return _SGD(parameters, lr=lr, momentum=float(settings.momentum), weight_decay=decay, nesterov=True)
    if settings.optimizer == "adam":
        return _ADAM(parameters, lr=lr, weight_decay=decay)
    if settings.optimizer == "adamw":
        return _ADAMW(parameters, lr=lr, weight_decay=decay, amsgrad=True)
    raise ValueError(f"optimizer must be one of {list(OPTIMIZER_CHOICES)} (got {settings.optimizer!r})")
