"""``constellation train router``: fits the quality predictor and the profiles on the pools' train splits.

What it does, in order:

1. Reads every pool given (default: every ``*.jsonl.gz`` in the data directory) and embeds each prompt
   the way the classifier does at run time (its keyword focus, all-MiniLM-L6-v2), with an on-disk cache.
2. Chooses the predictor's neighbourhood (k, shrinkage) by leave-one-out routing accuracy on ``train``.
3. Calibrates it: isotonic regression of the recorded quality on the leave-one-out estimates.
4. Learns, per answer kind, how the ``quality`` profile plans (one model per query; the one model with
   the best train record over the pool, unless per-query choices beat it on train; a vote of n; a vote
   of the 3 or 5 best train records, the top-k baselines of ``eval``; or a cascade), and the
   ``balanced`` profile on ``train``: among a grid of weights, cascades and top-k votes by train record
   (closed answers) and ranked fan-outs (code and open answers, when a pair ranker is trained: cheap
   models asked at once, the ranker's pick kept), the one with the lowest mean cost relative to each pool's
   best train model that stays within a margin of that model's train quality on every pool (simulated
   with leave-one-out predictions and recorded answers; nothing from ``test`` is used; the ranker's
   picks are in-sample, since it was fitted on the same train splits). A model with no recorded price
   costs what the plan estimated for it, never 0. ``cost`` and ``speed`` keep their stated quality
   margins (:data:`~services.dispatch.routing.DEFAULT_PROFILES`), written into the artifact.
5. Reports Brier score and expected calibration error on leave-one-out ``train`` and, for information
   only, on ``test``; writes a versioned artifact and points CURRENT at it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition
from constellation.ml.answers import normalize_answer
from constellation.ml.calibration import expected_calibration_error, fit_isotonic
from constellation.ml.vote import Ballot, tally
from constellation.pools import PoolRecord, read_model_cards, read_pool
from constellation.training import run_training
from services.dispatch.routing import (
    ARTIFACT_KIND,
    CLOSED_KINDS,
    DEFAULT_PROFILES,
    PlannedModel,
    PoolModel,
    Prediction,
    ProfileSettings,
    QualityPredictor,
    Router,
    Weights,
    brier,
    estimate_tokens,
)

K_GRID = (10, 20, 40)
ALPHA_GRID = (2.0, 8.0, 32.0, 128.0)
COST_WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4)
CASCADE_SIZES = (2, 3)
CASCADE_MIN_QUALITY = (0.75, 0.85, 0.9)
VOTE_SIZES = (1, 3, 5, 7)
ANCHOR_MARGINS = (0.0, 0.02, 0.05, 0.1)
ESCALATE_SIZES = (1, 3)
RANK_SIZES = (2, 3)
TOP_VOTES = (3, 5)
"""The top-k votes by train record that ``eval`` reports as baselines; the quality profile keeps one
when no per-query plan beats it on train (leave-one-out records)."""
QUALITY_TIE = 1e-9
"""The quality profile keeps the most accurate settings on train; only exact ties go to the cheaper."""
MEAN_LOSS = 0.01
MAX_LOSS = 0.02
"""The balanced profile may lose at most 1 point of quality to each pool's best train model on average
over the pools of one answer kind, and at most 2 points on any one of them; among the settings that do,
the one with the lowest mean cost relative to those models is kept (per answer kind)."""


def default_data_dir() -> Path:
    env = os.environ.get("CONSTELLATION_DATA_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@dataclass
class PoolData:
    name: str
    path: Path
    records: list[PoolRecord]
    rows: np.ndarray  # indices of this pool's records in the global arrays


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="constellation train router",
        description="Fit the routing policy on the train splits of recorded pools: a k-nearest-neighbour "
        "quality predictor over query embeddings (calibrated), and the profiles' weights and cascades. "
        "Writes a versioned artifact that dispatch loads (CURRENT under ~/.cache/constellation/artifacts/router).",
        epilog="Example: constellation train router ../shared/data/gsm8k.jsonl.gz "
        "../shared/data/routerbench_arc.jsonl.gz",
    )
    parser.add_argument("pools", nargs="*", type=Path, help="pool files (default: every *.jsonl.gz in --data-dir)")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir(), help="where pools are found")
    parser.add_argument("--models-json", type=Path, help="model cards (default: models.json beside the pools)")
    parser.add_argument("--out", type=Path, help="artifacts root (default ~/.cache/constellation/artifacts)")
    parser.add_argument("--no-current", action="store_true", help="do not point CURRENT at the new artifact")
    parser.add_argument(
        "--ranker",
        type=Path,
        help="pair ranker artifact used to simulate ranked fan-outs for code and open answers (default: the "
        "CURRENT one under the artifacts root, if any; `constellation train ranker` makes one)",
    )
    parser.add_argument("--no-ranker", action="store_true", help="do not learn ranked fan-outs")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def embed_prompts(records: Sequence[PoolRecord], root: Path, *, quiet: bool) -> np.ndarray:
    """Unit embeddings of each record's keyword focus, as the classifier computes them at run time."""
    from constellation.ml.embeddings import EmbeddingCache, embed
    from constellation.ml.encoder import Encoder
    from services.classifier.rules import KeywordRules

    rules = KeywordRules()
    encoder = Encoder()
    cache = EmbeddingCache(root / "classifier" / f"embeddings-{encoder.identity.key}.npz")
    focus = [rules.focus(r.prompt)[0] for r in records]
    vectors, _, _ = embed(encoder, focus, cache, show_progress=not quiet)
    cache.save()
    return vectors.astype(np.float32)


