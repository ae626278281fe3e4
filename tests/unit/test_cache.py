"""The front door's semantic cache: normalising, partitions, semantic lookups, TTL, pool changes, LRU."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import pytest

from services.dispatch.http.cache import CacheKey, SemanticCache, normalise, numbers_of

GREEDY = CacheKey("constellation/balanced", max_tokens=64, temperature=0.0)


@dataclass
class WordsEmbedding:
    """A deterministic embedding for tests: each word hashed to one of 256 axes, then unit length.
    Prompts sharing most words are similar; it counts its calls."""

    calls: list[str] = field(default_factory=list)

    def __call__(self, text: str) -> np.ndarray:
        self.calls.append(text)
        vector = np.zeros(256, dtype=np.float32)
        for word in normalise(text).split():
            vector[hashlib.sha1(word.encode()).digest()[0]] += 1.0
        return vector / max(float(np.linalg.norm(vector)), 1e-9)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def stored(cache: SemanticCache[str], prompt: str, key: CacheKey = GREEDY, tenant: str = "default") -> None:
    probe = cache.probe(prompt, key, tenant=tenant)
    assert probe is not None
    cache.store(probe, prompt)


def found(cache: SemanticCache[str], prompt: str, key: CacheKey = GREEDY, tenant: str = "default") -> str | None:
    probe = cache.probe(prompt, key, tenant=tenant)
    assert probe is not None
    hit, _ = cache.lookup(probe)
    return None if hit is None else hit.value


@pytest.mark.parametrize(
    "variant",
    [
        "What is the capital of France?",
        "what is the capital of france",
        "  What   is the capital\nof France?  ",
        "Please, what is the capital of France?",
        "What is the capital of France, please? Thanks!",
        "WHAT IS THE CAPITAL OF FRANCE!!",
    ],
)
def test_trivial_rewordings_normalise_to_one_form(variant: str) -> None:
    assert normalise(variant) == "what is the capital of france"


@pytest.mark.parametrize(
    ("one", "other"),
    [("What is 3.5 + 2?", "What is 35 + 2?"), ("Compute 5 - 3", "Compute 5 + 3"), ("a,b", "a b")],
)
def test_normalising_keeps_what_can_change_the_question(one: str, other: str) -> None:
    assert normalise(one) != normalise(other)


def test_numbers_are_a_sorted_multiset() -> None:
    assert numbers_of("Add 1,000 and 2.5, then 7") == ("1,000", "2.5", "7")


def test_exact_hit_on_a_reworded_prompt_without_embedding_anything() -> None:
    embed = WordsEmbedding()
    cache: SemanticCache[str] = SemanticCache(embed, threshold=0.9)
    probe = cache.probe("What is the capital of France?", GREEDY)
    assert probe is not None
    cache.store(probe, "Paris")
    embed.calls.clear()
    hit, _ = cache.lookup(cache.probe("please what is the CAPITAL of france", GREEDY))  # type: ignore[arg-type]
    assert hit is not None and hit.value == "Paris" and hit.kind == "exact" and hit.similarity == 1.0
    assert embed.calls == []


def test_partitions_tenants_and_sampling_never_share_answers() -> None:
    cache: SemanticCache[str] = SemanticCache(WordsEmbedding(), threshold=0.5)
    stored(cache, "What is the capital of France?", tenant="a")
    assert found(cache, "What is the capital of France?", tenant="a") is not None
    assert found(cache, "What is the capital of France?", tenant="b") is None
    longer = CacheKey("constellation/balanced", max_tokens=128, temperature=0.0)
    assert found(cache, "What is the capital of France?", key=longer, tenant="a") is None
    other_model = CacheKey("smollm2", max_tokens=64, temperature=0.0)
    assert found(cache, "What is the capital of France?", key=other_model, tenant="a") is None


def test_only_greedy_requests_are_cached_unless_asked() -> None:
    sampled = CacheKey("smollm2", temperature=0.7)
    assert SemanticCache[str]().probe("hi", sampled) is None
    assert SemanticCache[str]().probe("hi", CacheKey("smollm2")) is None  # the model's default: unknown
    assert SemanticCache[str](greedy_only=False).probe("hi", sampled) is not None


def test_semantic_hit_needs_the_threshold_and_the_same_numbers() -> None:
    cache: SemanticCache[str] = SemanticCache(WordsEmbedding(), threshold=0.8)
    stored(cache, "Explain how a rainbow forms in the sky after rain")
    hit_probe = cache.probe("Explain how a rainbow forms in the sky after the rain", GREEDY)
    assert hit_probe is not None
    hit, _ = cache.lookup(hit_probe)
    assert hit is not None and hit.kind == "semantic" and 0.8 <= hit.similarity < 1.0
    assert found(cache, "Describe the life cycle of a frog") is None
    stored(cache, "Tom has 3 apples and buys 4 more. How many apples does Tom have?")
    assert found(cache, "Tom has 3 apples and buys 5 more. How many apples does Tom have?") is None


def test_the_embedding_is_computed_once_per_request() -> None:
    embed = WordsEmbedding()
    cache: SemanticCache[str] = SemanticCache(embed, threshold=0.9)
    probe = cache.probe("Why is the sea salty?", GREEDY)
    assert probe is not None
    hit, probe = cache.lookup(probe)
    assert hit is None and probe.embedding is not None
    cache.store(probe, "answer")
    assert embed.calls == ["Why is the sea salty?"]


def test_entries_expire_after_the_ttl() -> None:
    clock = Clock()
    cache: SemanticCache[str] = SemanticCache(None, ttl_s=60, clock=clock)
    stored(cache, "Why is the sky blue?")
    clock.now += 59
    assert found(cache, "Why is the sky blue?") is not None
    clock.now += 2
    assert found(cache, "Why is the sky blue?") is None
    assert len(cache) == 0


def test_a_new_pool_version_drops_everything_the_same_one_nothing() -> None:
    cache: SemanticCache[str] = SemanticCache(WordsEmbedding(), threshold=0.9)
    cache.pool_changed(1)
    stored(cache, "Why is the sky blue?")
    cache.pool_changed(1)
    assert found(cache, "Why is the sky blue?") is not None
    cache.pool_changed(2)
    assert found(cache, "Why is the sky blue?") is None and len(cache) == 0


def test_the_least_recently_used_entry_is_evicted_and_its_embedding_with_it() -> None:
    cache: SemanticCache[str] = SemanticCache(WordsEmbedding(), threshold=0.99, max_entries=2)
    stored(cache, "first question about volcanoes")
    stored(cache, "second question about glaciers")
    assert found(cache, "first question about volcanoes") is not None  # now the most recent
    stored(cache, "third question about deserts")
    assert len(cache) == 2
    assert found(cache, "second question about glaciers") is None
    assert found(cache, "first question about volcanoes") is not None
    stored(cache, "fourth question about oceans")  # reuses the freed embedding row
    assert found(cache, "fourth question about oceans") is not None
    assert found(cache, "third question about deserts") is None


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        SemanticCache(threshold=0.0)
    with pytest.raises(ValueError):
        SemanticCache(max_entries=0)
