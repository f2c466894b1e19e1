"""Progress bars on long CLI work: `strata verify` of a deep lineage counts the models it
checked, `strata model export` and `strata model put` their steps, on stderr and only on a terminal. Piped (as
scripts run it) or with --json, stderr stays empty. Real CLI processes; rich is told the
captured stderr is a terminal (TTY_COMPATIBLE), as it cannot be one under pytest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import save_model
from storage.store import LocalStore
from tests.procs import run_strata

DEPTH = 25
pytestmark = pytest.mark.slow  # five CLI processes, each importing torch

TERMINAL = {"TTY_COMPATIBLE": "1", "TERM": "xterm-256color", "COLUMNS": "120"}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A store holding a lineage DEPTH models deep, each model the parent of the next; the last's CID."""
    root = tmp_path_factory.mktemp("chain")
    key = KeyPair.generate()
    with LocalStore(root / "store") as store:
        parents: list[str] = []
        for round_ in range(DEPTH):
            weights = encode_tensors({"w": np.full(8, round_, dtype=np.float32)})
            manifest = save_model(
                store, weights=weights, kind="cluster", federation="digits", round=round_,
                producer=Producer(role="aggregator", id="agg-a"), key=key, parents=parents,
            )  # fmt: skip
            parents = [manifest.cid]
    return root, parents[0]


def test_verify_of_a_deep_lineage_shows_its_progress_on_a_terminal(chain: tuple[Path, str]) -> None:
    root, cid = chain
    shown = run_strata("verify", cid, "--store", str(root / "store"), home=root / "home", env=TERMINAL)
    assert shown.returncode == 0, shown.stderr
    assert f"ok: {DEPTH} model(s)" in shown.stdout
    assert "verifying the lineage" in shown.stderr and f"{DEPTH}/{DEPTH}" in shown.stderr

    piped = run_strata("verify", cid, "--store", str(root / "store"), home=root / "home")
    assert (piped.returncode, piped.stdout, piped.stderr) == (0, shown.stdout, "")
    as_json = run_strata("verify", cid, "--store", str(root / "store"), "--json", home=root / "home", env=TERMINAL)
    assert as_json.stderr == "" and json.loads(as_json.stdout)["models_checked"] == DEPTH


def test_export_shows_its_steps_on_a_terminal(chain: tuple[Path, str], tmp_path: Path) -> None:
    root, cid = chain
    output = tmp_path / "out.safetensors"
    shown = run_strata("model", "export", cid, "-o", str(output), "--store", str(root / "store"), home=root / "home", env=TERMINAL)
    assert shown.returncode == 0, shown.stderr
    assert "exporting" in shown.stderr and "2/2" in shown.stderr
    assert output.read_bytes() == encode_tensors({"w": np.full(8, DEPTH - 1, dtype=np.float32)})
    piped = run_strata("model", "export", cid, "-o", str(output), "--store", str(root / "store"), home=root / "home")
    assert (piped.returncode, piped.stderr) == (0, "")

    # and back in: `model put` (an upload, with an IPFS store) counts its steps too
    store = tmp_path / "other-store"
    put = run_strata("model", "put", str(output), "--federation", "digits", "--store", str(store), home=root / "home", env=TERMINAL)
    assert put.returncode == 0, put.stderr
    assert "importing out.safetensors" in put.stderr and "2/2" in put.stderr
    with LocalStore(store) as other:
        assert other.has(put.stdout.strip())