def loo_predictions(
    predictor: QualityPredictor, queries: np.ndarray, exclude: np.ndarray | None, models: Sequence[str]
) -> tuple[np.ndarray, ...]:
    parts: list[tuple[np.ndarray, ...]] = []
    for start in range(0, len(queries), 256):
        sims = queries[start : start + 256] @ predictor.embeddings.T
        parts.append(predictor.raw_batch(sims, None if exclude is None else exclude[start : start + 256], models))
    return tuple(np.concatenate([part[i] for part in parts]) for i in range(len(parts[0])))


def pooled_loo(predictor: QualityPredictor, vectors: np.ndarray, pools: Sequence[PoolData]) -> tuple[np.ndarray, ...]:
    """Leave-one-out estimates of every train row, each pool's rows scored against that pool's models."""
    n, m = len(vectors), len(predictor.models)
    raw = np.full((n, m), np.nan, dtype=np.float64)
    obs = np.zeros((n, m))
    tokens = np.zeros((n, m))
    wide = np.full((n, m), np.nan, dtype=np.float64)
    pool_mean = np.full((n, m), np.nan, dtype=np.float64)
    group = np.zeros(n, dtype=np.int64)
    for pool in pools:
        r, o, t, w, pm, g = loo_predictions(predictor, vectors[pool.rows], pool.rows, list(pool.records[0].responses))
        raw[pool.rows], obs[pool.rows], tokens[pool.rows], wide[pool.rows], pool_mean[pool.rows] = r, o, t, w, pm
        group[pool.rows] = g
    return raw, obs, tokens, wide, pool_mean, group


def routing_accuracy(raw: np.ndarray, quality: np.ndarray, pools: Sequence[PoolData]) -> float:
    """Mean over pools of the recorded quality of each row's highest-estimate model (no cost)."""
    scores = []
    for pool in pools:
        est = raw[pool.rows]
        truth = quality[pool.rows]
        est = np.where(np.isnan(truth), -np.inf, np.nan_to_num(est, nan=-np.inf))
        pick = est.argmax(1)
        scores.append(float(np.mean(truth[np.arange(len(pick)), pick])))
    return float(np.mean(scores))


