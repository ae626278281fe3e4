"""Runs the whole mesh on one machine: a Triton server and the Constellation services as child processes.

Used by ``constellation up`` (and so ``make run``). Each child runs in its own session, so a Ctrl-C
reaches only the supervisor, which then stops the services first (health drains, calls finish) and
Triton last (it removes its shared-memory regions). Nothing is left behind: no process, no port,
no ``/dev/shm`` file. A state file tells ``constellation ask`` and ``constellation down`` where the
mesh is.

While the mesh runs, :meth:`Mesh.supervise` restarts a child that died, after an exponential backoff
(:class:`Backoff`: bounded, and reset once a child has run for a stable period); a dead Triton's process
group (its python-backend stubs) and its ``/dev/shm`` regions are removed before it is started again.
Each child's state and restart count go to ``<run dir>/supervisor.json`` for ``constellation health``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from constellation import tls
from constellation.net import port_in_use
from constellation.paths import default_cache_dir

log = logging.getLogger(__name__)

STOP_TIMEOUT_S = 40.0
"""How long a service gets after SIGTERM: its notice plus its drain window (1 + 30 s by default), and some."""


def default_run_dir() -> Path:
    return default_cache_dir() / "run"


def state_file(run_dir: Path | None = None) -> Path:
    """Where ``up`` records the running mesh (``<run dir>/mesh.json``)."""
    return (run_dir or default_run_dir()) / "mesh.json"


def supervisor_file(run_dir: Path | None = None) -> Path:
    """Where the supervisor records each child's state and restarts (``<run dir>/supervisor.json``)."""
    return (run_dir or default_run_dir()) / "supervisor.json"


@dataclass(frozen=True)
class Backoff:
    """When a crashed child is started again.

    Attributes:
        initial_s: Delay before the first restart after a crash.
        factor: Each consecutive crash multiplies the delay by this.
        max_s: The delay never exceeds this (the backoff is bounded; restarts never stop).
        stable_s: A child that has run this long is stable again: its next crash waits ``initial_s``.
    """

    initial_s: float = 0.5
    factor: float = 2.0
    max_s: float = 30.0
    stable_s: float = 60.0

    def delay(self, failures: int) -> float:
        """Seconds to wait before restarting after the ``failures``-th consecutive crash (1-based)."""
        return float(min(self.max_s, self.initial_s * self.factor ** max(0, failures - 1)))


@dataclass
class ChildStatus:
    """What the supervisor knows about one child: ``running``, ``backoff`` (dead, waiting) or ``stopped``."""

    name: str
    state: str = "running"
    pid: int | None = None
    restarts: int = 0
    failures: int = 0
    started_at: float = 0.0
    restart_at: float | None = None
    last_exit: str = ""


@dataclass
class MeshState:
    """Where a running mesh listens; written by ``up``, read by ``ask`` and ``down``."""

    pid: int
    dispatch: str
    triton_grpc: str
    triton_metrics: str
    dispatch_metrics: str
    log_dir: str
    models: list[str] = field(default_factory=list)
    pool: str = ""
    """A recorded pool served beside the local models (``up --pool``), else empty."""

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, path: Path) -> MeshState | None:
        try:
            return cls(**json.loads(path.read_text()))
        except (FileNotFoundError, json.JSONDecodeError, TypeError):
            return None


def wait_serving(address: str, timeout_s: float, *, alive: Callable[[], bool] = lambda: True) -> None:
    """Blocks until the gRPC health service at ``address`` reports SERVING.

    Raises:
        TimeoutError: not serving after ``timeout_s`` seconds.
        RuntimeError: ``alive()`` turned false (the process died) while waiting.
    """
    deadline = time.monotonic() + timeout_s
    with tls.blocking_channel(address) as channel:  # TLS when this process is configured for it
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError(f"the process behind {address} exited while starting")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise TimeoutError(f"{address} did not become healthy within {timeout_s:.0f} s")


