"""The ONNX Runtime encoder against the torch one, with the real MiniLM weights of the installed package.

The graphs are exported once per session into a temporary cache directory (about 20-40 s on a busy
2-core host), so the test also covers the export and the int8 quantisation, not only a cached file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from constellation.ml.encoder import Encoder, EncoderIdentity

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from constellation.ml.onnx_encoder import OnnxEncoder, graph_path

PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Which is heavier, a kilogram of feathers or a kilogram of iron?",
    "",
    "word " * 400,  # cut to head and tail
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("encoder-cache")


@pytest.fixture(scope="module")
def reference() -> Encoder:
    return Encoder(threads=1)


def test_fp32_graph_gives_torch_embeddings_and_identity(cache: Path, reference: Encoder) -> None:
    onnx = OnnxEncoder(int8=False, cache_dir=cache)
    expected, got = reference.encode(PROMPTS), onnx.encode(PROMPTS)
    assert np.abs(expected.embeddings - got.embeddings).max() < 1e-4
    assert (expected.truncated == got.truncated).all() and (expected.tokens == got.tokens).all()
    assert got.truncated[-1] and not got.truncated[0]
    assert onnx.identity == reference.identity  # same embeddings: caches keyed by torch stay valid
    assert graph_path(reference.directory, int8=False, cache_dir=cache).is_file()


def test_int8_graph_stays_close_and_has_its_own_identity(cache: Path, reference: Encoder) -> None:
    int8 = OnnxEncoder(int8=True, cache_dir=cache)
    cosine = (reference.encode(PROMPTS).embeddings * int8.encode(PROMPTS).embeddings).sum(axis=1)
    texts = np.array([bool(p) for p in PROMPTS])
    assert cosine[texts].min() > 0.985, cosine  # measured 0.990 at worst over 100 gsm8k test prompts
    assert cosine[~texts].min() > 0.95, cosine  # "[CLS] [SEP]" alone: two tokens, no averaging of errors
    norms = np.linalg.norm(int8.encode(PROMPTS[:2]).embeddings, axis=1)
    assert np.allclose(norms, 1.0, atol=1e-4)
    assert int8.identity.key != reference.identity.key
    assert int8.identity.runtime == "onnxruntime" and int8.identity.quantized
    assert EncoderIdentity.from_json(int8.identity.to_json()) == int8.identity


def test_torch_identity_json_has_no_runtime_field(reference: Encoder) -> None:
    """Keys computed before runtimes existed must not change (on-disk embedding caches use them)."""
    assert "runtime" not in reference.identity.to_json()
    assert EncoderIdentity.from_json(reference.identity.to_json()).runtime == "torch"


def test_a_cached_graph_is_reused(cache: Path) -> None:
    first = OnnxEncoder(int8=True, cache_dir=cache)
    stamp = first.graph.stat().st_mtime_ns
    second = OnnxEncoder(int8=True, cache_dir=cache)
    assert second.graph == first.graph and second.graph.stat().st_mtime_ns == stamp


def test_the_classifier_loads_the_runtime_its_config_names(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from constellation.config import load_config
    from services.classifier.config import ClassifierConfig
    from services.classifier.main import _load_encoder

    monkeypatch.setenv("CONSTELLATION_CACHE_DIR", str(cache))
    assert type(_load_encoder(load_config(ClassifierConfig, None, port=0), 128, 96, False)) is Encoder
    int8_config = load_config(ClassifierConfig, None, port=0, encoder_runtime="onnx-int8")
    int8 = _load_encoder(int8_config, 128, 96, False)
    assert isinstance(int8, OnnxEncoder) and int8.quantized
    # heads trained on torch's int8 embeddings keep torch's int8 encoder
    assert type(_load_encoder(int8_config, 128, 96, True)) is Encoder
