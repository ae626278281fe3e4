"""`constellation up` as a user runs it: start, ask from another process, Ctrl-C, nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import openai
import psutil

from apps.mesh import port_in_use, state_file, wait_serving
from constellation.net import free_port


def test_up_ask_then_ctrl_c_leaves_nothing_behind(tmp_path: Path) -> None:
    ports = {name: free_port() for name in ("port", "metrics", "grpc", "http", "tmetrics", "classifier", "api")}
    run_dir = tmp_path / "run"
    up = subprocess.Popen(
        [
            sys.executable, "-m", "apps.cli", "up",
            "--port", str(ports["port"]), "--metrics-port", str(ports["metrics"]),
            "--triton-grpc-port", str(ports["grpc"]), "--triton-http-port", str(ports["http"]),
            "--triton-metrics-port", str(ports["tmetrics"]), "--classifier-port", str(ports["classifier"]),
            "--http-port", str(ports["api"]), "--run-dir", str(run_dir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        address = f"127.0.0.1:{ports['port']}"
        deadline = time.monotonic() + 300
        while not state_file(run_dir).exists():
            assert up.poll() is None, up.communicate()
            assert time.monotonic() < deadline, "the mesh did not come up"
            time.sleep(0.2)
        wait_serving(address, 30)
        children = [p.pid for p in psutil.Process(up.pid).children(recursive=True)]
        started_groups = {psutil.Process(pid).cmdline()[0] for pid in children}
        assert any("tritonserver" in c for c in started_groups)

        ask = subprocess.run(
            [sys.executable, "-m", "apps.cli", "ask", "--address", address, "--max-tokens", "12",
             "--temperature", "0", "What is the capital of France?"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert ask.returncode == 0, ask.stderr
        assert ask.stdout.strip()
        assert "first_token" in ask.stderr and "trace id:" in ask.stderr
        assert "classify" in ask.stderr  # the classifier ran on the way in

        # The same dispatch process serves the OpenAI-compatible HTTP API.
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{ports['api']}/v1", api_key="unused", max_retries=0)
        assert "smollm2" in {model.id for model in api.models.list()}
        reply = api.chat.completions.create(
            model="smollm2",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
            timeout=120,
        )
        assert reply.choices[0].message.content

        up.send_signal(signal.SIGINT)
        _out, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
    assert up.returncode == 0, err
    assert "no process, port or /dev/shm file left behind" in err
    assert not state_file(run_dir).exists()
    for pid in children:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    for port in ports.values():
        assert not port_in_use(port)
