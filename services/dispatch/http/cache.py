"""The front door's semantic cache: answers to earlier greedy requests, found again by prompt.

Two lookups, in order:

* **exact**: the prompt's normalised form (:func:`normalise`: case, whitespace, sentence punctuation at
  word edges and politeness words removed) equals a stored one;
* **semantic**: the cosine similarity of the prompt's embedding with a stored one is at least
  ``threshold`` *and* both prompts have the same :func:`signature`: the same numbers and the same
  content words in the same order (function words and request fillers aside). Embeddings cannot
  tell a math question from the one with another number, nor "a hands-on approach" from "a hands-off
  approach", nor "hard furniture and soft toy" from "soft furniture and hard toy" (0.9994 to 0.9999
  on the Winogrande pool); the signature can. So what the semantic lookup adds over the exact one is
  prompts that differ only in function words and fillers ("Quick question for you: ...", "the").

Entries are partitioned by tenant and by :class:`CacheKey` (the model or profile asked plus every
sampling parameter), so two tenants, or two requests that decode differently, never share an answer.
Only greedy requests (temperature 0) are cached unless ``greedy_only`` is off. Entries expire after
``ttl_s``; :meth:`SemanticCache.pool_changed` drops them all when the pool's version moves (a model
joined, left or changed price), and the least recently used entry is evicted beyond ``max_entries``.

The embedding function is injected (text -> unit ``float32`` vector), so this module imports no model
code. Concurrency: every method takes one lock and may be called from any thread; the embedding
function is called outside the lock, and callers that share a non-thread-safe encoder must serialise
the calls themselves (the HTTP app runs every cache call on one worker thread).
"""

from __future__ import annotations

import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Generic, Literal, TypeVar

import numpy as np

T = TypeVar("T")
Embed = Callable[[str], np.ndarray]
"""Text -> unit-length embedding (``float32 [d]``). CPU-bound; called outside the cache's lock."""

POLITENESS = ("thank you", "thanks in advance", "thanks", "please", "pls", "plz", "kindly")
"""Words and phrases dropped by :func:`normalise` wherever they stand, as whole words."""
_POLITE = re.compile(r"\b(?:" + "|".join(re.escape(p) for p in POLITENESS) + r")\b")
_EDGE_PUNCTUATION = ".,!?;:"
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


def normalise(prompt: str) -> str:
    """The prompt with what cannot change its meaning removed: case, runs of whitespace, sentence
    punctuation (``. , ! ? ; :``) at the edges of words, and politeness words.

    Punctuation inside a word (``3.5``, ``a,b``, ``x.y``) and symbols standing alone (``5 - 3``) stay:
    removing them could merge two different questions.
    """
    lowered = _POLITE.sub(" ", prompt.lower())
    words = (word.strip(_EDGE_PUNCTUATION) for word in lowered.split())
    return " ".join(word for word in words if word)


def numbers_of(text: str) -> tuple[str, ...]:
    """The numbers a text mentions, sorted (a multiset): two prompts that differ in them never match."""
    return tuple(sorted(_NUMBER.findall(text)))


FILLERS = frozenset(
    """a an the and or but if then so of to in on at by for with from into about as is are was were be been
    being am do does did have has had it its this that these those there here i me my we our you your he she
    they them his her their what which who whom whose when where why how can could would should will shall
    may might must just also very really quite hi hello hey quick question questions tell help know want
    like need ask asking answer following short brief briefly""".split()
)
"""Words a prompt can gain or lose without asking another question (function words, request fillers)."""


def content_words(normalised: str) -> tuple[str, ...]:
    """The words of a normalised prompt that carry its question, in order: all but :data:`FILLERS`."""
    words = (word.strip("\"'()[]{}<>*_`") for word in normalised.split())
    return tuple(word for word in words if word and word not in FILLERS)


Signature = tuple[tuple[str, ...], tuple[str, ...]]


def signature(prompt: str) -> Signature:
    """What two prompts must share for a semantic hit: their numbers and their content words, in order."""
    return numbers_of(prompt), content_words(normalise(prompt))


