"""How far cascades can go on a closed-answer pool: every cheap first wave, searched on ``train``.

A cascade asks a first wave of cheap models; if they all give the same (normalised) answer (or, in the
vote variant, the answer wins the wave's weighted vote by a chosen share), that answer stands, otherwise
a second wave is asked: the best model on train alone, or a weighted vote of the three
best. This script tries every first wave of 1 to ``--max-size`` models among those whose mean train cost
is below ``--cost-cap`` times the best train model's, on the recorded answers of ``train`` (no predictor,
no mesh: an upper bound on what the cascade family can do with these models), keeps those whose mean
train cost stays under the cap, and reports the most accurate ones beside the best single model, then
their figures on ``test``. It answers whether a cheaper cascade that beats the best single model exists
at all in a pool, before any routing policy is asked to find it.

Run: ``python -m bench.cascade_search`` (default pools gsm8k and routerbench_arc; writes its section of
``docs/BENCHMARKS.md`` and ``docs/bench/cascade_search.json``).
"""

from __future__ import annotations

import argparse
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from bench.report import DOCS, markdown_table, write_section
from constellation.ml.answers import normalize_answer
from constellation.ml.vote import Ballot, tally
from constellation.pools import PoolRecord, read_pool
from services.dispatch.router_train import default_data_dir


@dataclass
class Split:
    """One split of a pool as arrays: normalised answers, correctness and cost per model."""

    models: list[str]
    answers: dict[str, list[str | None]]
    correct: dict[str, np.ndarray]
    cost: dict[str, np.ndarray]
    reference: list[str | None]

    @classmethod
    def read(cls, path: Path, split: str) -> Split:
        return cls.of(list(read_pool(path, split=split)))

    @classmethod
    def of(cls, records: Sequence[PoolRecord]) -> Split:
        """The split of ``records`` (one pool's, closed answers)."""
        kind = records[0].answer_kind
        models = list(records[0].responses)
        return cls(
            models,
            {m: [normalize_answer(kind, r.responses[m].answer) for r in records] for m in models},
            {m: np.array([r.responses[m].quality for r in records], dtype=float) for m in models},
            {m: np.array([r.responses[m].cost_usd or 0.0 for r in records], dtype=float) for m in models},
            [normalize_answer(kind, r.reference) for r in records],
        )

    def __post_init__(self) -> None:
        # answers as integers for vectorised agreement: -1 for none, -2 for a reference without one
        table: dict[str, int] = {}
        self.codes = {
            m: np.array([-1 if a is None else table.setdefault(a, len(table)) for a in answers])
            for m, answers in self.answers.items()
        }
        self.reference_codes = np.array([-2 if a is None else table.setdefault(a, len(table)) for a in self.reference])

    def accuracy(self, model: str) -> float:
        return float(self.correct[model].mean())

    def mean_cost(self, model: str) -> float:
        return float(self.cost[model].mean())


def second_wave_correct(split: Split, second: Sequence[str], weight: dict[str, float]) -> np.ndarray:
    """Per record, whether the second wave is right: its one model's score, or its weighted vote's."""
    if len(second) == 1:
        return split.correct[second[0]]
    out = np.zeros(len(split.reference))
    for i, reference in enumerate(split.reference):
        winner = tally([Ballot(split.answers[m][i], weight[m], rank) for rank, m in enumerate(second)]).answer
        out[i] = winner is not None and winner == reference
    return out


def cascade(
    split: Split,
    first: Sequence[str],
    second: Sequence[str],
    later: np.ndarray,
    *,
    share: float | None = None,
    weight: dict[str, float] | None = None,
) -> tuple[float, ...]:
    """(accuracy, mean cost, escalation rate) of one cascade on every record of ``split``.

    ``later`` is :func:`second_wave_correct` for ``second``: what an escalated record scores. The first
    wave's answer stands when every member gives it (``share`` None), or when it wins the first wave's
    vote with at least ``share`` of the wave's total ``weight``.
    """
    codes = np.array([split.codes[m] for m in first])
    if share is None:
        agreed = (codes[0] >= 0) & np.all(codes == codes[0], axis=0)
        answer = codes[0]
    else:
        assert weight is not None
        w = np.array([weight[m] for m in first])
        same = (codes[:, None, :] == codes[None, :, :]) & (codes[None, :, :] >= 0)
        support = np.einsum("i,ijn->jn", w, same)  # weight behind each member's answer
        top = support.argmax(axis=0)
        answer = codes[top, np.arange(codes.shape[1])]
        agreed = (answer >= 0) & (support.max(axis=0) >= share * w.sum())
    correct = np.where(agreed, answer == split.reference_codes, later)
    cost = sum(split.cost[m] for m in first) + np.where(agreed, 0.0, sum(split.cost[m] for m in second))
    return float(correct.mean()), float(cost.mean()), float(1.0 - agreed.mean())


