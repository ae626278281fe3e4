"""Query plans with guarantees: cost-minimal model sets under per-label error bounds.

* :mod:`.confusion` - per-model confusion matrices (Dirichlet-smoothed, with uncertainty) from train.
* :mod:`.surrogate` - the union/Chernoff (Bhattacharyya) bound of a plan's error per true label.
* :mod:`.solve` - exact branch and bound, and the grid DP approximation scheme.
* :mod:`.plan` - :class:`Planner` and :class:`QueryPlan`, the API a dispatch strategy uses.
* :mod:`.decision` - the likelihood-ratio vote and the certified early stop.
* :mod:`.decompose` - splitting multi-part prompts into independent parts.
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
