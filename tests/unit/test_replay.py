"""Unit tests of the replay index, the simulated latency model, chunking and the run-time repository."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path
from typing import Any

import pytest

from constellation.pools import ModelCard
from services.inference.launcher import MODEL_REPOSITORY, materialize_model_repository, with_parameters
from services.inference.replay import (
    LatencyModel,
    LatencyProfile,
    ReplayIndex,
    UnknownPrompt,
    UnknownRecordedModel,
    chunk_text,
    cost_from_prices,
    estimate_tokens,
    prompt_sha256,
    size_class_of,
    stream_plan,
)

CARDS = {
    "small-7b": {
        "family": "x",
        "params_b": 7.0,
        "open_weights": True,
        "price_in_per_mtok": 0.2,
        "price_out_per_mtok": 0.2,
    },
    "large-70b": {
        "family": "y",
        "params_b": 70.0,
        "open_weights": True,
        "price_in_per_mtok": 0.9,
        "price_out_per_mtok": 0.9,
    },
    "closed-xl": {
        "family": "z",
        "params_b": None,
        "open_weights": False,
        "price_in_per_mtok": 5,
        "price_out_per_mtok": 15,
    },
}
LONG_PROMPT = "Explain, in great detail and with examples, why the sky looks blue during the day and red at dusk."
PROMPTS = ["What is 2 + 2?", "Name a colour.", "Grüße aus Köln: wie spät ist es? 日本語で答えて。", LONG_PROMPT]
UNICODE_ANSWER = "Es ist 12 Uhr — こんにちは 🎉🎉 naïve café, ça va? " * 5


def _response(text: str, tokens: tuple[int | None, int | None], cost: float | None) -> dict[str, Any]:
    return {
        "text": text,
        "answer": None,
        "correct": None,
        "score": None,
        "input_tokens": tokens[0],
        "output_tokens": tokens[1],
        "cost_usd": cost,
    }


def _line(n: int, prompt: str, responses: dict[str, Any]) -> str:
    record = {
        "id": f"tiny/{n}",
        "task": "tiny",
        "split": "train",
        "prompt": prompt,
        "reference": None,
        "answer_kind": "open",
        "responses": responses,
    }
    return json.dumps(record, ensure_ascii=False) + "\n"


def write_tiny_pools(directory: Path) -> tuple[Path, Path]:
    """A plain pool with recorded tokens and costs and a gzip one without (RouterBench style)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "models.json").write_text(json.dumps(CARDS), encoding="utf-8")
    plain = directory / "recorded.jsonl"
    plain.write_text(
        _line(
            0,
            PROMPTS[0],
            {"small-7b": _response("4", (10, 1), 0.000002), "large-70b": _response("Four.", (10, 3), 0.00001)},
        )
        + _line(
            1,
            PROMPTS[1],
            {"small-7b": _response("Blue", (5, 1), 0.000001), "large-70b": _response("Red", (5, 1), None)},
        ),
        encoding="utf-8",
    )
    packed = directory / "estimated.jsonl.gz"
    with gzip.open(packed, "wt", encoding="utf-8") as handle:
        handle.write(
            _line(
                0,
                PROMPTS[2],
                {
                    "closed-xl": _response(UNICODE_ANSWER, (None, None), None),
                    "mystery": _response("x" * 40, (None, None), None),
                },
            )
        )
        handle.write(
            _line(
                1,
                PROMPTS[3],
                {
                    "closed-xl": _response("Rayleigh scattering. " * 20, (None, None), 0.5),
                    "mystery": _response("", (None, None), None),
                },
            )
        )
    return plain, packed


@pytest.fixture
def index(tmp_path: Path) -> ReplayIndex:
    return ReplayIndex.from_pools(write_tiny_pools(tmp_path))