def _pool_models(pool: PoolData, cards: dict[str, Any]) -> list[PoolModel]:
    out = []
    for name in pool.records[0].responses:
        card = cards.get(name)
        out.append(
            PoolModel(
                name,
                (card.price_in_per_mtok or 0.0) if card else 0.0,
                (card.price_out_per_mtok or 0.0) if card else 0.0,
                card.family if card else None,
                card.params_b if card else None,
            )
        )
    return out


Picker = Callable[[PoolRecord, Sequence[str]], str]
"""Which of the named models' recorded answers to a record a ranked fan-out keeps."""


class RankerPicks:
    """The trained pair ranker's pick among recorded answers, for simulating ranked fan-outs on train.

    Loads the ranker artifact and the embedding cache its trainer filled (answers not cached are embedded
    once, with a progress bar). Each candidate's reliability is its model's mean train quality on the
    pool, as dispatch sends it. The ranker was fitted on these train splits, so what it picks here is
    in-sample: an optimistic estimate.
    """

    def __init__(self, artifact_path: Path, pools: Sequence[PoolData], *, quiet: bool):
        from constellation.ml.embeddings import EmbeddingStore
        from constellation.ml.encoder import Encoder
        from services.ranking.pairwise import load_ranker
        from services.ranking.rank import Ranker

        artifact = load_ranker(artifact_path)
        assert artifact.path is not None
        self.content_hash = artifact.content_hash
        self.encoder = Encoder()
        self.store = EmbeddingStore(artifact.path.parent / f"embeddings-{self.encoder.identity.key}.npz")
        self.ranker = Ranker(None, artifact)
        self.means = {
            pool.name: {
                m: float(np.mean([r.responses[m].quality for r in pool.records])) for m in pool.records[0].responses
            }
            for pool in pools
        }
        self.pool_of = {r.id: pool.name for pool in pools for r in pool.records}
        texts = [t for pool in pools for r in pool.records for t in (r.prompt, *(x.text for x in r.responses.values()))]
        self.store.fill(self.encoder, texts, show_progress=not quiet)
        self.store.save()
        self.cache: dict[tuple[str, tuple[str, ...]], str] = {}

    def __call__(self, record: PoolRecord, members: Sequence[str]) -> str:
        from services.ranking.rank import CandidateText

        key = (record.id, tuple(members))
        if key not in self.cache:
            means = self.means[self.pool_of[record.id]]
            candidates = [
                CandidateText(
                    record.responses[m].text, record.responses[m].answer or "", float(np.clip(means[m], 1e-3, 1))
                )
                for m in members
            ]
            query = self.store.get([record.prompt])[0]
            vectors = self.store.get([record.responses[m].text for m in members])
            ranking = self.ranker.rank_embedded(query, vectors, candidates, record.answer_kind)
            self.cache[key] = members[ranking.ranked[0].index]
        return self.cache[key]


def _cost(record: PoolRecord, member: PlannedModel) -> float:
    """The recorded cost of ``member``'s answer; the plan's estimate where no price was recorded (never 0)."""
    recorded = record.responses[member.model].cost_usd
    return member.cost_usd if recorded is None else recorded


