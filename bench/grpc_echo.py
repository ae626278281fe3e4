"""A bare gRPC aio echo server, no interceptors or handlers' work: the transport's own round-trip floor.

``python -m bench.grpc_echo PORT`` serves ``/bench.Echo/Echo`` (unary, bytes in, the same bytes out) on
loopback until terminated. :mod:`bench.dispatch_hop` measures it beside dispatch's ``Plan``.
"""

from __future__ import annotations

import asyncio
import sys

import grpc

METHOD = "/bench.Echo/Echo"


def _same(data: bytes) -> bytes:
    return data


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def serve(port: int) -> None:
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(_echo, _same, _same)}
    )
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def stub(channel: grpc.Channel | grpc.aio.Channel) -> object:
    """The echo method on ``channel`` (sync or aio), with bytes passed through unchanged."""
    return channel.unary_unary(METHOD, request_serializer=_same, response_deserializer=_same)


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1])))
