"""Where Constellation keeps files on a machine: converted weights, artifacts, run state, the registry."""

from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    """Return the cache directory for converted models, artifacts and run state.

    Order: ``$CONSTELLATION_CACHE_DIR``, else ``$XDG_CACHE_HOME/constellation``, else
    ``~/.cache/constellation``. Read from the environment on every call; the directory is not created here.
    """
    explicit = os.environ.get("CONSTELLATION_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "constellation"
    return Path.home() / ".cache" / "constellation"
