"""Checks every Constellation service must pass: stock health and server reflection."""

from __future__ import annotations

import asyncio

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


async def serving(address: str, services: tuple[str, ...]) -> list[int]:
    """Health status of each name in ``services`` (use "" for the overall status)."""
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        return [
            (await health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)).status for name in services
        ]


async def reflected(address: str, service: str, method: str) -> tuple[set[str], str]:
    """The services reflection lists, and the output type of ``service.method`` as reflection describes it."""

    def reflect() -> tuple[set[str], str]:
        # The reflection client is synchronous: run it off the event loop that serves it.
        with grpc.insecure_channel(address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            names = set(database.get_services())
            pool = descriptor_pool.DescriptorPool(database)
            found = pool.FindServiceByName(service).FindMethodByName(method)
            return names, found.output_type.full_name

    return await asyncio.to_thread(reflect)


SERVING = health_pb2.HealthCheckResponse.SERVING
