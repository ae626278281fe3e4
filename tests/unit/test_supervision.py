"""The supervisor's backoff schedule and how `constellation health` shows what the supervisor recorded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from apps.cli import _print_supervision
from apps.mesh import Backoff, supervisor_file


def test_backoff_doubles_from_the_initial_delay_and_is_bounded() -> None:
    backoff = Backoff(initial_s=0.5, factor=2.0, max_s=5.0)
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]


def test_health_prints_each_child_and_is_unhealthy_while_one_waits_to_restart(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"name": "triton", "state": "running", "pid": 11, "restarts": 0, "last_exit": ""},
        {"name": "classifier", "state": "backoff", "pid": 12, "restarts": 2, "last_exit": "-9"},
    ]
    supervisor_file(tmp_path).write_text(json.dumps({"updated": 0, "children": rows}))
    assert _print_supervision(str(tmp_path)) is False
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].split() == ["triton", "running", "11", "0", "-"]
    assert lines[2].split() == ["classifier", "backoff", "12", "2", "-9"]
    rows[1]["state"] = "running"
    supervisor_file(tmp_path).write_text(json.dumps({"updated": 0, "children": rows}))
    assert _print_supervision(str(tmp_path)) is True