class ServiceProcess:
    """One Constellation service as a child process in its own session."""

    def __init__(
        self,
        name: str,
        module: str,
        args: list[str],
        log_path: Path,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self.module = module
        self.args = args
        self.log_path = log_path
        self.env = env
        self.cwd = cwd
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_handle:
            self.process = subprocess.Popen(
                [sys.executable, "-m", self.module, *self.args],
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(self.env or {})},
                cwd=self.cwd,
            )

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def exit_status(self) -> int | None:
        """The exit status once the process ended (negative: killed by that signal), else None."""
        return self.process.poll() if self.process is not None else None

    def reap(self) -> None:
        """After the process died: kills what is left of its process group (children it started)."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (graceful shutdown), then SIGKILL of the whole process group after ``timeout_s``."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


_Child = tuple[str, Callable[[], bool], Callable[[], int | None], Callable[[], None], Callable[[], Any]]
"""A supervised child: name, alive, exit status, reap (after death), start."""


@dataclass
class MeshPorts:
    dispatch: int = 50051
    dispatch_metrics: int = 9464
    triton_grpc: int = 8001
    triton_http: int = 8000
    triton_metrics: int = 8002
    classifier: int = 50052
    registry: int = 50053
    ranking: int = 50054
    fusion: int = 50055
    scaler: int = 50056
    dispatch_http: int = -1
    """The OpenAI-compatible HTTP API, served by the dispatch process itself (-1: none)."""


class Mesh:
    """Triton plus the services, started and stopped together.

    Args:
        ports: Where everything listens (loopback only).
        models: Triton models to load at start.
        run_dir: Logs go here.
        say: Progress messages for a person (``print`` by default).
        service_env: Extra environment of the services dispatch calls (classifier, registry, ranking,
            fusion), for example ``OTEL_EXPORTER_OTLP_ENDPOINT``; each also gets its ``OTEL_SERVICE_NAME``.
    """

    def __init__(
        self,
        ports: MeshPorts,
        *,
        models: list[str],
        run_dir: Path,
        say: Callable[[str], None] = print,
        model_parameters: dict[str, dict[str, str]] | None = None,
        dispatch_args: Sequence[str] = (),
        dispatch_env: dict[str, str] | None = None,
        triton_args: Sequence[str] = (),
        classifier: bool = False,
        registry: bool = False,
        registry_args: Sequence[str] = (),
        ranking: bool = False,
        fusion: bool = False,
        service_env: dict[str, str] | None = None,
        backoff: Backoff | None = None,
        triton_bind_host: str = "127.0.0.1",
        scaler: bool = False,
        scaler_args: Sequence[str] = (),
    ):
        from services.inference.launcher import TritonServer

        self.ports = ports
        self.models = models
        self.run_dir = run_dir
        self.say = say
        self.backoff = backoff or Backoff()
        self.status: dict[str, ChildStatus] = {}
        """Supervision state per child name (``triton``, ``dispatch``, ...), filled by :meth:`supervise`."""
        extra: dict[str, Any] = {"model_parameters": model_parameters} if model_parameters else {}
        self.triton = TritonServer(
            models=models,
            grpc_port=ports.triton_grpc,
            http_port=ports.triton_http,
            metrics_port=ports.triton_metrics,
            log_file=run_dir / "triton.log",
            run_dir=run_dir,
            extra_args=triton_args,
            bind_host=triton_bind_host,
            **extra,
        )
        self.supporting: list[tuple[ServiceProcess, int]] = []
        """Services started before dispatch, in order, with their gRPC ports."""

        def add(name: str, module: str, port: int, flag: str, args: Sequence[str] = ()) -> ServiceProcess:
            nonlocal dispatch_args
            env = {**service_env, "OTEL_SERVICE_NAME": name} if service_env else None
            process = ServiceProcess(
                name, module, ["--port", str(port), "--metrics-port", "-1", *args], run_dir / f"{name}.log", env=env
            )
            self.supporting.append((process, port))
            dispatch_args = [*dispatch_args, flag, f"127.0.0.1:{port}"]
            return process

        self.classifier = (
            add("classifier", "services.classifier.main", ports.classifier, "--classifier-url") if classifier else None
        )
        self.registry = (
            add("registry", "services.registry.main", ports.registry, "--registry-url", registry_args)
            if registry
            else None
        )
        self.ranking = add("ranking", "services.ranking.main", ports.ranking, "--ranking-url") if ranking else None
        self.fusion = (
            add(
                "fusion",
                "services.fusion.main",
                ports.fusion,
                "--fusion-url",
                ["--triton-url", f"127.0.0.1:{ports.triton_grpc}"],
            )
            if fusion
            else None
        )
        self.scaler = (
            add("scaler", "services.scaler.main", ports.scaler, "--scaler-url", self._scaler_args(scaler_args))
            if scaler
            else None
        )
        self.dispatch = ServiceProcess(
            "dispatch",
            "services.dispatch.main",
            [
                "--port",
                str(ports.dispatch),
                "--triton-url",
                f"127.0.0.1:{ports.triton_grpc}",
                "--metrics-port",
                str(ports.dispatch_metrics),
                "--http-port",
                str(ports.dispatch_http),
                *dispatch_args,
            ],
            run_dir / "dispatch.log",
            env=dispatch_env,
        )

    def _scaler_args(self, extra: Sequence[str]) -> list[str]:
        """The scaler's flags: our Triton, the registry when it runs (live latency, model states), the models."""
        args = ["--triton-url", f"127.0.0.1:{self.ports.triton_grpc}"]
        if self.registry is not None:
            args += ["--registry-address", f"127.0.0.1:{self.ports.registry}"]
        for model in self.models:
            args += ["--model", model]
        return [*args, *extra]

    @property
    def dispatch_address(self) -> str:
        return f"127.0.0.1:{self.ports.dispatch}"

    def start(self, timeout_s: float = 600.0) -> None:
        """Starts Triton (and loads the models), then the services; raises with log tails on failure."""
        started = time.perf_counter()
        self.say(f"starting Triton (models: {', '.join(self.models)}; log: {self.run_dir / 'triton.log'}) ...")
        self.triton.start()
        self.triton.wait_ready(timeout_s)
        self.say(f"  Triton ready on {self.triton.grpc_url} in {time.perf_counter() - started:.1f} s")
        for process, port in [*self.supporting, (self.dispatch, self.ports.dispatch)]:
            step = time.perf_counter()
            process.start()
            address = f"127.0.0.1:{port}"
            try:
                wait_serving(address, 120.0, alive=process.alive)
            except (TimeoutError, RuntimeError) as exc:
                raise RuntimeError(f"{process.name} did not start: {exc}\n{process.log_tail()}") from exc
            self.say(f"  {process.name} serving on {address} in {time.perf_counter() - step:.1f} s")
        now = time.monotonic()
        for name in ["triton", *(p.name for p in self.children())]:
            self.status[name] = ChildStatus(name, started_at=now)
        self.save_status()

    def state(self) -> MeshState:
        return MeshState(
            pid=os.getpid(),
            dispatch=self.dispatch_address,
            triton_grpc=self.triton.grpc_url,
            triton_metrics=self.triton.metrics_url,
            dispatch_metrics=f"http://127.0.0.1:{self.ports.dispatch_metrics}/metrics",
            log_dir=str(self.run_dir),
            models=self.models,
        )

    def check(self) -> str | None:
        """Returns a description of the first child that died, or None while all run."""
        for process in [self.dispatch, *(p for p, _ in self.supporting)]:
            if not process.alive():
                return f"{process.name} exited:\n{process.log_tail()}"
        if not self.triton.is_running():
            return "Triton exited; see " + str(self.run_dir / "triton.log")
        return None

    def children(self) -> list[ServiceProcess]:
        """The service processes, in start order (dispatch last)."""
        return [*(p for p, _ in self.supporting), self.dispatch]

    def supervise(self, now: float | None = None) -> list[str]:
        """One supervision step: notes children that died, restarts those whose backoff is over.

        Call it every fraction of a second while the mesh runs; it never blocks on a start (a restarted
        Triton loads its models while the services answer from their fallbacks). Writes
        ``supervisor.json`` when anything changed.

        Returns:
            What happened in this step, one line per event, for the log.
        """
        now = time.monotonic() if now is None else now
        events: list[str] = []
        server = self.triton
        triton: _Child = ("triton", server.is_running, lambda: server.returncode, server.stop, server.start)
        children = [triton, *((p.name, p.alive, p.exit_status, p.reap, p.start) for p in self.children())]
        for name, alive, exit_status, reap, start in children:
            status = self.status.setdefault(name, ChildStatus(name, started_at=now))
            if status.state == "running" and not alive():
                reap()
                if now - status.started_at >= self.backoff.stable_s:
                    status.failures = 0
                status.failures += 1
                delay = self.backoff.delay(status.failures)
                status.state, status.restart_at, status.last_exit = "backoff", now + delay, str(exit_status())
                events.append(f"{name} exited (status {status.last_exit}); restarting in {delay:.1f} s")
            elif status.state == "backoff" and status.restart_at is not None and now >= status.restart_at:
                start()
                status.state, status.started_at, status.restart_at = "running", now, None
                status.restarts += 1
                events.append(f"{name} restarted (restart {status.restarts})")
        if events:
            for event in events:
                log.warning("%s", event)
            self.save_status()
        return events

    def save_status(self) -> None:
        """Writes each child's state, pid and restarts to ``supervisor.json`` (read by ``health``)."""
        pids = {"triton": self.triton.pid, **{p.name: p.pid for p in self.children()}}
        rows = []
        for name, status in self.status.items():
            status.pid = pids.get(name)
            rows.append(asdict(status))
        path = supervisor_file(self.run_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"updated": time.time(), "children": rows}, indent=2))

    def stop(self) -> None:
        """Stops dispatch first, then the services it calls, then Triton. Idempotent."""
        self.dispatch.stop()
        for process, _ in reversed(self.supporting):
            process.stop()
        self.triton.stop()
        for status in self.status.values():
            status.state = "stopped"
        if self.status:
            self.save_status()

    def leftovers(self) -> list[str]:
        """What a stopped mesh left behind: live processes, bound ports, /dev/shm files. Empty when clean."""
        found: list[str] = []
        for process in [self.dispatch, *(p for p, _ in self.supporting)]:
            if process.alive():
                found.append(f"{process.name} process {process.process.pid if process.process else '?'}")
        if self.triton.is_running():
            found.append(f"tritonserver process {self.triton.pid}")
        ports = [self.ports.dispatch, self.ports.triton_grpc, self.ports.triton_http, self.ports.triton_metrics]
        ports += [port for _, port in self.supporting]
        for port in ports:
            if port_in_use(port):
                found.append(f"port {port} still bound")
        found += [str(p) for p in self.triton.shm_leftovers()]
        return found


