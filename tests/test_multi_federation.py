"""One aggregator process serving two federations: own rounds, journals, rings and models each.

In-process: a coordinator, a multi-federation aggregator (`digits` and `fashion`) and a
single-federation `digits` peer, all over real gRPC on 127.0.0.1; agents are plain stubs.
As a process: `strata aggregator serve` with a two-federation YAML and one real
`strata agent run` per federation (slow). Every wait is bounded only to turn a hang
into a failure.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from aggregator.journal import Journal
from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto import strata_pb2_grpc as pb_grpc
from proto.errors import ConfigError
from proto.wire import REASON_METADATA_KEY, create_channel, read_header_stream, stream_with_header
from storage.cid import cid_of
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.store import LocalStore
from strata.wiring import initial_model_factory
from tests.agent_service_contract import RPC_TIMEOUT_S, nudged, wait_until
from tests.procs import ProcessFactory, free_port, procs_fixture, run_strata, wait_healthy  # noqa: F401 - fixture
from tests.scrape import scrape

FEDERATIONS = {"digits": {}, "fashion": {"initial_model": "task:fashion_mnist", "round": {"quorum": 1.0}}}


# ------------------------------------------------------------------ config


def test_each_federation_gets_the_top_level_keys_with_its_own_overrides() -> None:
    config = AggregatorConfig(round=RoundSettings(min_updates=2, quorum=0.5), federations=FEDERATIONS)
    per = config.per_federation()
    assert list(per) == ["digits", "fashion"] and config.served_federations() == ("digits", "fashion")
    assert per["fashion"].federation == "fashion" and per["fashion"].initial_model == "task:fashion_mnist"
    assert per["fashion"].round.quorum == 1.0 and per["fashion"].round.min_updates == 2  # merged key by key
    assert per["digits"].round.quorum == 0.5 and per["digits"].initial_model == "task:digits"
    assert AggregatorConfig().per_federation() == {"digits": AggregatorConfig()}  # the single-federation default
    # text from `--set federations.F.round.min_updates=3` or the environment takes the key's type
    as_text = AggregatorConfig(federations={"f": {"round": {"min_updates": "3", "quorum": "0.5"}}}).per_federation()
    assert as_text["f"].round.min_updates == 3 and as_text["f"].round.quorum == 0.5


@pytest.mark.parametrize(("federations", "words"), [
    ({"fashion": {"listen": "127.0.0.1:1"}}, "may set only"),
    ({"a/b": {}}, "not a federation name"),
    ({"fashion": {"round": {"quorum": 7}}}, "quorum"),
    ({"fashion": {"round": {"no_such_key": 1}}}, "no_such_key"),
    ({"fashion": {"encoding": "int3"}}, "encoding"),
    ({"fashion": {"round": {"min_updates": "two"}}}, "min_updates: expected int"),
])  # fmt: skip
def test_a_bad_federation_entry_is_a_config_error_naming_it(federations: dict[str, Any], words: str) -> None:
    with pytest.raises(ConfigError) as info:
        AggregatorConfig(federations=federations)
    assert words in str(info.value) and "federations" in str(info.value)


# ------------------------------------------------------------------ two federations, one process


class Fleet:
    def __init__(self, tmp_path: Path) -> None:
        self.store = str(tmp_path / "store")  # one store for all: isolation must not rest on separate stores
        self.coordinator = CoordinatorDaemon(
            CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(tmp_path / "coordinator"), heartbeat_interval_s=0.5)
        ).start()
        common: dict[str, Any] = {
            "listen": "127.0.0.1:0",
            "store": self.store,
            "coordinator": self.coordinator.address,
            "serving": ServingSettings(heartbeat_interval_s=0.5, stream_idle_s=1.0),
            "round": RoundSettings(min_updates=1, deadline_s=120.0),
            "synthesis": SynthesisSettings(peer_wait_s=0.5, fetch_timeout_s=5.0),
        }
        self.metrics_port = free_port()
        multi = AggregatorConfig(
            id="agg-multi", state_dir=str(tmp_path / "multi"), federations=FEDERATIONS, metrics_port=self.metrics_port,
            **common,
        )  # fmt: skip
        self.multi = AggregatorDaemon(multi, federation_model_factory=initial_model_factory).start()
        single = AggregatorConfig(id="agg-single", state_dir=str(tmp_path / "single"), **common)
        self.single = AggregatorDaemon(single, initial_model_factory=initial_model_factory(single)).start()
        self.channel = create_channel(self.multi.address)
        self.agents = pb_grpc.AgentServiceStub(self.channel)
        self.peers = pb_grpc.PeerServiceStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.single.stop()
        self.multi.stop()
        self.coordinator.stop()


@pytest.fixture(name="fleet")
def fleet_fixture(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(tmp_path)
    try:
        yield fleet
    finally:
        fleet.stop()


def refused_reason(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), dict(info.value.trailing_metadata() or ()).get(REASON_METADATA_KEY, "")


def join(stub: pb_grpc.AgentServiceStub, agent_id: str, federation: str) -> pb.JoinReply:
    return stub.Join(pb.JoinRequest(agent_id=agent_id, federation=federation, capability=pb.TRAIN), timeout=RPC_TIMEOUT_S)


def get_model(stub: pb_grpc.AgentServiceStub, federation: str, model_cid: str = "") -> tuple[pb.ModelHeader, bytes]:
    stream = stub.GetModel(pb.GetModelRequest(model_cid=model_cid, federation=federation), timeout=RPC_TIMEOUT_S)
    return read_header_stream(stream, size_of=lambda h: h.weights_size, max_size=1 << 30)


def submit(stub: pb_grpc.AgentServiceStub, agent_id: str, federation: str, base: pb.ModelRef, blob: bytes) -> pb.SubmitUpdateReply:
    header = pb.UpdateHeader(
        agent_id=agent_id, round=base.round, base_cid=base.model_cid, num_samples=10, weights_size=len(blob),
        weights_cid=cid_of(blob), federation=federation, kind="local",
    )  # fmt: skip
    return stub.SubmitUpdate(stream_with_header(pb.UpdateChunk, header, blob, 4096), timeout=RPC_TIMEOUT_S)


def current(stub: pb_grpc.AgentServiceStub, agent_id: str, federation: str) -> pb.ModelRef:
    request = pb.HeartbeatRequest(agent_id=agent_id, federation=federation)
    return stub.Heartbeat(request, timeout=RPC_TIMEOUT_S).current_base


def test_two_federations_on_one_aggregator_are_independent_and_isolated(fleet: Fleet, tmp_path: Path) -> None:
    coordinator = CoordinatorClient(fleet.coordinator.address)
    try:
        # membership is per federation: only agg-multi serves fashion; both serve digits
        wait_until(lambda: {m.id for m in coordinator.ring("digits").members} == {"agg-multi", "agg-single"}, 20, "digits ring")
        assert {m.id for m in coordinator.ring("fashion").members} == {"agg-multi"}
        wait_until(lambda: len(fleet.multi.federation("digits").ring_view.ring) == 2, 20, "digits ring view")
        assert len(fleet.multi.federation("fashion").ring_view.ring) == 1

        # an agent chooses its federation at join; fashion's only member never redirects
        fashion_home = join(fleet.agents, "f-agent", "fashion").home
        assert fashion_home.aggregator_id == "agg-multi" and fashion_home.base.federation == "fashion"
        digits_agent = next(
            agent_id for agent_id in (f"d-agent-{i}" for i in range(200))
            if join(fleet.agents, agent_id, "digits").WhichOneof("outcome") == "home"
        )
        digits_base = join(fleet.agents, digits_agent, "digits").home.base
        assert digits_base.federation == "digits" and digits_base.model_cid != fashion_home.base.model_cid
        header, _ = get_model(fleet.agents, "fashion")
        assert Manifest.from_bytes(header.manifest).federation == "fashion"

        # unknown federations are refused with the machine-readable reason, everywhere
        assert refused_reason(lambda: join(fleet.agents, "x", "cifar")) == (grpc.StatusCode.INVALID_ARGUMENT, "unknown_federation")
        assert refused_reason(lambda: get_model(fleet.agents, "cifar"))[1] == "unknown_federation"
        assert refused_reason(lambda: fleet.peers.GetLatest(pb.LatestRequest(federation="cifar"), timeout=5))[1] == (
            "unknown_federation"
        )
        blob = nudged(decode_tensors(get_model(fleet.agents, "fashion")[1]))
        wrong = submit(fleet.agents, "f-agent", "cifar", fashion_home.base, blob)
        assert not wrong.accepted and wrong.reason == "unknown_federation"

        # fashion closes a round; digits, with no update yet, stays at round 0
        assert submit(fleet.agents, "f-agent", "fashion", fashion_home.base, blob).accepted
        wait_until(lambda: current(fleet.agents, "f-agent", "fashion").round == 1, 30, "fashion round 1")
        assert current(fleet.agents, digits_agent, "digits").round == 0
        assert fleet.multi.federation("digits").rounds.current.round == 0
        fashion_now = current(fleet.agents, "f-agent", "fashion")

        # an agent of digits never gets fashion's models: not by CID, not as a base, not on its watch stream
        for cid in (fashion_now.model_cid, fashion_home.base.model_cid):
            assert refused_reason(lambda cid=cid: get_model(fleet.agents, "digits", cid)) == (
                grpc.StatusCode.NOT_FOUND, "not_found"
            )
        assert get_model(fleet.agents, "fashion", fashion_now.model_cid)[0].model_cid == fashion_now.model_cid
        digits_tensors = decode_tensors(get_model(fleet.agents, "digits")[1])
        crossed = submit(fleet.agents, digits_agent, "digits", fashion_now, nudged(digits_tensors))
        assert not crossed.accepted
        watch = fleet.agents.WatchModels(pb.WatchModelsRequest(agent_id=digits_agent, federation="digits"), timeout=5)
        first = next(watch)
        watch.cancel()
        assert first.new_base.federation == "digits" and first.new_base.model_cid == digits_base.model_cid

        # digits closes its own round, then each federation's peer pointer is its own
        assert submit(fleet.agents, digits_agent, "digits", digits_base, nudged(digits_tensors)).accepted
        wait_until(lambda: current(fleet.agents, digits_agent, "digits").round == 1, 30, "digits round 1")
        assert current(fleet.agents, "f-agent", "fashion").round == 1
        for federation in ("digits", "fashion"):
            latest = fleet.peers.GetLatest(pb.LatestRequest(federation=federation), timeout=5).latest
            assert latest.federation == federation and latest.producer == "agg-multi"
            with create_channel(fleet.multi.address) as channel:  # the published cluster model is fetchable
                blobs = pb_grpc.PeerServiceStub(channel).FetchBlob(pb.FetchBlobRequest(cid=latest.model_cid), timeout=5)
                _, manifest_bytes = read_header_stream(blobs, size_of=lambda h: h.size, max_size=1 << 30)
            assert Manifest.from_bytes(manifest_bytes).federation == federation

        # /metrics: the default federation's families as before, and each federation's round, labelled
        metrics = scrape(fleet.metrics_port)
        assert metrics.labelled("strata_aggregator_federation_round", "federation") == {"digits": 1, "fashion": 1}
        assert metrics.labelled("strata_aggregator_federation_rounds_closed_total", "federation") == {
            "digits": 1, "fashion": 1,
        }  # fmt: skip
        assert metrics.value("strata_aggregator_round") == 1

        # journals are per federation, and so is what the coordinator indexes
        for federation in ("digits", "fashion"):
            journal = tmp_path / "multi" / "federations" / federation / "journal.sqlite"
            assert journal.is_file()
        fashion_history = fleet.multi.federation("fashion").journal.history()
        assert [record.round for record in fashion_history if record.closed_at] == [0]
        with LocalStore(fleet.store) as store:
            for record in fashion_history:
                if record.cluster_cid:
                    assert Manifest.from_bytes(store.get(record.cluster_cid)).federation == "fashion"
        wait_until(lambda: any(r.kind == "cluster" for r in coordinator.list_models(federation="fashion")), 20, "indexed")
        assert {r.federation for r in coordinator.list_models(aggregator="agg-multi")} == {"digits", "fashion"}
        assert all(r.federation == "fashion" for r in coordinator.list_models(federation="fashion"))
        assert not coordinator.list_models(federation="fashion", aggregator="agg-single")

        # the heartbeat reports each federation's round and models; the one-federation aggregator none
        def progress() -> dict[str, tuple[int, str]]:
            status = {s.info.id: s for s in coordinator.fleet_status().aggregators}
            assert not status["agg-single"].federations
            return {f.federation: (f.round, f.last_cluster_cid) for f in status["agg-multi"].federations}

        wait_until(lambda: {f: r for f, (r, _) in progress().items()} == {"digits": 1, "fashion": 1}, 20, "progress")
        assert progress()["fashion"][1] == fashion_history[0].cluster_cid
    finally:
        coordinator.close()


@pytest.mark.slow  # a CLI process
def test_strata_ring_show_lists_one_federations_ring(fleet: Fleet, tmp_path: Path) -> None:
    with CoordinatorClient(fleet.coordinator.address) as coordinator:
        wait_until(lambda: {m.id for m in coordinator.ring("digits").members} == {"agg-multi", "agg-single"}, 20, "ring")
    for federation, members in (("fashion", ["agg-multi"]), ("digits", ["agg-multi", "agg-single"])):
        shown = run_strata("ring", "show", "--federation", federation, "--coordinator", fleet.coordinator.address,
                           "--json", home=tmp_path)  # fmt: skip
        assert shown.returncode == 0, shown.stderr
        assert [m["id"] for m in json.loads(shown.stdout)["members"]] == members


def test_a_request_naming_no_federation_goes_to_the_default_one(fleet: Fleet) -> None:
    header, _ = get_model(fleet.agents, "")
    assert Manifest.from_bytes(header.manifest).federation == "digits"  # the top-level `federation`


def test_an_upload_that_never_starts_or_starts_with_garbage_is_refused_as_an_answer(fleet: Fleet) -> None:
    # the router reads the first message itself (to find the federation), with the same bounds
    upload = fleet.channel.stream_unary(
        "/strata.v1.AgentService/SubmitUpdate", response_deserializer=pb.SubmitUpdateReply.FromString
    )
    garbage = upload(iter([b"\xff\xff\xff not a protobuf"]), timeout=10)
    assert not garbage.accepted and garbage.reason == "bad_request"
    release = threading.Event()

    def silent() -> Iterator[bytes]:
        release.wait(15)  # sends nothing until the reply came (or a bound passed)
        yield from ()

    try:
        idle = upload(silent(), timeout=10)
    finally:
        release.set()
    assert not idle.accepted and idle.reason == "bad_stream"


# ------------------------------------------------------------------ as real processes


@pytest.mark.slow
def test_strata_aggregator_serve_trains_two_federations_with_real_agents(procs: ProcessFactory, tmp_path: Path) -> None:
    port, store = free_port(), tmp_path / "store"
    config = tmp_path / "aggregator.yaml"
    config.write_text(yaml.safe_dump({
        "id": "agg-multi", "listen": f"127.0.0.1:{port}", "state_dir": str(tmp_path / "agg"), "store": str(store),
        "serving": {"heartbeat_interval_s": 0.5},
        "round": {"min_updates": 1, "quorum": 1.0, "deadline_s": 60},
        "federations": {
            "digits": {"round_config": {"epochs": "1"}},
            "fashion": {"initial_model": "task:fashion_mnist", "round_config": {"max_batches": "2", "batch_size": "16"}},
        },
    }))  # fmt: skip
    aggregator = procs.strata("aggregator", "serve", "--config", str(config), name="aggregator")
    aggregator.wait_for_event("aggregator_started", timeout=60)
    wait_healthy(f"127.0.0.1:{port}", timeout=20)
    agents = []
    for federation, task in (("digits", "digits"), ("fashion", "fashion_mnist")):
        agent_config = tmp_path / f"agent-{federation}.yaml"
        agent_config.write_text(yaml.safe_dump({
            "id": f"{federation}-agent", "seeds": [f"127.0.0.1:{port}"], "federation": federation, "task": task,
            "task_options": {"partition": {"index": 0, "count": 20}},
            "state_dir": str(tmp_path / f"agent-{federation}"), "max_rounds": 2, "backoff_max_s": 1.0,
            "start_jitter_s": 0.0,
        }))  # fmt: skip
        agents.append(procs.strata("agent", "run", "--config", str(agent_config), name=f"agent-{federation}"))
    for agent in agents:
        assert agent.wait_exit(timeout=240) == 0, agent.tail()
    aggregator.terminate()

    with LocalStore(store) as models:
        for federation in ("digits", "fashion"):
            with Journal(tmp_path / "agg" / "federations" / federation / "journal.sqlite") as journal:
                closed = [record for record in journal.history() if record.closed_at]
            assert len(closed) >= 1, f"{federation}: no round closed"
            for record in closed:
                cluster = Manifest.from_bytes(models.get(record.cluster_cid))
                assert cluster.federation == federation
                for parent in cluster.parents:
                    update = Manifest.from_bytes(models.get(parent))
                    assert update.federation == federation and update.producer.id == f"{federation}-agent"
    started = {event["federation"] for event in aggregator.events("aggregator_started")}
    assert started == {"digits", "fashion"}
    # one process's log interleaves both federations' rounds: each round event says whose it is
    assert {event["federation"] for event in aggregator.events("round_closed")} == {"digits", "fashion"}


def test_history_finds_one_journal_per_federation(tmp_path: Path) -> None:
    import argparse

    from strata.cmd_history import find_state_dirs, read_history

    state = tmp_path / "agg-m"
    for federation in ("digits", "fashion"):
        with Journal(state / "federations" / federation / "journal.sqlite") as journal:
            journal.open_round(0, "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH", now=100.0)
    found = find_state_dirs(argparse.Namespace(state_dir=[state], aggregator=[]))
    assert found == {"agg-m/digits": state / "federations" / "digits", "agg-m/fashion": state / "federations" / "fashion"}
    assert [row["round"] for row in read_history(found["agg-m/fashion"])] == [0]
    assert set(find_state_dirs(argparse.Namespace(state_dir=[state], aggregator=["agg-m"]))) == set(found)


def test_a_federation_cannot_start_from_another_federations_model(tmp_path: Path) -> None:
    from storage.keys import KeyPair
    from strata.wiring import task_base_model

    with LocalStore(tmp_path / "store") as store:
        digits_base = task_base_model(store, KeyPair.generate(), task="digits", federation="digits")
    config = AggregatorConfig(
        id="agg-x", listen="127.0.0.1:0", state_dir=str(tmp_path / "state"), store=str(tmp_path / "store"),
        federations={"digits": {"initial_model": digits_base}, "other": {"initial_model": digits_base}},
    )  # fmt: skip
    daemon = AggregatorDaemon(config)
    try:
        with pytest.raises(ConfigError) as info:
            daemon.start()
        assert "'digits' model, not 'other'" in str(info.value)
    finally:
        daemon.stop()
