"""The ``constellation`` command: run the mesh, ask it questions, inspect it.

Examples::

    constellation up                 # start Triton + services; Ctrl-C stops everything
    constellation up --demo          # ... and stream an answer to a demo question first (make run)
    constellation ask "Why is the sky blue?"
    constellation ask --max-tokens 64 --temperature 0 "Name three prime numbers."
    constellation plan "Solve 12*7"  # which model(s) would be asked, without asking
    constellation health             # health of every service of the running mesh
    constellation models list        # the registry's pool: state, prices, latency, errors
    constellation scaler status      # replicas per model, targets and the latest decision's reason
    constellation eval --pool ../shared/data/gsm8k.jsonl.gz   # judge policies on a recorded pool
    constellation down               # stop a mesh started by `up` in another terminal
    constellation keys create --tenant acme --key "$ADMIN_KEY"   # an API key (see `keys --help`)
    constellation certs dev-ca ./certs   # a development CA + server/client certificates for mTLS
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar, cast

from constellation.errors import ConstellationError, InvalidArgument

DEMO_QUESTION = "What is the capital of France, and what is it famous for?"
EXIT_ERROR = 1
SHOWN_ALTERNATIVES = 4
"""Candidates not chosen that ``ask -v`` lists under the plan (the best-scoring first)."""
EXIT_USAGE = 2


def _err(message: str) -> None:
    print(f"constellation: {message}", file=sys.stderr)


def _dispatch_address(explicit: str | None) -> str:
    if explicit:
        return explicit
    from apps.mesh import MeshState, state_file

    state = MeshState.load(state_file())
    return state.dispatch if state else "127.0.0.1:50051"


class AnswerPrinter:
    """Prints an Ask's event stream: answer text on stdout; with ``verbose``, the classification, the plan
    with every candidate's reason and each member's progress on stderr; the summary on stderr.

    One method per event kind, looked up in :attr:`HANDLERS` by the event's ``oneof`` name.
    """

    def __init__(self, args: argparse.Namespace):
        self.verbose = bool(args.verbose)
        self.quiet = bool(args.quiet)
        self.started = time.perf_counter()
        self.first_at: float | None = None
        self.plan_seen: Any = None
        self.member_cost: dict[str, float] = {}

    def show(self, event: Any) -> None:
        handler = self.HANDLERS.get(event.WhichOneof("event"))
        if handler is not None:
            handler(self, event)

    def classification(self, event: Any) -> None:
        if not self.verbose:
            return
        from constellation.v1 import common_pb2

        c = event.classification.classification
        kind = common_pb2.AnswerKind.Name(c.answer_kind).removeprefix("ANSWER_KIND_").lower()
        print(
            f"[classify] task {common_pb2.TaskType.Name(c.task).removeprefix('TASK_TYPE_').lower()} "
            f"({c.task_confidence:.2f}), complexity "
            f"{common_pb2.Complexity.Name(c.complexity).removeprefix('COMPLEXITY_').lower()} "
            f"({c.complexity_confidence:.2f}), {kind} answer, ~{c.expected_output_tokens} output tokens, "
            f"by {c.decided_by}",
            file=sys.stderr,
        )

    def plan(self, event: Any) -> None:
        self.plan_seen = event.plan.plan
        if not self.verbose:
            return
        plan = event.plan.plan
        print(f"[plan] {plan.policy}: {plan.summary}", file=sys.stderr)
        others = [c for c in plan.candidates if not c.chosen]
        shown = [c for c in plan.candidates if c.chosen] + others[:SHOWN_ALTERNATIVES]
        for c in shown:
            mark = "*" if c.chosen else " "
            print(
                f"  {mark} {c.model:<14} quality {c.predicted_quality:.2f}  ${c.predicted_cost_usd:.7f}  "
                f"~{c.predicted_latency_ms:,.0f} ms  {c.reason}",
                file=sys.stderr,
            )
        if len(others) > SHOWN_ALTERNATIVES:
            print(
                f"    ... {len(others) - SHOWN_ALTERNATIVES} more (`constellation plan` lists them all)",
                file=sys.stderr,
            )

    def candidate(self, event: Any) -> None:
        from constellation.v1 import dispatch_pb2

        c = event.candidate
        if c.phase == dispatch_pb2.CandidateEvent.PHASE_FINISHED:
            self.member_cost[c.model] = c.usage.cost_usd
        fan_out = self.plan_seen is not None and sum(m.chosen for m in self.plan_seen.candidates) > 1
        problem = c.phase in (dispatch_pb2.CandidateEvent.PHASE_FAILED, dispatch_pb2.CandidateEvent.PHASE_CANCELLED)
        if not self.verbose or not (fan_out or problem):
            return  # one model streams its answer itself; its timing is in the summary
        phase = dispatch_pb2.CandidateEvent.Phase.Name(c.phase).removeprefix("PHASE_").lower()
        elapsed = (time.perf_counter() - self.started) * 1000
        line = f"[member] {c.model:<14} {phase:<11} at {elapsed:>8,.0f} ms"
        if c.phase == dispatch_pb2.CandidateEvent.PHASE_FINISHED:
            line += f"  {c.usage.output_tokens} tokens  ${c.usage.cost_usd:.7f}"
            if c.text:
                line += f"  {_one_line(c.text)!r}"
        elif c.HasField("error") and c.error.message:
            line += f"  {c.error.message}"
        print(line, file=sys.stderr, flush=True)

    def delta(self, event: Any) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
        sys.stdout.write(event.delta.text)
        sys.stdout.flush()

    def final(self, event: Any) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
        if not self.quiet:
            alternative = _alternative_cost(self.plan_seen, self.member_cost, event.final.usage.cost_usd)
            _print_summary(event.final, self.started, self.first_at, alternative)

    HANDLERS: ClassVar[dict[str, Callable[[AnswerPrinter, Any], None]]] = {
        "classification": classification,
        "plan": plan,
        "candidate": candidate,
        "delta": delta,
        "final": final,
    }


def _one_line(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


def _alternative_cost(plan: Any, member_cost: dict[str, float], cost_usd: float) -> str:
    """What the other choice would have cost: for a fan-out, its best-scoring member alone (that member's
    measured cost in this run); for one model, every eligible model (this run's cost scaled by the plan's
    predicted costs). Empty without a plan."""
    if plan is None:
        return ""
    chosen = [c for c in plan.candidates if c.chosen]
    if len(chosen) > 1:
        best = max(chosen, key=lambda c: c.score)
        if best.model in member_cost:
            return f"   single-model alternative: {best.model} alone ${member_cost[best.model]:.7f}"
        return f"   single-model alternative: {best.model} alone ${best.predicted_cost_usd:.7f} (predicted)"
    eligible = [c for c in plan.candidates if not c.reason.startswith("left out")]
    if len(eligible) > 1 and chosen and chosen[0].predicted_cost_usd > 0:
        ratio = sum(c.predicted_cost_usd for c in eligible) / chosen[0].predicted_cost_usd
        estimate = cost_usd * ratio
        return f"   all {len(eligible)} models at once: ~${estimate:.7f} ({ratio:.1f}x, from the plan's predictions)"
    return ""


def _pool_question(args: argparse.Namespace) -> tuple[str, list[str]]:
    """The prompt to send and the capabilities it requires: with ``up --pool`` running, a pool question
    (``--pool-id``, or a prompt that is one of its questions word for word) goes to the recorded models and
    any other prompt to the local ones; without a pool, the prompt as given, unrestricted.

    Raises:
        InvalidArgument: ``--pool-id`` without a served pool, an unknown id, or no prompt at all.
    """
    from apps.mesh import LOCAL_CAPABILITY, RECORDED_CAPABILITY, MeshState, state_file
    from constellation.pools import read_pool

    state = MeshState.load(state_file())
    if state is not None and args.address and state.dispatch != args.address:
        state = None  # another mesh than the one asked
    pool = state.pool if state is not None else ""
    pool_id = getattr(args, "pool_id", None)
    if not pool:
        if pool_id:
            raise InvalidArgument("--pool-id needs a mesh started with `constellation up --pool FILE`")
        if not args.prompt:
            raise InvalidArgument("a prompt is required")
        return args.prompt, []
    if pool_id:
        records = list(read_pool(pool))
        test = [r for r in records if r.split == "test"]
        found = next((r for r in records if r.id == pool_id), None)
        if found is None and pool_id.isdigit() and int(pool_id) < len(test):
            found = test[int(pool_id)]
        if found is None:
            raise InvalidArgument(f"{pool} has no question {pool_id!r} (ids look like {records[0].id})")
        return found.prompt, [RECORDED_CAPABILITY]
    if not args.prompt:
        raise InvalidArgument("a prompt or --pool-id is required")
    known = any(r.prompt.strip() == args.prompt.strip() for r in read_pool(pool))
    return args.prompt, [RECORDED_CAPABILITY if known else LOCAL_CAPABILITY]


async def _ask(args: argparse.Namespace) -> int:
    from constellation.client import DispatchClient, ask_request

    prompt, required = _pool_question(args)
    fields = _routing_fields(args)
    if required:
        from constellation.v1 import common_pb2

        ceilings = fields.get("ceilings") or common_pb2.Ceilings()
        ceilings.required_capabilities.extend(required)
        fields["ceilings"] = ceilings
        if getattr(args, "pool_id", None):
            print(f"> {_one_line(prompt, 200)}", file=sys.stderr)
    request = ask_request(
        prompt,
        model=args.model or "",
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        stop=args.stop or (),
        seed=args.seed,
        **fields,
    )
    address = _dispatch_address(args.address)
    printer = AnswerPrinter(args)
    async with DispatchClient(address) as client:
        async for event in client.ask(request, timeout_s=args.timeout):
            printer.show(event)
    return 0


def _print_summary(final: object, started: float, first_at: float | None, alternative: str = "") -> None:
    from constellation.v1 import dispatch_pb2

    assert isinstance(final, dispatch_pb2.FinalEvent)
    client_total = (time.perf_counter() - started) * 1000
    client_ttft = ((first_at or time.perf_counter()) - started) * 1000
    usage = final.usage
    lines = [
        "",
        f"models: {', '.join(final.models)}   finish: {final.finish_reason}   "
        f"tokens: {usage.input_tokens} in / {usage.output_tokens} out",
    ]
    if final.confidence or final.uncertain:
        verdict = "UNCERTAIN: the models disagreed" if final.uncertain else "not flagged uncertain"
        lines.append(f"confidence: {final.confidence:.2f}   {verdict}")
    lines += [f"cost: ${usage.cost_usd:.7f}{alternative}", "stage            ms"]
    lines += [f"  {s.stage:<12} {s.milliseconds:>9.1f}{'  (simulated)' if s.simulated else ''}" for s in final.stages]
    lines.append(f"  {'client ttft':<12} {client_ttft:>9.1f}")
    lines.append(f"  {'client total':<12} {client_total:>9.1f}")
    if final.decision:
        bounds = ", ".join(f"{label} {b:.4f}" for label, b in sorted(final.error_bounds.items()))
        lines.append(f"decision: {final.decision}   certified error per true label: {bounds}")
    if final.trace_id:
        lines.append(f"trace id: {final.trace_id}")
    print("\n".join(lines), file=sys.stderr)


def _routing_fields(args: argparse.Namespace) -> dict[str, Any]:
    """AskRequest routing fields from --profile, --max-cost and --max-latency-ms."""
    from constellation.v1 import common_pb2

    fields: dict[str, Any] = {}
    if getattr(args, "profile", None):
        fields["profile"] = getattr(common_pb2, "PROFILE_" + args.profile.upper())
    if getattr(args, "alpha", None):
        fields["alpha"] = args.alpha
    if getattr(args, "label_alpha", None):
        fields["label_alpha"] = dict(_label_bound(item) for item in args.label_alpha)
    if getattr(args, "max_cost", None) or getattr(args, "max_latency_ms", None):
        fields["ceilings"] = common_pb2.Ceilings(
            max_cost_usd=args.max_cost or 0.0, max_latency_ms=args.max_latency_ms or 0.0
        )
    return fields


def _label_bound(item: str) -> tuple[str, float]:
    """``A=0.05`` -> ("A", 0.05)."""
    label, _, value = item.partition("=")
    try:
        return label.strip(), float(value)
    except ValueError:
        raise InvalidArgument(f"--label-alpha takes LABEL=BOUND, got {item!r}") from None


def _print_bounds(plan: Any) -> None:
    """The error-bounded part of a plan: requested and certified bound per label, calls and cost."""
    if not plan.error_bounds:
        return
    calls = sum(c.samples for c in plan.candidates if c.chosen)
    cost = sum(c.predicted_cost_usd for c in plan.candidates if c.chosen)
    print(f"error-bounded plan: {calls} calls, predicted cost ${cost:.6f}")
    print(f"   {'label':<8} {'alpha':>8} {'certified':>10}")
    for label, bound in sorted(plan.error_bounds.items()):
        print(f"   {label:<8} {plan.alpha.get(label, 0.0):8.4f} {bound:10.4f}")


async def _plan(args: argparse.Namespace) -> int:
    from constellation.client import DispatchClient, ask_request
    from constellation.v1 import common_pb2

    async with DispatchClient(_dispatch_address(args.address)) as client:
        response = await client.plan(ask_request(args.prompt, model=args.model or "", **_routing_fields(args)))
    plan = response.plan
    profile = common_pb2.Profile.Name(plan.profile).removeprefix("PROFILE_").lower()
    print(f"policy: {plan.policy} (profile {profile})   {plan.summary}")
    if response.HasField("classification"):
        seen = response.classification
        print(
            f"classified: {common_pb2.TaskType.Name(seen.task).removeprefix('TASK_TYPE_').lower()}, "
            f"{common_pb2.AnswerKind.Name(seen.answer_kind).removeprefix('ANSWER_KIND_').lower()} answer "
            f"(by {seen.decided_by})"
        )
    print(f"   {'model':<34} {'wave':>4} {'score':>6} {'quality':>7} {'cost $':>10} {'latency ms':>10}  reason")
    for c in plan.candidates:
        mark = "*" if c.chosen else " "
        wave = str(c.wave) if c.chosen else ""
        cost = ("~" if c.cost_estimated else "") + f"{c.predicted_cost_usd:.6f}"  # ~: estimated price
        print(
            f" {mark} {c.model[:34]:<34} {wave:>4} {c.score:6.3f} {c.predicted_quality:7.2f} "
            f"{cost:>10} {c.predicted_latency_ms:10.0f}  {c.reason}"
        )
    _print_bounds(plan)
    if any(c.cost_estimated for c in plan.candidates):
        print("~ cost from an estimated price (no price recorded for that model)")
    return 0


def _health(args: argparse.Namespace) -> int:
    """Dispatch's gRPC health, then (when a supervisor runs) each child's state and restarts."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from constellation import tls

    address = _dispatch_address(args.address)
    with tls.blocking_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=3)
        except grpc.RpcError as exc:
            _err(f"dispatch at {address}: {exc.code().name}: {exc.details()}; is the mesh up (`constellation up`)?")
            _print_supervision(args.run_dir)
            return EXIT_ERROR
    print(f"dispatch {address}: {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}")
    healthy = _print_supervision(args.run_dir)
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING and healthy else EXIT_ERROR