# ------------------------------------------------------------------------------------------------ the demo

LOCAL_MODELS = ("smollm2", "gemma3_270m")
"""The real models the local Triton serves on the CPU (``services/inference/model_repository``)."""


def default_pool_file() -> Path:
    """The registry seed that describes :data:`LOCAL_MODELS` (prices from measured tokens/s)."""
    import services.registry

    return Path(services.registry.__file__).resolve().parent / "data" / "default_pool.toml"


@dataclass(frozen=True)
class DemoQuestion:
    """One question of ``constellation up --demo``, with the profile it is asked under and why."""

    prompt: str
    profile: str
    max_tokens: int
    shows: str
    stop: tuple[str, ...] = ()


DEMO_QUESTIONS = (
    DemoQuestion(
        "Question: What is 7 + 5?\nAnswer:",
        "quality",
        12,
        "the quality profile on a closed answer: both local models at once, a vote decides",
        stop=("\n",),
    ),
    DemoQuestion(
        "What is the capital of France, and what is it famous for?",
        "balanced",
        48,
        "the balanced profile: one cheap model suffices",
    ),
)


def demo_pool_file(run_dir: Path, triton_grpc: str) -> Path:
    """A run-time copy of :func:`default_pool_file` (JSON, ``<run_dir>/default_pool.json``) whose empty
    backend endpoints name this mesh's Triton, so that the registry probes the models there (a model
    marked unhealthy comes back once Triton says it is ready)."""
    import tomllib

    document = tomllib.loads(default_pool_file().read_text(encoding="utf-8"))
    for model in document.get("models", []):
        backend = model.setdefault("backend", {})
        backend["endpoint"] = backend.get("endpoint") or triton_grpc
    path = run_dir / "default_pool.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def demo_mesh(ports: MeshPorts, run_dir: Path, say: Callable[[str], None] = print) -> Mesh:
    """The mesh of ``up --demo``: both local models, classifier, registry seeded with the default pool
    (its own SQLite file under ``run_dir``), and fusion (calibrated votes, generated answers).

    Dispatch reads its trained artifacts from an empty root under ``run_dir``, so it routes as on a
    fresh machine: a router trained on recorded pools knows none of the local models. Each model runs
    torch on one thread: a fan-out runs both at once, and two 2-thread models on 2 cores spin against
    each other (measured here: a 16-token vote took 43 s with 2 threads each).
    """
    return Mesh(
        ports,
        models=list(LOCAL_MODELS),
        run_dir=run_dir,
        say=say,
        classifier=True,
        registry=True,
        registry_args=[
            "--seed-file",
            str(demo_pool_file(run_dir, f"127.0.0.1:{ports.triton_grpc}")),
            "--db",
            str(run_dir / "registry.sqlite"),
        ],
        fusion=True,
        dispatch_env={"CONSTELLATION_CACHE_DIR": str(run_dir / "demo-dispatch-cache")},
        model_parameters={model: {"num_threads": "1"} for model in LOCAL_MODELS},
    )