def simulate(
    router: Router,
    profile: str,
    pool: PoolData,
    models: list[PoolModel],
    predictions: list[dict[str, Prediction]],
    indices: Sequence[int],
    pick: Picker | None = None,
) -> tuple[float, float]:
    """Mean recorded quality and cost of ``profile``'s plans on the pool's records at ``indices``.

    ``pick`` chooses the answer a ranked fan-out keeps; without it, its first member's.
    """
    kind = pool.records[0].answer_kind
    total_q = total_c = 0.0
    for i in indices:
        record = pool.records[i]
        route = router.route(
            models,
            answer_kind=kind,
            input_tokens=estimate_tokens(record.prompt),
            profile=profile,
            predictions=predictions[i],
        )
        waves = route.waves()
        quality = 0.0
        cost = 0.0
        if route.policy == "rank":
            names = [m.model for m in route.members]
            kept = pick(record, names) if pick is not None else names[0]
            total_q += record.responses[kept].quality
            total_c += sum(_cost(record, m) for m in route.members)
            continue
        for w, wave in enumerate(waves):
            cost += sum(_cost(record, m) for m in wave)
            if route.policy == "cascade" and w < len(waves) - 1:
                answers = [normalize_answer(kind, record.responses[m.model].answer) for m in wave]
                if answers[0] is not None and all(a == answers[0] for a in answers):
                    quality = float(answers[0] == normalize_answer(kind, record.reference))
                    break
                continue
            if len(wave) > 1:
                ballots = [
                    Ballot(normalize_answer(kind, record.responses[m.model].answer), m.quality, rank)
                    for rank, m in enumerate(wave)
                ]
                winner = tally(ballots).answer
                quality = float(winner is not None and winner == normalize_answer(kind, record.reference))
                break
            quality = record.responses[wave[0].model].quality
            break
        total_q += quality
        total_c += cost
    n = max(len(indices), 1)
    return total_q / n, total_c / n


@dataclass
class TrainingSet:
    """The pools' records: train rows (what is fitted) and test rows (reported only), with their embeddings.

    Attributes:
        pools: One entry per pool with train records; ``rows`` index the train matrices.
        test_spans: (pool name, first, end) of each pool's rows in ``test_records``.
        quality: Recorded quality, train rows x ``models`` (NaN where a model has no record).
        tokens: Recorded output tokens, the same shape (NaN where unknown).
        groups: The pool number of each train row.
    """

    pools: list[PoolData]
    train_records: list[PoolRecord]
    test_records: list[PoolRecord]
    test_spans: list[tuple[str, int, int]]
    train_vectors: np.ndarray
    test_vectors: np.ndarray
    models: list[str]
    quality: np.ndarray
    tokens: np.ndarray
    groups: np.ndarray

    @property
    def index(self) -> dict[str, int]:
        return {m: i for i, m in enumerate(self.models)}

    @property
    def pool_kinds(self) -> list[str]:
        return [pool.records[0].answer_kind for pool in self.pools]


def read_training_set(paths: Sequence[Path], root: Path, *, quiet: bool) -> TrainingSet:
    """Step 1: every pool's records split into train and test, embedded, and the train matrices."""
    pools: list[PoolData] = []
    train_records: list[PoolRecord] = []
    test_records: list[PoolRecord] = []
    test_spans: list[tuple[str, int, int]] = []
    for path in paths:
        records = list(read_pool(path))
        train = [r for r in records if r.split == "train"]
        if not train:
            continue
        rows = np.arange(len(train_records), len(train_records) + len(train))
        pools.append(PoolData(path.name.split(".")[0], path, train, rows))
        train_records += train
        test = [r for r in records if r.split == "test"]
        test_spans.append((pools[-1].name, len(test_records), len(test_records) + len(test)))
        test_records += test
    if not train_records:
        raise ValueError("the pools hold no train-split records")
    vectors = embed_prompts(train_records + test_records, root, quiet=quiet)
    models = sorted({m for r in train_records for m in r.responses})
    index = {m: i for i, m in enumerate(models)}
    quality = np.full((len(train_records), len(models)), np.nan, dtype=np.float32)
    tokens = np.full_like(quality, np.nan)
    for row, record in enumerate(train_records):
        for model, response in record.responses.items():
            quality[row, index[model]] = response.quality
            if response.output_tokens is not None:
                tokens[row, index[model]] = response.output_tokens
    groups = np.zeros(len(train_records), dtype=np.int32)
    for number, pool in enumerate(pools):
        groups[pool.rows] = number
    split = len(train_records)
    return TrainingSet(
        pools,
        train_records,
        test_records,
        test_spans,
        vectors[:split],
        vectors[split:],
        models,
        quality,
        tokens,
        groups,
    )


