"""Atomic files and deterministic JSON.

Every JSON file nnsnake writes goes through :func:`write_json`: keys are sorted (except dataset.json's
``labels``, whose order means something) and the text is written to a
temporary file that is renamed into place, so an unchanged result is byte-identical (Snakemake's checksum then
sees no change) and a killed job never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np


def to_builtin(obj: Any) -> Any:
    """Convert numpy scalars/arrays and tuples recursively into plain JSON types."""
    if isinstance(obj, dict):
        return {str(k): to_builtin(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_builtin(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_builtin(obj.tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


ORDERED_KEYS = frozenset({"labels"})
"""Mappings stored under these keys keep their order: dataset.json's ``labels`` (region mode numbers its output
channels in file order, so sorting them would reassign the regions)."""


def _sorted_keys(obj: Any, keep_order: bool = False) -> Any:
    """``obj`` (plain JSON types) with every mapping's keys sorted, except mappings under :data:`ORDERED_KEYS`."""
    if isinstance(obj, dict):
        items = obj.items() if keep_order else sorted(obj.items())
        return {k: _sorted_keys(v, k in ORDERED_KEYS) for k, v in items}
    if isinstance(obj, list):
        return [_sorted_keys(v) for v in obj]
    return obj


def dumps(obj: Any, keep_label_order: bool = True) -> str:
    """Canonical JSON text: sorted keys (dataset.json ``labels`` in file order unless ``keep_label_order`` is
    false), 2-space indent, trailing newline."""
    if not keep_label_order:
        return json.dumps(to_builtin(obj), indent=2, sort_keys=True, allow_nan=True) + "\n"
    return json.dumps(_sorted_keys(to_builtin(obj)), indent=2, allow_nan=True) + "\n"


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, fsync: bool = True) -> Iterator[BinaryIO]:
    """Open ``path`` for binary writing through a temporary file in the same folder, renamed on success.

    Readers never see a partial file, and a write interrupted by an exception (or a kill) leaves the previous
    file untouched; the temporary file is removed on exceptions. Permissions follow the umask as for open().
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp creates 0600
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes, fsync: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_open`)."""
    with atomic_open(path, fsync=fsync) as fh:
        fh.write(data)


def write_json(path: str | os.PathLike, obj: Any, fsync: bool = True) -> None:
    """Write ``obj`` as canonical JSON, atomically; an identical object gives identical bytes.

    ``fsync=False`` for the many small files of one job that :func:`sync_filesystem` flushes together at its
    end (an fsync per file costs milliseconds each: about a tenth of preprocessing a small case)."""
    atomic_write_bytes(path, dumps(obj).encode("utf-8"), fsync=fsync)


def sync_filesystem(path: str | os.PathLike) -> None:
    """Flush everything written to the filesystem that holds ``path`` to disk, in one call.

    A job that writes many files without an fsync each calls this before it writes its declared output, so
    the output never reaches the disk ahead of the files it lists. Linux ``syncfs``; ``sync`` elsewhere."""
    import ctypes

    syncfs = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None) if os.name == "posix" else None
    if syncfs is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            if syncfs(fd) == 0:
                return
        finally:
            os.close(fd)
    if hasattr(os, "sync"):
        os.sync()


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)