# ------------------------------------------------------------------------------------- a recorded pool beside

LOCAL_CAPABILITY = "local"
RECORDED_CAPABILITY = "recorded"
"""Capabilities that keep a pool question on the recorded models and any other prompt on the local ones."""


def recorded_pool_seed(run_dir: Path, triton_grpc: str, pool: Path) -> Path:
    """A registry seed (``<run_dir>/pool_seed.json``) with the local models and every model of the
    recorded ``pool``, served by Triton's replay model (family, size and prices from ``models.json``)."""
    from constellation.pools import model_cards_for, pool_models

    document = json.loads(demo_pool_file(run_dir, triton_grpc).read_text(encoding="utf-8"))
    for model in document["models"]:
        model["capabilities"] = [*model.get("capabilities", []), LOCAL_CAPABILITY]
    cards = model_cards_for(pool)
    for name in pool_models(pool):
        card = cards.get(name)
        document["models"].append(
            {
                "name": name,
                "family": (card.family if card else None) or "",
                "params_b": (card.params_b if card else None) or 0.0,
                "price_in_per_mtok": (card.price_in_per_mtok if card else None) or 0.0,
                "price_out_per_mtok": (card.price_out_per_mtok if card else None) or 0.0,
                "capabilities": [RECORDED_CAPABILITY],
                "simulated": True,
                "backend": {"endpoint": triton_grpc, "model_name": "replay", "parameters": {"recorded_model": name}},
            }
        )
    path = run_dir / "pool_seed.json"
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path


