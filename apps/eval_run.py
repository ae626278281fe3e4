"""``constellation eval``: runs a recorded pool's test split through the real mesh and judges policies.

Starts its own mesh on free loopback ports (Triton with the replay model serving the pool, and a
dispatch process whose catalog maps every pool model to the replay model), sends every call the
chosen policies need as an ``Ask`` with bounded concurrency, then writes the results as JSON, a
markdown table and a Pareto plot.

Latency is reported in two parts: the replayed model's *simulated* time (time to last token, from
its size class with a seeded heavy tail) and the *real* time the mesh took around it (client wall
time less the simulated waiting, which is ``time_scale`` × simulated time).
"""

from __future__ import annotations

import asyncio
import json
import math
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from apps.evaluation import PROFILE_POLICIES, Call, Judge, PolicyResult, pareto_verdict, verdict
from constellation.client import DispatchClient, ask_request
from constellation.errors import ConstellationError
from constellation.ml.answers import extract_answer
from constellation.pools import PoolRecord, model_cards_for, read_pool
from constellation.v1 import common_pb2
from services.dispatch import bounds

REPLAY_MODEL = "replay"
MAX_TOKENS_LIMIT = 65536


@dataclass
class EvalReport:
    """Everything one ``eval`` run produced."""

    pool: str
    task: str
    answer_kind: str
    results: list[PolicyResult]
    best_single: PolicyResult
    bounded: dict[str, dict[str, dict[str, float]]]
    """Per ``planned:<alpha>`` policy and true label: n, errors, realised error and its 95% Wilson interval."""
    calls: int
    failed_calls: int
    wall_s: float
    calls_per_s: float
    time_scale: float
    concurrency: int
    cascade: str = ""
    """The cascade baseline found on train, in words (empty when none)."""

    @property
    def metric(self) -> str:
        return "mean score" if self.answer_kind == "open" else "accuracy"


def catalog_for(pool: Path, models: Sequence[str]) -> dict[str, dict[str, object]]:
    """Dispatch catalog entries that send every pool model to the replay model."""
    cards = model_cards_for(pool)
    catalog: dict[str, dict[str, object]] = {}
    for model in models:
        card = cards.get(model)
        entry: dict[str, object] = {"triton_model": REPLAY_MODEL, "parameters": {"recorded_model": model}}
        if card is not None:
            entry.update(
                price_in_per_mtok=card.price_in_per_mtok or 0.0,
                price_out_per_mtok=card.price_out_per_mtok or 0.0,
                family=card.family,
                params_b=card.params_b,
            )
        catalog[model] = entry
    return catalog


async def _one_call(client: DispatchClient, record: PoolRecord, model: str, time_scale: float) -> Call:
    """One Ask: ``model`` is a pool model, or ``profile:<name>`` for a routed call (no model named)."""
    start = time.perf_counter()
    text = ""
    cost = 0.0
    simulated_ttft = simulated_total = 0.0
    error = ""
    models: tuple[str, ...] = ()
    if model.startswith("profile:"):
        profile = getattr(common_pb2, "PROFILE_" + model.split(":", 1)[1].upper())
        request = ask_request(record.prompt, max_tokens=MAX_TOKENS_LIMIT, profile=profile)
    elif model.startswith("planned:"):
        request = ask_request(record.prompt, max_tokens=MAX_TOKENS_LIMIT, alpha=float(model.split(":", 1)[1]))
    else:
        request = ask_request(record.prompt, model=model, max_tokens=MAX_TOKENS_LIMIT)
    try:
        async with aclosing(client.ask(request, timeout_s=120)) as events:
            async for event in events:
                if event.WhichOneof("event") == "final":
                    final = event.final
                    text = final.text
                    cost = final.usage.cost_usd
                    models = tuple(final.models)
                    simulated = {s.stage: s.milliseconds for s in final.stages if s.simulated}
                    simulated_ttft = simulated.get("first_token", 0.0)
                    simulated_total = simulated_ttft + simulated.get("generate", 0.0)
    except ConstellationError as exc:
        error = str(exc)
    wall_ms = (time.perf_counter() - start) * 1000
    mesh_ms = max(0.0, wall_ms - time_scale * simulated_total)
    return Call(record.id, model, text, cost, simulated_total, simulated_ttft, mesh_ms, error, models)


