"""Shared fixtures, and the line between the unit tier and the rest.

`make test` runs everything. `make test-fast` (`pytest -m "not slow"`) is the unit
tier: in-process only, seconds in all. A test is `slow` when it starts OS processes
(the `procs` fixture or the `strata` CLI as a subprocess), an embedded Kubo node, or
trains a real model; this hook marks the process and Kubo ones by what they use, so
a new test of that kind cannot land in the unit tier by accident.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import Client
from storage.keys import KeyPair
from storage.store import LocalStore

# modules whose every test runs the `strata` CLI as a subprocess, starts a Kubo node, or runs a whole
# fleet of daemons in-process through several rounds (agents restarting, enrolling, being refused)
_SLOW_MODULES = {
    "test_cli_model.py",
    "test_cli_daemons.py",
    "test_ipfs_store.py",
    "test_history.py",
    "test_enroll_fleet.py",
    "test_tls_fleet.py",
    "test_agent_resume.py",
    "test_relay_backpressure.py",
    "test_metrics_values.py",
    "test_hub.py",
    "test_hub_tls.py",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "procs" in getattr(item, "fixturenames", ()) or item.path.name in _SLOW_MODULES:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """Put the root logger's handlers and level back after every test: a test that runs a CLI
    command in-process installs a handler on that test's captured stderr, which pytest closes,
    and a later test's threads would then log into a closed file ("--- Logging error ---")."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A fresh LocalStore in a temporary directory, closed after the test."""
    store = LocalStore(tmp_path / "store")
    yield store
    store.close()


@pytest.fixture
def clients() -> Iterator[list[Client]]:
    """Agent clients a test connects (tests.agent_service_contract.connect_client), closed after it."""
    made: list[Client] = []
    yield made
    for client in made:
        client.close()


@pytest.fixture(scope="session")
def keypair() -> KeyPair:
    return KeyPair.generate()
