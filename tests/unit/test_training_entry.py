"""run_training: the summary as JSON on stdout and 0; wrong input as one stderr line and 2; bugs keep
their traceback."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from typing import Any

import pytest

from constellation.errors import FailedPrecondition
from constellation.training import EXIT_BAD_INPUT, EXIT_OK, run_training


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="constellation train demo")
    parser.add_argument("--epochs", type=int, default=1)
    return parser


def _train(args: argparse.Namespace) -> Mapping[str, Any]:
    if args.epochs == 0:
        raise FailedPrecondition("no train split in the pools")
    if args.epochs < 0:
        raise RuntimeError("a bug")
    return {"epochs": args.epochs, "artifact": "/tmp/a"}


def test_the_summary_is_printed_as_json_and_the_status_is_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_training(_parser(), _train, ["--epochs", "3"]) == EXIT_OK
    out = capsys.readouterr()
    assert json.loads(out.out) == {"epochs": 3, "artifact": "/tmp/a"}
    assert out.err == ""


def test_wrong_input_is_one_line_naming_the_trainer_and_status_two(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_training(_parser(), _train, ["--epochs", "0"]) == EXIT_BAD_INPUT
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == "constellation train demo: FAILED_PRECONDITION: no train split in the pools\n"


def test_a_bug_is_not_turned_into_an_exit_status() -> None:
    with pytest.raises(RuntimeError, match="a bug"):
        run_training(_parser(), _train, ["--epochs", "-1"])


def test_bad_flags_exit_through_argparse() -> None:
    with pytest.raises(SystemExit) as done:
        run_training(_parser(), _train, ["--epochs", "x"])
    assert done.value.code == 2