SHARES = (0.5, 0.6, 0.7, 0.8, 0.9)
"""Vote shares tried as the first wave's bar, beside unanimity."""


def log_odds(accuracy: float) -> float:
    """A voter's weight: the log-odds of its train accuracy (clipped away from 0 and 1)."""
    clipped = min(max(accuracy, 0.01), 0.99)
    return float(np.log(clipped / (1 - clipped)))


Tried = tuple[float, float, float, list[str], list[str], float | None]
"""(train accuracy, train mean cost, escalation rate, first wave, second wave, vote share or None)."""


def search_train(
    train: Split, cost_cap: float, max_size: int, *, label: str = "", progress: bool = True
) -> tuple[list[Tried], str, dict[str, float]]:
    """Every cascade within ``cost_cap`` on ``train``, most accurate first (ties: cheaper).

    Returns:
        The cascades tried, the best single model on train, and the first-wave vote weights.
    """
    ranked = sorted(train.models, key=lambda m: (-train.accuracy(m), train.mean_cost(m)))
    best = ranked[0]
    reference_cost = train.mean_cost(best)
    weight = {m: train.accuracy(m) for m in train.models}
    cheap = [m for m in train.models if m != best and train.mean_cost(m) < cost_cap * reference_cost]
    seconds = [[best], ranked[:3]]
    later_train = [second_wave_correct(train, second, weight) for second in seconds]
    tried: list[Tried] = []
    waves = [w for size in range(1, max_size + 1) for w in itertools.combinations(cheap, size)]
    votes = {m: log_odds(train.accuracy(m)) for m in train.models}
    rules: list[float | None] = [None, *SHARES]
    for first in tqdm(waves, desc=f"{label}: first waves", unit="wave", disable=not progress):
        for second, later in zip(seconds, later_train, strict=True):
            for rule in rules if len(first) > 1 else [None]:
                accuracy, cost, escalated = cascade(train, first, second, later, share=rule, weight=votes)
                if cost <= cost_cap * reference_cost:
                    tried.append((accuracy, cost, escalated, list(first), list(second), rule))
    tried.sort(key=lambda t: (-t[0], t[1]))
    return tried, best, votes


@dataclass(frozen=True)
class CascadeChoice:
    """One cheap-first cascade, as :func:`best_cascade` found it on train, ready to replay on any record.

    Attributes:
        first: The cheap first wave.
        second: Asked only when the first wave's answer does not stand: one model, or a weighted vote.
        share: None: the first wave's answer stands when every member gives it; else when it wins the
            wave's vote (``votes`` weights) with at least this share of the weight.
        votes: First-wave vote weights (log-odds of train accuracy).
        weights: Second-wave vote weights (train accuracy).
        train_accuracy, train_cost: Its mean accuracy and cost on train.
    """

    first: tuple[str, ...]
    second: tuple[str, ...]
    share: float | None
    votes: dict[str, float]
    weights: dict[str, float]
    train_accuracy: float
    train_cost: float

    def answer(self, answers: dict[str, str | None]) -> tuple[str | None, bool]:
        """(the cascade's normalised answer, whether it escalated) from each member's normalised answer."""
        first = [answers.get(m) for m in self.first]
        if self.share is None:
            agreed = first[0] is not None and all(a == first[0] for a in first)
            if agreed:
                return first[0], False
        else:
            support: dict[str, float] = {}
            for model, a in zip(self.first, first, strict=True):
                if a is not None:
                    support[a] = support.get(a, 0.0) + self.votes[model]
            total = sum(self.votes[m] for m in self.first)
            if support:
                top = max(support, key=lambda a: support[a])
                if support[top] >= self.share * total:
                    return top, False
        if len(self.second) == 1:
            return answers.get(self.second[0]), True
        ballots = [Ballot(answers.get(m), self.weights[m], rank) for rank, m in enumerate(self.second)]
        return tally(ballots).answer, True

    def describe(self) -> str:
        rule = "all agree" if self.share is None else f"vote share >= {self.share}"
        return f"{short(self.first)} ({rule}), else {short(self.second)}"


def best_cascade(
    train: Sequence[PoolRecord], *, cost_cap: float = 0.5, max_size: int = 3, progress: bool = False
) -> CascadeChoice | None:
    """The most accurate cheap-first cascade on ``train`` records (closed answers) within ``cost_cap``
    times the best train model's mean cost; None when no cheap model exists."""
    split = Split.of(train)
    tried, _best, votes = search_train(split, cost_cap, max_size, label="cascade", progress=progress)
    if not tried:
        return None
    accuracy, cost, _escalated, first, second, share = tried[0]
    weights = {m: split.accuracy(m) for m in split.models}
    return CascadeChoice(tuple(first), tuple(second), share, votes, weights, accuracy, cost)


