"""The routing policy on hand-made data: predictor, calibration, score, ceilings, cascades, votes, artifact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from constellation import artifacts
from constellation.errors import FailedPrecondition
from constellation.ml.calibration import expected_calibration_error, fit_isotonic
from services.dispatch.calls import CallResult
from services.dispatch.events import PlanMade
from services.dispatch.routing import (
    ARTIFACT_KIND,
    PlannedModel,
    PoolModel,
    Prediction,
    ProfileSettings,
    QualityPredictor,
    Router,
    Weights,
    brier,
    estimate_prices,
    load_router,
    score_candidates,
)
from services.dispatch.strategies.waves import settled


def unit(v: list[float]) -> np.ndarray:
    a = np.array(v, dtype=np.float32)
    return a / np.linalg.norm(a)


def two_topics() -> QualityPredictor:
    """Topic x prompts: `maths` is right, `prose` wrong; topic y prompts: the reverse."""
    rng = np.random.default_rng(0)
    rows, quality = [], []
    for topic in range(2):
        for _ in range(30):
            base = [1.0, 0.0, 0.0] if topic == 0 else [0.0, 1.0, 0.0]
            rows.append(unit([b + 0.1 * rng.standard_normal() for b in base]))
            quality.append([1.0, 0.0] if topic == 0 else [0.0, 1.0])
    q = np.array(quality, dtype=np.float32)
    return QualityPredictor(
        np.stack(rows), q, np.full_like(q, 50.0), ["maths", "prose"], {"maths": ("fam", 7.0)}, k=5, alpha=1.0
    )


def test_isotonic_is_monotone_and_fits_steps() -> None:
    x = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    y = np.array([0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    xs, ys = fit_isotonic(x, y, merge_ties=False)
    assert np.all(np.diff(ys) >= 0)
    assert ys[0] == pytest.approx(0.0) and ys[-1] == pytest.approx(1.0)
    assert np.interp(0.25, xs, ys) == pytest.approx(0.5)


def test_brier_and_ece_of_perfect_and_overconfident_predictions() -> None:
    y = np.array([1.0, 0.0, 1.0, 0.0])
    assert brier(y, y) == 0.0 and expected_calibration_error(y, y) == 0.0
    overconfident = np.array([0.95, 0.95, 0.95, 0.95])
    assert expected_calibration_error(overconfident, y) == pytest.approx(0.45)


def test_predictor_prefers_the_model_that_did_well_on_similar_prompts() -> None:
    predictor = two_topics()
    on_x = predictor.predict(unit([1.0, 0.05, 0.0]), ["maths", "prose"])
    on_y = predictor.predict(unit([0.05, 1.0, 0.0]), ["maths", "prose"])
    assert on_x["maths"].quality > 0.8 > 0.2 > on_x["prose"].quality
    assert on_y["prose"].quality > 0.8 > 0.2 > on_y["maths"].quality
    assert on_x["maths"].source == "knn" and on_x["maths"].observations > 0
    assert on_x["maths"].output_tokens == pytest.approx(50.0)


def test_a_model_without_records_gets_a_family_prior() -> None:
    predictor = two_topics()
    predictor.cards["newcomer"] = ("fam", 8.0)  # same family as `maths`
    out = predictor.predict(unit([1.0, 0.0, 0.0]), ["maths", "prose", "newcomer"])
    assert out["newcomer"].source == "prior" and out["newcomer"].observations == 0
    assert out["newcomer"].quality == pytest.approx(out["maths"].quality)


def test_without_an_embedding_the_train_mean_is_used() -> None:
    out = two_topics().predict(None, ["maths", "prose", "unknown"])
    assert out["maths"].quality == pytest.approx(0.5) and out["maths"].source == "mean"
    assert out["unknown"].source == "prior"


def test_score_normalises_each_objective_to_the_unit_interval() -> None:
    candidates = [
        PlannedModel("good-dear", 0.9, 1e-2, 1000, 100, 1, "knn"),
        PlannedModel("poor-cheap", 0.5, 1e-4, 100, 100, 1, "knn"),
        PlannedModel("mid", 0.7, 1e-3, 300, 100, 1, "knn"),
    ]
    score_candidates(candidates, Weights(1, 0, 0))
    assert [c.score for c in candidates] == pytest.approx([1.0, 0.0, 0.5])
    score_candidates(candidates, Weights(0, 1, 0))
    assert [c.score for c in candidates] == pytest.approx([0.0, 1.0, 0.5])  # log scale: 1e-3 is halfway


POOL = [
    PoolModel("maths", 1.0, 2.0, "fam", 7.0, frozenset({"math"})),
    PoolModel("prose", 0.1, 0.2, "fam", 1.0, frozenset({"writing"})),
]


def fixed(quality: dict[str, float]) -> dict[str, Prediction]:
    return {m: Prediction(q, 10.0, 100.0, "knn") for m, q in quality.items()}


def test_quality_profile_picks_the_best_and_cost_profile_the_cheapest_within_its_margin() -> None:
    router = Router(None)
    preds = fixed({"maths": 0.9, "prose": 0.87})
    best = router.route(POOL, profile="quality", predictions=preds)
    cheap = router.route(POOL, profile="cost", predictions=preds)
    assert best.members[0].model == "maths" and best.policy == "single"
    assert cheap.members[0].model == "prose" and "within 0.05" in cheap.summary
    assert {c.model for c in best.candidates} == {"maths", "prose"}
    assert all(c.reason for c in best.candidates)
    # 30 points worse is outside the margin: the cost profile does not give that up to save money
    far = router.route(POOL, profile="cost", predictions=fixed({"maths": 0.9, "prose": 0.6}))
    assert far.members[0].model == "maths"


def test_speed_profile_is_the_fastest_within_its_margin() -> None:
    pool = [PoolModel("big", 1.0, 1.0, params_b=400.0), PoolModel("small", 1.0, 1.0, params_b=3.0)]
    near = Router(None).route(pool, profile="speed", predictions=fixed({"big": 0.9, "small": 0.88}))
    far = Router(None).route(pool, profile="speed", predictions=fixed({"big": 0.9, "small": 0.5}))
    assert near.members[0].model == "small" and far.members[0].model == "big"
    assert "fastest within 0.05" in near.members[0].reason


def test_an_unpriced_model_gets_an_estimate_from_its_family_or_peers_never_zero() -> None:
    pool = [
        PoolModel("a-small", 0.2, 0.4, "a", 8.0),
        PoolModel("a-large", 2.0, 4.0, "a", 70.0),
        PoolModel("b-mid", 1.0, 1.0, "b", 30.0),
        PoolModel("a-new", family="a"),  # no price recorded: its family's median
        PoolModel("c-sized", family="c", params_b=70.0),  # no family peer: the size trend
        PoolModel("mystery"),  # nothing known: the median of every priced peer
    ]
    estimates = estimate_prices(pool)
    assert set(estimates) == {"a-new", "c-sized", "mystery"}
    assert estimates["a-new"][:2] == pytest.approx((1.1, 2.2)) and "family a" in estimates["a-new"][2]
    assert estimates["c-sized"][0] > 1.0 and "size" in estimates["c-sized"][2]
    assert estimates["mystery"][:2] == pytest.approx((1.0, 1.0))
    assert not estimate_prices([PoolModel("x"), PoolModel("y")])  # nothing priced: nothing to go by
    assert PoolModel("free-local", priced=True).has_price


def test_the_cost_profile_never_plans_an_unpriced_model_as_free() -> None:
    pool = [PoolModel("cheap", 0.1, 0.1), PoolModel("dear", 5.0, 5.0), PoolModel("unpriced")]
    preds = fixed({"cheap": 0.88, "dear": 0.9, "unpriced": 0.9})
    route = Router(None).route(pool, profile="cost", predictions=preds)
    assert route.members[0].model == "cheap"
    unpriced = next(c for c in route.candidates if c.model == "unpriced")
    assert unpriced.cost_estimated and unpriced.cost_usd > 0
    assert "no recorded price, estimated" in unpriced.reason
    assert not route.members[0].cost_estimated


def test_top_vote_asks_the_best_train_records_and_votes() -> None:
    pool = [PoolModel(n, 1, 1) for n in "abcd"]
    preds = {
        m: Prediction(0.5, 1.0, 10.0, "knn", pool_mean=record)
        for m, record in {"a": 0.9, "b": 0.6, "c": 0.8, "d": 0.7}.items()
    }
    router = Router(None, {"quality": ProfileSettings(Weights(1, 0, 0), top_vote=3)})
    route = router.route(pool, profile="quality", answer_kind="number", predictions=preds)
    assert route.policy == "vote" and [m.model for m in route.members] == ["a", "c", "d"] and route.quorum == 2
    assert router.route(pool, profile="quality", answer_kind="code", predictions=preds).policy == "single"


def test_per_request_weights_override_the_profile() -> None:
    route = Router(None).route(
        POOL, profile="quality", weights=Weights(0, 1, 0), predictions=fixed({"maths": 0.9, "prose": 0.6})
    )
    assert route.members[0].model == "prose" and route.profile == "custom"


def test_ceilings_capabilities_and_health_leave_models_out_with_reasons() -> None:
    router = Router(None)
    preds = fixed({"maths": 0.9, "prose": 0.6})
    capped = router.route(POOL, profile="quality", max_cost_usd=1e-4, predictions=preds)
    assert capped.members[0].model == "prose"
    assert "max_cost_usd" in next(c.reason for c in capped.candidates if c.model == "maths")
    needs_math = router.route(POOL, profile="cost", required_capabilities=["math"], predictions=preds)
    assert needs_math.members[0].model == "maths"
    sick = [PoolModel("maths", healthy=False), POOL[1]]
    assert router.route(sick, profile="quality", predictions=preds).members[0].model == "prose"
    with pytest.raises(FailedPrecondition, match="no model can take this request"):
        router.route(POOL, profile="quality", max_cost_usd=1e-9, predictions=preds)


def test_cascade_for_closed_answers_when_the_cheap_wave_is_good_enough() -> None:
    pool = [PoolModel("strong", 10, 30), PoolModel("a", 0.1, 0.1), PoolModel("b", 0.2, 0.2), PoolModel("c", 5, 5)]
    preds = fixed({"strong": 0.95, "a": 0.9, "b": 0.88, "c": 0.5})
    router = Router(None, {"balanced": ProfileSettings(Weights(0.8, 0.2, 0), 2, 0.25, 0.85)})
    route = router.route(pool, answer_kind="number", profile="balanced", predictions=preds)
    assert route.policy == "cascade" and route.quorum == 2
    assert [[m.model for m in wave] for wave in route.waves()] == [["a", "b"], ["strong"]]
    # open answers cannot be compared for agreement, and weak first waves are not worth asking
    assert router.route(pool, answer_kind="open", profile="balanced", predictions=preds).policy == "single"
    weak = fixed({"strong": 0.95, "a": 0.6, "b": 0.88, "c": 0.5})
    assert router.route(pool, answer_kind="number", profile="balanced", predictions=weak).policy == "single"


def test_vote_plans_per_answer_kind() -> None:
    pool = [PoolModel(n, 1, 1) for n in "abcd"]
    router = Router(None, {"quality/number": ProfileSettings(Weights(1, 0, 0), vote_size=3)})
    preds = fixed({"a": 0.9, "b": 0.8, "c": 0.7, "d": 0.6})
    route = router.route(pool, answer_kind="number", profile="quality", predictions=preds)
    assert route.policy == "vote" and [m.model for m in route.members] == ["a", "b", "c"] and route.quorum == 2
    assert router.route(pool, answer_kind="code", profile="quality", predictions=preds).policy == "single"


def test_artifact_round_trip(tmp_path: Path) -> None:
    predictor = two_topics()
    predictor.calibration = fit_isotonic(np.array([0.0, 0.5, 1.0]), np.array([0.1, 0.5, 0.9]), merge_ties=False)
    manifest = {
        "models": predictor.models,
        "cards": {"maths": {"family": "fam", "params_b": 7.0}},
        "predictor": predictor.settings(),
        "profiles": {"balanced/number": ProfileSettings(Weights(0.5, 0.5, 0), 2, 0.3, 0.8).to_json()},
    }
    directory = artifacts.save(ARTIFACT_KIND, predictor.to_arrays(), manifest, tmp_path)
    router = load_router(tmp_path)
    assert router.predictor is not None and router.predictor.models == ["maths", "prose"]
    assert router.settings("balanced", "number").cascade_size == 2
    assert router.settings("balanced", "open") == router.profiles["balanced"]
    (directory / "arrays.npz").write_bytes(b"corrupt")
    with pytest.raises(Exception):  # noqa: B017 - numpy's error for a bad archive
        load_router(tmp_path)
    with pytest.raises(FailedPrecondition, match="constellation train router"):
        load_router(tmp_path / "nothing-here")


def member(model: str, answer: str | None, reliability: float = 0.9) -> CallResult:
    return CallResult(model, reliability, answer=answer)


def test_a_vote_settles_once_the_leader_cannot_be_overtaken() -> None:
    plan = PlanMade("vote", [PlannedModel(m) for m in "abc"], "", quorum=0)
    assert settled(plan, [member("a", "4")], [member("b", None), member("c", None)], True) is None
    two = [member("a", "4"), member("b", "4")]
    assert settled(plan, two, [member("c", None)], True) is True
    split = [member("a", "4"), member("b", "5")]
    assert settled(plan, split, [member("c", None)], True) is None
    assert settled(plan, split, [], True) is True


def test_a_cascade_escalates_on_the_first_disagreement() -> None:
    plan = PlanMade("cascade", [PlannedModel("a"), PlannedModel("b"), PlannedModel("s", wave=1)], "")
    assert settled(plan, [member("a", "4")], [member("b", None)], False) is None
    assert settled(plan, [member("a", "4"), member("b", "4")], [], False) is True
    assert settled(plan, [member("a", "4"), member("b", "5")], [], False) is False
    assert settled(plan, [member("a", None)], [member("b", None)], False) is False


def test_an_anchor_margin_keeps_the_steadier_model_unless_the_gain_is_clear() -> None:
    pool = [PoolModel("steady", 1, 1), PoolModel("lucky", 1, 1)]
    preds = {
        "steady": Prediction(0.80, 10, 100, "knn", anchor=0.85),
        "lucky": Prediction(0.82, 10, 100, "knn", anchor=0.70),
    }
    plain = Router(None, {"quality": ProfileSettings(Weights(1, 0, 0))})
    assert plain.route(pool, profile="quality", predictions=preds).members[0].model == "lucky"
    anchored = Router(None, {"quality": ProfileSettings(Weights(1, 0, 0), anchor_margin=0.05)})
    assert anchored.route(pool, profile="quality", predictions=preds).members[0].model == "steady"
    preds["lucky"] = Prediction(0.95, 10, 100, "knn", anchor=0.70)
    assert anchored.route(pool, profile="quality", predictions=preds).members[0].model == "lucky"


def test_a_static_profile_asks_the_model_with_the_best_pool_record_whatever_the_neighbours_say() -> None:
    pool = [PoolModel("steady", 1, 1), PoolModel("lucky", 1, 1), PoolModel("unknown", 0.1, 0.1)]
    preds = {
        "steady": Prediction(0.60, 10, 100, "knn", pool_mean=0.85),
        "lucky": Prediction(0.95, 10, 100, "knn", pool_mean=0.70),
        "unknown": Prediction(0.99, 0, None, "prior"),
    }
    router = Router(None, {"quality": ProfileSettings(Weights(1, 0, 0), static=True)})
    route = router.route(pool, profile="quality", predictions=preds)
    assert route.policy == "single" and [m.model for m in route.members] == ["steady"]
    assert "best train record" in route.members[0].reason
    # per-request weights are not a profile: they score every candidate as usual
    custom = router.route(pool, profile="quality", weights=Weights(1, 0, 0), predictions=preds)
    assert custom.members[0].model == "unknown"
    # nothing recorded for the pool: the static choice does not apply and the score decides
    bare = {m: Prediction(p.quality, p.observations, p.output_tokens, p.source) for m, p in preds.items()}
    assert router.route(pool, profile="quality", predictions=bare).members[0].model == "unknown"


def test_the_pool_mean_is_the_models_record_over_the_querys_pool_leaving_the_query_out() -> None:
    predictor = two_topics()  # maths right on the 30 x prompts, prose right on the 30 y prompts
    sims = predictor.embeddings[:2] @ predictor.embeddings.T
    pool_mean = predictor.raw_batch(sims)[4]
    assert pool_mean[0] == pytest.approx([0.5, 0.5])
    loo = predictor.raw_batch(sims, exclude=np.array([0, -1]))[4]
    assert loo[0] == pytest.approx([29 / 59, 30 / 59]) and loo[1] == pytest.approx([0.5, 0.5])
    assert predictor.predict(predictor.embeddings[0], ["maths", "prose"])["maths"].pool_mean == pytest.approx(0.5)


def test_static_survives_the_profile_json_round_trip() -> None:
    settings = ProfileSettings(Weights(1, 0, 0), static=True)
    assert ProfileSettings.from_json(settings.to_json()) == settings
    assert not ProfileSettings.from_json({"weights": {"quality": 1, "cost": 0, "latency": 0}}).static


def test_settings_follow_the_kind_of_the_recorded_pool_the_query_lands_in() -> None:
    """A query near an `open` pool's prompts gets the `open` settings, whatever kind the classifier reads."""
    pool = [PoolModel("steady", 1, 1), PoolModel("lucky", 1, 1)]
    preds = {
        "steady": Prediction(0.60, 10, 100, "knn", pool_mean=0.85, pool_kind="open"),
        "lucky": Prediction(0.95, 10, 100, "knn", pool_mean=0.70, pool_kind="open"),
    }
    router = Router(
        None,
        {
            "quality/open": ProfileSettings(Weights(1, 0, 0), static=True),
            "quality/code": ProfileSettings(Weights(1, 0, 0)),
        },
    )
    assert router.route(pool, profile="quality", answer_kind="code", predictions=preds).members[0].model == "steady"
    unknown = {m: Prediction(p.quality, 10, 100, "knn", pool_mean=p.pool_mean) for m, p in preds.items()}
    assert router.route(pool, profile="quality", answer_kind="code", predictions=unknown).members[0].model == "lucky"


