"""The committed stubs must be exactly what `make proto` would generate from strata.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from proto.generate import PROTO_DIR, generate

pytest.importorskip("grpc_tools", reason="grpcio-tools (a test dependency) regenerates the stubs")


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    written = generate(tmp_path)
    assert len(written) == 3
    stale = [p.name for p in written if p.read_bytes() != (PROTO_DIR / p.name).read_bytes()]
    assert not stale, f"stubs are stale: run `make proto` ({', '.join(stale)} differ)"
