"""Bare relays: ``DispatchService/Ask`` reduced to its hop, to measure the floor dispatch sits on.

A relay takes an ``AskRequest`` naming a model, sends it to Triton over the same streaming call that
dispatch makes, and passes each text piece back as an ``AnswerDelta``. Nothing else: no validation,
routing, tracing, metrics, plan or progress events, fallback or accounting. Two of them, differing only
in the gRPC API they use:

- ``aio``: a ``grpc.aio`` server calling Triton through :class:`constellation.triton.TritonClient` on one
  event loop, as dispatch does;
- ``sync``: a thread-pool ``grpc.server`` making the same Triton call blocking, from the handler's thread.

``python -m bench.relays --kind aio|sync --port P --triton-url HOST:PORT --models-file F`` serves one on
loopback until terminated (``F`` is dispatch's ``--models-file`` JSON). :mod:`bench.relay_floor` measures
both beside dispatch and a direct Triton call. They are benchmark instruments, not a way to run the mesh.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2

from constellation.triton import STREAM_METHOD, Sampling, TritonClient, decode_chunk, stream_request
from constellation.v1 import dispatch_pb2, dispatch_pb2_grpc

TIMEOUT_S = 30.0


def _target(models: dict[str, Any], request: dispatch_pb2.AskRequest) -> tuple[str, Sampling, dict[str, str]]:
    entry = models[request.model]
    sampling = Sampling(max_tokens=request.sampling.max_tokens or 16, temperature=request.sampling.temperature)
    return entry.get("triton_model", request.model), sampling, dict(entry.get("parameters", {}))


def _delta(text: str, model: str) -> dispatch_pb2.AskResponse:
    return dispatch_pb2.AskResponse(delta=dispatch_pb2.AnswerDelta(text=text, source=model))


class AioRelay(dispatch_pb2_grpc.DispatchServiceServicer):
    """The asyncio relay: dispatch's own Triton client, nothing around it."""

    def __init__(self, triton: TritonClient, models: dict[str, Any]):
        self.triton = triton
        self.models = models

    async def Ask(
        self, request: dispatch_pb2.AskRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[dispatch_pb2.AskResponse]:
        model, sampling, parameters = _target(self.models, request)
        async for chunk in self.triton.generate(
            model, request.prompt, sampling, timeout_s=TIMEOUT_S, parameters=parameters
        ):
            if chunk.text:
                yield _delta(chunk.text, request.model)

    async def Plan(
        self, request: dispatch_pb2.PlanRequest, context: grpc.aio.ServicerContext
    ) -> dispatch_pb2.PlanResponse:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("a bare relay does not plan; ask dispatch")
        return dispatch_pb2.PlanResponse()


class SyncRelay(dispatch_pb2_grpc.DispatchServiceServicer):
    """The thread-pool relay: a blocking Triton stub called from the handler's own thread."""

    def __init__(self, triton_url: str, models: dict[str, Any]):
        self.method = grpc.insecure_channel(triton_url).unary_stream(
            STREAM_METHOD,
            request_serializer=service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=service_pb2.ModelStreamInferResponse.FromString,
        )
        self.models = models

    def Ask(
        self, request: dispatch_pb2.AskRequest, context: grpc.ServicerContext
    ) -> Iterator[dispatch_pb2.AskResponse]:
        model, sampling, parameters = _target(self.models, request)
        # The same call as TritonClient's: one request, half-closed, read to the end.
        responses = self.method(stream_request(model, request.prompt, sampling, "", parameters), timeout=TIMEOUT_S)
        ended = False
        try:
            for response in responses:
                if response.error_message:
                    context.abort(grpc.StatusCode.INTERNAL, response.error_message)
                chunk = decode_chunk(response.infer_response)
                if chunk.text:
                    yield _delta(chunk.text, request.model)
            ended = True
        finally:
            if not ended:
                responses.cancel()

    def Plan(self, request: dispatch_pb2.PlanRequest, context: grpc.ServicerContext) -> dispatch_pb2.PlanResponse:
        context.set_code(grpc.StatusCode.UNIMPLEMENTED)
        context.set_details("a bare relay does not plan; ask dispatch")
        return dispatch_pb2.PlanResponse()


def _health() -> health.HealthServicer:
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    return servicer


async def serve_aio(port: int, triton_url: str, models: dict[str, Any]) -> None:
    server = grpc.aio.server()
    async with TritonClient(triton_url) as triton:
        dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(AioRelay(triton, models), server)
        health_pb2_grpc.add_HealthServicer_to_server(_health(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        await server.wait_for_termination()


def serve_sync(port: int, triton_url: str, models: dict[str, Any]) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    dispatch_pb2_grpc.add_DispatchServiceServicer_to_server(SyncRelay(triton_url, models), server)
    health_pb2_grpc.add_HealthServicer_to_server(_health(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("aio", "sync"), required=True, help="which gRPC API the relay uses")
    parser.add_argument("--port", type=int, required=True, help="loopback port to serve on")
    parser.add_argument("--triton-url", required=True, help="Triton's gRPC endpoint, host:port")
    parser.add_argument("--models-file", type=Path, required=True, help="model name -> triton_model, parameters")
    args = parser.parse_args(argv)
    models = json.loads(args.models_file.read_text())
    if args.kind == "aio":
        asyncio.run(serve_aio(args.port, args.triton_url, models))
    else:
        serve_sync(args.port, args.triton_url, models)


if __name__ == "__main__":
    main()