async def run_calls(
    address: str,
    pairs: Sequence[tuple[PoolRecord, str]],
    *,
    concurrency: int,
    time_scale: float,
    progress: bool = True,
) -> dict[tuple[str, str], Call]:
    """Sends every (record, model) pair through ``Ask``, at most ``concurrency`` at a time."""
    limit = asyncio.Semaphore(concurrency)
    results: dict[tuple[str, str], Call] = {}
    bar = tqdm(total=len(pairs), desc="calls through the mesh", unit="call", disable=not progress)
    async with DispatchClient(address, traced=False) as client:

        async def worker(record: PoolRecord, model: str) -> None:
            async with limit:
                call = await _one_call(client, record, model, time_scale)
            results[(record.id, model)] = call
            bar.update(1)

        await asyncio.gather(*(worker(r, m) for r, m in pairs))
    bar.close()
    return results


def run_eval(
    pool: Path,
    *,
    policies: Sequence[str] | None = None,
    concurrency: int = 32,
    time_scale: float = 0.0,
    limit: int | None = None,
    seed: int = 0,
    split: str = "test",
    say: Callable[[str], None] = print,
    progress: bool = True,
    router_artifact: str | None = None,
    profiles: bool | None = None,
) -> EvalReport:
    """Evaluates ``policies`` on ``pool``'s ``split`` through a fresh mesh.

    The default policies are every baseline, plus the four routing profiles when a trained router is
    found (``router_artifact``, else the CURRENT one) and ``profiles`` is not False; routed policies also
    start the classifier, whose query embedding the router reads.
    """
    from apps.mesh import Mesh, MeshPorts
    from constellation.net import free_port

    records = list(read_pool(pool))  # one pass over the file for both splits
    evaluated = [r for r in records if split == "all" or r.split == split]
    if limit:
        evaluated = evaluated[:limit]
    train = [r for r in records if r.split == "train"]
    if not evaluated:
        raise ValueError(f"{pool} has no {split} records")
    judge = Judge(evaluated, train, seed=seed)
    artifact = trained_router(router_artifact)
    if policies:
        chosen = list(policies)
    else:
        chosen = judge.policies()
        if artifact is not None and profiles is not False:
            chosen += list(PROFILE_POLICIES)
        elif profiles is not False:
            say("no trained router (`constellation train router`): the routing profiles are not evaluated")
    routed = any(p.startswith("profile:") for p in chosen)
    if routed and artifact is None:
        raise ValueError("profile:<name> policies need a trained router; run `constellation train router` first")
    planned = [p for p in chosen if p.startswith("planned:")]
    needed: dict[tuple[str, str], tuple[PoolRecord, str]] = {}
    for policy in chosen:
        for record in evaluated:
            for model in judge.members(policy, record):
                needed[(record.id, model)] = (record, model)
    say(
        f"{pool.name}: {len(evaluated)} {split} prompts x {len(judge.models)} models; "
        f"{len(chosen)} policies need {len(needed)} calls"
    )
    with tempfile.TemporaryDirectory(prefix="constellation-eval-") as tmp:
        run_dir = Path(tmp)
        models_file = run_dir / "models.json"
        models_file.write_text(json.dumps(catalog_for(pool, judge.models)))
        confusion = bounds.save([bounds.fit(pool)], run_dir / "artifacts") if planned else None
        ports = MeshPorts(*(free_port() for _ in range(9)))
        mesh = Mesh(
            ports,
            models=[REPLAY_MODEL],
            run_dir=run_dir,
            say=say,
            model_parameters={
                REPLAY_MODEL: {
                    "pool_paths": str(pool.resolve()),
                    "time_scale": str(time_scale),
                    "tokens_per_chunk": "64",
                }
            },
            dispatch_args=[
                "--models-file",
                str(models_file),
                "--max-tokens-limit",
                str(MAX_TOKENS_LIMIT),
                *(["--router-artifact", str(artifact)] if routed and artifact is not None else ["--no-routing"]),
                # the eval measures routing decisions, not the classifier's latency under a burst
                *(["--classify-timeout", "30"] if routed else []),
                *(["--confusion-artifact", str(confusion)] if confusion is not None else []),
                # simulated latency is not waited (time scale 0): real times to first token say nothing
                "--no-hedging",
            ],
            classifier=routed,
            # ranked fan-outs (code, open answers) need the ranking service to pick their answer
            ranking=routed and artifact is not None and plans_ranked_fanouts(artifact),
        )
        try:
            mesh.start()
            started = time.perf_counter()
            calls = asyncio.run(
                run_calls(
                    mesh.dispatch_address,
                    list(needed.values()),
                    concurrency=concurrency,
                    time_scale=time_scale,
                    progress=progress,
                )
            )
            wall = time.perf_counter() - started
        finally:
            mesh.stop()
    results = [judge.evaluate(p, calls) for p in chosen]
    singles = [r for r in results if r.policy.startswith("single:")]
    if singles:
        best = max(singles, key=lambda r: (r.quality, -r.mean_cost_usd))
    else:  # no single model was run: compare against the recorded best single model, and say so
        best = judge.recorded_best_single()
        results.append(best)
    errors = Counter(c.error for c in calls.values() if c.error)
    failed = sum(errors.values())
    for message, count in errors.most_common(3):
        say(f"  {count} calls failed: {message}")
    return EvalReport(
        pool=str(pool),
        task=evaluated[0].task,
        answer_kind=judge.kind,
        results=results,
        best_single=best,
        calls=len(calls),
        failed_calls=failed,
        wall_s=wall,
        calls_per_s=len(calls) / wall if wall else math.nan,
        time_scale=time_scale,
        concurrency=concurrency,
        bounded={p: error_per_label(evaluated, {r: c for (r, m), c in calls.items() if m == p}) for p in planned},
        cascade=judge.cascade.describe() if judge.cascade is not None else "",
    )