@dataclass(frozen=True)
class CacheKey:
    """Everything besides the prompt that decides the answer: the model or profile asked and the sampling.

    ``model`` is what the caller named (a pool model or a virtual profile model such as
    ``constellation/balanced``); ``None`` sampling fields mean "the model's default".
    """

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(frozen=True)
class Probe:
    """One prompt prepared for a lookup, reused to store the answer (the embedding is computed once)."""

    tenant: str
    key: CacheKey
    prompt: str
    normalised: str
    signature: Signature
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Hit(Generic[T]):
    """A cached answer and how it was found.

    Attributes:
        value: What was stored (the HTTP layer stores the whole completion).
        kind: ``exact`` (same normalised prompt) or ``semantic`` (similar embedding, same signature).
        similarity: Cosine similarity to the stored prompt (1.0 for exact hits).
        prompt: The stored prompt that matched.
        age_s: Seconds since the entry was stored.
    """

    value: T
    kind: Literal["exact", "semantic"]
    similarity: float
    prompt: str
    age_s: float


@dataclass
class _Entry(Generic[T]):
    value: T
    prompt: str
    signature: Signature
    stored_at: float
    slot: int | None = None


@dataclass
class _Partition:
    """The embeddings of one (tenant, key) partition in a growable matrix; a freed row is zeroed."""

    dimensions: int
    owners: list[str | None] = field(default_factory=list)
    free: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.matrix = np.zeros((0, self.dimensions), dtype=np.float32)

    def add(self, normalised: str, vector: np.ndarray) -> int:
        if self.free:
            slot = self.free.pop()
        else:
            slot = len(self.owners)
            self.owners.append(None)
            if slot >= self.matrix.shape[0]:
                grown = np.zeros((max(16, 2 * slot), self.dimensions), dtype=np.float32)
                grown[: self.matrix.shape[0]] = self.matrix
                self.matrix = grown
        self.matrix[slot] = vector
        self.owners[slot] = normalised
        return slot

    def remove(self, slot: int) -> None:
        self.matrix[slot] = 0.0
        self.owners[slot] = None
        self.free.append(slot)

    def nearest(self, vector: np.ndarray, floor: float) -> list[tuple[float, str]]:
        """Owners whose similarity is at least ``floor``, best first."""
        if not self.owners:
            return []
        sims = self.matrix[: len(self.owners)] @ vector
        found = np.flatnonzero(sims >= floor)
        ranked = sorted(found, key=lambda i: -sims[i])
        return [(float(sims[i]), owner) for i in ranked if (owner := self.owners[i]) is not None]


