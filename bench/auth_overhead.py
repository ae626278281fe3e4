"""What API keys and mTLS add to time to first token, against plain gRPC, side by side in one run.

Three dispatch servers in one process share one Dispatcher: plain gRPC (no keys, no TLS), keys (the auth
interceptor verifying a Bearer key against the SQLite key table), and keys + mTLS (certificates from a
development CA). Model calls go to an in-process stand-in for Triton that answers at once, one token per
chunk (model time near zero, so differences are the front door's own cost). Rounds send the same ``Ask``
to the three, the order rotating, over channels kept open (steady state); a second series opens a new
channel per request, so the TLS handshake is counted.

Run: ``python -m bench.auth_overhead --rounds 300`` (well under a minute on 2 cores). Writes
``docs/bench/auth_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import grpc

from bench.report import DOCS, percentiles
from constellation import tls
from constellation.auth import Role, bearer_metadata, new_key
from constellation.config import SecurityConfig, ServiceConfig
from constellation.server import Registration, create_server
from constellation.triton import Chunk, Sampling, TritonClient
from constellation.v1 import dispatch_pb2, dispatch_pb2_grpc
from services.dispatch.config import DispatchConfig
from services.dispatch.pipeline import Dispatcher
from services.dispatch.servicer import SERVICE_NAME, DispatchServicer
from services.registry.store import ModelStore

PATHS = ("plain", "keys", "keys+mtls")


class InstantModel:
    """A stand-in for Triton's generation stream: answers at once, a few chunks of one token each."""

    url = "in-process:0"

    def stream(self, model: str, prompt: str, sampling: Sampling, **_: Any) -> InstantStream:
        return InstantStream()


class InstantStream:
    def __init__(self) -> None:
        self.chunks = [Chunk(w, input_tokens=8, output_tokens=1) for w in ("The", " answer", " is")]
        self.chunks.append(Chunk(" 4.", input_tokens=8, output_tokens=1, finish_reason="stop", final=True))

    async def __aenter__(self) -> InstantStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        return None

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self

    async def __anext__(self) -> Chunk:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)


async def _ttft(channel: grpc.aio.Channel, metadata: tuple[tuple[str, str], ...] | None) -> float:
    request = dispatch_pb2.AskRequest(prompt="What is 2 + 2?", model="smollm2")
    request.sampling.max_tokens = 8
    started = time.perf_counter()
    first = None
    async for event in dispatch_pb2_grpc.DispatchServiceStub(channel).Ask(request, metadata=metadata, timeout=10):
        if first is None and event.WhichOneof("event") == "delta":
            first = time.perf_counter() - started
    assert first is not None
    return first * 1000


async def run(rounds: int, folder: Path) -> dict[str, Any]:
    certs = tls.make_dev_ca(folder / "certs")
    with ModelStore(folder / "keys.sqlite") as store:
        key, row = new_key("bench", Role.TENANT)
        store.add_key(row)
    keys = SecurityConfig(auth=True, keys_db=str(folder / "keys.sqlite"))
    mtls = keys.model_copy(
        update={
            "tls_cert": str(certs.server_cert),
            "tls_key": str(certs.server_key),
            "tls_ca": str(certs.ca),
            "mtls": True,
        }
    )
    clients = {"plain": tls.ClientSecurity(), "keys": tls.ClientSecurity(), "keys+mtls": certs.client()}
    metadata = {"plain": None, "keys": bearer_metadata(key), "keys+mtls": bearer_metadata(key)}
    async with AsyncExitStack() as stack, TritonClient("127.0.0.1:1") as triton:
        dispatcher = Dispatcher(DispatchConfig(routing=False), triton, generator=InstantModel())  # type: ignore[arg-type]
        registration = Registration(
            DispatchServicer(dispatcher),
            dispatch_pb2_grpc.add_DispatchServiceServicer_to_server,  # type: ignore[arg-type]
            SERVICE_NAME,
        )
        addresses = {}
        for name, security in (("plain", SecurityConfig()), ("keys", keys), ("keys+mtls", mtls)):
            running = await create_server([registration], ServiceConfig(port=0, security=security))
            stack.push_async_callback(running.stop, 0)
            addresses[name] = f"localhost:{running.port}"
        channels = {
            n: await stack.enter_async_context(tls.open_channel(addresses[n], [], [], clients[n])) for n in PATHS
        }
        steady: dict[str, list[float]] = {n: [] for n in PATHS}
        fresh: dict[str, list[float]] = {n: [] for n in PATHS}
        for n in PATHS:  # warm up
            await _ttft(channels[n], metadata[n])
        for i in range(rounds):
            order = PATHS[i % 3 :] + PATHS[: i % 3]
            for n in order:
                steady[n].append(await _ttft(channels[n], metadata[n]))
            if i % 5 == 0:
                for n in order:
                    async with tls.open_channel(addresses[n], [], [], clients[n]) as channel:
                        fresh[n].append(await _ttft(channel, metadata[n]))
    return {"rounds": rounds, "steady": _summary(steady), "new_channel": _summary(fresh)}


def _summary(samples: Mapping[str, list[float]]) -> dict[str, Any]:
    base = statistics.median(samples["plain"])
    return {
        n: {**percentiles(values), "median_ratio_to_plain": statistics.median(values) / base}
        for n, values in samples.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        result = asyncio.run(run(args.rounds, Path(folder)))
    out = DOCS / "bench" / "auth_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"auth + TLS overhead on TTFT ({args.rounds} rounds; model time ~0)")
    print(f"{'series':<12} {'path':<10} {'p50 ms':>8} {'p95 ms':>8} {'x plain (p50)':>14}")
    for series in ("steady", "new_channel"):
        for n in PATHS:
            row = result[series][n]
            print(f"{series:<12} {n:<10} {row['p50']:>8.2f} {row['p95']:>8.2f} {row['median_ratio_to_plain']:>14.2f}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
