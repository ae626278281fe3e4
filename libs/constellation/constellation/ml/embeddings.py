"""Embedding caches for training: vectors of texts under one encoder identity, kept in one ``.npz`` file.

Two file layouts exist and both are read by trained pipelines' caches on disk: :class:`EmbeddingCache`
(the classifier's and the router's: vector, truncation flag, token count per text) and
:class:`EmbeddingStore` (the ranker's and the router's ranked fan-out simulation: vector only). Files
are keyed by the SHA-256 of each text; saves are atomic (a temporary file renamed), the last writer wins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from constellation.ml.encoder import Encoder


def text_key(text: str) -> str:
    """The cache key of a text: the hex SHA-256 of its UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes ``arrays`` to ``path`` atomically: a temporary file beside it, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(path.name + ".tmp.npz")
    np.savez(staging, **arrays)
    staging.replace(path)


class EmbeddingCache:
    """Embeddings of texts under one encoder identity, kept in one ``.npz`` file.

    Not safe for two writers at once (the last save wins; nothing is corrupted: saves are atomic).
    """

    def __init__(self, path: Path | None):
        self.path = path
        self._rows: dict[str, tuple[np.ndarray, bool, int]] = {}
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as data:
                for key, vector, cut, count in zip(
                    data["keys"], data["vectors"], data["truncated"], data["tokens"], strict=True
                ):
                    self._rows[str(key)] = (vector, bool(cut), int(count))

    key = staticmethod(text_key)

    def get(self, text: str) -> tuple[np.ndarray, bool, int] | None:
        return self._rows.get(self.key(text))

    def put(self, text: str, vector: np.ndarray, truncated: bool, tokens: int) -> None:
        self._rows[self.key(text)] = (vector, truncated, tokens)

    def save(self) -> None:
        if self.path is None or not self._rows:
            return
        keys = sorted(self._rows)
        save_npz(
            self.path,
            {
                "keys": np.array(keys),
                "vectors": np.stack([self._rows[k][0] for k in keys]).astype(np.float32),
                "truncated": np.array([self._rows[k][1] for k in keys]),
                "tokens": np.array([self._rows[k][2] for k in keys], dtype=np.int64),
            },
        )


def embed(
    encoder: Encoder,
    texts: Sequence[str],
    cache: EmbeddingCache,
    *,
    batch_size: int = 64,
    show_progress: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Embeddings, truncation flags and token counts of ``texts``, from the cache where possible."""
    from tqdm import tqdm

    missing = sorted({t for t in texts if cache.get(t) is None}, key=len)
    with tqdm(total=len(missing), desc="embedding", unit="prompt", disable=not show_progress or not missing) as bar:
        for start in range(0, len(missing), batch_size):
            chunk = missing[start : start + batch_size]
            encoded = encoder.encode(chunk)
            for i, text in enumerate(chunk):
                cache.put(text, encoded.embeddings[i], bool(encoded.truncated[i]), int(encoded.tokens[i]))
            bar.update(len(chunk))
    rows = [cache.get(t) for t in texts]
    assert all(r is not None for r in rows)
    return (
        np.stack([r[0] for r in rows if r is not None]),
        np.array([r[1] for r in rows if r is not None], dtype=bool),
        np.array([r[2] for r in rows if r is not None], dtype=np.int64),
    )


class EmbeddingStore:
    """Embeddings of texts under one encoder identity, in one ``.npz`` file keyed by the text's SHA-256.

    Saves are atomic (a temporary file renamed); with two concurrent writers the last save wins.
    """

    def __init__(self, path: Path | None):
        self.path = path
        self.vectors: dict[str, np.ndarray] = {}
        if path is not None and path.is_file():
            with np.load(path, allow_pickle=False) as data:
                self.vectors = {str(k): v for k, v in zip(data["keys"], data["vectors"], strict=True)}

    key = staticmethod(text_key)

    def missing(self, texts: Sequence[str]) -> list[str]:
        """Distinct texts not yet stored, shortest first (similar lengths batch with little padding)."""
        return sorted({t for t in texts if self.key(t) not in self.vectors}, key=len)

    def fill(self, encoder: Any, texts: Sequence[str], *, batch_size: int = 64, show_progress: bool = True) -> int:
        """Embeds the missing ``texts`` in batches, saving every ~2000 so an interrupted run keeps its work."""
        from tqdm import tqdm

        todo = self.missing(texts)
        since_save = 0
        with tqdm(total=len(todo), desc="embedding", unit="text", disable=not show_progress or not todo) as bar:
            for start in range(0, len(todo), batch_size):
                chunk = todo[start : start + batch_size]
                encoded = encoder.encode(chunk)
                for text, vector in zip(chunk, encoded.embeddings, strict=True):
                    self.vectors[self.key(text)] = np.asarray(vector, dtype=np.float32)
                bar.update(len(chunk))
                since_save += len(chunk)
                if since_save >= 2000:
                    self.save()
                    since_save = 0
        self.save()
        return len(todo)

    def get(self, texts: Sequence[str]) -> np.ndarray:
        return np.stack([self.vectors[self.key(t)] for t in texts]) if texts else np.zeros((0, 384), np.float32)

    def save(self) -> None:
        if self.path is None or not self.vectors:
            return
        keys = sorted(self.vectors)
        save_npz(self.path, {"keys": np.array(keys), "vectors": np.stack([self.vectors[k] for k in keys])})
