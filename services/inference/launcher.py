"""Start and stop a real Triton Inference Server (the binary in the ``nvidia-pytriton`` wheel) on CPU.

How Triton is run here (see ``shared/TRITON_CPU.md``):

* the binary is ``<pytriton package>/tritonserver/bin/tritonserver``;
* the python backend must find its stub next to ``libtriton_python.so``, so a backend directory
  ``<cache>/triton-backends/python/`` of symlinks is made (the stub built for this Python's version);
* ``PATH`` starts with the venv's ``bin`` (so the stub's embedded Python finds the venv's packages) and
  ``LD_LIBRARY_PATH`` with this Python's ``LIBDIR`` (so the stub links the same ``libpython``);
* each server gets its own python-backend shared-memory prefix, so :meth:`TritonServer.stop` can remove
  what that server left in ``/dev/shm`` (after a SIGKILL) without touching other servers' regions;
* per-model config parameters given at start (``model_parameters``) go into a run-time copy of the model
  repository under the run directory (:func:`materialize_model_repository`): symlinks to each model's
  version directories and a rewritten ``config.pbtxt``; the source repository is never modified.

``python -m services.inference.launcher`` runs one in the foreground until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

from constellation.paths import default_cache_dir
from services.inference import checkpoints

logger = logging.getLogger(__name__)

MODEL_REPOSITORY = Path(__file__).resolve().parent / "model_repository"
"""The repository of models that ships with this package."""

SHM_DIR = Path("/dev/shm")


class TritonError(RuntimeError):
    """Triton could not be started, or died, or did not become ready."""


def pytriton_dir() -> Path:
    """Return the ``tritonserver`` directory inside the installed ``pytriton`` package (not imported)."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise TritonError("package 'nvidia-pytriton' is not installed (it ships the tritonserver binary)")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def tritonserver_binary() -> Path:
    """Return the path of the ``tritonserver`` executable from the nvidia-pytriton wheel."""
    binary = pytriton_dir() / "bin" / "tritonserver"
    if not binary.is_file():
        raise TritonError(f"{binary} not found")
    return binary


def prepare_backend_dir(cache_dir: Path) -> Path:
    """Create (idempotently) a Triton backend directory with the python backend and this Python's stub.

    Layout: ``<cache_dir>/triton-backends/python/{libtriton_python.so, triton_python_backend_utils.py,
    triton_python_backend_stub}``, all symlinks into the pytriton wheel. Safe to call concurrently.

    Returns:
        The backend directory (the value for ``--backend-directory``).
    """
    root = pytriton_dir()
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": root / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": root / "python_backend_stubs" / version / "triton_python_backend_stub",
    }
    backend_dir = Path(cache_dir) / "triton-backends"
    python_dir = backend_dir / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.is_file():
            raise TritonError(f"{source} not found (no python backend stub for Python {version}?)")
        link = python_dir / name
        if link.is_symlink() and os.readlink(link) == str(source):
            continue
        tmp = python_dir / f".{name}.{uuid.uuid4().hex}"
        os.symlink(source, tmp)
        os.replace(tmp, link)
    return backend_dir


