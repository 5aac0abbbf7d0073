"""How a model predicts, independent of what it predicts: the workflow's ``inference:`` section as one object.

Validation, final prediction and the CLI all pass an :class:`InferenceSettings` instead of loose keywords, so a
setting means the same thing everywhere and a wrong value fails when the configuration is read, not hours into a
run. The names are the glossary's (CONTRIBUTING.md); the defaults are nnU-Net's (docs/method.md §7.1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from ..deprecation import warn_deprecated
from ..errors import ConfigError

log = logging.getLogger("nnsnake")

AUTOCAST_CHOICES = ("auto", "off", "fp16", "bf16")


@dataclass(frozen=True)
class InferenceSettings:
    """Device, test-time mirroring, sliding-window step, autocast, tiles per forward pass and CPU threads.

    ``autocast``: ``auto`` = fp16 on CUDA, full precision elsewhere (nnU-Net); ``off``, ``fp16``, ``bf16``; the
    deprecated booleans mean True = fp16 on CUDA / bf16 elsewhere, False = off, None = auto.
    ``tile_batch``: patches per forward pass (None: chosen from the patch size and the device). ``threads``: torch
    CPU threads of the job (None: every available core; one on CUDA), applied by whoever selects the device
    (:func:`nnsnake.runtime.compute_device`).
    """

    device: str = "auto"
    mirroring: bool = True
    step_size: float = 0.5
    autocast: str | bool | None = "auto"
    tile_batch: int | None = None
    threads: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.device, str) or not re.fullmatch(
            r"auto|cpu|cuda(:\d+)?|mps", self.device.strip().lower()
        ):
            problems.append(f"device {self.device!r} is not understood; use auto, cpu, cuda, cuda:N or mps")
        if not isinstance(self.mirroring, bool):
            problems.append(f"mirroring must be true or false (got {self.mirroring!r})")
        if (
            isinstance(self.step_size, bool)
            or not isinstance(self.step_size, numbers.Real)
            or not math.isfinite(self.step_size)
            or not 0 < self.step_size <= 1
        ):
            problems.append(
                f"step_size must be a number in (0, 1], a fraction of the patch (got {self.step_size!r}; "
                "0.5 is nnU-Net's)"
            )
        if not (
            self.autocast is None or isinstance(self.autocast, bool) or self.autocast in AUTOCAST_CHOICES
        ):
            problems.append(f"autocast must be one of {', '.join(AUTOCAST_CHOICES)} (got {self.autocast!r})")
        for name in ("tile_batch", "threads"):
            value = getattr(self, name)
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1
            ):
                problems.append(
                    f"{name} must be an integer >= 1, or null to choose automatically (got {value!r})"
                )
        if problems:
            raise ConfigError("inference settings: " + "; ".join(problems))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any] | None) -> InferenceSettings:
        """Settings from a config mapping (the workflow's ``inference:`` section); unknown keys are errors."""
        values = dict(values or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"inference settings: unknown key(s) {unknown}; known keys are {sorted(known)}")
        autocast = values.get("autocast")
        if isinstance(autocast, bool):
            deprecated_autocast_bool(autocast)
        return cls(**values)

    def replace(self, **changes: Any) -> InferenceSettings:
        """A copy with ``changes`` applied (and validated)."""
        return dataclasses.replace(self, **changes)


def deprecated_autocast_bool(value: bool) -> None:
    """Warn that a boolean autocast is deprecated, naming the string that replaces it."""
    new = "'fp16' on CUDA / 'bf16' elsewhere" if value else "'off'"
    warn_deprecated(f"autocast {value} is deprecated; use {new}", stacklevel=3)


# keywords that callers passed before InferenceSettings, and the field each became
LEGACY_KEYWORDS = {
    "device": "device",
    "mirroring": "mirroring",
    "use_mirroring": "mirroring",
    "step_size": "step_size",
    "autocast": "autocast",
    "threads": "threads",
    "num_threads": "threads",
    "tile_batch": "tile_batch",
    "batch_tiles": "tile_batch",
}
# which of them each layer took: the steps (validate, predict) and the prediction pipelines
STEP_KEYWORDS = frozenset(LEGACY_KEYWORDS) - {"batch_tiles"}
PIPELINE_KEYWORDS = frozenset({"use_mirroring", "step_size", "device", "batch_tiles", "autocast"})


def with_legacy_keywords(
    function: str,
    settings: InferenceSettings,
    legacy: Mapping[str, Any],
    accepted: Collection[str],
    stacklevel: int = 3,
) -> InferenceSettings:
    """``settings`` updated by the deprecated loose keywords a caller of ``function`` still passes (one release),
    each with a deprecation warning; a keyword outside ``accepted`` (the ones ``function`` took) is a TypeError,
    as Python would raise."""
    changes = {}
    for old, value in legacy.items():
        new = LEGACY_KEYWORDS.get(old) if old in accepted else None
        if new is None:
            raise TypeError(f"{function}() got an unexpected keyword argument {old!r}")
        warn_deprecated(
            f"{function}({old}=...) is deprecated; use {function}(settings=InferenceSettings({new}=...))",
            stacklevel=stacklevel,
        )
        changes[new] = str(value) if new == "device" else value
    return settings.replace(**changes) if changes else settings