def test_lookups(index: ReplayIndex) -> None:
    assert index.models() == ["closed-xl", "large-70b", "mystery", "small-7b"]
    assert len(index) == 8
    assert index.prompt_count("small-7b") == 2
    entry = index.lookup("large-70b", PROMPTS[0])
    assert entry is not None and entry.text == "Four."
    assert (entry.input_tokens, entry.output_tokens, entry.cost_usd) == (10, 3, 0.00001)
    assert not (entry.input_tokens_estimated or entry.output_tokens_estimated or entry.cost_from_prices)
    assert index.lookup_hashed("large-70b", prompt_sha256(PROMPTS[0])) is entry
    assert index.lookup("large-70b", PROMPTS[0] + " ") is None  # exact text only
    assert index.lookup("nobody", PROMPTS[0]) is None
    assert index.card("small-7b") == ModelCard("small-7b", "x", 7.0, True, 0.2, 0.2)
    assert index.card("mystery") is None
    assert "mystery" not in index.cards and "closed-xl" in index.cards


def test_not_found_errors_name_the_model(index: ReplayIndex) -> None:
    with pytest.raises(UnknownRecordedModel) as caught:
        index.get("gpt-17", PROMPTS[0])
    assert "is not found" in str(caught.value) and "gpt-17" in str(caught.value)
    with pytest.raises(UnknownRecordedModel) as caught:
        index.get(None, PROMPTS[0])
    assert "is not found" in str(caught.value) and "recorded_model" in str(caught.value)
    unknown = "Q" * 59 + "Z" + "never shown"
    with pytest.raises(UnknownPrompt) as caught_prompt:
        index.get("small-7b", unknown)
    message = str(caught_prompt.value)
    assert "is not found" in message and "small-7b" in message
    assert "Q" * 59 + "Z" in message and "never shown" not in message


def test_null_tokens_are_estimated_and_flagged(index: ReplayIndex) -> None:
    entry = index.lookup("closed-xl", PROMPTS[2])
    assert entry is not None
    assert entry.output_tokens == estimate_tokens(UNICODE_ANSWER) == round(len(UNICODE_ANSWER) / 4)
    assert entry.input_tokens == estimate_tokens(PROMPTS[2])
    assert entry.input_tokens_estimated and entry.output_tokens_estimated
    empty = index.lookup("mystery", PROMPTS[3])
    assert empty is not None and empty.text == "" and empty.output_tokens == 1  # at least one token


def test_cost_falls_back_to_card_prices(index: ReplayIndex) -> None:
    estimated = index.lookup("closed-xl", PROMPTS[2])
    assert estimated is not None and estimated.cost_from_prices
    expected = (estimated.input_tokens * 5 + estimated.output_tokens * 15) / 1e6
    assert estimated.cost_usd == pytest.approx(expected)
    recorded = index.lookup("closed-xl", PROMPTS[3])
    assert recorded is not None and recorded.cost_usd == 0.5 and not recorded.cost_from_prices
    red = index.lookup("large-70b", PROMPTS[1])
    assert red is not None and red.cost_usd == pytest.approx((5 * 0.9 + 1 * 0.9) / 1e6)
    no_card = index.lookup("mystery", PROMPTS[2])
    assert no_card is not None and no_card.cost_usd is None
    assert cost_from_prices(ModelCard("m", price_in_per_mtok=1.0), 10, 10) is None


def test_max_tokens_truncates(index: ReplayIndex) -> None:
    full = index.replay("closed-xl", PROMPTS[3])
    assert full.finish_reason == "stop" and full.text == "Rayleigh scattering. " * 20
    cut = index.replay("closed-xl", PROMPTS[3], max_tokens=10)
    assert cut.finish_reason == "length" and cut.output_tokens == 10
    assert full.text.startswith(cut.text) and 0 < len(cut.text) < len(full.text)
    assert cut.cost_usd == pytest.approx((cut.input_tokens * 5 + 10 * 15) / 1e6)
    assert index.replay("closed-xl", PROMPTS[3], max_tokens=10_000).finish_reason == "stop"
    one = index.replay("small-7b", PROMPTS[0], max_tokens=1)
    assert (one.text, one.finish_reason) == ("4", "stop")
    with pytest.raises(ValueError):
        index.replay("small-7b", PROMPTS[0], max_tokens=0)