def triton_environment(cache_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Return the environment Triton needs (venv ``bin`` first on PATH, LIBDIR first on LD_LIBRARY_PATH).

    Also sets ``CONSTELLATION_CACHE_DIR`` (where models find converted weights) and ``HF_HUB_OFFLINE=1``.
    """
    env = dict(os.environ if base is None else base)
    venv_bin = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([venv_bin, *[p for p in env.get("PATH", "").split(os.pathsep) if p]])
    libdir = sysconfig.get_config_var("LIBDIR")
    lib_paths = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    env["LD_LIBRARY_PATH"] = os.pathsep.join([str(libdir), *lib_paths] if libdir else lib_paths)
    env["CONSTELLATION_CACHE_DIR"] = str(cache_dir)
    env["HF_HUB_OFFLINE"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


ModelParameters = Mapping[str, Mapping[str, object]]
"""Per-model config parameters: model name -> {parameter key -> value (stored as its ``str``)}."""


def with_parameters(config_text: str, parameters: Mapping[str, object]) -> str:
    """Return ``config_text`` (a Triton ``config.pbtxt``) with ``parameters`` added or overridden.

    Parsed and re-written with Triton's ``ModelConfig`` protobuf (from ``tritonclient``), so comments are
    dropped; values become ``string_value`` (``str(value)``), which is how Triton passes parameters to
    python-backend models.

    Raises:
        TritonError: The config does not parse, or a key is empty.
    """
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(config_text, config)
    except text_format.ParseError as exc:
        raise TritonError(f"config.pbtxt does not parse: {exc}") from None
    for key, value in parameters.items():
        if not key:
            raise TritonError("model parameter keys must not be empty")
        config.parameters[key].string_value = str(value)
    return text_format.MessageToString(config)


def materialize_model_repository(source: Path, target: Path, model_parameters: ModelParameters) -> Path:
    """Build a run-time model repository at ``target`` from ``source`` with per-model parameters.

    For every model directory of ``source`` that has a ``config.pbtxt``: ``target/<model>/`` holds a
    symlink to each of its other entries (version directories such as ``1/``) and a ``config.pbtxt`` with
    that model's ``model_parameters`` added or overridden (:func:`with_parameters`); models without
    parameters get a verbatim copy. Other entries of ``source`` are symlinked. ``target`` is replaced if
    it exists. Takes milliseconds.

    Returns:
        ``target`` (the value for ``--model-repository``).

    Raises:
        TritonError: A model in ``model_parameters`` is not in ``source``, or a config does not parse.
    """
    source = Path(source).resolve()
    target = Path(target)
    unknown = sorted(m for m in model_parameters if not (source / m / "config.pbtxt").is_file())
    if unknown:
        raise TritonError(f"model_parameters name model(s) {unknown} that {source} does not hold")
    if target.is_symlink() or target.is_file():
        target.unlink()
    elif target.exists():
        shutil.rmtree(target)
    target.mkdir(parents=True)
    for entry in sorted(source.iterdir()):
        config_path = entry / "config.pbtxt"
        if not (entry.is_dir() and config_path.is_file()):
            os.symlink(entry, target / entry.name)
            continue
        model_dir = target / entry.name
        model_dir.mkdir()
        for item in sorted(entry.iterdir()):
            if item.name != "config.pbtxt":
                os.symlink(item, model_dir / item.name)
        text = config_path.read_text(encoding="utf-8")
        parameters = model_parameters.get(entry.name)
        if parameters:
            header = f"# Generated from {config_path} with run-time parameters {sorted(parameters)}.\n"
            text = header + with_parameters(text, parameters)
        (model_dir / "config.pbtxt").write_text(text, encoding="utf-8")
    return target


def _wait_group_gone(pgid: int, timeout: float) -> bool:
    """Poll until no process (zombies included) is left in process group ``pgid``; False on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


class TritonServer:
    """One ``tritonserver`` process on 127.0.0.1, with explicit model control.

    Not thread-safe: call start/stop from one thread. ``stop()`` is idempotent and also runs on
    ``__exit__``. The process is in its own session (process group), so stopping it also ends the python
    backend stubs it started.

    Example::

        with TritonServer(models=["smollm2"]) as server:
            server.wait_ready(timeout=120)
            client = InferenceServerClient(server.grpc_url)
    """

    def __init__(
        self,
        models: Sequence[str] = ("smollm2",),
        *,
        model_repository: Path = MODEL_REPOSITORY,
        grpc_port: int = 8001,
        http_port: int = 8000,
        metrics_port: int = 8002,
        cache_dir: Path | None = None,
        log_file: Path | None = None,
        run_dir: Path | None = None,
        exit_timeout_s: int = 5,
        extra_args: Sequence[str] = (),
        model_parameters: ModelParameters | None = None,
        bind_host: str = "127.0.0.1",
    ) -> None:
        """Describe a server; nothing starts before :meth:`start`.

        Args:
            models: Models loaded at start-up (``--load-model``); others in the repository stay unloaded
                until loaded over the model-control API.
            model_repository: Directory of Triton models.
            grpc_port: gRPC port (see :func:`constellation.net.free_port` for tests).
            http_port: HTTP port; also used by :meth:`wait_ready`.
            metrics_port: Prometheus metrics port.
            cache_dir: Converted weights and the backend directory; default
                :func:`constellation.paths.default_cache_dir`. Passed to models as
                ``CONSTELLATION_CACHE_DIR``.
            log_file: Triton's stdout and stderr; default ``<run_dir>/tritonserver.log``.
            run_dir: Directory for the log when ``log_file`` is not given; default a new temporary
                directory.
            exit_timeout_s: ``--exit-timeout-secs``: how long Triton waits for in-flight requests on
                shutdown.
            extra_args: More ``tritonserver`` arguments, appended last.
            model_parameters: Config parameters per model, added to (or overriding) the ``parameters`` of
                its ``config.pbtxt``, e.g. ``{"replay": {"pool_paths": "/data/gsm8k.jsonl.gz",
                "time_scale": "0.01"}}``. When given, Triton serves a run-time copy of the repository,
                ``<run_dir>/model_repository`` (see :attr:`served_model_repository`).
            bind_host: Address Triton's gRPC, HTTP and metrics endpoints bind to. Loopback by default:
                the model-control API is unauthenticated, so serving beyond the host (``0.0.0.0``) is
                an explicit choice.
        """
        self.models = list(models)
        self.model_repository = Path(model_repository)
        self.grpc_port = grpc_port
        self.http_port = http_port
        self.metrics_port = metrics_port
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._run_dir = Path(run_dir) if run_dir is not None else None
        self._log_file = Path(log_file) if log_file is not None else None
        self.exit_timeout_s = exit_timeout_s
        self.extra_args = list(extra_args)
        self.bind_host = bind_host
        self.model_parameters: dict[str, dict[str, str]] = {
            model: {str(k): str(v) for k, v in params.items()} for model, params in (model_parameters or {}).items()
        }
        self.shm_prefix = f"constellation_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        """Our python-backend shared-memory prefix; files ``/dev/shm/<prefix>*`` belong to this server."""
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle: BinaryIO | None = None

    # -------------------------------------------------------------------------------------- properties

    @property
    def local_host(self) -> str:
        """The host this machine reaches the server at: loopback when it binds every interface."""
        return "127.0.0.1" if self.bind_host in ("", "0.0.0.0", "::", "[::]") else self.bind_host

    @property
    def grpc_url(self) -> str:
        """``<host>:<grpc_port>`` (the form tritonclient.grpc expects)."""
        return f"{self.local_host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        """``http://<host>:<http_port>``."""
        return f"http://{self.local_host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        """``http://<host>:<metrics_port>/metrics`` (Prometheus text format)."""
        return f"http://{self.local_host}:{self.metrics_port}/metrics"

    @property
    def run_dir(self) -> Path:
        """Directory for this server's run-time files (created on first use: a new temporary directory
        unless ``run_dir`` was given)."""
        if self._run_dir is None:
            self._run_dir = Path(tempfile.mkdtemp(prefix="tritonserver-"))
        return self._run_dir

    @property
    def log_file(self) -> Path:
        """Where Triton's stdout and stderr go."""
        if self._log_file is None:
            self._log_file = self.run_dir / "tritonserver.log"
        return self._log_file

    @property
    def served_model_repository(self) -> Path:
        """The repository Triton is given: ``model_repository`` itself, or, with ``model_parameters``,
        its run-time copy ``<run_dir>/model_repository``."""
        if not self.model_parameters:
            return self.model_repository
        return self.run_dir / "model_repository"

    def prepare_model_repository(self) -> Path:
        """Materialise the run-time repository when there are ``model_parameters``; return the served one.

        Rebuilt on every call while the server is not running (so it follows edits of the source
        repository); left alone while it runs, since Triton reads it on (explicit) model loads.
        """
        served = self.served_model_repository
        if self.model_parameters and not (self.is_running() and served.is_dir()):
            materialize_model_repository(self.model_repository, served, self.model_parameters)
        return served

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended (0 after a clean SIGTERM shutdown), else None.

        1 means Triton hit ``--exit-timeout-secs`` (requests or gRPC streams still open) and exited
        forcibly; negative values are signals (-9: killed by :meth:`stop` after its timeout).
        """
        return self._process.poll() if self._process is not None else None

    def is_running(self) -> bool:
        """True while the server process exists and has not exited."""
        return self._process is not None and self._process.poll() is None

    def command(self) -> list[str]:
        """The ``tritonserver`` command line :meth:`start` runs (materialises the run-time repository)."""
        args = [
            str(tritonserver_binary()),
            f"--model-repository={self.prepare_model_repository()}",
            f"--backend-directory={prepare_backend_dir(self.cache_dir)}",
            f"--grpc-address={self.bind_host}",
            f"--grpc-port={self.grpc_port}",
            f"--http-address={self.bind_host}",
            f"--http-port={self.http_port}",
            f"--metrics-address={self.bind_host}",
            f"--metrics-port={self.metrics_port}",
            "--model-control-mode=explicit",
            *[f"--load-model={model}" for model in self.models],
            "--disable-auto-complete-config",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            "--log-verbose=0",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *self.extra_args,
        ]
        return args

    # -------------------------------------------------------------------------------------- lifecycle

    def start(self) -> TritonServer:
        """Start the server process and return at once (use :meth:`wait_ready`).

        Converts the weights of the local models to be loaded first (:meth:`convert_local_models`), so
        that this happens here, logged, rather than inside Triton's model-load time.

        Raises:
            TritonError: If it is already running or the binary is missing.
        """
        if self.is_running():
            raise TritonError(f"tritonserver already running (pid {self.pid})")
        self.convert_local_models()
        command = self.command()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log_handle = open(self.log_file, "ab")
        logger.info("starting tritonserver (grpc %s, log %s): %s", self.grpc_url, self.log_file, " ".join(command))
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_handle,
                stderr=subprocess.STDOUT,
                env=triton_environment(self.cache_dir),
                start_new_session=True,
            )
        except BaseException:
            log_handle.close()
            raise
        self._log_handle = log_handle
        return self

    def convert_local_models(self) -> None:
        """Convert the GGUF weights of every local model in :attr:`models` not yet cached (once per cache
        directory: SmolLM2 ~30 s, Gemma-3-270M ~45 s on 2 cores); models of other kinds are skipped."""
        for name in self.models:
            spec = checkpoints.CHECKPOINTS.get(name)
            if spec is None or checkpoints.is_converted(spec, self.cache_dir):
                continue
            logger.info("converting %s weights into %s before starting Triton (once)", name, self.cache_dir)
            started = time.monotonic()
            checkpoints.ensure_checkpoint(spec, self.cache_dir)
            logger.info("converted %s in %.1f s", name, time.monotonic() - started)

    def wait_ready(self, timeout: float = 180.0, poll_interval: float = 0.25) -> None:
        """Block until ``/v2/health/ready`` and every listed model's ``/ready`` answer 200.

        Args:
            timeout: Seconds to wait in total (a first start loads torch and the model: ~10 s here).
            poll_interval: Seconds between polls.

        Raises:
            TritonError: If the process exits (message has the tail of its log) or the timeout passes.
        """
        if self._process is None:
            raise TritonError("tritonserver was not started")
        deadline = time.monotonic() + timeout
        paths = ["/v2/health/ready", *[f"/v2/models/{model}/ready" for model in self.models]]
        while True:
            code = self._process.poll()
            if code is not None:
                raise TritonError(f"tritonserver exited with code {code}; log tail:\n{self.log_tail()}")
            if all(self._http_ok(path) for path in paths):
                return
            if time.monotonic() >= deadline:
                raise TritonError(f"tritonserver not ready after {timeout:.0f} s; log tail:\n{self.log_tail()}")
            time.sleep(poll_interval)

    def _http_ok(self, path: str) -> bool:
        try:
            with urllib.request.urlopen(self.http_url + path, timeout=2) as response:
                return int(response.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, max_bytes: int = 6000) -> str:
        """Return the end of Triton's log (empty if there is none yet)."""
        try:
            with open(self.log_file, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - max_bytes))
                return handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        """Stop the server: SIGTERM, wait up to ``timeout`` s, then SIGKILL its whole process group.

        Afterwards removes ``/dev/shm`` files with this server's prefix (only left behind after a
        SIGKILL; Triton cleans up after SIGTERM). Idempotent; safe if never started.
        """
        process = self._process
        if process is not None:
            if process.poll() is None:
                logger.info("stopping tritonserver (pid %d)", process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    logger.warning("tritonserver did not exit %.0f s after SIGTERM; killing its group", timeout)
            # Kill the group even after a clean exit: python-backend stubs that outlive Triton share it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
            if process.returncode not in (0, None):
                logger.warning(
                    "tritonserver exited with status %s (1: exit timeout with requests or streams still open)",
                    process.returncode,
                )
            if not _wait_group_gone(process.pid, timeout=5.0):
                logger.warning("processes of tritonserver's group %d still exist after SIGKILL", process.pid)
        handle = self._log_handle
        self._log_handle = None
        if handle is not None:
            handle.close()
        self.remove_shm_leftovers()

    def shm_leftovers(self) -> list[Path]:
        """Return the ``/dev/shm`` files whose names start with this server's prefix."""
        if not SHM_DIR.is_dir():
            return []
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*"))

    def remove_shm_leftovers(self) -> None:
        """Remove this server's ``/dev/shm`` files (call only when the server is not running)."""
        for path in self.shm_leftovers():
            logger.info("removing shared-memory leftover %s", path)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Run Triton in the foreground until Ctrl-C (or SIGTERM)."""
    parser = argparse.ArgumentParser(
        prog="python -m services.inference.launcher",
        description="Run the Triton Inference Server from the nvidia-pytriton wheel with this project's "
        "model repository, in the foreground until Ctrl-C.",
    )
    parser.add_argument(
        "--model",
        action="append",
        dest="models",
        default=None,
        help="model to load at start-up (repeatable; default: smollm2)",
    )
    parser.add_argument("--model-repository", type=Path, default=MODEL_REPOSITORY)
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--http-port", type=int, default=8000)
    parser.add_argument("--metrics-port", type=int, default=8002)
    parser.add_argument(
        "--bind-host",
        default="127.0.0.1",
        help="address gRPC, HTTP and metrics bind to (default loopback; 0.0.0.0 exposes model control too)",
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="converted weights and backend dir (default: $CONSTELLATION_CACHE_DIR, "
        "$XDG_CACHE_HOME/constellation or ~/.cache/constellation)",
    )
    parser.add_argument(
        "--log-file", type=Path, default=None, help="Triton's log (default: a file in a new temporary directory)"
    )
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--model-parameter",
        action="append",
        default=[],
        metavar="MODEL.KEY=VALUE",
        help="config parameter for a model, e.g. replay.pool_paths=data/gsm8k.jsonl.gz (repeatable)",
    )
    args = parser.parse_args(argv)
    model_parameters: dict[str, dict[str, str]] = {}
    for item in args.model_parameter:
        name, eq, value = item.partition("=")
        model, dot, key = name.partition(".")
        if not (eq and dot and model and key):
            parser.error(f"--model-parameter must look like MODEL.KEY=VALUE, got {item!r}")
        model_parameters.setdefault(model, {})[key] = value
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    server = TritonServer(
        models=args.models or ["smollm2"],
        model_repository=args.model_repository,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        cache_dir=args.cache_dir,
        log_file=args.log_file,
        model_parameters=model_parameters,
        bind_host=args.bind_host,
    )

    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    try:
        print(f"Starting Triton with models {server.models}; log: {server.log_file}", flush=True)
        server.start()
        server.wait_ready(timeout=args.ready_timeout)
        print(
            f"Triton ready in {time.monotonic() - started:.1f} s: gRPC {server.grpc_url}, "
            f"HTTP {server.http_url}, metrics {server.metrics_url}. Ctrl-C to stop.",
            flush=True,
        )
        while server.is_running():
            time.sleep(0.5)
        print(f"Triton exited on its own; log tail:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping Triton ...", flush=True)
        return 0
    except TritonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        server.stop()
        print("Triton stopped.", flush=True)


if __name__ == "__main__":
    sys.exit(main())
