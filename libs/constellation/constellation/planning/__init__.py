"""Query plans with guarantees: cost-minimal model sets under per-label error bounds.

* :mod:`.confusion` - per-model confusion matrices (Dirichlet-smoothed, with uncertainty) from train.
* :mod:`.surrogate` - the union/Chernoff (Bhattacharyya) bound of a plan's error per true label.
* :mod:`.solve` - exact branch and bound, and the grid DP approximation scheme.
* :mod:`.plan` - :class:`Planner` and :class:`QueryPlan`, the API a dispatch strategy uses.
* :mod:`.decision` - the likelihood-ratio vote and the certified early stop.
* :mod:`.decompose` - splitting multi-part prompts into independent parts.

What a plan guarantees: if every model's answers follow its confusion matrix and calls are independent
given the true label, the plan's likelihood-ratio vote errs with probability at most
``bound_per_label[theta]`` (<= the requested ``alpha_theta``) when the truth is ``theta``. The matrices
are estimates from ``train`` (``pessimistic_level`` plans on an upper credible quantile of each
Bhattacharyya coefficient), and recorded LLMs make correlated mistakes, so the realised error can exceed
alpha; ``python -m bench.planner`` measures by how much. The certified early stop never changes the
vote's decision, so it keeps whatever the plan guarantees.

Typical use (a dispatch strategy)::

    plan = Planner().plan(matrices, costs, alpha=0.05)       # offline, cache per task and alpha
    vote = LikelihoodVote({m: matrices[m] for m in plan.members})
    ... as answers arrive:  if certified_stop(vote, answers, running): cancel the rest
    label = vote.decide(answers)
"""

from constellation.planning.confusion import ABSTAIN, ConfusionMatrix, from_records, mean_costs
from constellation.planning.decision import LikelihoodVote, certified_stop
from constellation.planning.decompose import Part, split
from constellation.planning.plan import InfeasiblePlan, Planner, QueryPlan

__all__ = [
    "ABSTAIN",
    "ConfusionMatrix",
    "InfeasiblePlan",
    "LikelihoodVote",
    "Part",
    "Planner",
    "QueryPlan",
    "certified_stop",
    "from_records",
    "mean_costs",
    "split",
]
