"""Shared fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage.keys import KeyPair
from storage.store import LocalStore


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    """A fresh LocalStore in a temporary directory, closed after the test."""
    store = LocalStore(tmp_path / "store")
    yield store
    store.close()


@pytest.fixture(scope="session")
def keypair() -> KeyPair:
    return KeyPair.generate()
