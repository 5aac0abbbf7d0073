"""Model bundles: one zip that carries a trained model with everything needed to run and judge it
(docs/architecture.md, "Model bundle").

A bundle is an ordinary zip archive. ``metadata.json`` (its first member) says what the bundle is (format,
versions, dataset, licence, the model's stages and files) and lists the SHA-256 and size of every other member.
Reading verifies every member against that list while extracting it, so a damaged or edited bundle is refused
with the name of the member before any of it is used; members that are not listed, or whose names would leave
the extraction folder, are refused too. Writing goes through a temporary file renamed into place, so a reader
never sees half a bundle. This module knows nothing about results folders: :mod:`nnsnake.steps.export` decides
what goes in, :mod:`nnsnake.steps.predict` runs what comes out.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import ModelFolderError
from ..jsonio import atomic_open, dumps

PathLike = str | os.PathLike

BUNDLE_FORMAT = "nnsnake-bundle-1"
METADATA_FILE = "metadata.json"
_CHUNK = 1 << 20
# weights do not compress; JSON does
_STORED_SUFFIXES = (".pt", ".pth", ".png", ".npz")


class BundleError(ModelFolderError):
    """A model bundle that cannot be used: not a bundle, damaged, edited, or lacking a member; the message names
    the bundle and the member."""


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _safe_member_name(name: str) -> bool:
    """A relative POSIX path without ``..`` or empty parts: it stays inside the extraction folder."""
    path = PurePosixPath(name)
    return bool(name) and not path.is_absolute() and all(part not in ("", ".", "..") for part in path.parts)


def write_bundle(path: PathLike, files: Mapping[str, PathLike | bytes], metadata: Mapping[str, Any]) -> dict:
    """Write a bundle: ``files`` (member name → source file or bytes) and ``metadata.json``, atomically.

    ``metadata`` is completed by ``format`` and ``files`` (member name → ``{sha256, bytes}``) and written first.
    Returns the metadata as written.
    """
    bad = [name for name in files if not _safe_member_name(name) or name == METADATA_FILE]
    if bad:
        raise ValueError(f"bundle member names must be relative paths other than {METADATA_FILE}: {bad}")
    listing = {}
    for name, source in sorted(files.items()):
        if isinstance(source, bytes):
            listing[name] = {"sha256": hashlib.sha256(source).hexdigest(), "bytes": len(source)}
        else:
            listing[name] = {"sha256": sha256_file(source), "bytes": os.path.getsize(source)}
    written = {**metadata, "format": BUNDLE_FORMAT, "files": listing}
    with atomic_open(path) as fh, zipfile.ZipFile(fh, "w") as archive:
        archive.writestr(METADATA_FILE, dumps(written), compress_type=zipfile.ZIP_DEFLATED)
        for name, source in sorted(files.items()):
            compression = zipfile.ZIP_STORED if name.endswith(_STORED_SUFFIXES) else zipfile.ZIP_DEFLATED
            if isinstance(source, bytes):
                archive.writestr(name, source, compress_type=compression)
            else:
                archive.write(source, name, compress_type=compression)
    return written


def is_bundle(path: PathLike) -> bool:
    """Whether ``path`` is a zip file with a ``metadata.json`` member (what it holds is checked on reading)."""
    path = Path(path)
    if not path.is_file() or not zipfile.is_zipfile(path):
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return METADATA_FILE in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def _open(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BundleError(f"{path}: not a readable zip file ({exc}); export the model again") from exc


def _metadata(path: Path, archive: zipfile.ZipFile) -> dict[str, Any]:
    import json

    if METADATA_FILE not in archive.namelist():
        raise BundleError(
            f"{path}: no {METADATA_FILE}: not an nnsnake model bundle (`nnsnake export` writes them); an "
            "nnU-Net export zip is installed with nnUNetv2_install_pretrained_model_from_zip, then "
            "-m <nnUNet_results>/<Dataset> runs it"
        )
    try:
        metadata = json.loads(archive.read(METADATA_FILE))
    except (zipfile.BadZipFile, zlib.error, ValueError) as exc:
        raise BundleError(f"{path}: {METADATA_FILE} is damaged ({exc}); export the model again") from exc
    if not isinstance(metadata, dict) or metadata.get("format") != BUNDLE_FORMAT:
        found = metadata.get("format") if isinstance(metadata, dict) else None
        raise BundleError(
            f"{path}: {METADATA_FILE} has format {found!r}, not {BUNDLE_FORMAT!r}; this nnsnake cannot read it"
        )
    if not isinstance(metadata.get("files"), dict):
        raise BundleError(f"{path}: {METADATA_FILE} lists no files; export the model again")
    return metadata


def read_bundle_metadata(path: PathLike) -> dict[str, Any]:
    """The bundle's ``metadata.json`` (format checked, members not verified: :func:`extract_bundle` does that)."""
    path = Path(path)
    with _open(path) as archive:
        return _metadata(path, archive)


def extract_bundle(path: PathLike, target: PathLike) -> dict[str, Any]:
    """Verify every member of a bundle against ``metadata.json`` while extracting it into ``target``.

    Refused (:class:`BundleError`, naming the member) when a member's SHA-256 or size differs from the listing,
    when its compressed data is damaged, when a listed member is missing, or when the zip holds a member that is
    not listed or whose name would leave ``target``. On refusal ``target`` is emptied again. Returns the metadata.
    """
    path, target = Path(path), Path(target)
    with _open(path) as archive:
        metadata = _metadata(path, archive)
        listing: dict[str, Any] = metadata["files"]
        names = [n for n in archive.namelist() if n != METADATA_FILE and not n.endswith("/")]
        unlisted = sorted(set(names) - set(listing))
        unsafe = sorted(n for n in set(names) | set(listing) if not _safe_member_name(n))
        if unsafe or unlisted:
            what = unsafe or unlisted
            reason = "names outside the bundle folder" if unsafe else f"members {METADATA_FILE} does not list"
            raise BundleError(f"{path}: refused: {reason}: {', '.join(what[:5])}; export the model again")
        missing = sorted(set(listing) - set(names))
        if missing:
            raise BundleError(
                f"{path}: {len(missing)} listed member(s) are missing: {', '.join(missing[:5])}; export the "
                "model again"
            )
        try:
            for name in sorted(listing):
                _extract_verified(path, archive, name, listing[name], target / name)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return metadata


def _extract_verified(
    path: Path, archive: zipfile.ZipFile, name: str, expected: Mapping[str, Any], destination: Path
) -> None:
    """One member streamed to ``destination`` while hashed; refused when it differs from ``expected``."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    digest, size = hashlib.sha256(), 0
    try:
        with archive.open(name) as source, open(destination, "wb") as out:
            for chunk in iter(lambda: source.read(_CHUNK), b""):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
        raise BundleError(
            f"{path}: member {name} is damaged ({exc}); the bundle was changed after export: get a fresh copy"
        ) from exc
    if digest.hexdigest() != expected.get("sha256") or size != expected.get("bytes"):
        raise BundleError(
            f"{path}: member {name} does not match its SHA-256 in {METADATA_FILE} (the bundle was changed "
            "after export); refused: get a fresh copy from its author"
        )
