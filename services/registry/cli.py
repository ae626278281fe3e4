"""``constellation models ...``: look at and change the registry's pool from a terminal.

Examples::

    constellation models list                      # table of every model
    constellation models list --state ready --capability code
    constellation models show gpt-4o-mini-2024-07-18
    constellation models add --file services/registry/data/pool.example.toml
    constellation models remove gpt-4o-mini-2024-07-18

Only argparse is imported at module level, so building the command's parser stays cheap.
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50053"
STATES = ("ready", "loading", "cold", "unhealthy")


def _short(enum: Any, prefix: str, value: int) -> str:
    from services.registry.seed import enum_label

    return enum_label(enum, prefix, value)


def format_table(records: list[Any]) -> str:
    """The ``models list`` table: one line per record, columns sized to their contents."""
    from constellation.v1 import common_pb2

    header = ("name", "family", "size", "state", "$/Mtok in/out", "ttft p95", "errors", "version/weight")
    rows = [header]
    for r in records:
        ttft = r.stats.time_to_first_token.p95_ms
        rows.append(
            (
                r.name,
                r.family or "-",
                f"{r.params_b:g}B" if r.params_b else "-",
                _short(common_pb2.ModelState, "MODEL_STATE_", r.state),
                f"{r.price_in_per_mtok:g}/{r.price_out_per_mtok:g}",
                f"{ttft:.0f} ms" if ttft else "-",
                f"{r.stats.error_rate:.0%}",
                f"{r.version or '-'}/{r.traffic_weight:g}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)


async def _list(args: argparse.Namespace) -> int:
    from constellation.v1 import common_pb2
    from services.registry.client import RegistryClient

    state = common_pb2.ModelState.Value("MODEL_STATE_" + args.state.upper()) if args.state else 0
    async with RegistryClient(args.address, traced=False) as client:
        records = await client.list(state, args.capability or ())
    print(format_table(records) if records else "no models registered")
    return 0


async def _show(args: argparse.Namespace) -> int:
    from google.protobuf import json_format

    from services.registry.client import RegistryClient

    async with RegistryClient(args.address, traced=False) as client:
        record = await client.get(args.name)
    print(json_format.MessageToJson(record, preserving_proto_field_name=True, indent=2))
    return 0


async def _add(args: argparse.Namespace) -> int:
    from services.registry.client import RegistryClient
    from services.registry.seed import load_pool_file

    records = load_pool_file(args.file)
    async with RegistryClient(args.address, traced=False) as client:
        for record in records:
            stored = await client.register(record)
            print(f"registered {stored.name}")
    return 0


async def _remove(args: argparse.Namespace) -> int:
    from services.registry.client import RegistryClient

    async with RegistryClient(args.address, traced=False) as client:
        await client.deregister(args.name)
    print(f"removed {args.name}")
    return 0


def _run(handler: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        return int(asyncio.run(handler(args)))

    return run


def add_models_command(sub: Any) -> None:
    """Adds ``models list|show|add|remove`` to the top-level subparsers ``sub``."""
    models = sub.add_parser(
        "models",
        help="list, show, add or remove models in the registry",
        description="Talks to RegistryService (`constellation serve registry`, port 50053 by default).",
    )
    actions = models.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str, handler: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"registry host:port ({DEFAULT_ADDRESS})")
        parser.set_defaults(handler=_run(handler))
        return parser

    listing = action("list", "a table of the models: size, state, prices, latency, errors", _list)
    listing.add_argument("--state", choices=STATES, help="only models in this state")
    listing.add_argument("--capability", action="append", help="only models with this capability (repeatable)")
    action("show", "one model's full record as JSON", _show).add_argument("name")
    action("add", "register (upsert) the models of a pool file", _add).add_argument(
        "--file", required=True, help="pool file, TOML or JSON (see services/registry/data/pool.example.toml)"
    )
    action("remove", "deregister one model", _remove).add_argument("name")
