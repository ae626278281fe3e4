"""The classifier: keyword rules, the encoder and its heads, and the hybrid policy that picks between them.

Plain Python (no gRPC). The servicer validates requests with :func:`validate_prompts` and calls
:meth:`Classifier.classify`.

Policies (``mode``):

* ``keyword``: the rules decide everything; the encoder runs only to produce a requested embedding.
* ``encoder``: the trained heads decide everything (the rules when no artifact is loaded).
* ``hybrid`` (default): the encoder runs when the rules are not confident of the task
  (``task_confidence < keyword_min_confidence``, or no task rule fired) or when the embedding is wanted.
  Task and answer kind come from the rules when they are confident, else from the heads. Complexity and
  expected length come from the heads whenever the encoder ran (they are learned from the pools, the
  rules only know base rates), unless the rules' complexity confidence reaches
  ``keyword_min_complexity_confidence``; without the encoder they come from the rules.

``decided_by`` names the path that decided the task: ``keyword``, ``encoder``, or ``default`` (no task
rule fired and no trained heads were there to ask). Without a trained artifact the service runs on the
rules alone (and still returns embeddings when the encoder package is installed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from constellation.errors import FieldViolation, InvalidArgument
from constellation.ml.encoder import BaseEncoder
from services.classifier.batcher import MicroBatcher
from services.classifier.heads import Artifact, features
from services.classifier.rules import KeywordResult, KeywordRules

log = logging.getLogger(__name__)

Mode = Literal["hybrid", "keyword", "encoder"]
INLINE_KEYWORD_PROMPTS = 16
"""Batches up to this many prompts run the rules on the event loop (tens of microseconds each);
bigger ones run them in a worker thread."""


@dataclass(frozen=True)
class Policy:
    """How the keyword and encoder paths are combined; see the module docstring.

    Attributes:
        mode: ``hybrid``, ``keyword`` or ``encoder``.
        keyword_min_confidence: The rules' task confidence at or above which their task stands.
        keyword_min_complexity_confidence: The rules' complexity confidence at or above which their
            complexity stands even when the heads ran (above 1: always prefer the heads).
    """

    mode: Mode = "hybrid"
    keyword_min_confidence: float = 0.6
    keyword_min_complexity_confidence: float = 1.1


@dataclass(frozen=True)
class EncoderView:
    """What the encoder path says of one prompt.

    Attributes:
        embedding: ``float32 [384]``, unit length.
        truncated: The focus text was cut to fit the encoder.
        task ... output_tokens: The heads' predictions, or None without a trained artifact.
    """

    embedding: np.ndarray
    truncated: bool
    task: str | None = None
    task_confidence: float = 0.0
    complexity: str | None = None
    complexity_confidence: float = 0.0
    answer_kind: str | None = None
    answer_kind_confidence: float = 0.0
    output_tokens: float = 0.0


@dataclass(frozen=True)
class Classification:
    """The classification of one query, as routing sees it.

    Attributes:
        task: Task type (``math``, ``code``, ``multiple_choice``, ``extraction``, ``writing``,
            ``reasoning``, ``dialogue``), with ``task_confidence`` in [0, 1].
        complexity: ``low``, ``medium`` or ``high``, with its confidence.
        answer_kind: ``number``, ``choice``, ``code`` or ``open``, with its confidence.
        expected_output_tokens: Predicted output length in tokens, at least 1.
        decided_by: ``keyword``, ``encoder`` or ``default``: the path that decided the task.
        embedding: The query embedding, or None when not asked for or no encoder is available.
        truncated: The text was cut to fit the encoder (False when the encoder did not run).
        domain: A coarse topic from the rules, or empty.
    """

    task: str
    task_confidence: float
    complexity: str
    complexity_confidence: float
    answer_kind: str
    answer_kind_confidence: float
    expected_output_tokens: int
    decided_by: str
    embedding: np.ndarray | None
    truncated: bool
    domain: str


def validate_prompts(prompts: Sequence[str], fields: Sequence[str], *, max_chars: int) -> None:
    """Checks each prompt; ``fields[i]`` is the request path of ``prompts[i]`` (``prompt``,
    ``requests[3].prompt``).

    Raises:
        InvalidArgument: a prompt is empty (or only whitespace) or longer than ``max_chars``, with one
            field violation per bad prompt.
    """
    violations = []
    for prompt, name in zip(prompts, fields, strict=True):
        if not prompt.strip():
            violations.append(FieldViolation(name, "must not be empty"))
        elif len(prompt) > max_chars:
            violations.append(FieldViolation(name, f"is {len(prompt)} characters; the limit is {max_chars}"))
    if violations:
        what = "an empty prompt" if all("empty" in v.description for v in violations) else "invalid prompts"
        raise InvalidArgument(f"cannot classify {what}", violations, reason="INVALID_PROMPT")


def needs_encoder(keyword: KeywordResult, policy: Policy, *, want_embedding: bool, heads: bool) -> bool:
    """Whether the encoder must run for one prompt (given that one is loaded)."""
    if want_embedding:
        return True
    if not heads or policy.mode == "keyword":
        return False
    if policy.mode == "encoder":
        return True
    return not keyword.fired or keyword.task_confidence < policy.keyword_min_confidence


def decide(keyword: KeywordResult, encoded: EncoderView | None, policy: Policy) -> Classification:
    """Combines the two paths' answers for one prompt under ``policy``. Pure."""
    heads = encoded is not None and encoded.task is not None and policy.mode != "keyword"
    keyword_task = bool(keyword.fired) and keyword.task_confidence >= policy.keyword_min_confidence
    if heads and (policy.mode == "encoder" or not keyword_task):
        assert encoded is not None and encoded.task is not None and encoded.answer_kind is not None
        task, task_confidence = encoded.task, encoded.task_confidence
        answer_kind, answer_kind_confidence = encoded.answer_kind, encoded.answer_kind_confidence
        decided_by = "encoder"
    else:
        task, task_confidence = keyword.task, keyword.task_confidence
        answer_kind, answer_kind_confidence = keyword.answer_kind, keyword.answer_kind_confidence
        decided_by = "keyword" if keyword.fired else "default"
    keyword_complexity = policy.mode != "encoder" and (
        keyword.complexity_confidence >= policy.keyword_min_complexity_confidence
    )
    if heads and not keyword_complexity:
        assert encoded is not None and encoded.complexity is not None
        complexity, complexity_confidence = encoded.complexity, encoded.complexity_confidence
        tokens = encoded.output_tokens
    else:
        complexity, complexity_confidence = keyword.complexity, keyword.complexity_confidence
        tokens = keyword.expected_output_tokens
    return Classification(
        task=task,
        task_confidence=float(task_confidence),
        complexity=complexity,
        complexity_confidence=float(complexity_confidence),
        answer_kind=answer_kind,
        answer_kind_confidence=float(answer_kind_confidence),
        expected_output_tokens=max(1, round(float(tokens))),
        decided_by=decided_by,
        embedding=None if encoded is None else encoded.embedding,
        truncated=bool(encoded is not None and encoded.truncated),
        domain=keyword.domain,
    )


