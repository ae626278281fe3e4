"""``constellation scaler ...``: what the scaler decided and why, from a terminal.

Examples::

    constellation scaler status                  # replicas, target, rate, latency and reason per model
    constellation scaler status --json
    constellation scaler dry-run on              # keep deciding, stop applying

Only argparse is imported at module level, so building the command's parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50056"


def format_status(status: Any) -> str:
    """A ``GetStatusResponse`` as a table: one row per model, the latest decision's reason last."""
    from constellation.v1 import scaler_pb2

    head = f"actuator {status.actuator}, every {status.interval_s:g} s{', DRY-RUN' if status.dry_run else ''}"
    rows = [("MODEL", "TIER", "REPLICAS", "TARGET", "REQ/S", "LATENCY", "IDLE", "LAST ACTION", "REASON")]
    for model in status.models:
        last = model.last_decision
        action = (
            scaler_pb2.ScalingAction.Name(last.action).removeprefix("SCALING_ACTION_").lower() if last.model else "-"
        )
        if last.model and not last.applied and last.action != scaler_pb2.SCALING_ACTION_HOLD:
            action += " (not applied)"
        rows.append(
            (
                model.model,
                model.tier or "default",
                str(model.replicas),
                str(model.target_replicas),
                f"{last.arrival_rate_per_s:.2f}" if last.model else "-",
                f"{last.latency_ms:.0f} ms" if last.model else "-",
                f"{model.idle_s:.0f} s",
                action,
                last.reason or "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1] for row in rows
    ]
    return "\n".join([head, *lines])


async def _status(args: argparse.Namespace) -> int:
    from google.protobuf.json_format import MessageToDict

    from services.scaler.client import ScalerClient

    async with ScalerClient(args.address, traced=False) as client:
        status = await client.status()
    print(json.dumps(MessageToDict(status), indent=2) if args.json else format_status(status))
    return 0


async def _dry_run(args: argparse.Namespace) -> int:
    from services.scaler.client import ScalerClient

    async with ScalerClient(args.address, traced=False) as client:
        mode = await client.set_dry_run(args.mode == "on")
    print(f"dry-run {'on' if mode else 'off'}")
    return 0


def add_scaler_command(sub: Any) -> None:
    """Adds ``scaler status|dry-run`` to the top-level subparsers ``sub``."""
    scaler = sub.add_parser(
        "scaler",
        help="the scaler's replicas, targets and decisions",
        description="Talks to ScalerService (`constellation serve scaler`, `constellation up --scaler`; port 50056).",
    )
    actions = scaler.add_subparsers(dest="action", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="replicas, target and the latest decision with its reason, per model")
    status.add_argument("--json", action="store_true", help="the full status as JSON")
    dry_run = actions.add_parser("dry-run", help="turn dry-run on (decide, never apply) or off")
    dry_run.add_argument("mode", choices=["on", "off"])
    for parser, handler in ((status, _status), (dry_run, _dry_run)):
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"scaler host:port ({DEFAULT_ADDRESS})")
        parser.set_defaults(handler=lambda args, run=handler: int(asyncio.run(run(args))))
