"""The relay end to end: real agent daemons (head-only trainers, an inference-only device) through a relay,
`strata device predict` and `strata lineage` against it, and a `strata relay serve` process killed with -9.
"""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.config import AgentConfig
from agent.daemon import run_agents
from proto.errors import NotFound
from storage.codec import decode_tensors
from storage.models import load_manifest, load_model
from strata import cmd_device
from tests.agent_service_contract import base_tensors, join, nudged, stub_for, submit, wait_until
from tests.procs import ProcessFactory, free_port, procs_fixture, run_strata, wait_healthy  # noqa: F401
from tests.test_relay import aggregator_config, relay_config, start_aggregator, start_relay


def device_predict(capsys: pytest.CaptureFixture[str], *argv: str) -> int:
    """`strata device predict ARGV...` in-process (strata/cli.py registers the module separately)."""
    parser = argparse.ArgumentParser(prog="strata")
    commands = parser.add_subparsers(dest="command")
    cmd_device.register(commands)
    args = parser.parse_args(["device", "predict", *argv])
    return args.handler(args)


@pytest.mark.slow
def test_head_only_devices_and_an_inference_device_through_a_relay(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    aggregator = start_aggregator(aggregator_config(tmp_path))
    relay = start_relay(relay_config(tmp_path, aggregator.address, max_devices=2))
    stop = threading.Event()
    try:
        base_cid = aggregator.rounds.current.model_cid
        configs = [
            AgentConfig(
                id=f"dev-{i}",
                seeds=[relay.address],
                task_options={"head_only": True, "max_samples": 40, "partition": {"index": i, "count": 4}},
                state_dir=str(tmp_path / f"dev-{i}"),
                max_rounds=1,
            )
            for i in range(2)
        ] + [AgentConfig(id="viewer", seeds=[relay.address], capability="inference", state_dir=str(tmp_path / "viewer"))]
        # both trainers are known to the relay before either trains, so its window waits for two
        # (they start with a random delay, and the window counts the trainers it has heard from)
        channel, stub = stub_for(relay.address)
        for device in ("dev-0", "dev-1"):
            join(stub, device)
        channel.close()
        runner = threading.Thread(target=run_agents, args=(configs, stop), daemon=True)
        runner.start()
        wait_until(lambda: aggregator.rounds.current.model_cid != base_cid, 60, "a round closed upstream")

        (update,) = list(aggregator.journal.iter_all_updates())
        assert (update.agent_id, update.kind) == ("relay-1", "relay")
        assert update.tensors == ("head.bias", "head.weight")
        window = relay.journal.history()[0]
        assert window.devices == 2 and window.status == "forwarded"
        assert relay.agents.active_trainers() == 2  # the inference device is not a trainer

        _, base_weights = load_model(aggregator.store, base_cid)
        _, new_weights = load_model(aggregator.store, aggregator.rounds.current.model_cid)
        base, new = decode_tensors(base_weights), decode_tensors(new_weights)
        assert np.array_equal(base["fc1.weight"], new["fc1.weight"])  # nobody trained it: kept bit for bit
        assert not np.array_equal(base["head.weight"], new["head.weight"])

        assert device_predict(capsys, "--relay", relay.address, "--task", "digits", "--sample", "20", "--json") == 0
        answer = json.loads(capsys.readouterr().out)
        assert len(answer["predictions"]) == 20 and answer["home"] == "relay-1"
        assert answer["model"] == relay.relay.current.model_cid and 0 <= answer["accuracy"] <= 1
        inputs = tmp_path / "inputs.npy"
        np.save(inputs, np.zeros((3, 64), np.float32))
        assert device_predict(capsys, "--relay", relay.address, "--input", str(inputs)) == 0
        assert "predictions:" in capsys.readouterr().out

        home = tmp_path / "cli-home"

        lineage = run_strata(
            "lineage", window.update_cid, "--store", str(tmp_path / "relay-state" / "store"),
            "--format", "json", home=home,
        )
        assert lineage.returncode == 0, lineage.stderr
        for parent in load_manifest(relay.store, window.update_cid).parents:
            assert parent in lineage.stdout
            assert load_manifest(relay.store, parent).producer.id in ("dev-0", "dev-1")
    finally:
        stop.set()
        relay.stop()
        aggregator.stop()


@pytest.mark.slow
def test_acknowledged_device_updates_survive_kill_9_of_the_relay(procs: ProcessFactory, tmp_path: Path) -> None:
    aggregator = start_aggregator(aggregator_config(tmp_path))
    port = free_port()
    args = [
        "relay", "serve",
        "--set", "id=relay-1",
        "--set", f"seeds={aggregator.address}",
        "--set", f"listen=127.0.0.1:{port}",
        "--set", f"state_dir={tmp_path / 'relay-state'}",
        "--set", "serving.heartbeat_interval_s=0.5",
        "--set", "window.max_wait_s=600",
        "--set", "forward.retry_s=0.2",
    ]  # fmt: skip
    try:
        relay = procs.strata(*args, "--set", "window.max_devices=3", name="relay")
        relay.wait_for_event("new_base", timeout=60)
        wait_healthy(f"127.0.0.1:{port}", timeout=10)
        channel, stub = stub_for(f"127.0.0.1:{port}")
        with channel:
            homes = [join(stub, f"d{i}") for i in range(3)]  # three trainers: the window waits for all three
            tensors = base_tensors(stub, homes[0].base.model_cid)
            replies = [submit(stub, nudged(tensors, 0.01 * (i + 1)), agent_id=f"d{i}", base=homes[0].base) for i in range(2)]
        assert all(r.accepted for r in replies), replies
        assert relay.events("window_closed") == []
        relay.kill9()

        relay = procs.strata(*args, "--set", "window.max_devices=2", name="relay")
        recovered = relay.wait_for_event("window_recovered", timeout=60)  # a new process object reads only its own events
        assert recovered["updates"] == 2
        forwarded = relay.wait_for_event("update_forwarded", timeout=30)
        assert forwarded["devices"] == 2
        wait_until(lambda: any(u.kind == "relay" for u in aggregator.journal.iter_all_updates()), 10, "the relay update")
        update = next(u for u in aggregator.journal.iter_all_updates() if u.kind == "relay")
        assert set(load_manifest(aggregator.store, update.update_cid).parents) == {r.update_cid for r in replies}
        relay.terminate()
        status = json.loads((tmp_path / "relay-state" / "status.json").read_text())
        assert status["windows"]["forwarded"] == 1 and "bytes_saved" in status["cache"]
    finally:
        aggregator.stop()


def test_device_predict_refuses_a_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(NotFound):
        device_predict(capsys, "--relay", "127.0.0.1:1", "--input", str(tmp_path / "nope.npy"))