def choose_neighbourhood(
    data: TrainingSet, card_pairs: dict[str, Any], *, quiet: bool
) -> tuple[int, float, list[dict[str, float]]]:
    """Step 2: (k, shrinkage) by leave-one-out routing accuracy on train, and the search's rows."""
    from tqdm import tqdm

    grid = [(k, a) for k in K_GRID for a in ALPHA_GRID]
    best: tuple[float, int, float] | None = None
    search: list[dict[str, float]] = []
    for k, alpha in tqdm(grid, desc="choosing k and shrinkage", disable=quiet):
        predictor = QualityPredictor(
            data.train_vectors, data.quality, data.tokens, data.models, card_pairs, k=k, alpha=alpha, groups=data.groups
        )
        raw = pooled_loo(predictor, data.train_vectors, data.pools)[0]
        accuracy = routing_accuracy(raw, data.quality, data.pools)
        search.append({"k": k, "alpha": alpha, "loo_routing_quality": round(accuracy, 5)})
        if best is None or accuracy > best[0] + 1e-9:
            best = (accuracy, k, alpha)
    assert best is not None
    return best[1], best[2], search


@dataclass
class LeaveOneOut:
    """The calibrated predictor's leave-one-out view of every train row (train rows x models)."""

    predictor: QualityPredictor
    raw: np.ndarray
    observations: np.ndarray
    output_tokens: np.ndarray
    wide: np.ndarray
    pool_means: np.ndarray
    groups: np.ndarray
    calibrated: np.ndarray
    anchors: np.ndarray
    present: np.ndarray
    """True where a model has both a record and an estimate."""


def calibrate(data: TrainingSet, card_pairs: dict[str, Any], k: int, alpha: float) -> LeaveOneOut:
    """Step 3: the predictor with (k, alpha), calibrated by isotonic regression on its leave-one-out estimates."""
    predictor = QualityPredictor(
        data.train_vectors,
        data.quality,
        data.tokens,
        data.models,
        card_pairs,
        k=k,
        alpha=alpha,
        groups=data.groups,
        group_kinds=data.pool_kinds,
    )
    raw, obs, out_tokens, wide, pool_means, loo_groups = pooled_loo(predictor, data.train_vectors, data.pools)
    present = ~np.isnan(data.quality) & ~np.isnan(raw)
    predictor.calibration = fit_isotonic(raw[present], data.quality[present], merge_ties=False)
    calibrated = predictor.calibrate(np.nan_to_num(raw))
    anchors = predictor.calibrate(np.nan_to_num(wide))
    return LeaveOneOut(predictor, raw, obs, out_tokens, wide, pool_means, loo_groups, calibrated, anchors, present)


def calibration_metrics(data: TrainingSet, loo: LeaveOneOut) -> dict[str, Any]:
    """Step 5: Brier score and ECE on leave-one-out train, and on test for information only."""
    metrics: dict[str, Any] = {"train_loo": {}, "test": {}}
    for pool in data.pools:
        mask = loo.present[pool.rows]
        p, y = loo.calibrated[pool.rows][mask], data.quality[pool.rows][mask]
        metrics["train_loo"][pool.name] = {
            "brier": round(brier(p, y), 5),
            "ece": round(expected_calibration_error(p, y), 5),
        }
    index = data.index
    for name, start, end in data.test_spans:
        recs = data.test_records[start:end]
        if not recs:
            continue
        raw_t = loo_predictions(loo.predictor, data.test_vectors[start:end], None, list(recs[0].responses))[0]
        cal_t = loo.predictor.calibrate(np.nan_to_num(raw_t))
        ps, ys = [], []
        for row, record in enumerate(recs):
            for model, response in record.responses.items():
                i = index.get(model)
                if i is not None and not np.isnan(raw_t[row, i]):
                    ps.append(cal_t[row, i])
                    ys.append(response.quality)
        metrics["test"][name] = {
            "brier": round(brier(np.array(ps), np.array(ys)), 5),
            "ece": round(expected_calibration_error(np.array(ps), np.array(ys)), 5),
        }
    return metrics


