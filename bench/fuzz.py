"""Fuzzes every RPC of the running mesh with requests generated from the descriptors; tallies status codes.

``python -m bench.fuzz`` (in ``make bench``). Starts the mesh (Triton replay, classifier, registry,
ranking, fusion, dispatch) and sends each method of each service ``--per-method`` requests built from
its request message's descriptor: every field set with a random value of its type (ints at their
limits, NaN and infinities, invalid enum numbers, empty, huge and non-ASCII strings, random bytes,
nested messages and repeated fields of random length), plus raw random bytes that may not decode at
all. Expected: only specific codes (OK, INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...), never
UNKNOWN or INTERNAL, and no process dies. The scaler is not part of the local mesh and is not fuzzed here.

Writes ``docs/bench/fuzz.json`` and the ``fuzz`` section of ``docs/BENCHMARKS.md``; exits non-zero on
an UNKNOWN, an INTERNAL or a dead process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import descriptor as pb_descriptor
from google.protobuf.message import Message

from bench.faults import build_mesh
from bench.quorum import DATA
from bench.report import DOCS, markdown_table, write_section
from constellation.v1 import classifier_pb2, dispatch_pb2, fusion_pb2, ranking_pb2, registry_pb2

FD = pb_descriptor.FieldDescriptor
BAD_CODES = {"UNKNOWN", "INTERNAL"}
HUGE = 1_000_000
INTS = [0, 1, -1, 2**31 - 1, -(2**31), 7, 1000]
FLOATS = [0.0, -1.0, 1e308, -1e308, float("nan"), float("inf"), float("-inf"), 0.5, 7.5]
SERVICES = {  # descriptor, mesh attribute holding the process (None: dispatch)
    "classifier": classifier_pb2.DESCRIPTOR.services_by_name["ClassifierService"],
    "registry": registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
    "ranking": ranking_pb2.DESCRIPTOR.services_by_name["RankingService"],
    "fusion": fusion_pb2.DESCRIPTOR.services_by_name["FusionService"],
    "dispatch": dispatch_pb2.DESCRIPTOR.services_by_name["DispatchService"],
}


def random_string(rng: random.Random, huge: bool = True) -> str:
    choice = rng.randrange(6)
    if choice == 0:
        return ""
    if choice == 1 and huge:
        return "x" * rng.choice([HUGE, 70_000])
    if choice == 2:
        return "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(rng.randrange(1, 64)))
    if choice == 3:
        return "\x00\n\t" + "A" * rng.randrange(0, 200)
    return rng.choice(["smollm2", "replay", "gpt-4o", "What is 2 + 2?", "../../etc/passwd", "a.b.c"])


def random_scalar(field: Any, rng: random.Random, huge: bool = True) -> Any:
    kind = field.type
    if kind in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return rng.choice(FLOATS)
    if kind == FD.TYPE_BOOL:
        return rng.random() < 0.5
    if kind == FD.TYPE_STRING:
        return random_string(rng, huge)
    if kind == FD.TYPE_BYTES:
        return rng.randbytes(rng.choice([0, 1, 16, 4096]))
    if kind == FD.TYPE_ENUM:
        numbers = [v.number for v in field.enum_type.values]
        return rng.choice([*numbers, 99, -3, 2**31 - 1])
    if kind in (FD.TYPE_UINT32, FD.TYPE_FIXED32):
        return rng.choice([0, 1, 2**32 - 1, 1000])
    if kind in (FD.TYPE_UINT64, FD.TYPE_FIXED64):
        return rng.choice([0, 1, 2**64 - 1, 1000])
    if kind in (FD.TYPE_INT64, FD.TYPE_SINT64, FD.TYPE_SFIXED64):
        return rng.choice([*INTS, 2**63 - 1, -(2**63)])
    return rng.choice(INTS)


def _repeated(field: Any) -> bool:
    is_repeated = getattr(field, "is_repeated", None)
    return bool(is_repeated) if is_repeated is not None else field.label == FD.LABEL_REPEATED


def fill(message: Message, rng: random.Random, depth: int = 0) -> Message:
    """Sets every field of ``message`` (one member of each oneof) to random values, nested up to depth 3."""
    fields: list[Any] = list(message.DESCRIPTOR.fields)
    for field in fields:
        if field.containing_oneof is not None and rng.random() < 0.5:
            continue
        if field.type == FD.TYPE_MESSAGE:
            if depth >= 3 or field.message_type.full_name.startswith("google."):
                continue
            if _repeated(field):
                if field.message_type.GetOptions().map_entry:
                    mapping = getattr(message, field.name)
                    for _ in range(rng.choice([0, 1, 3])):
                        key = random_scalar(field.message_type.fields_by_name["key"], rng)
                        value_field = field.message_type.fields_by_name["value"]
                        if value_field.type == FD.TYPE_MESSAGE:
                            fill(mapping[key], rng, depth + 1)
                        else:
                            mapping[key] = random_scalar(value_field, rng)
                    continue
                for _ in range(rng.choice([0, 1, 5, 40])):
                    fill(getattr(message, field.name).add(), rng, depth + 1)
            else:
                fill(getattr(message, field.name), rng, depth + 1)
        elif _repeated(field):
            count = rng.choice([0, 1, 3, 2000])
            getattr(message, field.name).extend(random_scalar(field, rng, huge=False) for _ in range(count))
        else:
            setattr(message, field.name, random_scalar(field, rng, huge=depth == 0))
    return message


async def call_once(channel: grpc.aio.Channel, method: Any, payload: bytes, timeout_s: float) -> str:
    """Sends ``payload`` (serialized request bytes) to ``method``; returns the status code's name."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    try:
        if method.server_streaming:
            call = channel.unary_stream(path)(payload, timeout=timeout_s)
            received = 0
            async for _ in call:
                received += 1
                if received >= 50:  # a watch never ends by itself; enough to see it answer
                    call.cancel()
                    return "OK"
            return "OK"
        await channel.unary_unary(path)(payload, timeout=timeout_s)
        return "OK"
    except asyncio.CancelledError:
        return "OK"
    except grpc.RpcError as error:
        return str(error.code().name)