def router_for_pool(pool: Path, root: Path, say: Callable[[str], None] = print) -> Path:
    """The router artifact trained on ``pool``: the CURRENT one under ``root`` when its training read a
    pool of that file name, else one trained now on the pool's train split (a progress bar per stage,
    about a minute on 2 cores) into ``root``."""
    from constellation import artifacts
    from constellation.errors import FailedPrecondition
    from services.dispatch.routing import ARTIFACT_KIND, TRAIN_COMMAND

    def current() -> Path | None:
        try:
            found = artifacts.resolve(root, ARTIFACT_KIND, train_command=TRAIN_COMMAND)
        except FailedPrecondition:
            return None
        trained_on = json.loads((found / "manifest.json").read_text()).get("training", {}).get("pools", [])
        return found if any(p.get("file") == pool.name for p in trained_on) else None

    found = current()
    if found is not None:
        say(f"router for {pool.name}: {found}")
        return found
    say(f"no router trained on {pool.name} under {root}: training one on its train split ...")
    from services.dispatch import router_train

    router_train.main([str(pool), "--out", str(root), "--no-ranker"])
    found = current()
    if found is None:
        raise RuntimeError(f"training a router on {pool} left no artifact under {root}")
    return found


def recorded_pool_mesh(ports: MeshPorts, run_dir: Path, pool: Path, say: Callable[[str], None] = print) -> Mesh:
    """The mesh of ``up --pool FILE``: the demo mesh's local models plus Triton's replay model serving
    ``pool`` (simulated latency at time scale 1), the registry seeded with both, and dispatch routing with
    the router trained on ``pool`` (:func:`router_for_pool`)."""
    triton = f"127.0.0.1:{ports.triton_grpc}"
    router = router_for_pool(pool, run_dir / "artifacts", say)
    models = [*LOCAL_MODELS, "replay"]
    parameters: dict[str, dict[str, str]] = {model: {"num_threads": "1"} for model in LOCAL_MODELS}
    parameters["replay"] = {"pool_paths": str(pool.resolve()), "time_scale": "1.0"}
    return Mesh(
        ports,
        models=models,
        run_dir=run_dir,
        say=say,
        classifier=True,
        registry=True,
        registry_args=[
            "--seed-file",
            str(recorded_pool_seed(run_dir, triton, pool)),
            "--db",
            str(run_dir / "registry.sqlite"),
        ],
        fusion=True,
        dispatch_args=["--router-artifact", str(router)],
        model_parameters=parameters,
    )
