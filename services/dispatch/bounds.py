"""Error-bounded plans for closed-answer queries: the confusion-matrix artifact and the plan cache.

A *kind* is one closed-answer task with fixed labels (``routerbench_arc``: A-D; ``routerbench_winogrande``:
A/B), with one confusion matrix per model fitted on the ``train`` split of its recorded pool and the
mean recorded cost of a call. :func:`fit` builds kinds, :func:`save` writes them as a ``confusion``
artifact (``constellation train confusion``), :func:`load` reads them back for dispatch.

A query is of the kind whose labels are the option letters of its last question (``A) ...`` lines),
or the smallest kind holding them all, so a request needs no kind field. :class:`BoundedPlanner` turns
(kind, alpha) into a :class:`BoundedPlan` over the models of the current pool and caches it.

What a plan guarantees, precisely: if each model's answers follow the confusion matrix the plan was
computed from and calls are independent given the true label, the likelihood-ratio vote errs with
probability at most ``plan.bound_per_label[theta]`` (<= the requested alpha) when the truth is
``theta``. The certified early stop never changes the decision, so the stopped vote keeps the bound.
Re-planning keeps plans *consistent with the pool*: a plan is recomputed when the pool's plannable
models, their health or their prices change, and when :meth:`BoundedPlanner.reload` installs newly
fitted matrices. Nothing here re-estimates matrices from live traffic: the bound holds for the
matrices a plan was computed from, and drift of the real models away from them is not covered by it.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from constellation import artifacts
from constellation.errors import FailedPrecondition
from constellation.planning import ConfusionMatrix, LikelihoodVote, Planner, QueryPlan, from_records, mean_costs
from constellation.pools import model_cards_for, read_pool
from services.dispatch.routing import PoolModel

FAMILY = "confusion"
TRAIN_COMMAND = "constellation train confusion --pool <closed-answer pool>"
PRIOR = 1.0
_OPTION = re.compile(r"^\s*([A-H])\)\s", re.MULTILINE)


@dataclass(frozen=True)
class Kind:
    """One closed-answer task: its labels, a matrix per model and what a call of each model cost.

    Attributes:
        costs: Mean recorded USD per call on ``train``.
        prices: (input, output) USD per million tokens of each model when the matrices were fitted
            (0 when unknown); a registry price that differs rescales the call's cost.
    """

    name: str
    labels: tuple[str, ...]
    matrices: dict[str, ConfusionMatrix]
    costs: dict[str, float]
    prices: dict[str, tuple[float, float]]


@dataclass(frozen=True)
class BoundedPlan:
    """A plan chosen for an error bound: the kind, the planner's plan, its members' matrices and the vote."""

    kind: str
    plan: QueryPlan
    matrices: dict[str, ConfusionMatrix]
    vote: LikelihoodVote
    call_costs: dict[str, float]
    """USD per call of each member, as planned."""


def choice_labels(prompt: str) -> tuple[str, ...]:
    """The option letters (``A) ...`` lines) of the prompt's last question, in order; () when none."""
    last = prompt.strip().rsplit("\n\n", 1)[-1]
    return tuple(_OPTION.findall(last))


def fit(pool: Path, *, name: str | None = None, prior: float = PRIOR) -> Kind:
    """A kind from a closed-answer pool's train split; labels are the train references' letters."""
    records = list(read_pool(pool))
    references = {(r.reference or "").strip().upper() for r in records if r.split == "train"}
    labels = tuple(sorted(ref for ref in references if len(ref) == 1 and ref.isalpha()))
    matrices = from_records(records, labels, prior=prior)
    costs = mean_costs(records)
    cards = model_cards_for(pool)
    prices = {
        m: (cards[m].price_in_per_mtok or 0.0, cards[m].price_out_per_mtok or 0.0) if m in cards else (0.0, 0.0)
        for m in matrices
    }
    kind = name or Path(pool).name.split(".")[0]
    return Kind(kind, labels, matrices, {m: costs.get(m, 0.0) for m in matrices}, prices)


def save(kinds: Sequence[Kind], root: Path, sources: Sequence[str] = ()) -> Path:
    """Writes ``kinds`` as a ``confusion`` artifact under ``root`` (and makes it CURRENT)."""
    arrays: dict[str, np.ndarray] = {}
    manifest: dict[str, object] = {"kinds": {}, "prior": PRIOR, "sources": list(sources)}
    described: dict[str, object] = {}
    for k, kind in enumerate(kinds):
        models = list(kind.matrices)
        for m, model in enumerate(models):
            arrays[f"k{k}_m{m}"] = kind.matrices[model].counts
        described[kind.name] = {
            "index": k,
            "labels": list(kind.labels),
            "models": models,
            "costs": kind.costs,
            "prices": {m: list(p) for m, p in kind.prices.items()},
        }
    manifest["kinds"] = described
    return artifacts.save(FAMILY, arrays, manifest, root)


