"""Versioned, content-addressed training artifacts on disk (router, ranker, fusion calibrator...).

Layout under an artifacts root (``~/.cache/constellation/artifacts`` by default)::

    <root>/<family>/<hash12>/manifest.json   what was trained, on what, with which metrics
    <root>/<family>/<hash12>/<arrays>.npz    the numbers, when there are any
    <root>/<family>/CURRENT                  the name of the directory loaded by default

``family`` is the component (``router``, ``ranker``, ``fusion``); the manifest's own ``kind`` (set by
the component, ``family`` when it sets none) says what the artifact holds. The content hash covers the
manifest's stable fields (not the hash itself, the creation time, or ``training.seconds``) and every
array, so saving the same content twice gives the same directory. A save is atomic (a staging
directory renamed into place, then ``CURRENT`` replaced): a reader never sees half an artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation.errors import FailedPrecondition
from constellation.paths import default_cache_dir

CURRENT = "CURRENT"
_VOLATILE = ("content_hash", "created_at")


def default_root() -> Path:
    """``<cache dir>/artifacts`` (``CONSTELLATION_CACHE_DIR`` or ``~/.cache/constellation``)."""
    return default_cache_dir() / "artifacts"


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its manifest, its arrays and where it lives."""

    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path


def content_hash(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the manifest's stable fields and every array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    stable = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    if isinstance(stable.get("training"), Mapping):
        stable["training"] = {k: v for k, v in stable["training"].items() if k != "seconds"}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save(
    family: str,
    arrays: Mapping[str, np.ndarray],
    manifest: Mapping[str, Any],
    root: Path,
    *,
    make_current: bool = True,
    arrays_file: str = "arrays.npz",
    hash_of: Callable[[Mapping[str, Any], Mapping[str, np.ndarray]], str] = content_hash,
) -> Path:
    """Writes an artifact under ``root/<family>/<hash12>/`` and (by default) points CURRENT at it.

    Args:
        hash_of: The content hash; a component whose artifacts predate this module keeps its own, so
            the artifacts it already wrote still verify.

    Returns:
        The artifact directory.
    """
    full = {"kind": family, **manifest}
    full["content_hash"] = hash_of(full, arrays)
    full["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    base = Path(root) / family
    base.mkdir(parents=True, exist_ok=True)
    target = base / full["content_hash"][:12]
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=base))
        staging.chmod(0o755)
        if arrays:
            np.savez(staging / arrays_file, **arrays)  # type: ignore[arg-type]
        (staging / "manifest.json").write_text(json.dumps(full, indent=2, sort_keys=True) + "\n")
        try:
            staging.rename(target)
        except OSError:
            if not target.exists():
                raise
            for leftover in staging.iterdir():
                leftover.unlink()
            staging.rmdir()
    if make_current:
        pointer = base / f".{CURRENT}.{os.getpid()}"
        pointer.write_text(target.name + "\n")
        pointer.replace(base / CURRENT)
    return target


def resolve(path: Path | str, family: str, *, train_command: str) -> Path:
    """The artifact directory ``path`` names: itself, what its ``CURRENT`` names, or the same inside ``path/<family>``.

    Raises:
        FailedPrecondition: nothing loadable there; the message says how to train one.
    """
    path = Path(path)
    for candidate in (path, path / family):
        if (candidate / "manifest.json").is_file():
            return candidate
        pointer = candidate / CURRENT
        if pointer.is_file():
            named = candidate / pointer.read_text().strip()
            if (named / "manifest.json").is_file():
                return named
    raise FailedPrecondition(
        f"no {family} artifact at {path}; train one with `{train_command}`", reason=f"{family.upper()}_NOT_TRAINED"
    )


def load(path: Path | str, family: str, *, train_command: str, arrays_file: str = "arrays.npz") -> Artifact:
    """Loads an artifact and checks its content hash (what it holds is for the caller to check: ``kind``).

    Raises:
        FailedPrecondition: missing, or damaged or edited (content hash mismatch).
    """
    directory = resolve(path, family, train_command=train_command)
    manifest = json.loads((directory / "manifest.json").read_text())
    arrays: dict[str, np.ndarray] = {}
    if (directory / arrays_file).is_file():
        with np.load(directory / arrays_file, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    if content_hash(manifest, arrays) != manifest.get("content_hash"):
        raise FailedPrecondition(
            f"{directory} is damaged or edited (content hash mismatch); train it again with `{train_command}`",
            reason=f"{family.upper()}_ARTIFACT_CORRUPT",
        )
    return Artifact(manifest, arrays, directory)
