"""DESIGN's layout table, enforced: imports go one way and no package reaches where it may not."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("proto", "storage", "coordinator", "aggregator", "relay", "agent", "strata")
# package -> what it may import of ours (besides itself); `coordinator.ring` and `coordinator.client`
# are module-level grants
ALLOWED = {
    "proto": set(),
    "storage": {"proto"},
    "coordinator": {"proto", "storage"},
    "aggregator": {"proto", "storage", "coordinator.ring", "coordinator.client"},
    "relay": {"proto", "storage", "aggregator", "agent", "coordinator.ring"},
    "agent": {"proto", "storage"},
    "strata": set(OURS),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return {name for name in names if name.split(".")[0] in OURS}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    allowed = ALLOWED[package] | {package}
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        if path.name.endswith(("_pb2.py", "_pb2_grpc.py")):
            continue
        for name in _imports(path):
            if not any(name == grant or name.startswith(grant + ".") for grant in allowed):
                offenders.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not offenders, "\n".join(offenders)


def test_core_modules_never_import_grpc() -> None:
    core = [
        "aggregator/rounds.py",
        "aggregator/strategies.py",
        "aggregator/validation.py",
        "aggregator/synthesis.py",
        "aggregator/journal.py",
    "aggregator/ringview.py",
    "aggregator/lease.py",
    "aggregator/ring_follower.py",
    "aggregator/announcements.py",
    "aggregator/coordination.py",
        "coordinator/membership.py",
        "coordinator/index.py",
        "coordinator/ring.py",
        "relay/core.py",
        "storage/manifest.py",
        "storage/codec.py",
        "storage/store.py",
    ]
    for module in core:
        imported = set()
        tree = ast.parse((ROOT / module).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
                imported.update(f"{node.module}.{alias.name}" for alias in node.names)
        assert not any(name == "grpc" or name.startswith("grpc.") or name.endswith("_pb2") for name in imported), module
