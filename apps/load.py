"""``constellation load``: an open-loop load generator for DispatchService/Ask.

Arrival times are fixed in advance (a constant rate, or a Poisson process), and every request is sent
at its arrival time whether or not earlier ones have finished, so slow responses cannot hold back
the load (no coordinated omission). Latency is measured from the *scheduled* arrival, so any lag in
sending counts against the mesh too. The run is bounded both in requests and in time.

Results: HDR histograms (microseconds) of time to first token and total time, error counts by status
code, achieved rate; written as JSON plus the histograms in HDR's compressed base64 form.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path

from hdrh.histogram import HdrHistogram
from tqdm import tqdm

from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError

MAX_US = 3_600_000_000


def arrival_times(rate: float, duration_s: float, max_requests: int, *, poisson: bool, seed: int) -> list[float]:
    """Offsets in seconds from the start at which requests are due, within both bounds."""
    if rate <= 0:
        raise ValueError("rate must be > 0 requests per second")
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while len(times) < max_requests:
        t += rng.expovariate(rate) if poisson else 1.0 / rate
        if t > duration_s:
            break
        times.append(t)
    return times


@dataclass
class LoadResult:
    """What a load run measured. Histograms hold microseconds."""

    scheduled: int
    completed: int
    errors: dict[str, int]
    wall_s: float
    offered_rate: float
    ttft: HdrHistogram = field(repr=False)
    total: HdrHistogram = field(repr=False)
    max_lag_ms: float = 0.0

    def summary(self) -> dict[str, object]:
        def pct(h: HdrHistogram) -> dict[str, float]:
            if h.get_total_count() == 0:
                return {}
            return {f"p{p:g}": h.get_value_at_percentile(p) / 1000 for p in (50, 90, 95, 99, 99.9)} | {
                "max": h.get_max_value() / 1000
            }

        return {
            "scheduled": self.scheduled,
            "completed": self.completed,
            "errors": self.errors,
            "wall_s": self.wall_s,
            "offered_rate_per_s": self.offered_rate,
            "achieved_rate_per_s": self.completed / self.wall_s if self.wall_s else 0.0,
            "max_send_lag_ms": self.max_lag_ms,
            "time_to_first_token_ms": pct(self.ttft),
            "total_ms": pct(self.total),
        }

    def write(self, path: Path) -> None:
        """Writes the summary and both histograms (HDR compressed, base64) as one JSON file."""
        data = self.summary() | {
            "hdr_time_to_first_token_us": self.ttft.encode().decode(),
            "hdr_total_us": self.total.encode().decode(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=2))


async def run_load(
    address: str,
    prompts: Sequence[str],
    *,
    rate: float,
    duration_s: float,
    max_requests: int,
    poisson: bool = True,
    models: Sequence[str] = (),
    max_tokens: int = 0,
    timeout_s: float = 60.0,
    seed: int = 0,
    traced: bool = True,
    progress: bool = True,
) -> LoadResult:
    """Offers ``rate`` requests per second for at most ``duration_s`` seconds and ``max_requests`` requests.

    Each request takes the next prompt (cycling) and, when ``models`` is given, a model drawn at
    random (seeded). Requests still running ``timeout_s`` after their arrival end with
    DEADLINE_EXCEEDED and count as errors.
    """
    schedule = arrival_times(rate, duration_s, max_requests, poisson=poisson, seed=seed)
    rng = random.Random(seed + 1)
    ttft = HdrHistogram(1, MAX_US, 3)
    total = HdrHistogram(1, MAX_US, 3)
    errors: Counter[str] = Counter()
    completed = 0
    max_lag = 0.0
    bar = tqdm(total=len(schedule), desc=f"open-loop load at {rate:g}/s", unit="req", disable=not progress)

    async with DispatchClient(address, traced=traced) as client:

        async def one(due: float, prompt: str, model: str) -> None:
            nonlocal completed, max_lag
            max_lag = max(max_lag, time.perf_counter() - due)
            first: float | None = None
            request = ask_request(prompt, model=model, max_tokens=max_tokens)
            try:
                async with aclosing(client.ask(request, timeout_s=timeout_s)) as events:
                    async for event in events:
                        if first is None and event.WhichOneof("event") == "delta":
                            first = time.perf_counter()
                end = time.perf_counter()
                ttft.record_value(max(1, round(((first or end) - due) * 1e6)))
                total.record_value(max(1, round((end - due) * 1e6)))
                completed += 1
            except ConstellationError as exc:
                errors[exc.code.name] += 1
            finally:
                bar.update(1)

        start = time.perf_counter()
        tasks = []
        for i, offset in enumerate(schedule):
            due = start + offset
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            model = rng.choice(list(models)) if models else ""
            tasks.append(asyncio.create_task(one(due, prompts[i % len(prompts)], model)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
    bar.close()
    return LoadResult(
        scheduled=len(schedule),
        completed=completed,
        errors=dict(errors),
        wall_s=wall,
        offered_rate=rate,
        ttft=ttft,
        total=total,
        max_lag_ms=max_lag * 1000,
    )