def test_the_predictor_names_the_kind_of_the_pool_a_query_lands_in() -> None:
    base = two_topics()
    groups = np.array([0] * 30 + [1] * 30)
    predictor = QualityPredictor(
        base.embeddings,
        base.quality,
        base.output_tokens,
        base.models,
        k=5,
        groups=groups,
        group_kinds=["number", "open"],
    )
    assert predictor.predict(unit([0.0, 1.0, 0.05]), base.models)["maths"].pool_kind == "open"
    assert predictor.predict(unit([1.0, 0.0, 0.05]), base.models)["prose"].pool_kind == "number"
    assert base.predict(unit([1.0, 0.0, 0.05]), base.models)["prose"].pool_kind is None


def test_a_ranked_fan_out_asks_the_cheap_models_with_the_best_records_for_answers_that_cannot_be_voted_on() -> None:
    pool = [
        PoolModel("strong", 10.0, 10.0),
        PoolModel("good-cheap", 0.5, 0.5),
        PoolModel("fair-cheap", 0.4, 0.4),
        PoolModel("poor-cheap", 0.1, 0.1),
        PoolModel("pricey", 5.0, 5.0),
    ]
    records = {"strong": 0.70, "good-cheap": 0.66, "fair-cheap": 0.60, "poor-cheap": 0.35, "pricey": 0.64}
    preds = {m: Prediction(q, 10, 100, "knn", pool_mean=q) for m, q in records.items()}
    router = Router(None, {"balanced/code": ProfileSettings(Weights(0.9, 0.1, 0.0), rank_size=2)})
    route = router.route(pool, profile="balanced", answer_kind="code", predictions=preds)
    assert route.policy == "rank" and [m.model for m in route.members] == ["good-cheap", "fair-cheap"]
    assert all("ranked fan-out" in m.reason for m in route.members)
    # closed answers are voted or cascaded, never ranked; per-request weights plan one model
    assert router.route(pool, profile="balanced", answer_kind="number", predictions=preds).policy == "single"
    custom = router.route(pool, profile="balanced", answer_kind="code", weights=Weights(1, 0, 0), predictions=preds)
    assert custom.policy == "single"
    # no ranking service to pick the answer: one model
    alone = router.route(pool, profile="balanced", answer_kind="code", predictions=preds, ranking=False)
    assert alone.policy == "single"
    # too few models under the cost ratio: one model instead
    wide = Router(None, {"balanced/code": ProfileSettings(Weights(0.9, 0.1, 0.0), rank_size=4)})
    assert wide.route(pool, profile="balanced", answer_kind="code", predictions=preds).policy == "single"