def wilson(errors: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion ``errors / n``."""
    if n == 0:
        return (math.nan, math.nan)
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def error_per_label(records: Sequence[PoolRecord], calls: dict[str, Call]) -> dict[str, dict[str, float]]:
    """Realised error of an error-bounded policy per true label (a failed call counts as an error)."""
    tally: dict[str, list[int]] = {}
    for record in records:
        truth = (record.reference or "").strip().upper()
        call = calls.get(record.id)
        if not truth or call is None:
            continue
        right = not call.error and extract_answer("choice", call.text) == truth
        counts = tally.setdefault(truth, [0, 0])
        counts[0] += 1
        counts[1] += int(not right)
    rows: dict[str, dict[str, float]] = {}
    for label, (n, errors) in sorted(tally.items()):
        low, high = wilson(errors, n)
        rows[label] = {"n": n, "errors": errors, "error": errors / n, "low": low, "high": high}
    return rows


def plans_ranked_fanouts(artifact: Path) -> bool:
    """Whether the router artifact at ``artifact`` has a profile that plans ranked fan-outs."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    return any(int(settings.get("rank_size", 0)) > 1 for settings in manifest.get("profiles", {}).values())


def trained_router(path: str | None) -> Path | None:
    """The router artifact directory to evaluate, or None when none is trained."""
    from constellation import artifacts
    from constellation.errors import FailedPrecondition
    from services.dispatch.routing import ARTIFACT_KIND, TRAIN_COMMAND

    try:
        return artifacts.resolve(path or artifacts.default_root(), ARTIFACT_KIND, train_command=TRAIN_COMMAND)
    except FailedPrecondition:
        if path:
            raise
        return None


def _fmt_ms(stats: dict[str, float]) -> str:
    return " / ".join(f"{stats[p]:.0f}" if stats[p] >= 10 else f"{stats[p]:.1f}" for p in ("p50", "p95", "p99"))


def markdown(report: EvalReport, whole_file: dict[str, float] | None = None) -> str:
    """The results table plus one verdict line per non-single policy.

    Args:
        whole_file: Optional recorded quality of each model over the whole pool file (both splits), shown
            beside the split's figures so they can be checked against the pool's own documentation.
    """
    baselines = [r for r in report.results if not r.policy.startswith("single:")]
    singles = sorted(
        (r for r in report.results if r.policy.startswith("single:")), key=lambda r: (-r.quality, r.mean_cost_usd)
    )
    scale = 100.0
    header = (
        f"| policy | {report.metric} % | mean cost $ | total cost $ | simulated model ms p50 / p95 / p99 "
        "| real mesh ms p50 / p95 / p99 | models per query |"
    )
    separator = "|---|---|---|---|---|---|---|"
    if whole_file is not None:
        header += " whole file % (recorded) |"
        separator += "---|"
    lines = [header, separator]
    for r in [*baselines, *singles]:
        name = r.policy.removeprefix("single:")
        if r.mean_cost_usd == 0:
            name += " (no price recorded)"
        if r is report.best_single:
            name = f"**{name}** (best single)"
        elif not r.policy.startswith("single:"):
            name = f"**{name}**"
        lines.append(
            f"| {name} | {r.quality * scale:.2f} | {r.mean_cost_usd:.6f} | {r.total_cost_usd:.4f} | "
            f"{_fmt_ms(r.simulated_ms)} | {_fmt_ms(r.mesh_ms)} | {r.mean_models:.1f} |"
        )
        if whole_file is not None:
            model = r.policy.removeprefix("single:").split(" (recorded")[0]
            lines[-1] += f" {whole_file[model] * scale:.2f} |" if model in whole_file else " |"
    verdicts = [f"- {verdict(r, report.best_single)}" for r in baselines]
    front = [f"- {pareto_verdict(r, report.results)}" for r in baselines if r.policy != "oracle"]
    notes = f"\nBaseline `cascade` (found on train): {report.cascade}.\n" if report.cascade else ""
    return (
        "\n".join(lines)
        + "\n\n"
        + "\n".join(verdicts)
        + "\n\nAgainst the Pareto front of single models and baselines (quality vs mean cost; the oracle and "
        + "policies with no recorded price left out):\n\n"
        + "\n".join(front)
        + "\n"
        + notes
        + bounded_table(report)
    )


def bounded_table(report: EvalReport) -> str:
    """Realised error per true label (95% Wilson interval) of each ``planned:<alpha>`` policy; "" if none."""
    if not report.bounded:
        return ""
    lines = ["", "| policy | true label | n | realised error % | 95% interval % | alpha % |"]
    lines.append("|---|---|---|---|---|---|")
    for policy, rows in report.bounded.items():
        alpha = float(policy.split(":", 1)[1])
        for label, row in rows.items():
            lines.append(
                f"| {policy} | {label} | {row['n']:.0f} | {row['error'] * 100:.1f} | "
                f"{row['low'] * 100:.1f}-{row['high'] * 100:.1f} | {alpha * 100:g} |"
            )
    return "\n".join(lines) + "\n"


def pareto_plot(report: EvalReport, path: Path) -> None:
    """Cost (log axis) against quality: every single model a point, the policies highlighted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    singles = [r for r in report.results if r.policy.startswith("single:")]
    floor = min((r.mean_cost_usd for r in report.results if r.mean_cost_usd > 0), default=1e-6) / 2
    ax.scatter(
        [max(r.mean_cost_usd, floor) for r in singles],
        [r.quality * 100 for r in singles],
        color="0.6",
        label="single models",
        zorder=2,
    )
    for r in singles:
        ax.annotate(
            r.policy.removeprefix("single:")[:22] + (" (no price)" if r.mean_cost_usd == 0 else ""),
            (max(r.mean_cost_usd, floor), r.quality * 100),
            fontsize=6,
            color="0.4",
            xytext=(3, 2),
            textcoords="offset points",
        )
    markers = {
        "static": "s",
        "random": "v",
        "oracle": "*",
        "majority": "D",
        "profile:quality": "P",
        "profile:balanced": "X",
        "profile:cost": "<",
        "profile:speed": ">",
        "top3": "^",
        "top5": "h",
        "cascade": "d",
    }
    for r in report.results:
        if r.policy.startswith("single:"):
            continue
        ax.scatter(
            max(r.mean_cost_usd, floor),
            r.quality * 100,
            marker=markers.get(r.policy, "o"),
            s=90,
            label=r.policy,
            zorder=3,
        )
    ax.set_xscale("log")
    ax.set_xlabel("mean cost per query (USD, log scale)")
    ax.set_ylabel(f"{report.metric} (%)")
    ax.set_title(f"{report.task}: quality vs cost on the test split (through the mesh)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(report: EvalReport, out_dir: Path) -> dict[str, Path]:
    """Writes ``<task>.json``, ``<task>.md`` and ``<task>_pareto.png`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = report.task
    data = {
        "pool": Path(report.pool).name,
        "task": report.task,
        "answer_kind": report.answer_kind,
        "metric": report.metric,
        "calls": report.calls,
        "failed_calls": report.failed_calls,
        "wall_s": report.wall_s,
        "calls_per_s": report.calls_per_s,
        "time_scale": report.time_scale,
        "concurrency": report.concurrency,
        "best_single": report.best_single.policy,
        "results": [r.row() for r in report.results],
        "verdicts": {r.policy: verdict(r, report.best_single) for r in report.results},
        "error_per_label": report.bounded,
        "pareto": {
            r.policy: pareto_verdict(r, report.results)
            for r in report.results
            if not r.policy.startswith("single:") and r.policy != "oracle"
        },
        "cascade": report.cascade,
    }
    paths = {
        "json": out_dir / f"{stem}.json",
        "markdown": out_dir / f"{stem}.md",
        "plot": out_dir / f"{stem}_pareto.png",
    }
    paths["json"].write_text(json.dumps(data, indent=2))
    paths["markdown"].write_text(markdown(report))
    pareto_plot(report, paths["plot"])
    return paths