def search(path: Path, cost_cap: float, max_size: int, keep: int) -> dict[str, object]:
    train, test = Split.read(path, "train"), Split.read(path, "test")
    tried, best, votes = search_train(train, cost_cap, max_size, label=path.name)
    reference_cost = train.mean_cost(best)
    cheap = [m for m in train.models if m != best and train.mean_cost(m) < cost_cap * reference_cost]
    weight = {m: train.accuracy(m) for m in train.models}
    ranked = sorted(train.models, key=lambda m: (-train.accuracy(m), train.mean_cost(m)))
    later_test = {tuple(second): second_wave_correct(test, second, weight) for second in ([best], ranked[:3])}
    rows = []
    for accuracy, cost, escalated, first, second, rule in tried[:keep]:
        test_accuracy, test_cost, test_escalated = cascade(
            test, first, second, later_test[tuple(second)], share=rule, weight=votes
        )
        rows.append(
            {
                "first": first,
                "rule": "all agree" if rule is None else f"vote share >= {rule}",
                "second": second,
                "train": {"accuracy": accuracy, "relative_cost": cost / reference_cost, "escalated": escalated},
                "test": {
                    "accuracy": test_accuracy,
                    "relative_cost": test_cost / test.mean_cost(best),
                    "escalated": test_escalated,
                },
            }
        )
    return {
        "pool": path.name,
        "best_single": best,
        "best_single_train": train.accuracy(best),
        "best_single_test": test.accuracy(best),
        "cheap_models": cheap,
        "cascades_within_cap": len(tried),
        "top": rows,
    }


def short(models: Sequence[str]) -> str:
    return ", ".join(m.split("/")[-1] for m in models)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pools", nargs="*", default=["gsm8k", "routerbench_arc"], help="closed-answer pool names")
    parser.add_argument("--data-dir", type=Path, default=default_data_dir())
    parser.add_argument("--cost-cap", type=float, default=0.5, help="mean cost cap, relative to the best model's")
    parser.add_argument("--max-size", type=int, default=4, help="largest first wave tried")
    parser.add_argument("--keep", type=int, default=3, help="cascades reported per pool")
    args = parser.parse_args(argv)
    results = [
        search(args.data_dir / f"{name}.jsonl.gz", args.cost_cap, args.max_size, args.keep) for name in args.pools
    ]
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "cascade_search.json").write_text(json.dumps({"cost_cap": args.cost_cap, "pools": results}, indent=2))
    rows = []
    lines = []
    for result in results:
        best_train, best_test = float(result["best_single_train"]), float(result["best_single_test"])  # type: ignore[arg-type]
        rows.append(
            [result["pool"], f"best on train: {short([str(result['best_single'])])}", "", "", f"{100 * best_train:.2f}",
             "1.00x", f"{100 * best_test:.2f}", "1.00x"]
        )  # fmt: skip
        top: list[dict[str, dict[str, float]]] = result["top"]  # type: ignore[assignment]
        for row in top:
            tr, te = row["train"], row["test"]
            rows.append(
                ["", short(row["first"]), row["rule"], short(row["second"]), f"{100 * tr['accuracy']:.2f}",  # type: ignore[arg-type]
                 f"{tr['relative_cost']:.2f}x", f"{100 * te['accuracy']:.2f}", f"{te['relative_cost']:.2f}x"]
            )  # fmt: skip
        beats = [r for r in top if r["train"]["accuracy"] > best_train]
        lines.append(
            f"- {result['pool']}: {result['cascades_within_cap']} cascades stay within {args.cost_cap}x on train; "
            + (
                f"the best beats {short([str(result['best_single'])])} on train."
                if beats
                else f"none is more accurate than {short([str(result['best_single'])])} on train, so no cascade "
                "of this family learned on train can beat it."
            )
        )
    table = markdown_table(
        ["pool", "first wave", "its answer stands when", "second wave", "train %", "train cost", "test %", "test cost"],
        rows,
    )
    body = f"""## Cascade search: can a cheaper cascade beat the best single model at all?

Command: `python -m bench.cascade_search --cost-cap {args.cost_cap} --max-size {args.max_size}`. Every first wave
of 1 to {args.max_size} models cheaper than {args.cost_cap}x the best train model, with the best model alone or a
weighted vote of the three best as the second wave, evaluated on the recorded answers of `train` (no
predictor, no mesh: the upper bound of this cascade family). The first wave's answer stands when all its
members give it, or (waves of two or more) when it wins the wave's vote, each member weighted by the
log-odds of its train accuracy, with at least {", ".join(str(x) for x in SHARES)} of the weight; otherwise
the second wave is asked. Kept: those whose mean train cost stays
within {args.cost_cap}x; shown: the {args.keep} most accurate on train, then their `test` figures. Costs are
relative to the best single model's mean cost on the same split.

{table}

{chr(10).join(lines)}
"""
    write_section("cascade-search", body)
    print(table)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