class Classifier:
    """Classifies prompts; the encoder work is micro-batched across concurrent callers.

    Args:
        rules: The keyword rules.
        encoder: all-MiniLM-L6-v2, or None to run without embeddings (and without heads).
        artifact: Trained heads, or None (keyword path only).
        policy: How the paths combine.
        max_batch: Most prompts per encoder run.
        max_wait_s: How long the batcher lingers for more prompts under load.
        max_queue: Most prompts waiting for the encoder before callers get ``ResourceExhausted``.

    Use as an async context manager (or ``start``/``close``) so the batcher runs. ``classify`` is safe to
    call concurrently; the encoder runs in one worker thread. A call with many prompts queues them for
    the encoder ``max_batch`` at a time and waits for each chunk before queueing the next, so a single
    prompt that arrives meanwhile waits for at most about one encoder run, not for the whole call.
    """

    def __init__(
        self,
        rules: KeywordRules,
        *,
        encoder: BaseEncoder | None = None,
        artifact: Artifact | None = None,
        policy: Policy = Policy(),
        max_batch: int = 64,
        max_wait_s: float = 0.002,
        max_queue: int = 4096,
    ):
        if artifact is not None and encoder is None:
            raise ValueError("trained heads need the encoder")
        self.rules = rules
        self.encoder = encoder
        self.artifact = artifact
        self.policy = policy
        self.chunk = max_batch
        self._batcher: MicroBatcher[tuple[str, int], EncoderView] | None = None
        if encoder is not None:
            self._batcher = MicroBatcher(
                self._encode_batch, max_batch=max_batch, max_wait_s=max_wait_s, max_queue=max_queue
            )

    @property
    def description(self) -> str:
        """One line for logs: what this classifier will use."""
        if self.artifact is not None:
            return f"{self.policy.mode} policy; keyword rules + encoder heads {self.artifact.content_hash[:12]}"
        if self.encoder is not None:
            return "keyword path only (no trained classifier artifact; embeddings still computed)"
        return "keyword path only (no encoder: no embeddings)"

    async def __aenter__(self) -> Classifier:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._batcher is not None:
            self._batcher.start()

    async def close(self) -> None:
        if self._batcher is not None:
            await self._batcher.close()

    def _encode_batch(self, items: list[tuple[str, int]]) -> list[EncoderView]:
        """Runs in the batcher's thread: embeds focus texts, then applies the heads to the whole batch."""
        assert self.encoder is not None
        encoded = self.encoder.encode([focus for focus, _ in items])
        if self.artifact is None:
            return [EncoderView(encoded.embeddings[i], bool(encoded.truncated[i])) for i in range(len(items))]
        x = features(encoded.embeddings, [chars for _, chars in items], [len(f) for f, _ in items], encoded.truncated)
        p = self.artifact.heads.predict(x)
        return [
            EncoderView(
                embedding=encoded.embeddings[i],
                truncated=bool(encoded.truncated[i]),
                task=p.task[i],
                task_confidence=float(p.task_confidence[i]),
                complexity=p.complexity[i],
                complexity_confidence=float(p.complexity_confidence[i]),
                answer_kind=p.answer_kind[i],
                answer_kind_confidence=float(p.answer_kind_confidence[i]),
                output_tokens=float(p.output_tokens[i]),
            )
            for i in range(len(items))
        ]

    async def _encode_chunk(self, items: list[tuple[str, int]]) -> list[EncoderView]:
        """Encoder views of one chunk. If one item fails, the rest of the chunk is cancelled (its
        queued items are then dropped by the batcher) and the error is raised."""
        assert self._batcher is not None
        batcher = self._batcher
        tasks = [asyncio.ensure_future(batcher.submit(item)) for item in items]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:
                task.cancel()

    async def classify(self, prompts: Sequence[str], want_embedding: Sequence[bool]) -> list[Classification]:
        """Classifies ``prompts`` (validated already), in order.

        Args:
            prompts: The queries.
            want_embedding: Per prompt, whether the caller wants the embedding back.

        Raises:
            ResourceExhausted: the encoder's queue is full.
            Unavailable: the classifier is shutting down.
        """
        if len(prompts) <= INLINE_KEYWORD_PROMPTS:
            keyword = [self.rules.classify(p) for p in prompts]
        else:
            keyword = await asyncio.to_thread(lambda: [self.rules.classify(p) for p in prompts])
        encoded: list[EncoderView | None] = [None] * len(prompts)
        if self._batcher is not None:
            heads = self.artifact is not None
            wanted = [
                i
                for i, k in enumerate(keyword)
                if needs_encoder(k, self.policy, want_embedding=want_embedding[i], heads=heads)
            ]
            for start in range(0, len(wanted), self.chunk):
                chunk = wanted[start : start + self.chunk]
                views = await self._encode_chunk([(keyword[i].focus, len(prompts[i])) for i in chunk])
                for i, view in zip(chunk, views, strict=True):
                    encoded[i] = view
        results = []
        for i, k in enumerate(keyword):
            found = encoded[i]
            result = decide(k, found, self.policy)
            if found is not None and not want_embedding[i]:
                result = _without_embedding(result)
            results.append(result)
        return results


def _without_embedding(result: Classification) -> Classification:
    return Classification(**{**result.__dict__, "embedding": None})
