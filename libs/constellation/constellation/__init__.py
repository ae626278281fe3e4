"""Constellation's shared library: contracts, server bootstrap, configuration, errors, clients and the CLI."""

__version__ = "0.1.0"
