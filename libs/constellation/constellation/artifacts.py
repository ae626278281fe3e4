"""Versioned, content-addressed training artifacts on disk (router, ranker, fusion calibrator...).

Layout under an artifacts root (``~/.cache/constellation/artifacts`` by default)::

    <root>/<kind>/<hash12>/manifest.json   what was trained, on what, with which metrics
    <root>/<kind>/<hash12>/arrays.npz      the numbers
    <root>/<kind>/CURRENT                  the name of the directory loaded by default

A save is atomic (written into a staging directory, renamed into place, then ``CURRENT`` replaced), so a
reader never sees half an artifact; saving the same content twice gives the same directory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation.errors import FailedPrecondition

CURRENT = "CURRENT"
_VOLATILE = ("content_hash", "created_at")


def default_root() -> Path:
    """``<cache dir>/artifacts`` (``CONSTELLATION_CACHE_DIR`` or ``~/.cache/constellation``)."""
    from services.inference.smollm2 import default_cache_dir

    return default_cache_dir() / "artifacts"


@dataclass(frozen=True)
class Artifact:
    """A loaded artifact: its manifest, its arrays and where it lives."""

    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    path: Path


def content_hash(manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over the manifest (less volatile keys) and every array's dtype, shape and bytes."""
    digest = hashlib.sha256()
    stable = {k: v for k, v in manifest.items() if k not in _VOLATILE}
    digest.update(json.dumps(stable, sort_keys=True).encode())
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def save(
    kind: str, arrays: Mapping[str, np.ndarray], manifest: Mapping[str, Any], root: Path, *, make_current: bool = True
) -> Path:
    """Writes an artifact of ``kind`` under ``root/<kind>/<hash12>/`` and (by default) points CURRENT at it.

    Returns:
        The artifact directory.
    """
    full = {**manifest, "kind": kind}
    full["content_hash"] = content_hash(full, arrays)
    full["created_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    base = Path(root) / kind
    base.mkdir(parents=True, exist_ok=True)
    target = base / full["content_hash"][:12]
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=base))
        staging.chmod(0o755)
        np.savez(staging / "arrays.npz", **arrays)  # type: ignore[arg-type]
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


def resolve(path: Path | str, kind: str, *, train_command: str) -> Path:
    """The artifact directory ``path`` names: itself, what its ``CURRENT`` names, or the same inside ``path/<kind>``.

    Raises:
        FailedPrecondition: nothing loadable there; the message says how to train one.
    """
    path = Path(path)
    for candidate in (path, path / kind):
        if (candidate / "manifest.json").is_file():
            return candidate
        pointer = candidate / CURRENT
        if pointer.is_file():
            named = candidate / pointer.read_text().strip()
            if (named / "manifest.json").is_file():
                return named
    raise FailedPrecondition(
        f"no {kind} artifact at {path}; train one with `{train_command}`", reason=f"{kind.upper()}_NOT_TRAINED"
    )


def load(path: Path | str, kind: str, *, train_command: str) -> Artifact:
    """Loads an artifact and checks its kind and content hash.

    Raises:
        FailedPrecondition: missing, of another kind, or corrupted.
    """
    directory = resolve(path, kind, train_command=train_command)
    manifest = json.loads((directory / "manifest.json").read_text())
    if manifest.get("kind") != kind:
        raise FailedPrecondition(f"{directory} holds a {manifest.get('kind')!r} artifact, not {kind!r}")
    with np.load(directory / "arrays.npz", allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    if content_hash(manifest, arrays) != manifest.get("content_hash"):
        raise FailedPrecondition(f"{directory} is corrupted (content hash mismatch); train it again")
    return Artifact(manifest, arrays, directory)