def load(path: Path | str) -> dict[str, Kind]:
    """The kinds of a ``confusion`` artifact (a directory, or a root holding ``confusion/CURRENT``).

    Raises:
        FailedPrecondition: no artifact there, or it is damaged.
    """
    found = artifacts.load(path, FAMILY, train_command=TRAIN_COMMAND)
    prior = float(found.manifest.get("prior", PRIOR))
    kinds: dict[str, Kind] = {}
    for name, spec in found.manifest["kinds"].items():
        labels = tuple(spec["labels"])
        matrices = {
            model: ConfusionMatrix(model, labels, found.arrays[f"k{spec['index']}_m{m}"], prior)
            for m, model in enumerate(spec["models"])
        }
        prices = {m: (float(p[0]), float(p[1])) for m, p in spec.get("prices", {}).items()}
        kinds[name] = Kind(name, labels, matrices, dict(spec["costs"]), prices)
    return kinds


def try_load(path: str | None) -> tuple[dict[str, Kind], str]:
    """(kinds, "") from ``path`` or the default root's CURRENT; ({}, why) when there is none."""
    try:
        return load(path or artifacts.default_root()), ""
    except FailedPrecondition as exc:
        return {}, str(exc)


def call_cost(kind: Kind, model: PoolModel) -> float:
    """The planning cost of one call: the recorded mean, rescaled when the registry's price changed."""
    base = kind.costs[model.name]
    then = sum(kind.prices.get(model.name, (0.0, 0.0)))
    now = model.price_in_per_mtok + model.price_out_per_mtok
    return base * now / then if then > 0 and now > 0 else base


class BoundedPlanner:
    """Plans error-bounded queries over the live pool, caching a plan per (kind, alpha, caps).

    A cached plan is reused while the *pool signature* it was computed for is unchanged: the plannable
    models (those with a matrix, in the pool and healthy) with their call costs. Thread-safe.

    Args:
        kinds: The fitted kinds by name.
        planner: The solver settings.
    """

    def __init__(self, kinds: Mapping[str, Kind], planner: Planner | None = None) -> None:
        self.planner = planner or Planner()
        self._lock = threading.Lock()
        self._kinds = dict(kinds)
        self._cache: dict[tuple[object, ...], tuple[tuple[object, ...], BoundedPlan]] = {}
        self.solves = 0

    @property
    def kinds(self) -> dict[str, Kind]:
        return dict(self._kinds)

    def reload(self, kinds: Mapping[str, Kind]) -> None:
        """Installs newly fitted matrices; every cached plan is dropped."""
        with self._lock:
            self._kinds = dict(kinds)
            self._cache.clear()

    def kind_of(self, prompt: str) -> Kind | None:
        """The kind whose labels are the prompt's option letters, else the one with fewest labels that holds
        them all (a three-option question of a four-label kind: the truth is still one of its labels, so
        the bound of each of those labels holds); None when no fitted kind has them."""
        letters = set(choice_labels(prompt))
        if not letters:
            return None
        holding = [k for k in self._kinds.values() if letters <= set(k.labels)]
        return min(holding, key=lambda k: len(k.labels), default=None)

    def plan(
        self, kind: Kind, alpha: Mapping[str, float], pool: Iterable[PoolModel], *, samples: int = 1
    ) -> BoundedPlan:
        """The cheapest plan meeting ``alpha`` (per label) over ``pool``; at most ``samples`` calls per model.

        Raises:
            FailedPrecondition: no pool model has a matrix of ``kind``.
            InfeasiblePlan: even every plannable model at its cap misses the bound.
        """
        usable = sorted((m for m in pool if m.healthy and m.name in kind.matrices), key=lambda m: m.name)
        if not usable:
            raise FailedPrecondition(f"no model of the pool has a confusion matrix for {kind.name}")
        costs = {m.name: call_cost(kind, m) for m in usable}
        signature = tuple((name, round(cost, 12)) for name, cost in costs.items())
        key = (kind.name, tuple(sorted(alpha.items())), samples)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None and cached[0] == signature:
                return cached[1]
        matrices = {name: kind.matrices[name] for name in costs}
        chosen = self.planner.plan(matrices, costs, dict(alpha), cap=samples)
        members = {m: matrices[m] for m in chosen.members}
        made = BoundedPlan(kind.name, chosen, members, LikelihoodVote(members), {m: costs[m] for m in chosen.members})
        with self._lock:
            self._cache[key] = (signature, made)
            self.solves += 1
        return made


def main(argv: Sequence[str] | None = None) -> int:
    """``constellation train confusion``: fit the matrices of closed-answer pools and save the artifact."""
    parser = argparse.ArgumentParser(prog="constellation train confusion", description=main.__doc__)
    parser.add_argument("--pool", action="append", required=True, help="a closed-answer pool file (repeatable)")
    parser.add_argument("--out", default=str(artifacts.default_root()), help="artifacts root")
    args = parser.parse_args(argv)
    kinds = [fit(Path(p)) for p in args.pool]
    path = save(kinds, Path(args.out), [Path(p).name for p in args.pool])
    summary = {k.name: {"labels": "".join(k.labels), "models": len(k.matrices)} for k in kinds}
    print(f"confusion matrices written to {path}: {json.dumps(summary)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
