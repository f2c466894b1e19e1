"""`strata fleet watch`: one frame (--once, text and JSON) from a real coordinator holding
leases, heartbeat progress and indexed models, and the live view as a real process that
redraws until Ctrl-C (SIGINT) and then exits 0 without a traceback.

The aggregators are leases and heartbeats registered on the in-process coordinator and
their models are real signed manifests announced to its index: the view reads only the
coordinator, so no aggregator process is needed.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.membership import AggregatorInfo, Progress
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Producer
from storage.models import save_model
from storage.store import LocalStore
from strata.cli import main as cli_main
from strata.watch import ring_shares
from tests.procs import ProcessFactory, procs_fixture  # noqa: F401

AGGREGATORS = ("agg-a", "agg-b", "agg-c")
WEIGHTS = encode_tensors({"w": np.zeros(4, dtype=np.float32)})


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[CoordinatorDaemon]:
    """agg-a and agg-b alive in round 3 with models indexed, agg-c registered then expired."""
    now = [time.time()]
    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"), lease_ttl_s=600.0)
    with CoordinatorDaemon(config, clock=lambda: now[0]) as daemon, LocalStore(tmp_path / "store") as store:
        membership = daemon.membership
        assert membership is not None
        key = KeyPair.generate()
        with CoordinatorClient(daemon.address) as client:
            membership.register(AggregatorInfo(id="agg-c", address="127.0.0.1:7303"))
            now[0] += 601.0  # agg-c's lease runs out
            membership.expire()
            for i, name in enumerate(AGGREGATORS[:2]):
                membership.register(AggregatorInfo(id=name, address=f"127.0.0.1:{7301 + i}"))
                producer = Producer(role="aggregator", id=name)
                common = {"weights": WEIGHTS, "federation": "digits", "round": 3, "producer": producer, "key": key}
                cluster = save_model(store, kind="cluster", num_samples=100, metrics={"accuracy": 0.8 + 0.1 * i}, **common)
                semi = save_model(
                    store, kind="semi-global", parents=[cluster.cid], num_samples=100,
                    metrics={"accuracy": 0.85 + 0.1 * i}, **common,
                )  # fmt: skip
                for manifest in (cluster, semi):
                    client.announce(manifest.to_bytes())
                progress = Progress(round=4, agent_count=5 + i, last_cluster_cid=cluster.cid, last_semi_global_cid=semi.cid)
                membership.heartbeat(name, progress)
        yield daemon


def test_once_json_is_the_fleet_as_the_coordinator_sees_it(coordinator: CoordinatorDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["fleet", "watch", "--once", "--json", "--coordinator", coordinator.address]) == 0
    frame = json.loads(capsys.readouterr().out)
    assert coordinator.membership is not None
    shares = ring_shares(coordinator.membership.ring())
    assert frame["error"] == "" and frame["ring_version"] == coordinator.membership.ring_version
    rows = {row["id"]: row for row in frame["aggregators"]}
    assert list(rows) == list(AGGREGATORS)
    assert [(r["alive"], r["round"], r["agents"]) for r in rows.values()] == [(True, 4, 5), (True, 4, 6), (False, 0, 0)]
    assert {name: rows[name]["share"] for name in AGGREGATORS[:2]} == shares and rows["agg-c"]["share"] == 0
    assert sum(shares.values()) == pytest.approx(1.0) and all(0.2 < s < 0.8 for s in shares.values())
    assert [rows[n]["cluster_accuracy"] for n in AGGREGATORS] == [pytest.approx(0.8), pytest.approx(0.9), None]
    assert [rows[n]["semi_global_accuracy"] for n in AGGREGATORS] == [pytest.approx(0.85), pytest.approx(0.95), None]
    assert rows["agg-a"]["cluster"] != rows["agg-a"]["semi_global"] and rows["agg-c"]["cluster"] == ""


def test_once_draws_the_ring_and_the_table(coordinator: CoordinatorDaemon, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["fleet", "watch", "--once", "--coordinator", coordinator.address]) == 0
    text = capsys.readouterr().out
    assert "ring version" in text and "ring █" in text
    for name in AGGREGATORS:
        assert name in text
    assert "0.850" in text and "0.950" in text  # the semi-global accuracies
    assert "2/3 aggregators alive, 11 agents" in text


def test_once_against_a_dead_coordinator_exits_unavailable(tmp_path: Path) -> None:
    from tests.procs import free_port

    assert cli_main(["fleet", "watch", "--once", "--timeout", "1", "--coordinator", f"127.0.0.1:{free_port()}"]) == 5


def test_live_view_redraws_until_ctrl_c_and_exits_cleanly(coordinator: CoordinatorDaemon, procs: ProcessFactory) -> None:
    # rich treats the log file as a terminal and redraws in place, so frames reach it as they are drawn
    terminal = {"TTY_COMPATIBLE": "1", "TTY_INTERACTIVE": "1", "TERM": "xterm-256color", "COLUMNS": "160"}
    watch = procs.strata("fleet", "watch", "--interval", "0.2", "--coordinator", coordinator.address, name="watch", env=terminal)
    give_up = time.monotonic() + 60
    while watch.stdout().count("aggregators alive") < 2:  # at least one redraw after the first frame
        assert watch.alive, watch.tail()
        assert time.monotonic() < give_up, f"no frames within 60s: {watch.stdout()!r}"
        time.sleep(0.2)
    watch._require().send_signal(signal.SIGINT)
    assert watch.wait_exit(timeout=20) == 0, watch.tail()
    assert "Traceback" not in watch.tail(200)
