"""A service's ``main``, declared instead of written: flags, typed config, logging, lifespan, stop.

Each service describes itself once as a :class:`ServiceMain`: its config class, its extra flags (each
one's ``dest`` is the config field it overrides) and its *lifespan*, an async context manager that opens
what the service depends on, holds a server (:func:`constellation.server.serving`) and closes all of
it in reverse on exit. Tests enter the same lifespan with port 0; ``main`` runs it until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from constellation import tls
from constellation.config import ServiceConfig, load_config
from constellation.errors import ConstellationError
from constellation.server import run_until_stopped

log = logging.getLogger(__name__)

LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class Bound(Protocol):
    """What a lifespan yields: at least the port its server is bound to."""

    @property
    def port(self) -> int: ...


A = TypeVar("A")
C = TypeVar("C", bound=ServiceConfig)
R = TypeVar("R", bound=Bound)


class Flag:
    """One command-line flag: the arguments of ``ArgumentParser.add_argument``.

    The flag's ``dest`` names the config field it sets; a flag left out is None and changes nothing.
    """

    def __init__(self, *names: str, **options: Any) -> None:
        self.names = names
        self.options = options


def disable(name: str, field_name: str, help: str) -> Flag:
    """A ``--no-x`` switch that sets the boolean config field ``field_name`` to False when given."""
    return Flag(name, dest=field_name, action="store_const", const=False, default=None, help=help)


@dataclass(frozen=True)
class ServiceMain(Generic[C, R]):
    """The command line of one service.

    Attributes:
        name: Service name, as in ``constellation serve <name>``.
        config: The service's settings class.
        description: The ``--help`` text.
        lifespan: Opens the service and its dependencies for ``config``; yields what :attr:`banner` reads.
        flags: Flags beyond ``--config``, ``--port`` and ``--metrics-port``.
        details: Extra words for the start-up line (e.g. how many models are loaded); none by default.
    """

    name: str
    config: type[C]
    description: str
    lifespan: Callable[[C], AbstractAsyncContextManager[R]]
    flags: Sequence[Flag] = ()
    details: Callable[[R], str] | None = None

    def parser(self) -> argparse.ArgumentParser:
        """The argument parser: the common flags, then the service's own."""
        parser = argparse.ArgumentParser(prog=f"constellation serve {self.name}", description=self.description)
        parser.add_argument("--config", help="TOML config file (default: ./constellation.toml if present)")
        default_port = self.config.model_fields["port"].default
        parser.add_argument("--port", type=int, help=f"gRPC port (default {default_port}; 0 picks a free one)")
        parser.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (-1 disables)")
        parser.add_argument(
            "--insecure", action="store_true", help="allow binding a non-loopback address without API keys"
        )
        for flag in self.flags:
            parser.add_argument(*flag.names, **flag.options)
        return parser

    def load(self, argv: Sequence[str] | None = None) -> C:
        """Parses ``argv`` and builds the config: flags over environment over file over defaults."""
        args = vars(self.parser().parse_args(argv))
        path = args.pop("config")
        insecure = args.pop("insecure")
        config = load_config(self.config, path, **args)
        if insecure:
            config.security.insecure = True
        return config

    def banner(self, config: C, running: R) -> str:
        """The line printed once the server listens (supervisors and people read it)."""
        line = f"{self.name} listening on {config.host}:{running.port}"
        return f"{line} ({self.details(running)})" if self.details is not None else line

    def main(self, argv: Sequence[str] | None = None) -> None:
        """Runs the service until SIGINT or SIGTERM; exits with argparse's status 2 on bad flags."""
        config = self.load(argv)
        logging.basicConfig(level=config.log_level, format=LOG_FORMAT)
        tls.configure_clients(tls.from_config(config.security))
        asyncio.run(
            run_until_stopped(self.lifespan(config), lambda running: print(self.banner(config, running), flush=True))
        )


def optional_artifact(
    service: str, load: Callable[[Path], A], configured: str, default_root: Callable[[], Path], without: str
) -> A | None:
    """The trained artifact a service serves with, or None when there is none it can use.

    A missing or unreadable artifact is not an error: the service runs on its untrained path, and a
    warning (``"<service>: <why>; <without>"``) says which one. Blocking (reads files): call it off the loop.

    Args:
        service: The service's name, first word of the warning.
        load: Reads the artifact at a directory (one artifact, or a folder holding ``CURRENT``).
        configured: The directory the config names; empty: ``default_root()``.
        default_root: Where the service's trained artifacts live by default.
        without: How the service serves without it, for the warning.
    """
    where = Path(configured) if configured else default_root()
    try:
        return load(where)
    except ConstellationError as error:
        log.warning("%s: %s; %s", service, error.message, without)
        return None