def _print_supervision(run_dir: str | None) -> bool:
    """Prints the supervisor's table (state, pid, restarts, last exit); False when a child is down."""
    from apps.mesh import supervisor_file

    try:
        children = json.loads(supervisor_file(Path(run_dir) if run_dir else None).read_text())["children"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return True
    print(f"{'process':<12}{'state':<10}{'pid':>8}{'restarts':>10}  last exit")
    for child in children:
        pid = child.get("pid") or "-"
        print(f"{child['name']:<12}{child['state']:<10}{pid!s:>8}{child['restarts']:>10}  {child['last_exit'] or '-'}")
    return all(child["state"] == "running" for child in children)


def _up(args: argparse.Namespace) -> int:
    from apps.mesh import Mesh, MeshPorts, default_run_dir, demo_mesh, recorded_pool_mesh, state_file

    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir()
    ports = MeshPorts(
        dispatch=args.port,
        dispatch_metrics=args.metrics_port,
        triton_grpc=args.triton_grpc_port,
        triton_http=args.triton_http_port,
        triton_metrics=args.triton_metrics_port,
        dispatch_http=args.http_port,
    )
    ports.classifier = args.classifier_port
    if args.pool:
        mesh = recorded_pool_mesh(ports, run_dir, Path(args.pool))
    elif args.demo:
        mesh = demo_mesh(ports, run_dir)
    else:
        mesh = Mesh(
            ports,
            models=args.models,
            run_dir=run_dir,
            classifier=not args.no_classifier,
            registry=args.registry,
            registry_args=["--seed-file", args.registry_seed] if args.registry_seed else [],
            ranking=args.ranking,
            fusion=args.fusion,
            triton_bind_host=args.triton_bind_host,
            scaler=args.scaler,
        )
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    path = state_file(run_dir)
    code = 0
    try:
        mesh.start()
        state = mesh.state()
        state.pool = str(Path(args.pool).resolve()) if args.pool else ""
        state.save(path)
        if args.demo:
            _run_demo(mesh.dispatch_address)
        if args.exit_after_demo:
            return 0
        print(
            f"\nThe mesh is up: dispatch on {mesh.dispatch_address}, Triton on {mesh.triton.grpc_url}.\n"
            f'Ask from another terminal: constellation ask "your question"   (Ctrl-C here stops everything)',
            flush=True,
        )
        while not stopping:
            for event in mesh.supervise():
                _err(event)
            time.sleep(0.2)
    except (RuntimeError, TimeoutError, ConstellationError) as exc:
        _err(str(exc))
        code = EXIT_ERROR
    finally:
        print("\nstopping the mesh ...", file=sys.stderr, flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        mesh.stop()
        path.unlink(missing_ok=True)
        left = mesh.leftovers()
        if left:
            _err("stopped, but these were left behind: " + "; ".join(left))
            code = code or EXIT_ERROR
        else:
            print("stopped: no process, port or /dev/shm file left behind.", file=sys.stderr, flush=True)
    return code


def _run_demo(address: str) -> None:
    """Asks the demo questions (:data:`apps.mesh.DEMO_QUESTIONS`) and prints everything dispatch streams."""
    from apps.mesh import DEMO_QUESTIONS, default_pool_file

    pool = default_pool_file()
    shown = pool.relative_to(Path.cwd()) if pool.is_relative_to(Path.cwd()) else pool
    print(f"\npool: {shown} (no recorded answers: the untrained router's priors)", flush=True)
    for question in DEMO_QUESTIONS:
        print(f"\n> {question.prompt}\n  ({question.shows})\n", flush=True)
        demo = argparse.Namespace(
            prompt=question.prompt,
            model="",
            max_tokens=question.max_tokens,
            temperature=0.0,
            top_p=None,
            stop=list(question.stop),
            seed=None,
            address=address,
            timeout=300.0,
            verbose=True,
            quiet=False,
            profile=question.profile,
            max_cost=None,
            max_latency_ms=None,
        )
        asyncio.run(_ask(demo))


def _down(args: argparse.Namespace) -> int:
    from apps.mesh import MeshState, state_file

    state = MeshState.load(state_file(Path(args.run_dir) if args.run_dir else None))
    if state is None:
        _err("no running mesh found (nothing was started with `constellation up`)")
        return EXIT_ERROR
    try:
        os.kill(state.pid, signal.SIGTERM)
    except ProcessLookupError:
        state_file(Path(args.run_dir) if args.run_dir else None).unlink(missing_ok=True)
        _err(f"the mesh process {state.pid} is gone; removed its stale state file")
        return EXIT_ERROR
    for _ in range(300):
        try:
            os.kill(state.pid, 0)
        except ProcessLookupError:
            print("mesh stopped")
            return 0
        time.sleep(0.1)
    _err(f"mesh process {state.pid} did not stop within 30 s")
    return EXIT_ERROR


def _eval(args: argparse.Namespace) -> int:
    from apps.eval_run import markdown, run_eval, write_report

    pool = Path(args.pool)
    if not pool.is_file():
        _err(f"no pool file at {pool}; pools are JSON lines (optionally gzip), see ../shared/data/README.md")
        return EXIT_USAGE
    policies = [p.strip() for p in args.policy.split(",")] if args.policy else None
    report = run_eval(
        pool,
        policies=policies,
        concurrency=args.concurrency,
        time_scale=args.time_scale,
        limit=args.limit,
        seed=args.seed,
        split=args.split,
        progress=not args.no_progress,
        router_artifact=args.router_artifact,
    )
    paths = write_report(report, Path(args.out))
    print()
    print(markdown(report))
    print(
        f"{report.calls} calls through the mesh in {report.wall_s:.1f} s ({report.calls_per_s:.0f} calls/s, "
        f"concurrency {report.concurrency}); {report.failed_calls} failed. Latency of replayed models is "
        f"simulated (time scale {report.time_scale:g})."
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0 if report.failed_calls == 0 else EXIT_ERROR


def _traces_collect(args: argparse.Namespace) -> int:
    from apps.traces.collector import CollectorConfig, running_collector
    from constellation.config import load_config

    config = load_config(CollectorConfig, args.config, port=args.port, http_port=args.http_port, db=args.db)

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with running_collector(config) as collector:
            http = f", OTLP/HTTP on {config.host}:{collector.http_port}/v1/traces" if collector.http_port else ""
            print(
                f"collecting spans into {config.db}: OTLP/gRPC on {config.host}:{collector.grpc_port}{http}\n"
                f"point services at it: OTEL_EXPORTER_OTLP_ENDPOINT=http://{config.host}:{collector.grpc_port}",
                flush=True,
            )
            await stop.wait()
            print(f"stopped; {collector.store.count()} spans stored in {config.db}", flush=True)

    asyncio.run(run())
    return 0


def _traces_analyze(args: argparse.Namespace) -> int:
    from apps.traces.analyze import analyze, markdown, plot, write_json
    from apps.traces.store import SpanStore

    if not Path(args.db).is_file():
        _err(f"no trace database at {args.db}; collect spans with `constellation traces collect --db {args.db}`")
        return EXIT_USAGE
    store = SpanStore.open(args.db)
    try:
        analysis = analyze(store.spans(), percentile=args.percentile)
    finally:
        store.close()
    if analysis.requests == 0:
        _err(f"{args.db} holds no Ask requests (no dispatch server spans)")
        return EXIT_ERROR
    out = Path(args.out)
    paths = plot(analysis, out, prefix=args.prefix)
    report = markdown(analysis, plots={k: p.name for k, p in paths.items()})
    (out / f"{args.prefix}.md").write_text(report)
    write_json(analysis, out / f"{args.prefix}.json")
    print(report)
    print(f"wrote {out / (args.prefix + '.md')}, {out / (args.prefix + '.json')} and the plots")
    return 0


def _load(args: argparse.Namespace) -> int:
    from apps.load import run_load
    from constellation.pools import pool_models, read_pool

    if args.pool:
        prompts = [r.prompt for r in read_pool(args.pool, split="test")]
        models = args.models.split(",") if args.models else pool_models(args.pool)
    else:
        prompts = [args.prompt]
        models = args.models.split(",") if args.models else []
    result = asyncio.run(
        run_load(
            _dispatch_address(args.address),
            prompts,
            rate=args.rate,
            duration_s=args.duration,
            max_requests=args.max_requests,
            poisson=args.arrivals == "poisson",
            models=models,
            max_tokens=args.max_tokens,
            timeout_s=args.timeout,
            seed=args.seed,
        )
    )
    summary = result.summary()
    print(json.dumps(summary, indent=2))
    if args.out:
        result.write(Path(args.out))
        print(f"wrote {args.out}")
    return 0 if not result.errors else EXIT_ERROR


TRAINERS: dict[str, str] = {
    "classifier": "services.classifier.train",
    "router": "services.dispatch.router_train",
    "ranker": "services.ranking.train",
    "fusion": "services.fusion.train",
    "confusion": "services.dispatch.bounds",
}
"""``constellation train <what>`` -> the module whose ``main(argv)`` trains it (imported only when chosen)."""

SERVICES: dict[str, str] = {
    "dispatch": "services.dispatch.main",
    "classifier": "services.classifier.main",
    "registry": "services.registry.main",
    "ranking": "services.ranking.main",
    "fusion": "services.fusion.main",
    "scaler": "services.scaler.main",
    "triton": "services.inference.launcher",
}
"""``constellation serve <service>`` -> the module whose ``main(argv)`` runs it in the foreground."""


def _main_of(module: str) -> Callable[[list[str]], int | None]:
    """The ``main`` of ``module``, imported now: a command pays only for the code it runs."""
    return cast(Callable[[list[str]], int | None], importlib.import_module(module).main)


def _train(args: argparse.Namespace) -> int:
    return int(_main_of(TRAINERS[args.what])(args.rest) or 0)


def _serve(args: argparse.Namespace) -> int:
    _main_of(SERVICES[args.service])(args.rest)
    return 0


def _dev_ca(args: argparse.Namespace) -> int:
    from constellation.tls import make_dev_ca

    certs = make_dev_ca(args.dir, hosts=args.host or ("localhost", "127.0.0.1", "::1"))
    for path in (certs.ca, certs.server_cert, certs.server_key, certs.client_cert, certs.client_key):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="constellation",
        description="Constellation: one gRPC mesh in front of many LLMs. Start the mesh with `up`, "
        "then `ask` it questions; answers stream as the model writes them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start Triton and the services; Ctrl-C stops everything")
    up.add_argument(
        "--demo",
        action="store_true",
        help="run the local models (SmolLM2, Gemma-3-270M) with the default pool, classifier, registry and "
        "fusion, and stream the demo questions once ready (make run)",
    )
    up.add_argument(
        "--pool",
        help="also serve this recorded pool (.jsonl.gz) through the replay model, routed by a router trained "
        "on it (trained now if none matches); `ask --pool-id ID` then asks its questions",
    )
    up.add_argument("--exit-after-demo", action="store_true", help="stop right after the demo (for scripts)")
    up.add_argument("--port", type=int, default=50051, help="dispatch gRPC port (default 50051)")
    up.add_argument("--metrics-port", type=int, default=9464, help="dispatch /metrics port (default 9464)")
    up.add_argument(
        "--http-port",
        type=int,
        default=8080,
        help="OpenAI-compatible HTTP API of dispatch, http://127.0.0.1:PORT/v1 (default 8080; -1: none)",
    )
    up.add_argument("--triton-grpc-port", type=int, default=8001)
    up.add_argument("--triton-http-port", type=int, default=8000)
    up.add_argument("--triton-metrics-port", type=int, default=8002)
    up.add_argument("--classifier-port", type=int, default=50052, help="classifier gRPC port (default 50052)")
    up.add_argument("--no-classifier", action="store_true", help="run without the classifier service")
    up.add_argument("--registry", action="store_true", help="also run the registry (live health, latency, outcomes)")
    up.add_argument("--registry-seed", help="pool file (TOML/JSON) the registry upserts at start (with --registry)")
    up.add_argument("--ranking", action="store_true", help="also run the ranking service (orders fan-out answers)")
    up.add_argument("--fusion", action="store_true", help="also run the fusion service (calibrated votes, fused text)")
    up.add_argument("--scaler", action="store_true", help="also run the scaler (replicas from demand, scale-to-zero)")
    up.add_argument("--models", nargs="+", default=["smollm2"], help="Triton models to load (default smollm2)")
    up.add_argument("--run-dir", help="where logs go (default ~/.cache/constellation/run)")
    up.add_argument(
        "--triton-bind-host",
        default="127.0.0.1",
        help="address Triton binds (default loopback; 0.0.0.0 also exposes its unauthenticated model control)",
    )
    up.set_defaults(handler=_up)

    ask = sub.add_parser("ask", help="ask the running mesh a question and stream the answer")
    ask.add_argument("prompt", nargs="?", default="", help="the question")
    ask.add_argument(
        "--pool-id",
        help="ask this question of the recorded pool served by `up --pool` (a record id such as gsm8k/5, "
        "or N for the test split's N-th question)",
    )
    ask.add_argument("--model", help="ask exactly this model (default: the router's choice)")
    ask.add_argument("--max-tokens", type=int, default=0, help="most tokens to generate (default: service's)")
    ask.add_argument("--temperature", type=float, help="0 = greedy; up to 2")
    ask.add_argument("--top-p", type=float, help="nucleus sampling mass in (0, 1]")
    ask.add_argument("--stop", action="append", help="stop string (repeatable)")
    ask.add_argument("--seed", type=int, help="sampling seed, for repeatable answers")
    ask.add_argument("--timeout", type=float, default=300.0, help="deadline in seconds (default 300)")
    ask.add_argument("--address", help="dispatch host:port (default: the mesh started by `up`)")
    ask.add_argument("-v", "--verbose", action="store_true", help="also show the plan")
    ask.add_argument("-q", "--quiet", action="store_true", help="print only the answer")
    ask.set_defaults(handler=lambda a: asyncio.run(_ask(a)))

    plan = sub.add_parser("plan", help="show which models would be asked, without asking them")
    plan.add_argument("prompt")
    plan.add_argument("--model", help="plan for exactly this model")
    for command in (plan, ask):
        command.add_argument("--profile", choices=["quality", "balanced", "cost", "speed"], help="routing profile")
        command.add_argument("--max-cost", type=float, help="ceiling on the predicted cost in USD")
        command.add_argument("--max-latency-ms", type=float, help="ceiling on the predicted latency in ms")
        command.add_argument(
            "--alpha", type=float, help="error bound of a closed-answer query for every label, in (0, 1)"
        )
        command.add_argument("--label-alpha", action="append", metavar="LABEL=BOUND", help="per-label error bound")
    plan.add_argument("--address")
    plan.set_defaults(handler=lambda a: asyncio.run(_plan(a)))

    health = sub.add_parser("health", help="check the health of the running mesh")
    health.add_argument("--address")
    health.add_argument("--run-dir", help="the --run-dir given to `up`, if any (for the supervisor's table)")
    health.set_defaults(handler=_health)

    down = sub.add_parser("down", help="stop a mesh started by `constellation up`")
    down.add_argument("--run-dir", help="the --run-dir given to `up`, if any")
    down.set_defaults(handler=_down)

    evaluate = sub.add_parser(
        "eval",
        help="judge routing policies on a recorded pool, through the real mesh",
        description="Runs a recorded pool's test split through a fresh mesh (Triton replay model + dispatch) "
        "and judges policies: every single model, static (best on train), random, oracle (cheapest correct) "
        "and majority vote (closed answers). Writes JSON, a markdown table and a Pareto plot.",
    )
    evaluate.add_argument(
        "--pool", required=True, help="pool file (.jsonl or .jsonl.gz), e.g. ../shared/data/gsm8k.jsonl.gz"
    )
    evaluate.add_argument(
        "--policy",
        help="comma-separated: single:<model>, static, random, oracle, majority, profile:quality, profile:balanced, "
        "profile:cost, profile:speed (default: all of them; the profiles when a router is trained)",
    )
    evaluate.add_argument("--concurrency", type=int, default=32, help="calls in flight at once (default 32)")
    evaluate.add_argument(
        "--time-scale",
        type=float,
        default=0.0,
        help="fraction of the simulated model latency really waited (default 0: report it, don't wait)",
    )
    evaluate.add_argument("--split", choices=["test", "train", "all"], default="test")
    evaluate.add_argument("--limit", type=int, help="only the first N prompts (quick looks)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the random policy")
    evaluate.add_argument(
        "--router-artifact", help="trained router for the profile:<name> policies (default: the CURRENT one)"
    )
    evaluate.add_argument("--out", default="eval-results", help="output directory (default ./eval-results)")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_eval)

    traces = sub.add_parser("traces", help="collect spans and explain tail latency")
    traces_sub = traces.add_subparsers(dest="traces_command", required=True, metavar="SUBCOMMAND")
    collect = traces_sub.add_parser(
        "collect",
        help="receive OTLP spans (gRPC :4317, HTTP :4318) and store them in SQLite",
        description="An OTLP trace collector: point services at it with OTEL_EXPORTER_OTLP_ENDPOINT. "
        "Spans are stored durably in SQLite for `constellation traces analyze`. Ctrl-C stops it.",
    )
    collect.add_argument("--db", help="SQLite file (default traces.sqlite)")
    collect.add_argument("--port", type=int, help="OTLP/gRPC port (default 4317)")
    collect.add_argument("--http-port", type=int, help="OTLP/HTTP port (default 4318; -1 disables)")
    collect.add_argument("--config", help="TOML config file ([collector] table)")
    collect.set_defaults(handler=_traces_collect)
    analyze = traces_sub.add_parser(
        "analyze",
        help="percentiles per stage and model, and the critical path of the slow requests",
        description="Reads collected spans and reports p50/p95/p99 per stage and per model (HDR histograms), "
        "the cost per request, and for the requests above --percentile which member and which phase set "
        "their time. Writes markdown, JSON and plots.",
    )
    analyze.add_argument("--db", default="traces.sqlite")
    analyze.add_argument("--percentile", type=float, default=99.0, help="explain requests at or above this (99)")
    analyze.add_argument("--out", default="trace-report", help="output directory (default ./trace-report)")
    analyze.add_argument("--prefix", default="traces", help="file name prefix of the outputs")
    analyze.set_defaults(handler=_traces_analyze)

    load = sub.add_parser(
        "load",
        help="open-loop load on the running mesh (fixed or Poisson arrivals)",
        description="Sends Ask requests at their scheduled arrival times whatever the mesh does, so queueing "
        "shows in the latency (no coordinated omission). Bounded by --duration and --max-requests.",
    )
    load.add_argument("--rate", type=float, required=True, help="requests per second offered")
    load.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals (default 30)")
    load.add_argument("--max-requests", type=int, default=10_000, help="at most this many requests")
    load.add_argument("--arrivals", choices=["poisson", "fixed"], default="poisson")
    load.add_argument("--prompt", default=DEMO_QUESTION, help="the prompt (when no --pool)")
    load.add_argument("--pool", help="take prompts from a recorded pool's test split")
    load.add_argument("--models", help="comma-separated models to spread requests over (default: router's)")
    load.add_argument("--max-tokens", type=int, default=0)
    load.add_argument("--timeout", type=float, default=60.0, help="per-request deadline in seconds")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--address", help="dispatch host:port (default: the mesh started by `up`)")
    load.add_argument("--out", help="write the summary and HDR histograms to this JSON file")
    load.set_defaults(handler=_load)

    train = sub.add_parser(
        "train",
        help="train a component on the recorded pools' train splits",
        description="Trains a component on the train splits of recorded pools and writes a versioned "
        "artifact. `constellation train classifier --help` (or `train ranker --help`) lists a trainer's options.",
    )
    train.add_argument("what", choices=list(TRAINERS), help="what to train")
    train.add_argument("rest", nargs=argparse.REMAINDER, help="the trainer's own flags")
    train.set_defaults(handler=_train)

    serve = sub.add_parser("serve", help="run one service in the foreground (for deployments)")
    serve.add_argument("service", choices=list(SERVICES))
    serve.add_argument("rest", nargs=argparse.REMAINDER, help="the service's own flags (see `serve X --help`)")
    serve.set_defaults(handler=_serve)

    from services.registry.cli import add_models_command
    from services.registry.keys_cli import add_keys_command
    from services.scaler.cli import add_scaler_command

    add_models_command(sub)
    add_scaler_command(sub)
    add_keys_command(sub)
    certs = sub.add_parser("certs", help="TLS certificates for development")
    certs_sub = certs.add_subparsers(dest="certs_command", required=True, metavar="SUBCOMMAND")
    dev_ca = certs_sub.add_parser(
        "dev-ca", help="write a development CA and a server and a client certificate it signed (never for production)"
    )
    dev_ca.add_argument("dir", help="folder to write ca.pem, server.pem/.key, client.pem/.key into")
    dev_ca.add_argument("--host", action="append", help="name or IP the server certificate names (repeatable)")
    dev_ca.set_defaults(handler=_dev_ca)
    return parser


def _client_tls() -> None:
    """Dials the mesh with ``[dispatch.security]``'s CA and client certificate when TLS is configured there.

    The command (and the mesh it supervises) then checks health and asks over TLS/mTLS; API keys stay
    per command (``--key``), never the service key.
    """
    from constellation import tls
    from constellation.config import load_config
    from services.dispatch.config import DispatchConfig

    security = load_config(DispatchConfig).security
    if security.tls_ca:
        tls.configure_clients(replace(tls.from_config(security), bearer=""))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _client_tls()
        return int(args.handler(args) or 0)
    except InvalidArgument as exc:
        _err(str(exc))
        for v in exc.violations:
            _err(f"  {v.field}: {v.description}")
        return EXIT_USAGE
    except ConstellationError as exc:
        _err(str(exc))
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
