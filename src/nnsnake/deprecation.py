"""The one way nnsnake announces a deprecated name (CONTRIBUTING.md, glossary).

A renamed config key, CLI flag, settings field or keyword keeps working for one release. Using it logs
``"<old> is deprecated; use <new>"`` on the ``nnsnake`` logger (which lands in the job's log file) and raises a
``DeprecationWarning`` (which Python users and the tests see).
"""

from __future__ import annotations

import functools
import logging
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


def warn_deprecated(message: str, stacklevel: int = 2) -> None:
    """Log ``message`` and warn with it as a ``DeprecationWarning`` pointing ``stacklevel`` frames up."""
    logging.getLogger("nnsnake").warning(message)
    warnings.warn(message, DeprecationWarning, stacklevel=stacklevel + 1)


def renamed_keywords(**renames: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Accept the old keyword names of a function for one release: ``old=value`` becomes ``new=value``, with a
    warning ``"<function>(<old>=...) is deprecated; use <new>=..."``; giving both is a TypeError."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            for old, new in renames.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise TypeError(f"{function.__name__}() got both {old}= and its new name {new}=")
                warn_deprecated(f"{function.__name__}({old}=...) is deprecated; use {new}=...", stacklevel=2)
                kwargs[new] = kwargs.pop(old)
            return function(*args, **kwargs)

        return wrapper

    return decorate
