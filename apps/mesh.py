"""Runs the whole mesh on one machine: a Triton server and the Constellation services as child processes.

Used by ``constellation up`` (and so ``make run``). Each child runs in its own session, so a Ctrl-C
reaches only the supervisor, which then stops the services first (health drains, calls finish) and
Triton last (it removes its shared-memory regions). Nothing is left behind: no process, no port,
no ``/dev/shm`` file. A state file tells ``constellation ask`` and ``constellation down`` where the
mesh is.
"""

from __future__ import annotations

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

from constellation.net import port_in_use
from constellation.paths import default_cache_dir

log = logging.getLogger(__name__)


def default_run_dir() -> Path:
    return default_cache_dir() / "run"


def state_file(run_dir: Path | None = None) -> Path:
    """Where ``up`` records the running mesh (``<run dir>/mesh.json``)."""
    return (run_dir or default_run_dir()) / "mesh.json"


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
    with grpc.insecure_channel(address) as channel:
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

    def stop(self, timeout_s: float = 10.0) -> None:
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
        scaler: bool = False,
        scaler_args: Sequence[str] = (),
    ):
        from services.inference.launcher import TritonServer

        self.ports = ports
        self.models = models
        self.run_dir = run_dir
        self.say = say
        extra: dict[str, Any] = {"model_parameters": model_parameters} if model_parameters else {}
        self.triton = TritonServer(
            models=models,
            grpc_port=ports.triton_grpc,
            http_port=ports.triton_http,
            metrics_port=ports.triton_metrics,
            log_file=run_dir / "triton.log",
            run_dir=run_dir,
            extra_args=triton_args,
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

    def stop(self) -> None:
        """Stops dispatch first, then the services it calls, then Triton. Idempotent."""
        self.dispatch.stop()
        for process, _ in reversed(self.supporting):
            process.stop()
        self.triton.stop()

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
