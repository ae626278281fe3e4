"""The routing policy: predicted quality, cost and latency per model, a normalised score, and a plan.

Plain Python and numpy (no gRPC). Three parts:

- :class:`QualityPredictor`: the probability that a model answers a query well, from the query
  embedding (all-MiniLM-L6-v2, as the classifier returns it). Similarity-weighted k nearest neighbours
  over the ``train`` prompts of the recorded pools, shrunk towards the model's record in a wider
  neighbourhood, then calibrated (isotonic regression fitted on leave-one-out predictions). A model
  with no recorded answers gets a prior from the models of its family and size in the neighbourhood.
- :func:`score_candidates`: the normalised multi-objective score of Pick and Spin: quality, cost and
  latency each scaled to [0, 1] over the candidates (cost and latency on a log scale, so a model ten
  times dearer is as far from the cheapest as one ten times dearer than that), then weighted.
- :class:`Router`: turns a query, the pool (prices, live latency, health, capabilities), a profile or
  weights and hard ceilings into a :class:`Route`: the models to ask, in waves, with every
  candidate's score and the reason it was or was not chosen. For closed answers (number, choice) a
  profile may plan a *cascade*: a wave of cheap models that must agree, and the strongest model asked
  only when they do not. The profiles' weights and cascade settings are learned on ``train``.

Thread-safety: a :class:`Router` is immutable after construction and safe to share between requests.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition

ARTIFACT_KIND = "router"
TRAIN_COMMAND = "constellation train router"
PROFILES = ("quality", "cost", "speed", "balanced")
CLOSED_KINDS = ("number", "choice")
DEFAULT_INPUT_TOKENS = 200
DEFAULT_OUTPUT_TOKENS = 256


class Waved(Protocol):
    @property
    def wave(self) -> int: ...


W = TypeVar("W", bound=Waved)


def waves_of(members: Sequence[W]) -> list[list[W]]:
    """``members`` grouped by their ``wave`` (0 first), keeping their order within a wave."""
    grouped: dict[int, list[W]] = {}
    for member in members:
        grouped.setdefault(member.wave, []).append(member)
    return [grouped[w] for w in sorted(grouped)]


def estimate_tokens(text: str) -> int:
    """A prompt's length in tokens, estimated from its characters (about 4 per token); at least 1."""
    return max(1, len(text) // 4)


@dataclass(frozen=True)
class Weights:
    """Relative weights of quality, cost and latency (normalised to sum to 1 when used)."""

    quality: float
    cost: float
    latency: float

    def normalised(self) -> Weights:
        total = self.quality + self.cost + self.latency
        if total <= 0:
            return Weights(1.0, 0.0, 0.0)
        return Weights(self.quality / total, self.cost / total, self.latency / total)

    def to_json(self) -> dict[str, float]:
        return {"quality": self.quality, "cost": self.cost, "latency": self.latency}


@dataclass(frozen=True)
class ProfileSettings:
    """How a profile routes.

    Attributes:
        weights: The score's weights.
        cascade_size: For closed answers, how many cheap models form the first wave (0: no cascade).
        cascade_cost_ratio: A first-wave model must be predicted to cost at most this fraction of the
            strongest model's cost.
        cascade_min_quality: Every first-wave model must have at least this predicted quality, or no
            cascade is planned (cheap models that are often wrong agree on wrong answers too).
        vote_size: For closed answers, ask this many of the best-scoring models at once and vote (1: one
            model). Used when no cascade applies.
        escalate_size: How many of the strongest models the cascade's second wave asks (and votes over).
        quorum: Agreeing answers that end a vote early (0: a majority of the voters). Either way a vote
            also ends once its leader cannot be overtaken by the members still running.
        anchor_margin: Leaving the model with the best record over the wider neighbourhood (the anchor)
            for another costs this much predicted quality: near neighbours must show a clear gain first.
        static: Ask the one model with the best train record over the query's whole pool, whatever the
            neighbours say (training keeps it when no per-query choice beats it on train).
        rank_size: For answers that cannot be voted on (code, open text): ask this many cheap models at
            once (the best train records among those costing at most ``cascade_cost_ratio`` times the
            strongest model) and keep the answer the ranking service puts first (0: no ranked fan-out).
    """

    weights: Weights
    cascade_size: int = 0
    cascade_cost_ratio: float = 0.25
    cascade_min_quality: float = 0.0
    vote_size: int = 1
    escalate_size: int = 1
    anchor_margin: float = 0.0
    quorum: int = 0
    static: bool = False
    rank_size: int = 0
    objective: str = ""
    quality_margin: float = 0.0
    top_vote: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "weights": self.weights.to_json(),
            "cascade_size": self.cascade_size,
            "cascade_cost_ratio": self.cascade_cost_ratio,
            "cascade_min_quality": self.cascade_min_quality,
            "vote_size": self.vote_size,
            "escalate_size": self.escalate_size,
            "anchor_margin": self.anchor_margin,
            "quorum": self.quorum,
            "static": self.static,
            "rank_size": self.rank_size,
            "objective": self.objective,
            "quality_margin": self.quality_margin,
            "top_vote": self.top_vote,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ProfileSettings:
        return cls(
            Weights(**raw["weights"]),
            int(raw.get("cascade_size", 0)),
            float(raw.get("cascade_cost_ratio", 0.25)),
            float(raw.get("cascade_min_quality", 0.0)),
            int(raw.get("vote_size", 1)),
            int(raw.get("escalate_size", 1)),
            float(raw.get("anchor_margin", 0.0)),
            int(raw.get("quorum", 0)),
            bool(raw.get("static", False)),
            int(raw.get("rank_size", 0)),
            str(raw.get("objective", "")),
            float(raw.get("quality_margin", 0.0)),
            int(raw.get("top_vote", 0)),
        )


DEFAULT_PROFILES: dict[str, ProfileSettings] = {
    "quality": ProfileSettings(Weights(1.0, 0.0, 0.0)),
    "balanced": ProfileSettings(Weights(0.7, 0.2, 0.1)),
    "cost": ProfileSettings(Weights(0.3, 0.7, 0.0), objective="cost", quality_margin=0.05),
    "speed": ProfileSettings(Weights(0.3, 0.0, 0.7), objective="latency", quality_margin=0.05),
}
"""Used when no trained router artifact is loaded (training writes them into the artifact and learns
``balanced`` and ``quality`` per answer kind). ``cost`` and ``speed`` keep their meaning: the cheapest
(fastest) model predicted within 5 points of the best predicted quality."""

UNTRAINED_PROFILES: dict[str, ProfileSettings] = {"quality": ProfileSettings(Weights(1.0, 0.0, 0.0), vote_size=2)}
"""Overrides of the untrained router (no artifact): with no record of any model, the quality profile asks
the two best-scoring models of a closed-answer query at once and votes rather than trusting one."""


@dataclass(frozen=True)
class Prediction:
    """What the predictor expects of one model on one query.

    Attributes:
        quality: Calibrated probability of a good answer, in [0, 1].
        observations: Similarity-weighted number of recorded answers behind it (0 for a prior).
        output_tokens: Expected answer length in tokens, or None when nothing was recorded.
        source: ``knn`` (recorded neighbours), ``prior`` (family/size) or ``mean`` (no embedding).
        anchor: The model's calibrated record over the wider neighbourhood (a steadier estimate); None
            when not known.
        pool_mean: The model's mean recorded quality over every train prompt of the query's pool (what
            a static choice goes by); None when not known.
        pool_kind: The answer kind of the recorded pool the query's neighbours come from (the kind whose
            learned settings fit it); None when the artifact does not say.
    """

    quality: float
    observations: float
    output_tokens: float | None
    source: str
    anchor: float | None = None
    pool_mean: float | None = None
    pool_kind: str | None = None


def brier(p: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((p - y) ** 2)) if len(p) else math.nan


class QualityPredictor:
    """Per-model answer quality from the nearest recorded train prompts.

    Args:
        embeddings: ``float32 [n, d]`` unit vectors of the train prompts.
        quality: ``float32 [n, m]`` recorded quality (score) of each model on each prompt; NaN where the
            model did not answer that prompt (pools have different model sets).
        output_tokens: ``float32 [n, m]`` recorded output tokens; NaN where unknown.
        models: The ``m`` model names.
        cards: model -> (family, params_b) for priors; may cover models with no recorded answers.
        k: Neighbours of the narrow estimate.
        wide_k: Neighbours of the wide estimate the narrow one is shrunk towards.
        alpha: Strength of that shrinkage, in similarity-weighted observations.
        power: Similarities are raised to this power before weighting (sharper near neighbours).
        calibration: Isotonic knots ``(xs, ys)`` mapping raw estimates to probabilities; None: identity.
        groups: ``int [n]`` the pool each train prompt came from. Scores of different pools are not on
            one scale (a judge's preference share is not an exact-match rate), so a query's estimates
            use only the pool its ``k`` nearest prompts mostly come from. None: one pool.
        group_kinds: The answer kind of each pool in ``groups``; None: not known.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        quality: np.ndarray,
        output_tokens: np.ndarray,
        models: Sequence[str],
        cards: Mapping[str, tuple[str | None, float | None]] | None = None,
        *,
        k: int = 10,
        wide_k: int = 200,
        alpha: float = 2.0,
        power: float = 4.0,
        calibration: tuple[np.ndarray, np.ndarray] | None = None,
        groups: np.ndarray | None = None,
        group_kinds: Sequence[str] | None = None,
    ):
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        self.quality = np.asarray(quality, dtype=np.float32)
        self.output_tokens = np.asarray(output_tokens, dtype=np.float32)
        self.models = list(models)
        self.index = {m: i for i, m in enumerate(self.models)}
        self.cards = dict(cards or {})
        self.k = min(k, len(self.embeddings))
        self.wide_k = min(max(wide_k, self.k), len(self.embeddings))
        self.alpha = alpha
        self.power = power
        self.calibration = calibration
        self.groups = np.zeros(len(self.embeddings), dtype=np.int32) if groups is None else np.asarray(groups, np.int32)
        self.group_kinds = list(group_kinds) if group_kinds is not None else None
        present = ~np.isnan(self.quality)
        self.group_models = np.stack([present[self.groups == g].any(0) for g in range(int(self.groups.max()) + 1)])
        self.global_mean = np.where(present.any(0), np.nansum(self.quality, 0) / np.maximum(present.sum(0), 1), np.nan)
        filled = np.nan_to_num(self.quality)
        self.group_sum = np.stack([filled[self.groups == g].sum(0) for g in range(len(self.group_models))])
        self.group_count = np.stack([present[self.groups == g].sum(0) for g in range(len(self.group_models))])

    def calibrate(self, raw: np.ndarray) -> np.ndarray:
        if self.calibration is None:
            return np.clip(raw, 0.0, 1.0)
        xs, ys = self.calibration
        # Isotonic steps are flat; a vanishing slope keeps the raw order within a step, so two models
        # on one step are told apart by their estimates rather than tied.
        return np.clip(np.interp(raw, xs, ys) + 1e-6 * (raw - 0.5), 0.0, 1.0)

    def raw_batch(
        self, sims: np.ndarray, exclude: np.ndarray | None = None, models: Sequence[str] | None = None
    ) -> tuple[np.ndarray, ...]:
        """Uncalibrated estimates for a batch of queries.

        Args:
            sims: ``[b, n]`` cosine similarities of each query to every train prompt.
            exclude: Optional ``[b]`` train row to leave out per query (leave-one-out), or -1.
            models: The models that will be scored: only pools recording the most of them are used.

        Returns:
            ``(raw quality [b, m], observations [b, m], output tokens [b, m], wide mean [b, m], pool mean
            [b, m], pool [b])``; NaN where no neighbour in the wide neighbourhood (for the pool mean: no
            prompt of the query's pool, the excluded row left out) has the model.
        """
        sims = np.array(sims, dtype=np.float32, copy=True)
        if exclude is not None:
            rows = np.nonzero(exclude >= 0)[0]
            sims[rows, exclude[rows]] = -np.inf
        group = np.zeros(len(sims), dtype=np.int64)
        if self.groups.max(initial=0) > 0:
            if models:
                columns = [self.index[m] for m in models if m in self.index]
                coverage = self.group_models[:, columns].sum(1) if columns else np.zeros(len(self.group_models))
                sims[:, coverage[self.groups] < coverage.max()] = -np.inf
            nearest = np.argpartition(-sims, self.k - 1, axis=1)[:, : self.k]
            votes = self.groups[nearest]
            group = np.array([np.bincount(row).argmax() for row in votes])
            sims[self.groups[None, :] != group[:, None]] = -np.inf
        wide = np.argpartition(-sims, self.wide_k - 1, axis=1)[:, : self.wide_k]
        order = np.argsort(-np.take_along_axis(sims, wide, 1), axis=1)
        wide = np.take_along_axis(wide, order, 1)
        narrow = wide[:, : self.k]
        q_wide = self.quality[wide]  # [b, K, m]
        wide_sims = np.take_along_axis(sims, wide, 1)
        q_wide = np.where(np.isfinite(wide_sims)[:, :, None], q_wide, np.nan)  # rows of other pools
        mask_wide = ~np.isnan(q_wide)
        count_wide = mask_wide.sum(1)
        prior = np.where(count_wide > 0, np.nansum(q_wide, 1) / np.maximum(count_wide, 1), np.nan)
        weights = np.maximum(np.take_along_axis(sims, narrow, 1), 0.0) ** self.power  # [b, k]
        q_narrow = self.quality[narrow]
        mask = ~np.isnan(q_narrow)
        w = weights[:, :, None] * mask
        wsum = w.sum(1)
        qsum = (w * np.nan_to_num(q_narrow)).sum(1)
        raw = (qsum + self.alpha * np.nan_to_num(prior)) / (wsum + self.alpha)
        raw = np.where(np.isnan(prior), np.nan, raw)
        tokens_wide = np.where(np.isfinite(wide_sims)[:, :, None], self.output_tokens[wide], np.nan)
        token_mask = ~np.isnan(tokens_wide)
        narrow_mask = token_mask[:, : self.k]
        narrow_mean = np.nansum(tokens_wide[:, : self.k], 1) / np.maximum(narrow_mask.sum(1), 1)
        wide_mean = np.nansum(tokens_wide, 1) / np.maximum(token_mask.sum(1), 1)
        tokens = np.where(narrow_mask.any(1), narrow_mean, wide_mean)  # 0 where nothing was recorded
        pool_sum, pool_count = self.group_sum[group].astype(np.float64), self.group_count[group].astype(np.float64)
        if exclude is not None:
            rows = np.nonzero(exclude >= 0)[0]
            own = self.quality[exclude[rows]]
            pool_sum[rows] -= np.nan_to_num(own)
            pool_count[rows] -= ~np.isnan(own)
        pool_mean = np.where(pool_count > 0, pool_sum / np.maximum(pool_count, 1), np.nan)
        return raw, wsum, tokens, prior, pool_mean, group

    def predict(self, embedding: np.ndarray | None, models: Sequence[str]) -> dict[str, Prediction]:
        """Predictions for ``models`` on one query. Takes well under a millisecond for a few thousand rows.

        Without an embedding (no classifier), each model's mean over all train prompts is used.
        """
        out: dict[str, Prediction] = {}
        if embedding is None or not len(embedding):
            for model in models:
                i = self.index.get(model)
                mean = float(self.global_mean[i]) if i is not None else math.nan
                if math.isnan(mean):
                    out[model] = Prediction(0.5, 0.0, None, "prior")
                else:
                    calibrated_mean = float(self.calibrate(np.array([mean]))[0])
                    out[model] = Prediction(calibrated_mean, 0.0, None, "mean", pool_mean=mean)
            return out
        vector = np.asarray(embedding, dtype=np.float32)
        norm = float(np.linalg.norm(vector))
        if norm > 0:
            vector = vector / norm
        sims = (self.embeddings @ vector)[None, :]
        raw, obs, tokens, wide, pool_mean, group = (a[0] for a in self.raw_batch(sims, models=models))
        pool_kind = self.group_kinds[int(group)] if self.group_kinds else None
        calibrated = self.calibrate(np.nan_to_num(raw))
        anchors = self.calibrate(np.nan_to_num(wide))
        known: dict[str, float] = {}
        for model in models:
            i = self.index.get(model)
            if i is not None and not np.isnan(raw[i]):
                known[model] = float(calibrated[i])
                out[model] = Prediction(
                    float(calibrated[i]),
                    float(obs[i]),
                    float(tokens[i]) if tokens[i] > 0 else None,
                    "knn",
                    float(anchors[i]),
                    None if np.isnan(pool_mean[i]) else float(pool_mean[i]),
                    pool_kind,
                )
        for model in models:
            if model not in out:
                out[model] = Prediction(self.prior(model, known), 0.0, None, "prior")
        return out

    def prior(self, model: str, neighbours: Mapping[str, float]) -> float:
        """A quality guess for a model with no recorded answers near this query.

        The mean of the same family's models among ``neighbours`` when there are any, else a
        least-squares line of quality against log(parameters) over the neighbours with a known size,
        else the neighbours' mean; 0.5 when there is nothing at all.
        """
        if not neighbours:
            return 0.5
        family, size = self.cards.get(model, (None, None))
        same = [q for m, q in neighbours.items() if family and self.cards.get(m, (None, None))[0] == family]
        if same:
            return float(np.clip(np.mean(same), 0.0, 1.0))
        sized = [(math.log(s), q) for m, q in neighbours.items() if (s := self.cards.get(m, (None, None))[1])]
        if size and len(sized) >= 3:
            x = np.array([p[0] for p in sized])
            y = np.array([p[1] for p in sized])
            if np.ptp(x) > 0:
                slope, intercept = np.polyfit(x, y, 1)
                return float(np.clip(intercept + slope * math.log(size), 0.0, 1.0))
        return float(np.mean(list(neighbours.values())))

    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "embeddings": self.embeddings.astype(np.float16),
            "quality": self.quality,
            "output_tokens": self.output_tokens,
            "groups": self.groups,
        }
        if self.calibration is not None:
            arrays["calibration_x"], arrays["calibration_y"] = self.calibration
        return arrays

    def settings(self) -> dict[str, Any]:
        return {"k": self.k, "wide_k": self.wide_k, "alpha": self.alpha, "power": self.power}


@dataclass(frozen=True)
class PoolModel:
    """What routing knows of one model of the pool.

    Attributes:
        name: Model name as callers and the catalog know it.
        price_in_per_mtok: USD per million input tokens.
        price_out_per_mtok: USD per million output tokens.
        family: Model family (for priors), when known.
        params_b: Parameters in billions, when known.
        capabilities: What it can do (for ``Ceilings.required_capabilities``); empty: unknown, so any.
        ttft_ms: Expected time to first token, ms (live p50 from the registry, else a size prior).
        per_token_ms: Expected decoding time per output token, ms.
        healthy: False when the registry marks it unhealthy: routing skips it.
        live: True when the latency figures come from live statistics rather than a prior.
        cold_start_ms: Expected wait before the model can serve: 0 when warm, its (measured or prior) load
            time when scaled to zero, what is left of the load while loading. Added to its predicted latency.
        priced: Whether the prices are recorded; None: recorded when either price is above 0 (a
            catalog that leaves both at 0 does not know them). An unpriced model is planned with a
            price estimated from its peers (:func:`estimate_prices`), never as free.
    """

    name: str
    price_in_per_mtok: float = 0.0
    price_out_per_mtok: float = 0.0
    family: str | None = None
    params_b: float | None = None
    capabilities: frozenset[str] = frozenset()
    ttft_ms: float | None = None
    per_token_ms: float | None = None
    healthy: bool = True
    live: bool = False
    cold_start_ms: float = 0.0
    priced: bool | None = None

    @property
    def has_price(self) -> bool:
        """Whether the model's prices are recorded (see ``priced``)."""
        if self.priced is not None:
            return self.priced
        return self.price_in_per_mtok > 0 or self.price_out_per_mtok > 0


def _median_prices(models: Sequence[PoolModel]) -> tuple[float, float]:
    return (
        float(np.median([m.price_in_per_mtok for m in models])),
        float(np.median([m.price_out_per_mtok for m in models])),
    )


def _size_fit(model: PoolModel, peers: Sequence[PoolModel]) -> tuple[float, float] | None:
    """Prices read off a least-squares line of log price against log size over ``peers``; None if it cannot."""
    sized = [p for p in peers if p.params_b and p.params_b > 0]
    if not model.params_b or model.params_b <= 0 or len(sized) < 3:
        return None
    x = np.log([p.params_b or 1.0 for p in sized])
    if np.ptp(x) <= 0:
        return None
    out = []
    for prices in ([p.price_in_per_mtok for p in sized], [p.price_out_per_mtok for p in sized]):
        y = np.log(np.maximum(prices, 1e-6))
        slope, intercept = np.polyfit(x, y, 1)
        out.append(float(np.exp(intercept + slope * math.log(model.params_b))))
    return out[0], out[1]


def estimate_prices(pool: Sequence[PoolModel]) -> dict[str, tuple[float, float, str]]:
    """An estimated (price in, price out, how) per million tokens for every unpriced model of ``pool``.

    From its peers' recorded prices: the median of its family's, else a log-log line of price against
    size (three sized peers at least), else the median of every priced peer. With no priced peer at
    all nothing can be estimated and the model keeps its 0 (every model is then equally unknown).
    """
    priced = [m for m in pool if m.has_price]
    out: dict[str, tuple[float, float, str]] = {}
    if not priced:
        return out
    for model in pool:
        if model.has_price:
            continue
        family = [p for p in priced if model.family and p.family == model.family]
        if family:
            out[model.name] = (*_median_prices(family), f"median of family {model.family}")
        elif (fit := _size_fit(model, priced)) is not None:
            out[model.name] = (*fit, f"priced peers' size trend at {model.params_b:g}B")
        else:
            out[model.name] = (*_median_prices(priced), f"median of {len(priced)} priced peers")
    return out


def latency_prior(params_b: float | None) -> tuple[float, float]:
    """(time to first token ms, per-token ms) assumed for a model with no live statistics, from its size."""
    size = params_b if params_b and params_b > 0 else 70.0
    return 120.0 + 3.0 * size**0.75, 8.0 + 1.2 * size**0.6


@dataclass
class PlannedModel:
    """One model of a plan: its predictions, score, whether it is asked (in which wave) and why.

    The router fills every field; a plan made without routing (a requested or default model) names the
    model and the reason only.
    """

    model: str
    quality: float = 0.0
    """Predicted probability that the model answers this query well."""
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    output_tokens: float = 0.0
    observations: float = 0.0
    source: str = ""
    score: float = 0.0
    chosen: bool = False
    wave: int = 0
    reason: str = ""
    eligible: bool = True
    """False when health, capabilities or a ceiling left the model out."""
    cost_estimated: bool = False
    """True when no price is recorded for the model: ``cost_usd`` uses a price estimated from its peers."""


@dataclass
class Route:
    """A plan: who is asked, in which wave, and why.

    Attributes:
        policy: ``single`` (one model), ``vote`` (several at once, answers voted), ``cascade`` (cheap
            wave first, escalate on disagreement), ``rank`` (several at once, the ranking service picks
            one answer) or ``requested`` (the caller named the model).
        profile: The profile name, or ``custom`` for per-request weights.
        members: Chosen models in order of asking: wave 0 first.
        candidates: Every model considered, best score first.
        quorum: Agreeing answers that end a wave early; 0 waits for the whole wave.
        summary: One line for people.
    """

    policy: str
    profile: str
    members: list[PlannedModel]
    candidates: list[PlannedModel]
    quorum: int = 0
    summary: str = ""

    def waves(self) -> list[list[PlannedModel]]:
        return waves_of(self.members)


def _unit(values: np.ndarray, *, log: bool) -> np.ndarray:
    """Min-max scaling to [0, 1] over the candidates (on log scale when ``log``); all equal -> 0."""
    v = np.log(np.maximum(values, 1e-9)) if log else values
    span = float(v.max() - v.min()) if len(v) else 0.0
    return (v - v.min()) / span if span > 1e-12 else np.zeros_like(v)


def score_candidates(candidates: Sequence[PlannedModel], weights: Weights) -> None:
    """Sets ``score`` on each candidate: w_q * q + w_c * (1 - c) + w_l * (1 - l), each term scaled to [0, 1]."""
    if not candidates:
        return
    w = weights.normalised()
    quality = _unit(np.array([c.quality for c in candidates]), log=False)
    cost = _unit(np.array([c.cost_usd for c in candidates]), log=True)
    latency = _unit(np.array([c.latency_ms for c in candidates]), log=True)
    scores = w.quality * quality + w.cost * (1 - cost) + w.latency * (1 - latency)
    for candidate, score in zip(candidates, scores, strict=True):
        candidate.score = float(score)


@dataclass(frozen=True)
class _Ceilings:
    """A request's hard limits on predicted cost and latency (0: none), its required capabilities, and its
    deadline (0: none), which leaves out a cold model whose load would not finish in time."""

    max_cost_usd: float
    max_latency_ms: float
    required: frozenset[str]
    deadline_ms: float = 0.0

    def leaves_out(self, model: PoolModel, candidate: PlannedModel) -> str:
        """Why ``model`` cannot take the request (health first, then capabilities, cost, latency); empty if it can."""
        if not model.healthy:
            return "left out: unhealthy (registry)"
        if self.required and model.capabilities and not self.required <= model.capabilities:
            return f"left out: lacks {', '.join(sorted(self.required - model.capabilities))}"
        if self.max_cost_usd and candidate.cost_usd > self.max_cost_usd:
            return f"left out: predicted ${candidate.cost_usd:.6f} > max_cost_usd ${self.max_cost_usd:.6f}"
        cold = f" (cold start {model.cold_start_ms:.0f} ms)" if model.cold_start_ms > 0 else ""
        if self.max_latency_ms and candidate.latency_ms > self.max_latency_ms:
            return f"left out: predicted {candidate.latency_ms:.0f} ms{cold} > max_latency_ms"
        if cold and self.deadline_ms and candidate.latency_ms > self.deadline_ms:
            return f"{COLD_LEFT_OUT}: predicted {candidate.latency_ms:.0f} ms{cold} > the deadline"
        return ""


COLD_LEFT_OUT = "left out: cold"
"""How the reason of a cold model left out for the deadline begins (it is taken back when nothing warm can
answer: a late answer beats none)."""


def _predicted(
    model: PoolModel,
    prediction: Prediction,
    input_tokens: int,
    fallback_tokens: float,
    estimate: tuple[float, float, str] | None = None,
) -> PlannedModel:
    """``model`` as a candidate: predicted quality, cost (``estimate``d prices when given) and latency."""
    tokens = prediction.output_tokens or fallback_tokens
    price_in, price_out = model.price_in_per_mtok, model.price_out_per_mtok
    if estimate is not None:
        price_in, price_out = estimate[0], estimate[1]
    cost = (input_tokens * price_in + tokens * price_out) / 1e6
    ttft, per_token = model.ttft_ms, model.per_token_ms
    if ttft is None or per_token is None:
        prior_ttft, prior_per_token = latency_prior(model.params_b)
        ttft = prior_ttft if ttft is None else ttft
        per_token = prior_per_token if per_token is None else per_token
    return PlannedModel(
        model.name,
        prediction.quality,
        cost,
        model.cold_start_ms + ttft + per_token * tokens,
        tokens,
        prediction.observations,
        prediction.source,
        cost_estimated=estimate is not None,
    )


def _anchor(scored: list[PlannedModel], preds: Mapping[str, Prediction], margin: float) -> None:
    """Lowers every candidate but the anchor (the best known anchor record) by ``margin`` of quality."""
    known = [c for c in scored if preds[c.model].anchor is not None]
    if not known:
        return
    anchor = max(known, key=lambda c: (preds[c.model].anchor or 0.0, -c.cost_usd))
    for c in scored:
        if c is not anchor:
            c.quality = max(0.0, c.quality - margin)


def _only_cold_left(left_out: list[PlannedModel]) -> list[PlannedModel]:
    """The cold models left out for the deadline, taken back (and removed from ``left_out``) when they are
    all that could answer: the request then waits for a load rather than fail at once."""
    cold = [c for c in left_out if c.reason.startswith(COLD_LEFT_OUT)]
    for candidate in cold:
        left_out.remove(candidate)
        candidate.eligible, candidate.reason = True, ""
    return cold


class Router:
    """Plans which models answer a query.

    Args:
        predictor: The quality predictor; None predicts 0.5 for every model (cost and latency decide).
        profiles: Settings per profile name, and per ``<profile>/<answer kind>`` where training learned
            settings for one kind of answer; missing profiles take :data:`DEFAULT_PROFILES`.
    """

    def __init__(self, predictor: QualityPredictor | None, profiles: Mapping[str, ProfileSettings] | None = None):
        self.predictor = predictor
        self.profiles = {**DEFAULT_PROFILES, **(profiles or {})}

    def settings(self, profile: str, answer_kind: str) -> ProfileSettings:
        """The profile's settings learned for this answer kind (``balanced/code``...), else its general ones."""
        return self.profiles.get(f"{profile}/{answer_kind}") or self.profiles.get(profile) or self.profiles["balanced"]

    def predictions(self, embedding: np.ndarray | None, models: Sequence[str]) -> dict[str, Prediction]:
        if self.predictor is None:
            return {m: Prediction(0.5, 0.0, None, "prior") for m in models}
        return self.predictor.predict(embedding, models)

    def route(
        self,
        pool: Sequence[PoolModel],
        *,
        embedding: np.ndarray | None = None,
        answer_kind: str = "",
        input_tokens: int = DEFAULT_INPUT_TOKENS,
        expected_output_tokens: int | None = None,
        profile: str = "balanced",
        weights: Weights | None = None,
        max_cost_usd: float = 0.0,
        max_latency_ms: float = 0.0,
        required_capabilities: Sequence[str] = (),
        predictions: Mapping[str, Prediction] | None = None,
        ranking: bool = True,
        deadline_ms: float = 0.0,
    ) -> Route:
        """Scores every model of ``pool`` and plans the request.

        Args:
            pool: The models that may be asked.
            embedding: Query embedding from the classifier, if any.
            answer_kind: ``number``, ``choice``, ``code``, ``open`` or empty when unknown.
            input_tokens: Prompt length in tokens (an estimate is fine).
            expected_output_tokens: The classifier's length estimate, used where nothing was recorded.
            profile: One of :data:`PROFILES`.
            weights: Per-request weights; override the profile's.
            max_cost_usd, max_latency_ms: Hard ceilings on predicted cost and latency (0: none).
            required_capabilities: Every chosen model must list all of these.
            predictions: Precomputed predictions (training simulates plans with leave-one-out ones).
            ranking: Whether a ranking service can pick the answer of a ranked fan-out; without one,
                none is planned.
            deadline_ms: The request's time budget (0: none). A cold model (``cold_start_ms`` > 0) whose
                predicted latency, load included, passes it is left out while another model can answer.

        Raises:
            FailedPrecondition: no model is healthy, capable and within the ceilings; the message
                says which constraint removed them.
        """
        preds = predictions if predictions is not None else self.predictions(embedding, [m.name for m in pool])
        # Settings were learned per kind of recorded pool: a query near an `open` pool's prompts gets the
        # `open` settings even when the classifier reads it as `code` (closed-answer plans still need a
        # closed answer kind from the classifier to apply).
        pool_kind = next((p.pool_kind for p in preds.values() if p.pool_kind), None)
        settings = self.settings(profile, pool_kind or answer_kind)
        ceilings = _Ceilings(max_cost_usd, max_latency_ms, frozenset(required_capabilities), deadline_ms)
        fallback_tokens = float(expected_output_tokens or DEFAULT_OUTPUT_TOKENS)
        estimates = estimate_prices(pool)
        scored: list[PlannedModel] = []
        left_out: list[PlannedModel] = []
        for model in pool:
            estimate = estimates.get(model.name)
            candidate = _predicted(model, preds[model.name], input_tokens, fallback_tokens, estimate)
            candidate.reason = ceilings.leaves_out(model, candidate)
            if candidate.reason:
                candidate.eligible = False
                left_out.append(candidate)
            else:
                scored.append(candidate)
        if not scored:
            scored = _only_cold_left(left_out)
        if settings.anchor_margin > 0:
            _anchor(scored, preds, settings.anchor_margin)
        if not scored:
            reasons = sorted({c.reason for c in left_out}) or ["the pool is empty"]
            raise FailedPrecondition(
                "no model can take this request: " + "; ".join(reasons[:4]), reason="NO_ELIGIBLE_MODEL"
            )
        score_candidates(scored, weights if weights is not None else settings.weights)
        scored.sort(key=lambda c: (-c.score, c.cost_usd, c.model))
        name = "custom" if weights is not None else profile
        route = self._choose(scored, preds, settings, answer_kind, name, custom=weights is not None, ranking=ranking)
        for candidate in scored:
            if not candidate.chosen and not candidate.reason:
                candidate.reason = f"score {candidate.score:.3f} below the chosen"
        for candidate in scored + left_out:
            if candidate.model in estimates:
                candidate.reason += f"; no recorded price, estimated ({estimates[candidate.model][2]})"
        route.profile = name
        route.candidates = scored + left_out
        return route

    def _choose(
        self,
        scored: list[PlannedModel],
        preds: Mapping[str, Prediction],
        settings: ProfileSettings,
        answer_kind: str,
        name: str,
        *,
        custom: bool,
        ranking: bool,
    ) -> Route:
        """The first plan that applies: static, cascade, vote, ranked fan-out (profiles only), else the best alone."""
        route = None
        if not custom:
            route = self._static(scored, preds, name) if settings.static else None
            route = route or self._top_vote(scored, preds, settings, answer_kind)
            route = route or self._within_margin(scored, settings, name)
            route = route or self._cascade(scored, settings, answer_kind)
            route = route or self._vote(scored, settings, answer_kind)
            if route is None and ranking:
                route = self._ranked(scored, preds, settings, answer_kind)
        if route is not None:
            return route
        best = scored[0]
        best.chosen = True
        best.reason = f"highest {name} score ({best.score:.3f}): quality {best.quality:.2f}, ${best.cost_usd:.6f}"
        return Route("single", name, [best], [], summary=f"ask {best.model} alone ({name} profile)")

    def _static(self, scored: list[PlannedModel], preds: Mapping[str, Prediction], name: str) -> Route | None:
        """The model with the best train record over the query's pool, alone; None when no record is known."""
        known = [c for c in scored if preds[c.model].pool_mean is not None]
        if not known:
            return None
        best = max(known, key=lambda c: (preds[c.model].pool_mean or 0.0, -c.cost_usd))
        best.chosen = True
        best.reason = f"best train record over this pool ({preds[best.model].pool_mean:.3f}; static {name} choice)"
        return Route("single", name, [best], [], summary=f"ask {best.model} alone (static {name} choice)")

    def _within_margin(self, scored: list[PlannedModel], settings: ProfileSettings, name: str) -> Route | None:
        """The cheapest (fastest) model within the quality margin of the best prediction; None without an objective."""
        if settings.objective not in ("cost", "latency"):
            return None
        top = max(scored, key=lambda c: (c.quality, -c.cost_usd))
        close = [c for c in scored if c.quality >= top.quality - settings.quality_margin]

        def measure(c: PlannedModel) -> float:
            return c.cost_usd if settings.objective == "cost" else c.latency_ms

        best = min(close, key=lambda c: (measure(c), -c.quality, c.model))
        word = "cheapest" if settings.objective == "cost" else "fastest"
        best.chosen = True
        best.reason = (
            f"{word} within {settings.quality_margin:.2f} of the best predicted quality "
            f"({top.quality:.2f}, {top.model}): quality {best.quality:.2f}, ${best.cost_usd:.6f}, "
            f"{best.latency_ms:.0f} ms"
        )
        summary = f"ask {best.model} alone ({name}: {word} within {settings.quality_margin:.2f} of the best quality)"
        return Route("single", name, [best], [], summary=summary)

    def _top_vote(
        self, scored: list[PlannedModel], preds: Mapping[str, Prediction], settings: ProfileSettings, answer_kind: str
    ) -> Route | None:
        """The ``top_vote`` best train records over the query's pool asked at once and voted; None if not."""
        known = [c for c in scored if preds[c.model].pool_mean is not None]
        if settings.top_vote < 2 or answer_kind not in CLOSED_KINDS or len(known) < settings.top_vote:
            return None
        members = sorted(known, key=lambda c: (-(preds[c.model].pool_mean or 0.0), c.cost_usd))[: settings.top_vote]
        for c in members:
            c.chosen = True
            c.reason = f"voter: train record {preds[c.model].pool_mean:.3f} (top {settings.top_vote} by train record)"
        return Route(
            "vote",
            "",
            members,
            [],
            quorum=settings.top_vote // 2 + 1,
            summary=f"ask the {settings.top_vote} best train records ({', '.join(c.model for c in members)}) and vote",
        )

    def _ranked(
        self, scored: list[PlannedModel], preds: Mapping[str, Prediction], settings: ProfileSettings, answer_kind: str
    ) -> Route | None:
        """Cheap models asked at once for an answer that cannot be voted on; None when it does not apply.

        Members are the ``rank_size`` best train records over the query's pool (predicted quality where
        no record is known) among the models costing at most ``cascade_cost_ratio`` times the strongest.
        """
        if settings.rank_size < 2 or answer_kind in CLOSED_KINDS or len(scored) <= settings.rank_size:
            return None

        def record(c: PlannedModel) -> float:
            known = preds[c.model].pool_mean
            return c.quality if known is None else known

        strongest = max(scored, key=lambda c: (record(c), -c.cost_usd))
        limit = settings.cascade_cost_ratio * strongest.cost_usd
        cheap = sorted(
            (c for c in scored if c is not strongest and c.cost_usd <= limit), key=lambda c: (-record(c), c.cost_usd)
        )[: settings.rank_size]
        if len(cheap) < settings.rank_size:
            return None
        for c in cheap:
            c.chosen = True
            c.reason = f"ranked fan-out: train record {record(c):.2f} at ${c.cost_usd:.6f}"
            # The ranker weighs each answer by its model's reliability, learned as the model's train
            # record: the member's quality is that record, which dispatch sends as the reliability.
            c.quality = record(c)
        return Route(
            "rank",
            "",
            cheap,
            [],
            summary=f"ask {', '.join(c.model for c in cheap)} at once; the ranker picks the answer",
        )

    def _vote(self, scored: list[PlannedModel], settings: ProfileSettings, answer_kind: str) -> Route | None:
        """The best-scoring ``vote_size`` models asked at once, answers voted; None when it does not apply."""
        if settings.vote_size < 2 or answer_kind not in CLOSED_KINDS or len(scored) < settings.vote_size:
            return None
        members = scored[: settings.vote_size]
        for c in members:
            c.chosen = True
            c.reason = f"voter: score {c.score:.3f}, quality {c.quality:.2f}"
        return Route(
            "vote",
            "",
            members,
            [],
            quorum=settings.quorum or settings.vote_size // 2 + 1,
            summary=f"ask {', '.join(c.model for c in members)} at once and vote",
        )

    def _cascade(self, scored: list[PlannedModel], settings: ProfileSettings, answer_kind: str) -> Route | None:
        """A cheap first wave that must agree, then the strongest model; None when it does not apply."""
        if settings.cascade_size < 1 or answer_kind not in CLOSED_KINDS or len(scored) < 2:
            return None
        by_quality = sorted(scored, key=lambda c: (-c.quality, c.cost_usd))
        strongest = by_quality[0]
        cheap = [c for c in by_quality[1:] if c.cost_usd <= settings.cascade_cost_ratio * strongest.cost_usd][
            : settings.cascade_size
        ]
        if len(cheap) < settings.cascade_size or min(c.quality for c in cheap) < settings.cascade_min_quality:
            return None
        strong = [c for c in by_quality if c not in cheap][: max(1, settings.escalate_size)]
        for c in cheap:
            c.chosen, c.wave = True, 0
            c.reason = f"first wave: quality {c.quality:.2f} at ${c.cost_usd:.6f}"
        for c in strong:
            c.chosen, c.wave = True, 1
            c.reason = f"second wave, only if the first disagrees: quality {c.quality:.2f}"
        names = ", ".join(c.model for c in strong)
        return Route(
            "cascade",
            "",
            [*cheap, *strong],
            [],
            quorum=len(cheap),
            summary=f"ask {', '.join(c.model for c in cheap)}; escalate to {names} unless all agree",
        )


def load_router(path: Path | str | None = None) -> Router:
    """The router of a trained artifact (``path``, or the CURRENT one under the default root).

    Raises:
        FailedPrecondition: no artifact there; the message says how to train one.
    """
    artifact = artifacts.load(path or artifacts.default_root(), ARTIFACT_KIND, train_command=TRAIN_COMMAND)
    manifest, arrays = artifact.manifest, artifact.arrays
    if manifest.get("kind") != ARTIFACT_KIND:
        raise FailedPrecondition(f"{artifact.path} holds a {manifest.get('kind')!r} artifact, not a router")
    calibration = None
    if "calibration_x" in arrays:
        calibration = (arrays["calibration_x"].astype(np.float64), arrays["calibration_y"].astype(np.float64))
    cards = {m: (c.get("family"), c.get("params_b")) for m, c in manifest.get("cards", {}).items()}
    predictor = QualityPredictor(
        arrays["embeddings"].astype(np.float32),
        arrays["quality"],
        arrays["output_tokens"],
        manifest["models"],
        cards,
        calibration=calibration,
        groups=arrays.get("groups"),
        group_kinds=manifest.get("pool_kinds"),
        **manifest["predictor"],
    )
    profiles = {name: ProfileSettings.from_json(raw) for name, raw in manifest.get("profiles", {}).items()}
    return Router(predictor, profiles)


def try_load_router(path: Path | str | None = None) -> tuple[Router, str]:
    """Like :func:`load_router`, but without an artifact returns an untrained router and says why."""
    try:
        router = load_router(path)
    except FailedPrecondition as exc:
        return Router(None, UNTRAINED_PROFILES), str(exc)
    return router, ""
