"""Imports go one way: the library <- services <- apps, and a service reaches another only through its client.

Every ``.py`` file under ``libs/``, ``services/`` and ``apps/`` is parsed with :mod:`ast`, imports inside
functions included (a lazy import is still an edge). Generated stubs (``constellation.v1``, the protos) are
library. Tests and benchmarks sit above everything and are not walked.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

ALLOWED: dict[tuple[str, str], str] = {
    ("services/dispatch/router_train.py", "services.classifier.rules"): (
        "offline training: the router learns on the classifier's keyword focus of each prompt, the same text "
        "the classifier embeds at run time, so training and serving see one embedding"
    ),
    ("services/dispatch/router_train.py", "services.ranking.pairwise"): (
        "offline training: ranked fan-outs are simulated on train with the trained pair ranker's own picks"
    ),
    ("services/dispatch/router_train.py", "services.ranking.rank"): (
        "offline training: as above, the ranker that scores the recorded candidates"
    ),
}
"""Cross-service edges that are not through a client: (importing file, imported module) -> why."""


@dataclass(frozen=True)
class Edge:
    """One import: the file (relative to the root), the line and the imported module's dotted name."""

    path: str
    line: int
    module: str


def layer_of(path: str) -> tuple[str, str | None]:
    """The layer of a file (``library``, ``service``, ``apps``) and, for a service, its name."""
    parts = Path(path).parts
    if parts[0] == "libs":
        return "library", None
    if parts[0] == "services" and len(parts) > 2:
        return "service", parts[1]
    if parts[0] == "services":
        return "service", None  # services/__init__.py belongs to no one service
    return "apps", None


def imports_of(path: Path, root: Path) -> list[Edge]:
    """Every absolute import in ``path``, at any depth; ``from a import b`` yields ``a.b``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    relative = path.relative_to(root).as_posix()
    edges: list[Edge] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            edges += [Edge(relative, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            edges += [Edge(relative, node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return edges


def wrong_way(edge: Edge) -> str | None:
    """Why ``edge`` goes the wrong way, or None when it is allowed."""
    layer, service = layer_of(edge.path)
    parts = edge.module.split(".")
    top = parts[0]
    if layer == "library" and top in ("services", "apps"):
        return f"the library imports {top}"
    if layer == "service" and top == "apps":
        return "a service imports apps"
    if layer != "service" or top != "services" or len(parts) < 3:
        return None
    target, module = parts[1], parts[2]
    if target == service or module == "client":
        return None
    if (edge.path, f"services.{target}.{module}") in ALLOWED:
        return None
    return f"reaches into services.{target}.{module} (only services.{target}.client may be imported)"


def violations(root: Path) -> list[str]:
    """``path:line: module: why`` for every wrong-way import under ``root``'s libs/, services/ and apps/."""
    found: list[str] = []
    for top in ("libs", "services", "apps"):
        for path in sorted((root / top).rglob("*.py")):
            if "_pb2" in path.name or ".venv" in path.parts:
                continue
            for edge in imports_of(path, root):
                why = wrong_way(edge)
                if why:
                    found.append(f"{edge.path}:{edge.line}: {edge.module}: {why}")
    return found


def test_imports_go_one_way() -> None:
    assert violations(ROOT) == []


def test_every_allowed_edge_still_exists() -> None:
    """An allowed edge that no file has any more is stale and must be removed from :data:`ALLOWED`."""
    seen = {
        (edge.path, ".".join(edge.module.split(".")[:3]))
        for top in ("services",)
        for path in (ROOT / top).rglob("*.py")
        for edge in imports_of(path, ROOT)
    }
    assert set(ALLOWED) <= seen, set(ALLOWED) - seen


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_checker_finds_each_kind_of_wrong_way_edge(tmp_path: Path) -> None:
    lazy = "def f():\n    from services.fusion.vote import tally\n    return tally\n"
    _write(tmp_path, "libs/constellation/constellation/lazy.py", lazy)
    _write(tmp_path, "libs/constellation/constellation/up.py", "import apps.mesh\n")
    _write(tmp_path, "services/fusion/vote.py", "from constellation.ml.vote import tally\n")
    _write(tmp_path, "services/fusion/cli_bits.py", "from apps.cli import main\n")
    _write(tmp_path, "services/dispatch/plan.py", "from services.fusion import answers\n")
    _write(tmp_path, "services/dispatch/main.py", "from services.fusion.client import FusionClient\n")
    _write(tmp_path, "services/dispatch/own.py", "from services.dispatch.plan import x\nimport constellation.v1\n")
    _write(tmp_path, "apps/cli.py", "from services.dispatch.main import main\nimport services.fusion.vote\n")

    found = violations(tmp_path)

    assert found == [
        "libs/constellation/constellation/lazy.py:2: services.fusion.vote.tally: the library imports services",
        "libs/constellation/constellation/up.py:1: apps.mesh: the library imports apps",
        "services/dispatch/plan.py:1: services.fusion.answers: reaches into services.fusion.answers "
        "(only services.fusion.client may be imported)",
        "services/fusion/cli_bits.py:1: apps.cli.main: a service imports apps",
    ]


def test_an_allowed_edge_is_allowed_only_from_its_file(tmp_path: Path) -> None:
    _write(tmp_path, "services/dispatch/router_train.py", "from services.ranking.rank import Ranker\n")
    _write(tmp_path, "services/dispatch/routing.py", "from services.ranking.rank import Ranker\n")

    assert violations(tmp_path) == [
        "services/dispatch/routing.py:1: services.ranking.rank.Ranker: reaches into services.ranking.rank "
        "(only services.ranking.client may be imported)"
    ]