def test_training_simulates_a_ranked_fan_out_with_the_pickers_choice_and_every_members_cost() -> None:
    from constellation.pools import PoolRecord, Response
    from services.dispatch.router_train import PoolData, simulate

    def response(quality: float, cost: float) -> Response:
        return Response(f"q{quality}", None, None, quality, 10, 10, cost)

    record = PoolRecord(
        id="c/0", task="code", split="train", prompt="Write a function.", reference=None, answer_kind="code",
        responses={"strong": response(0.7, 1.0), "good-cheap": response(0.0, 0.01), "fair-cheap": response(1.0, 0.02)},
    )  # fmt: skip
    pool = PoolData("c", Path("c.jsonl.gz"), [record], np.arange(1))
    models = [PoolModel("strong", 10, 10), PoolModel("good-cheap", 0.5, 0.5), PoolModel("fair-cheap", 0.4, 0.4)]
    preds = [{"strong": Prediction(0.7, 10, 100, "knn", pool_mean=0.7),
              "good-cheap": Prediction(0.6, 10, 100, "knn", pool_mean=0.6),
              "fair-cheap": Prediction(0.5, 10, 100, "knn", pool_mean=0.5)}]  # fmt: skip
    router = Router(None, {"balanced/code": ProfileSettings(Weights(1, 0, 0), rank_size=2)})
    picked = simulate(router, "balanced", pool, models, preds, [0], pick=lambda rec, names: names[-1])
    assert picked == pytest.approx((1.0, 0.03))
    first = simulate(router, "balanced", pool, models, preds, [0])
    assert first == pytest.approx((0.0, 0.03))


def test_the_plan_message_says_which_costs_are_estimated() -> None:
    from services.dispatch.servicer import plan_message

    pool = [PoolModel("cheap", 0.1, 0.1), PoolModel("unpriced")]
    route = Router(None).route(pool, profile="cost", predictions=fixed({"cheap": 0.9, "unpriced": 0.9}))
    event = PlanMade(route.policy, route.members, route.summary, route.candidates, route.profile)
    flags = {c.model: c.cost_estimated for c in plan_message(event).candidates}
    assert flags == {"cheap": False, "unpriced": True}