def pool_predictions(data: TrainingSet, loo: LeaveOneOut, pool: PoolData) -> list[dict[str, Prediction]]:
    """Each train row's leave-one-out predictions for the pool's models, as routing takes them."""
    index, kinds = data.index, data.pool_kinds
    out = []
    for row in pool.rows:
        preds = {}
        for model in pool.records[0].responses:
            i = index[model]
            value = loo.raw[row, i]
            preds[model] = Prediction(
                float(loo.calibrated[row, i]) if not np.isnan(value) else 0.5,
                float(loo.observations[row, i]),
                float(loo.output_tokens[row, i]) if loo.output_tokens[row, i] > 0 else None,
                "knn",
                float(loo.anchors[row, i]) if not np.isnan(loo.wide[row, i]) else None,
                float(loo.pool_means[row, i]) if not np.isnan(loo.pool_means[row, i]) else None,
                kinds[loo.groups[row]],
            )
        out.append(preds)
    return out


def ranker_picks(args: argparse.Namespace, root: Path, pools: Sequence[PoolData]) -> tuple[Picker | None, str]:
    """The pair ranker's picks for open-answer pools, and its content hash; (None, "") without one."""
    open_pools = [pool for pool in pools if pool.records[0].answer_kind not in CLOSED_KINDS]
    if not open_pools or args.no_ranker:
        return None, ""
    try:
        picks = RankerPicks(args.ranker or root, open_pools, quiet=args.quiet)
    except FailedPrecondition as exc:
        if args.ranker:
            raise
        print(f"ranked fan-outs not learned: {exc}", file=sys.stderr)
        return None, ""
    return picks, picks.content_hash


def reference_models(pools: Sequence[PoolData]) -> dict[str, tuple[float, float]]:
    """Each pool's best train model: (mean quality, mean cost), the bar the balanced profile is held to."""
    reference: dict[str, tuple[float, float]] = {}
    for pool in pools:
        means = {m: np.mean([r.responses[m].quality for r in pool.records]) for m in pool.records[0].responses}
        costs = {m: np.mean([r.responses[m].cost_usd or 0.0 for r in pool.records]) for m in means}
        top = max(means, key=lambda m: (means[m], -costs[m]))
        reference[pool.name] = (float(means[top]), float(costs[top]))
    return reference


def balanced_options(ranked: bool) -> list[ProfileSettings]:
    """The balanced profile's grid: weights alone, with cascades, and (``ranked``) with ranked fan-outs."""
    options = [ProfileSettings(Weights(1 - c - c / 2, c, c / 2)) for c in COST_WEIGHTS] + [
        ProfileSettings(Weights(1 - c - c / 2, c, c / 2), size, 0.25, tau, escalate_size=escalate)
        for c in COST_WEIGHTS
        for size in CASCADE_SIZES
        for tau in CASCADE_MIN_QUALITY
        for escalate in ESCALATE_SIZES
    ]
    options += [ProfileSettings(Weights(0.7, 0.2, 0.1), top_vote=k) for k in TOP_VOTES]  # baselines, closed kinds
    if ranked:
        options += [
            ProfileSettings(Weights(1 - c - c / 2, c, c / 2), rank_size=size)
            for c in COST_WEIGHTS
            for size in RANK_SIZES
        ]
    return options