def test_first_pool_wins_on_duplicates(tmp_path: Path) -> None:
    plain, packed = write_tiny_pools(tmp_path)
    index = ReplayIndex.from_pools([plain, packed, plain])
    assert index.duplicates == 4 and len(index) == 8
    assert index.pool_paths == [plain, packed, plain]


@pytest.mark.parametrize("tokens_per_chunk", [1, 2, 3, 8, 16, 1000])
@pytest.mark.parametrize(
    "text", ["", "a", "hello world", UNICODE_ANSWER, "🎉" * 33, "x" * 101, "line one\nline two\n\n  indented\ttab  "]
)
def test_chunking_round_trips_exactly(text: str, tokens_per_chunk: int) -> None:
    pieces = chunk_text(text, tokens_per_chunk)
    assert "".join(pieces) == text
    assert b"".join(p.encode("utf-8") for p in pieces) == text.encode("utf-8")
    assert all(pieces) and all(len(p) <= tokens_per_chunk * 4 for p in pieces)
    if len(text) > tokens_per_chunk * 8:
        assert len(pieces) >= 2


def test_chunking_prefers_whitespace() -> None:
    pieces = chunk_text("one two six ten red tan big map cat dog", 2)  # 8-character pieces
    assert all(p.endswith(" ") for p in pieces[:-1])
    with pytest.raises(ValueError):
        chunk_text("abc", 0)


def test_stream_plan_spreads_tokens(index: ReplayIndex) -> None:
    replay = index.replay("closed-xl", PROMPTS[2])
    steps = stream_plan(replay, ttft_ms=100.0, per_token_ms=10.0, tokens_per_chunk=4)
    assert "".join(s.text for s in steps) == replay.text and len(steps) > 5
    counts = [s.output_tokens for s in steps]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == replay.output_tokens
    assert steps[0].at_ms == pytest.approx(100.0 + 10.0 * (counts[0] - 1))
    assert steps[-1].at_ms == pytest.approx(LatencyModel.total_ms(100.0, 10.0, replay.output_tokens))
    empty = stream_plan(index.replay("mystery", PROMPTS[3]), 100.0, 10.0)
    assert [(s.text, s.output_tokens, s.at_ms) for s in empty] == [("", 1, 100.0)]


def test_latency_is_deterministic_per_seed_model_and_prompt() -> None:
    model = LatencyModel(seed=3)
    first = model.sample("m", "prompt one")
    assert LatencyModel(seed=3).sample("m", "prompt one") == first
    assert model.sample_hashed("m", prompt_sha256("prompt one")) == first
    assert model.sample("m", "prompt two") != first
    assert model.sample("other", "prompt one") != first
    assert LatencyModel(seed=4).sample("m", "prompt one") != first
    simulated = model.simulate("m", "prompt one", output_tokens=11)
    assert (simulated.ttft_ms, simulated.per_token_ms) == first
    assert simulated.total_ms == pytest.approx(first[0] + 10 * first[1])
    assert LatencyModel.total_ms(50.0, 5.0, 1) == 50.0 and LatencyModel.total_ms(50.0, 5.0, 0) == 50.0


@pytest.mark.parametrize(
    ("card", "expected"),
    [
        (ModelCard("a", params_b=2.0), "small"),
        (ModelCard("a", params_b=10.0), "small"),
        (ModelCard("a", params_b=10.5), "medium"),
        (ModelCard("a", params_b=40.0), "medium"),
        (ModelCard("a", params_b=70.0, price_out_per_mtok=50.0), "large"),
        (ModelCard("a", params_b=100.0), "large"),
        (ModelCard("a", params_b=405.0), "xl"),
        (ModelCard("a", price_out_per_mtok=10.0), "xl"),
        (ModelCard("a", price_out_per_mtok=2.0), "large"),
        (ModelCard("a", price_out_per_mtok=1.99), "medium"),
        (ModelCard("a"), "medium"),
        (None, "medium"),
    ],
)
def test_size_classes(card: ModelCard | None, expected: str) -> None:
    assert size_class_of(card) == expected


