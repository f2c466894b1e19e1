"""DESIGN's layout table, enforced: imports go one way, no package reaches where it may not, no cycles.

Every import counts, function-level ones included: an import hidden inside a
function is still an arrow between rooms.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OURS = ("proto", "storage", "coordinator", "intake", "aggregator", "relay", "agent", "trust", "privacy", "strata")
# DESIGN's layout table: package -> what it may import of ours besides itself.
# A dotted grant ("aggregator.strategies") allows that module only.
ALLOWED = {
    "proto": set(),
    "storage": {"proto"},
    "trust": {"proto", "storage"},
    "privacy": {"proto"},
    "coordinator": {"proto", "storage", "trust"},
    "intake": {"proto", "storage", "trust"},
    "aggregator": {"proto", "storage", "trust", "privacy", "intake", "coordinator.ring", "coordinator.client"},
    "relay": {"proto", "storage", "trust", "intake", "aggregator.strategies", "agent"},
    "agent": {"proto", "storage", "trust", "privacy"},
    "strata": set(OURS),
}
# modules that hold domain logic: they never speak gRPC or protobuf (services and clients do)
CORE_MODULES = [
    "intake/accept.py",
    "intake/submission.py",
    "intake/validation.py",
    "intake/journal.py",
    "intake/agents.py",
    "intake/home.py",
    "aggregator/rounds.py",
    "aggregator/strategies.py",
    "aggregator/staleness.py",
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
    "relay/journal.py",
    "storage/manifest.py",
    "storage/codec.py",
    "storage/store.py",
    "storage/durable.py",
    "trust/identity.py",
    "trust/ca.py",
    "trust/tokens.py",
    "trust/revocation.py",
    "trust/roles.py",
    "trust/enroll.py",
]


def _sources(package: str) -> list[Path]:
    return [
        path
        for path in sorted((ROOT / package).rglob("*.py"))
        if not path.name.endswith(("_pb2.py", "_pb2_grpc.py"))
    ]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, at any depth, with `from a import b` also giving `a.b`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _our_imports(path: Path) -> set[str]:
    return {name for name in _imported_names(path) if name.split(".")[0] in OURS}


def _grant_covers(grant: str, name: str) -> bool:
    return name == grant or name.startswith(grant + ".")


def layout_offenders(package: str, grants: set[str]) -> list[str]:
    """Every import in `package` of one of our modules that neither the package itself nor a grant covers.

    `from aggregator import strategies` names the bare package "aggregator" too, so it counts
    as a reach into the whole package; import the module by its full name instead.
    """
    grants = grants | {package}
    return [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(package)
        for name in sorted(_our_imports(path))
        if not any(_grant_covers(grant, name) for grant in grants)
    ]


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_layout_allows(package: str) -> None:
    offenders = layout_offenders(package, ALLOWED[package])
    assert not offenders, "\n".join(offenders)


def test_the_layout_check_refuses_a_reach_it_does_not_grant() -> None:
    """The check itself must be able to fail: the relay reaching into the aggregator's rounds is refused."""
    assert not _grant_covers("aggregator.strategies", "aggregator.rounds")
    assert not _grant_covers("aggregator.strategies", "aggregator")
    assert _grant_covers("aggregator.strategies", "aggregator.strategies.FedAvg")
    # the relay imports today are all granted; without the strategies grant they would not be
    assert layout_offenders("relay", ALLOWED["relay"] - {"aggregator.strategies"})


def test_core_modules_never_import_grpc() -> None:
    for module in CORE_MODULES:
        imported = _imported_names(ROOT / module)
        assert not any(
            name == "grpc" or name.startswith("grpc.") or name.endswith("_pb2") or "_pb2." in name for name in imported
        ), module


def _module_graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for package in OURS for path in _sources(package)}
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        targets = set()
        for name in _our_imports(path):
            # resolve `pkg.mod.Symbol` to the longest module prefix we have
            parts = name.split(".")
            for end in range(len(parts), 0, -1):
                candidate = ".".join(parts[:end])
                if candidate in modules:
                    if candidate != module:
                        targets.add(candidate)
                    break
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycles_counting_function_level_imports() -> None:
    graph = _module_graph()
    # a package's __init__ re-exporting its own modules is not a cycle between rooms
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not (module.startswith(t + ".") and "." not in t)}
    cycles = _cycles(graph)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
