"""Composition roots above the services: the CLI, the local mesh supervisor, the eval harness, the load
generator and the trace tools. Imports go one way: the library <- services <- apps."""