def test_size_class_sets_the_base_times(index: ReplayIndex) -> None:
    flat = LatencyModel({"ttft_sigma": 0, "per_token_sigma": 0}, cards=index.cards)
    assert flat.base_ms("small-7b") == (120.0, 8.0)
    assert flat.sample("small-7b", "anything") == (120.0, 8.0)
    assert flat.sample("large-70b", "anything") == (350.0, 22.0)
    assert flat.sample("closed-xl", "anything") == (500.0, 30.0)
    assert flat.sample("mystery", "anything") == (200.0, 14.0)


def test_heavy_tail() -> None:
    model = LatencyModel(seed=0)
    samples = [model.sample("some-model", f"prompt {i}") for i in range(4000)]
    ttft = sorted(s[0] for s in samples)
    per_token = sorted(s[1] for s in samples)
    p50, p99 = ttft[len(ttft) // 2], ttft[int(len(ttft) * 0.99)]
    assert p99 / p50 > 3.0  # log-normal sigma 0.6: exp(2.33 * 0.6) ~ 4.0
    assert statistics.median(ttft) == pytest.approx(200.0, rel=0.1)
    assert 1.4 < per_token[int(len(per_token) * 0.99)] / statistics.median(per_token) < 2.3  # ~ exp(2.33 * 0.25)
    assert min(ttft) > 0


def test_profile_overrides_and_validation() -> None:
    profile = LatencyProfile.from_json(
        json.dumps(
            {
                "ttft_ms": {"xl": 900},
                "ttft_sigma": 0,
                "per_token_sigma": 0,
                "models": {"special": {"size_class": "xl"}, "tuned": {"ttft_ms": 42, "per_token_ms": 1}},
            }
        )
    )
    assert profile.ttft_ms["xl"] == 900 and profile.ttft_ms["small"] == 120
    model = LatencyModel(profile)
    assert model.size_class("special") == "xl" and model.sample("special", "p") == (900.0, 30.0)
    assert model.sample("tuned", "p") == (42.0, 1.0)
    assert LatencyModel(json.dumps({"ttft_sigma": 0, "per_token_sigma": 0})).sample("x", "p") == (200.0, 14.0)
    for bad in (
        '{"ttft": 1}',
        '{"ttft_ms": {"huge": 1}}',
        '{"ttft_sigma": -1}',
        "[1]",
        "{",
        '{"unknown_class": "big"}',
    ):
        with pytest.raises(ValueError):
            LatencyProfile.from_json(bad)
    assert LatencyProfile.from_json("") == LatencyProfile()


def test_with_parameters_adds_and_overrides() -> None:
    source = (MODEL_REPOSITORY / "replay" / "config.pbtxt").read_text()
    text = with_parameters(source, {"time_scale": 0.5, "pool_paths": "/a.jsonl,/b.jsonl.gz", "new_key": "v"})
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = text_format.Parse(text, model_config_pb2.ModelConfig())
    assert config.name == "replay" and config.model_transaction_policy.decoupled
    assert config.parameters["time_scale"].string_value == "0.5"
    assert config.parameters["pool_paths"].string_value == "/a.jsonl,/b.jsonl.gz"
    assert config.parameters["new_key"].string_value == "v"
    assert config.parameters["tokens_per_chunk"].string_value == "8"  # untouched


def test_materialized_repository(tmp_path: Path) -> None:
    target = materialize_model_repository(MODEL_REPOSITORY, tmp_path / "repo", {"replay": {"time_scale": "0"}})
    version = target / "replay" / "1"
    assert version.is_symlink() and version.resolve() == (MODEL_REPOSITORY / "replay" / "1").resolve()
    assert 'string_value: "0"' in (target / "replay" / "config.pbtxt").read_text()
    smollm2 = target / "smollm2" / "config.pbtxt"
    assert smollm2.read_text() == (MODEL_REPOSITORY / "smollm2" / "config.pbtxt").read_text()
    again = materialize_model_repository(MODEL_REPOSITORY, target, {})
    assert 'key: "time_scale"' in (again / "replay" / "config.pbtxt").read_text()  # verbatim source again
    from services.inference.launcher import TritonError

    with pytest.raises(TritonError):
        materialize_model_repository(MODEL_REPOSITORY, tmp_path / "x", {"no-such-model": {"a": "b"}})