class SemanticCache(Generic[T]):
    """Answers of earlier requests, per tenant and :class:`CacheKey`, found by exact or semantic lookup.

    Args:
        embed: Text -> unit embedding; None turns the semantic lookup off (exact only).
        threshold: Least cosine similarity of a semantic hit (``bench.cache`` chooses it on the recorded
            pools so that distinct questions almost never hit).
        ttl_s: Seconds an entry is served after it was stored.
        max_entries: Entries kept over all tenants; the least recently used goes first.
        greedy_only: Cache only requests with temperature 0 (sampled answers are meant to vary).
        clock: Monotonic seconds; a test may pass its own.
    """

    def __init__(
        self,
        embed: Embed | None = None,
        *,
        threshold: float = 0.95,
        ttl_s: float = 3600.0,
        max_entries: int = 10_000,
        greedy_only: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if max_entries < 1 or ttl_s <= 0:
            raise ValueError("max_entries must be >= 1 and ttl_s > 0")
        self.embed = embed
        self.threshold = threshold
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.greedy_only = greedy_only
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, CacheKey, str], _Entry[T]] = OrderedDict()
        self._partitions: dict[tuple[str, CacheKey], _Partition] = {}
        self.pool_version: int | None = None

    def __len__(self) -> int:
        return len(self._entries)

    def cacheable(self, key: CacheKey) -> bool:
        """True when answers for ``key`` may be cached (greedy, unless ``greedy_only`` is off)."""
        return key.greedy or not self.greedy_only

    def probe(self, prompt: str, key: CacheKey, *, tenant: str = "default") -> Probe | None:
        """The prompt prepared for :meth:`lookup` and :meth:`store`, or None when ``key`` is not cacheable.

        Computes no embedding yet: :meth:`lookup` asks for one only when the exact lookup misses.
        """
        if not self.cacheable(key):
            return None
        return Probe(tenant, key, prompt, normalise(prompt), signature(prompt))

    def lookup(self, probe: Probe) -> tuple[Hit[T] | None, Probe]:
        """The cached answer for ``probe``, and the probe (with its embedding once one was computed).

        Exact first; then, when an embedding function is set, semantic. A hit refreshes the entry's
        place in the LRU order but not its age.
        """
        with self._lock:
            hit = self._exact(probe)
        if hit is not None or self.embed is None:
            return hit, probe
        if probe.embedding is None:
            probe = replace(probe, embedding=_unit(self.embed(probe.prompt)))
        with self._lock:
            return self._semantic(probe), probe

    def store(self, probe: Probe, value: T) -> None:
        """Stores ``value`` as the answer to ``probe`` (replacing an entry with the same normalised prompt).

        Computes the probe's embedding when it has none yet (a store without an earlier lookup).
        """
        if self.embed is not None and probe.embedding is None:
            probe = replace(probe, embedding=_unit(self.embed(probe.prompt)))
        with self._lock:
            name = (probe.tenant, probe.key, probe.normalised)
            if name in self._entries:
                self._drop(name)
            entry = _Entry(value, probe.prompt, probe.signature, self._clock())
            if probe.embedding is not None:
                partition = self._partitions.setdefault(
                    (probe.tenant, probe.key), _Partition(dimensions=int(probe.embedding.shape[0]))
                )
                entry.slot = partition.add(probe.normalised, probe.embedding)
            self._entries[name] = entry
            while len(self._entries) > self.max_entries:
                self._drop(next(iter(self._entries)))

    def pool_changed(self, version: int | None = None) -> None:
        """Drops every entry when the pool moved: always without ``version``, else when it differs
        from the last version seen (the first version seen also drops: it may postdate the entries)."""
        with self._lock:
            if version is not None and version == self.pool_version:
                return
            self.pool_version = version
            self._entries.clear()
            self._partitions.clear()

    def _fresh(self, name: tuple[str, CacheKey, str]) -> _Entry[T] | None:
        entry = self._entries.get(name)
        if entry is None:
            return None
        if self._clock() - entry.stored_at > self.ttl_s:
            self._drop(name)
            return None
        return entry

    def _exact(self, probe: Probe) -> Hit[T] | None:
        name = (probe.tenant, probe.key, probe.normalised)
        entry = self._fresh(name)
        if entry is None:
            return None
        self._entries.move_to_end(name)
        return Hit(entry.value, "exact", 1.0, entry.prompt, self._clock() - entry.stored_at)

    def _semantic(self, probe: Probe) -> Hit[T] | None:
        partition = self._partitions.get((probe.tenant, probe.key))
        if partition is None or probe.embedding is None:
            return None
        for similarity, normalised in partition.nearest(probe.embedding, self.threshold):
            name = (probe.tenant, probe.key, normalised)
            entry = self._fresh(name)
            if entry is None or entry.signature != probe.signature:
                continue
            self._entries.move_to_end(name)
            return Hit(entry.value, "semantic", similarity, entry.prompt, self._clock() - entry.stored_at)
        return None

    def _drop(self, name: tuple[str, CacheKey, str]) -> None:
        entry = self._entries.pop(name)
        if entry.slot is not None:
            partition = self._partitions[(name[0], name[1])]
            partition.remove(entry.slot)


def _unit(vector: np.ndarray) -> np.ndarray:
    """``vector`` as float32 of unit length (a zero vector stays zero and never matches)."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array
