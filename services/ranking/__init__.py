"""The ranking service: orders the candidate answers of one query, best first.

Modules (none imports torch or gRPC unless it needs to):

* ``checks``: closed answers read from a text, form checks per answer kind (plain Python).
* ``prefilter``: the cheap first stage: centrality, agreement and form, and the prune.
* ``pairwise``: the antisymmetric pair ranker (numpy inference, torch training) and its artifact.
* ``rank``: :class:`~services.ranking.rank.Ranker`, the per-request pipeline; ``train``:
  ``constellation train ranker``.
* ``servicer``, ``main`` (``running_ranking`` for tests), ``client`` (``RankingClient``), ``config``.
"""