def quality_options(kind: str) -> list[ProfileSettings]:
    """The quality profile's grid for one answer kind; the static choice is always among them."""
    options = [ProfileSettings(Weights(1.0, 0.0, 0.0), anchor_margin=m) for m in ANCHOR_MARGINS]
    options.append(ProfileSettings(Weights(1.0, 0.0, 0.0), static=True))  # routing must beat this on train
    if kind in CLOSED_KINDS:  # and the votes of the best train records, the eval's top-k baselines
        options += [ProfileSettings(Weights(1.0, 0.0, 0.0), top_vote=k) for k in TOP_VOTES]
        options += [ProfileSettings(Weights(1.0, 0.0, 0.0), vote_size=size) for size in VOTE_SIZES[1:]]
        options += [
            ProfileSettings(Weights(1.0, 0.0, 0.0), size, 0.25, 0.85, escalate_size=escalate)
            for size in CASCADE_SIZES
            for escalate in ESCALATE_SIZES
        ]
    return options


@dataclass
class Simulator:
    """Replays profiles over train pools with leave-one-out predictions and recorded answers (step 4)."""

    predictor: QualityPredictor
    pool_models: dict[str, list[PoolModel]]
    pool_preds: dict[str, list[dict[str, Prediction]]]
    reference: dict[str, tuple[float, float]]
    pick: Picker | None

    def run(self, profile: str, settings: ProfileSettings, pool: PoolData, *, ranked: bool) -> tuple[float, float]:
        """(mean quality, mean cost) of ``settings`` as ``profile`` over ``pool``'s train rows."""
        router = Router(self.predictor, {profile: settings})
        preds = self.pool_preds[pool.name]
        rows = range(len(pool.records))
        if ranked:
            return simulate(router, profile, pool, self.pool_models[pool.name], preds, rows, self.pick)
        return simulate(router, profile, pool, self.pool_models[pool.name], preds, rows)


def learn_balanced(
    sim: Simulator, kind: str, members: Sequence[PoolData], options: Sequence[ProfileSettings], *, quiet: bool
) -> tuple[ProfileSettings, list[dict[str, Any]]]:
    """The cheapest balanced settings for ``kind`` within the loss margins (else the smallest loss); the search."""
    from tqdm import tqdm

    chosen: tuple[tuple[int, float], ProfileSettings] | None = None
    search: list[dict[str, Any]] = []
    for settings in tqdm(options, desc=f"learning balanced/{kind}", disable=quiet):
        closed_only = settings.cascade_size or settings.top_vote
        if (closed_only and kind not in CLOSED_KINDS) or (settings.rank_size and kind in CLOSED_KINDS):
            continue
        losses = []
        relative_costs = []
        per_pool = {}
        for pool in members:
            q, c = sim.run("balanced", settings, pool, ranked=True)
            ref_q, ref_c = sim.reference[pool.name]
            losses.append(max(0.0, ref_q - q))
            relative_costs.append(c / ref_c if ref_c else 1.0)
            per_pool[pool.name] = {"quality": round(q, 4), "cost": round(c, 6)}
        mean_cost = float(np.mean(relative_costs))
        feasible = float(np.mean(losses)) <= MEAN_LOSS and max(losses) <= MAX_LOSS
        search.append(
            {
                "answer_kind": kind,
                **settings.to_json(),
                "mean_relative_cost": round(mean_cost, 4),
                "feasible": feasible,
                "pools": per_pool,
            }
        )
        key = (1, -mean_cost) if feasible else (0, -float(np.mean(losses)))
        if chosen is None or key > chosen[0]:
            chosen = (key, settings)
    assert chosen is not None
    return chosen[1], search


