"""``constellation keys ...``: create, list and revoke API keys.

Examples::

    constellation keys create --tenant ops --role admin --db ~/.cache/constellation/registry.sqlite  # bootstrap
    constellation keys create --tenant acme --key "$ADMIN_KEY"          # over gRPC, as an admin
    constellation keys list --key "$ADMIN_KEY"
    constellation keys revoke 3f9a0c12ab45 --key "$ADMIN_KEY"

With ``--db`` the command writes the registry's SQLite file directly (the first admin key, before any
key exists); otherwise it calls the registry's CreateKey/ListKeys/RevokeKey with an admin key. The full
key is printed once, on stdout; only its salted hash is stored.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
from typing import Any

DEFAULT_ADDRESS = "127.0.0.1:50053"
ROLES = ("tenant", "admin", "service")


def _when(stamp: Any) -> str:
    if not stamp.seconds:
        return "-"
    return datetime.datetime.fromtimestamp(stamp.seconds, datetime.UTC).strftime("%Y-%m-%d %H:%M")


def format_keys(keys: list[Any]) -> str:
    """The ``keys list`` table."""
    from constellation.v1 import registry_pb2

    rows = [("key id", "tenant", "role", "created (UTC)", "revoked (UTC)")]
    for k in keys:
        role = registry_pb2.KeyRole.Name(k.role).removeprefix("KEY_ROLE_").lower()
        rows.append((k.key_id, k.tenant, role, _when(k.created_at), _when(k.revoked_at)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def _local(args: argparse.Namespace) -> int:
    from services.registry.servicer import create_key, key_info
    from services.registry.store import ModelStore

    with ModelStore(args.db) as store:
        if args.action == "create":
            full, _ = create_key(store, args.tenant, _role(args.role))
            print(full)
        elif args.action == "list":
            print(format_keys([key_info(k) for k in store.keys()]))
        else:
            revoked = store.revoke_key(args.key_id)
            if revoked is None:
                from constellation.errors import NotFound

                raise NotFound(f"no key {args.key_id!r}")
            print(f"revoked {revoked.key_id}")
    return 0


def _role(name: str) -> Any:
    from constellation.v1 import registry_pb2

    return registry_pb2.KeyRole.Value(f"KEY_ROLE_{name.upper()}")


async def _remote(args: argparse.Namespace) -> int:
    from constellation import tls
    from constellation.auth import bearer_metadata
    from constellation.v1 import registry_pb2
    from services.registry.client import RegistryClient

    if args.tls_ca:
        tls.configure_clients(tls.ClientSecurity(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key))
    metadata = bearer_metadata(args.key) if args.key else None
    async with RegistryClient(args.address, traced=False, default_timeout_s=10.0) as client:
        if args.action == "create":
            request = registry_pb2.CreateKeyRequest(tenant=args.tenant, role=_role(args.role))
            print((await client.stub.CreateKey(request, metadata=metadata)).key)
        elif args.action == "list":
            response = await client.stub.ListKeys(registry_pb2.ListKeysRequest(), metadata=metadata)
            print(format_keys(list(response.keys)))
        else:
            request_revoke = registry_pb2.RevokeKeyRequest(key_id=args.key_id)
            print(f"revoked {(await client.stub.RevokeKey(request_revoke, metadata=metadata)).info.key_id}")
    return 0


def _run(args: argparse.Namespace) -> int:
    return _local(args) if args.db else asyncio.run(_remote(args))


def add_keys_command(sub: Any) -> None:
    """Adds ``keys create|list|revoke`` to the ``constellation`` parser."""
    keys = sub.add_parser("keys", help="create, list and revoke API keys", description=__doc__.split("\n\n")[0])
    actions = keys.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument("--db", help="write the registry's SQLite file directly (bootstrap) instead of gRPC")
        parser.add_argument("--address", default=DEFAULT_ADDRESS, help=f"registry (default {DEFAULT_ADDRESS})")
        parser.add_argument("--key", default="", help="an admin API key (gRPC)")
        parser.add_argument("--tls-ca", default="", help="CA file: dial the registry over TLS")
        parser.add_argument("--tls-cert", default="", help="client certificate (mTLS)")
        parser.add_argument("--tls-key", default="", help="client private key (mTLS)")
        parser.set_defaults(handler=_run)
        return parser

    create = action("create", "create a key; prints it once")
    create.add_argument("--tenant", required=True, help="the tenant budgets and metrics are kept under")
    create.add_argument("--role", choices=ROLES, default="tenant", help="what the key may do (default tenant)")
    action("list", "list the keys (never their secrets)")
    revoke = action("revoke", "revoke a key")
    revoke.add_argument("key_id", help="the id inside the key (ck_<id>_...)")