async def fuzz_service(
    address: str, service: Any, per_method: int, rng: random.Random, timeout_s: float
) -> dict[str, Counter[str]]:
    """``per_method`` generated requests and a few raw random payloads to each method of ``service``."""
    tallies: dict[str, Counter[str]] = defaultdict(Counter)
    request_classes = _request_classes()
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)]
    ) as channel:
        for method in service.methods:
            cls = request_classes[method.input_type.full_name]
            for index in range(per_method):
                if index % 5 == 4:
                    payload = rng.randbytes(rng.choice([1, 7, 64, 1024]))
                else:
                    payload = fill(cls(), rng).SerializeToString()
                code = await call_once(channel, method, payload, timeout_s)
                tallies[method.name][code] += 1
    return tallies


def _request_classes() -> dict[str, type[Message]]:
    classes: dict[str, type[Message]] = {}
    for module in (classifier_pb2, dispatch_pb2, fusion_pb2, ranking_pb2, registry_pb2):
        for name in module.DESCRIPTOR.message_types_by_name:
            message_class = getattr(module, name)
            classes[message_class.DESCRIPTOR.full_name] = message_class
    return classes


def addresses(mesh: Any) -> dict[str, str]:
    ports = mesh.ports
    found = {"dispatch": mesh.dispatch_address}
    for name in ("classifier", "registry", "ranking", "fusion"):
        found[name] = f"127.0.0.1:{getattr(ports, name)}"
    return found


def report(results: dict[str, dict[str, Counter[str]]], dead: list[str], args: argparse.Namespace) -> str:
    rows = []
    for service, methods in results.items():
        for method, codes in methods.items():
            bad = sum(n for c, n in codes.items() if c in BAD_CODES)
            rows.append([f"{service}.{method}", sum(codes.values()),
                         ", ".join(f"{c} {n}" for c, n in codes.most_common()), bad])  # fmt: skip
    table = markdown_table(["method", "requests", "codes", "UNKNOWN + INTERNAL"], rows)
    return (
        "## Fuzzing every RPC\n\n"
        f"`python -m bench.fuzz --per-method {args.per_method} --seed {args.seed}`: requests generated from each "
        "request message's descriptor (random values of every field type, ints at their limits, NaN and "
        "infinities, invalid enum numbers, empty / 1 MB / non-ASCII strings, repeated scalars up to "
        "2,000 items, up to 40 nested messages), one in five replaced by raw random bytes, against the "
        "running mesh (Triton replay, "
        f"classifier, registry, ranking, fusion, dispatch).\n\n{table}\n\n"
        f"Processes dead afterwards: {', '.join(dead) or 'none'}.\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pool", type=Path, default=DATA / "gsm8k.jsonl.gz")
    parser.add_argument("--per-method", type=int, default=30)
    parser.add_argument("--seed", type=int, default=14)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    results: dict[str, dict[str, Counter[str]]] = {}
    with tempfile.TemporaryDirectory(prefix="constellation-fuzz-") as tmp:
        mesh = build_mesh(Path(tmp), args.pool, 0.01, ranking=True)
        try:
            mesh.start()
            started = time.perf_counter()
            for name, address in addresses(mesh).items():
                results[name] = asyncio.run(fuzz_service(address, SERVICES[name], args.per_method, rng, args.timeout_s))
                print(name, {m: dict(c) for m, c in results[name].items()}, flush=True)
            elapsed = time.perf_counter() - started
            dead = [p.name for p in mesh.children() if not p.alive()]
            dead += [] if mesh.triton.is_running() else ["triton"]
        finally:
            mesh.stop()
    body = report(results, dead, args)
    out = DOCS / "bench"
    out.mkdir(parents=True, exist_ok=True)
    data = {"args": vars(args) | {"pool": args.pool.name}, "elapsed_s": elapsed, "dead": dead,
            "codes": {s: {m: dict(c) for m, c in ms.items()} for s, ms in results.items()}}  # fmt: skip
    (out / "fuzz.json").write_text(json.dumps(data, indent=2))
    write_section("fuzz", body)
    print(body)
    bad = sum(n for ms in results.values() for c in ms.values() for code, n in c.items() if code in BAD_CODES)
    if bad or dead:
        raise SystemExit(f"{bad} UNKNOWN/INTERNAL answers; dead processes: {dead or 'none'}")


if __name__ == "__main__":
    main()