def learn_quality(
    sim: Simulator, kind: str, members: Sequence[PoolData]
) -> tuple[ProfileSettings, list[dict[str, Any]]]:
    """The most accurate quality settings for ``kind`` (within QUALITY_TIE, the cheaper); the search."""
    best: tuple[float, float, ProfileSettings] | None = None
    search: list[dict[str, Any]] = []
    for settings in quality_options(kind):
        outcomes = [sim.run("quality", settings, pool, ranked=False) for pool in members]
        mean_quality = float(np.mean([q for q, _ in outcomes]))
        mean_cost = float(np.mean([c / sim.reference[p.name][1] for (_, c), p in zip(outcomes, members, strict=True)]))
        search.append({"answer_kind": kind, **settings.to_json(), "quality": round(mean_quality, 5), "cost": mean_cost})
        if (
            best is None
            or mean_quality > best[0] + QUALITY_TIE
            or (mean_quality > best[0] - QUALITY_TIE and mean_cost < best[1])
        ):
            best = (mean_quality, mean_cost, settings)
    assert best is not None
    return best[2], search


def train(args: argparse.Namespace) -> dict[str, Any]:
    """Runs the steps of the module docstring and saves the artifact; returns a summary of it."""
    started = time.perf_counter()
    paths = list(args.pools) or sorted(Path(args.data_dir).glob("*.jsonl.gz"))
    if not paths:
        raise FileNotFoundError(f"no pools given and no *.jsonl.gz in {args.data_dir}")
    models_json = args.models_json or paths[0].parent / "models.json"
    cards = read_model_cards(models_json) if models_json.is_file() else {}
    root = args.out or artifacts.default_root()
    data = read_training_set(paths, root, quiet=args.quiet)
    card_pairs = {name: (card.family, card.params_b) for name, card in cards.items()}
    k, alpha, search = choose_neighbourhood(data, card_pairs, quiet=args.quiet)
    loo = calibrate(data, card_pairs, k, alpha)
    metrics = calibration_metrics(data, loo)
    pick, ranker_used = ranker_picks(args, root, data.pools)
    sim = Simulator(
        loo.predictor,
        {pool.name: _pool_models(pool, cards) for pool in data.pools},
        {pool.name: pool_predictions(data, loo, pool) for pool in data.pools},
        reference_models(data.pools),
        pick,
    )
    options = balanced_options(pick is not None)
    profile_search: list[dict[str, Any]] = []
    quality_search: list[dict[str, Any]] = []
    profiles = {name: settings.to_json() for name, settings in DEFAULT_PROFILES.items()}
    for kind in sorted({pool.records[0].answer_kind for pool in data.pools}):
        members = [pool for pool in data.pools if pool.records[0].answer_kind == kind]
        balanced, rows = learn_balanced(sim, kind, members, options, quiet=args.quiet)
        profiles[f"balanced/{kind}"] = balanced.to_json()
        profile_search += rows
        quality, rows = learn_quality(sim, kind, members)
        profiles[f"quality/{kind}"] = quality.to_json()
        quality_search += rows
    manifest = {
        "models": data.models,
        "cards": {m: {"family": c.family, "params_b": c.params_b} for m, c in cards.items()},
        "predictor": loo.predictor.settings(),
        "profiles": profiles,
        "pool_kinds": data.pool_kinds,
        "ranker": ranker_used,
        "embedding": "all-MiniLM-L6-v2 of the classifier's keyword focus (unit length)",
        "training": {
            "pools": [{"file": p.path.name, "rows": len(p.records)} for p in data.pools],
            "rows": len(data.train_records),
            "neighbourhood_search": search,
            "balanced_search": profile_search,
            "quality_search": quality_search,
            "seconds": round(time.perf_counter() - started, 1),
        },
        "metrics": metrics,
    }
    directory = artifacts.save(
        ARTIFACT_KIND, loo.predictor.to_arrays(), manifest, root, make_current=not args.no_current
    )
    return {
        "artifact": str(directory),
        "rows": len(data.train_records),
        "models": len(data.models),
        "predictor": loo.predictor.settings(),
        "profiles": {k: v for k, v in profiles.items() if "/" in k},
        "calibration": metrics,
        "seconds": round(time.perf_counter() - started, 1),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``constellation train router``; returns the exit status."""
    return run_training(build_parser(), train, argv)


if __name__ == "__main__":
    sys.exit(main())
