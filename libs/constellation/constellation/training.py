"""One entry point for every trainer: ``constellation train <what>`` and ``python -m services.<x>.train``.

A trainer is a parser (its flags; ``prog`` names it in messages) and a function from the parsed flags to
a JSON-able summary of what it wrote. :func:`run_training` parses, sets up logging, runs it and turns
the outcome into an exit status: 0 with the summary on stdout, 2 with one line on stderr when the input
is wrong (an error of the library's tree, a missing file, a bad value), 2 from argparse for bad flags.
Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from constellation.errors import ConstellationError

EXIT_OK = 0
EXIT_BAD_INPUT = 2
# What a trainer raises for input it cannot use; reported as one line, not a traceback.
INPUT_ERRORS = (ConstellationError, FileNotFoundError, ValueError)

Trainer = Callable[[argparse.Namespace], Mapping[str, Any]]


def run_training(parser: argparse.ArgumentParser, train: Trainer, argv: Sequence[str] | None = None) -> int:
    """Runs ``train`` on the flags in ``argv`` (``sys.argv`` when None) and returns the exit status.

    Progress (bars, epoch lines) is the trainer's own and goes to stderr; stdout carries only the
    summary, as indented JSON, so it can be piped.
    """
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = train(args)
    except INPUT_ERRORS as exc:
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(summary, indent=2))
    return EXIT_OK
