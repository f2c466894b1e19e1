"""`strata dashboard`'s JSON API over real HTTP, against the real CoordinatorServicer on an
in-process gRPC server holding a small signed lineage (base -> device updates -> cluster ->
semi-global) and three registered aggregators; its token rule, its refusals, its CLI guards."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from aggregator.journal import Journal
from coordinator.client import AgentEntry, AggregatorInfo, CoordinatorClient, Progress
from coordinator.index import ModelIndex
from coordinator.membership import Membership
from coordinator.service import CoordinatorServicer
from proto import strata_pb2_grpc as pb_grpc
from proto.serving import ServerHandle, create_server
from storage.codec import encode_tensors
from storage.keys import KeyPair
from storage.manifest import Manifest, Producer
from storage.models import save_model
from storage.store import LocalStore
from strata.cli import build_parser, main
from strata.cli_common import EXIT_USAGE
from strata.cmd_dashboard import reader_settings
from strata.dashboard.app import COOKIE, build_app
from strata.dashboard.reader import JOURNAL_FILE, FleetReader, ReaderSettings
from tests.dashboard_serving import first_sse_event, get, get_json, serve_app, sse_events
from tests.procs import free_port
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.signers import Signers

AGGREGATORS = ("agg-a", "agg-b", "agg-c")
TOKEN = "operator-token-for-the-dashboard-tests"


@dataclasses.dataclass(frozen=True)
class Models:
    base: Manifest
    locals: tuple[Manifest, ...]
    cluster: Manifest
    semi_global: Manifest
    store_path: Path


@pytest.fixture
def coordinator() -> Iterator[str]:
    membership, index = Membership(), ModelIndex(None)
    handle: ServerHandle = create_server("127.0.0.1:0", workers=4)
    pb_grpc.add_CoordinatorServiceServicer_to_server(CoordinatorServicer(membership, index, offload=handle.offload), handle.server)
    with handle:
        yield handle.address
    membership.close()
    index.close()


def _weights(seed: int) -> bytes:
    return encode_tensors({"w": np.full((2, 3), float(seed), dtype=np.float32), "b": np.zeros(3, dtype=np.float32)})


@pytest.fixture
def models(coordinator: str, tmp_path: Path, keypair: KeyPair) -> Models:
    """A round of agg-a's federation, stored and indexed, and the fleet's aggregators registered."""
    store_path = tmp_path / "store"
    with LocalStore(store_path) as store:
        common = {"federation": "digits", "key": keypair}
        base = save_model(store, weights=_weights(0), kind="base", round=0, producer=Producer(role="operator", id="op"), **common)
        device_updates = tuple(
            save_model(
                store, weights=_weights(i), kind="local", round=1, producer=Producer(role="agent", id=f"phone-{i}"),
                parents=(base.cid,), base=base.cid, num_samples=10 * i, metrics={"accuracy": 0.5 + i / 10, "loss": 1.0 / i}, **common,
            )
            for i in (1, 2)
        )
        cluster = save_model(
            store, weights=_weights(7), kind="cluster", round=1, producer=Producer(role="aggregator", id="agg-a"),
            parents=tuple(sorted(m.cid for m in device_updates)), base=base.cid, num_samples=30,
            metrics={"accuracy": 0.8, "loss": 0.4}, extra={"base_metrics": {"accuracy": 0.1, "loss": 2.3}}, **common,
        )
        semi_global = save_model(
            store, weights=_weights(8), kind="semi-global", round=1, producer=Producer(role="aggregator", id="agg-a"),
            parents=(cluster.cid,), base=base.cid, num_samples=30, metrics={"accuracy": 0.85, "loss": 0.35}, **common,
        )
    with CoordinatorClient(coordinator, timeout_s=5) as client:
        for manifest in (base, *device_updates, cluster, semi_global):
            client.announce(manifest.to_bytes())
        for i, aggregator in enumerate(AGGREGATORS):
            client.register(AggregatorInfo(id=aggregator, address=f"127.0.0.1:{7100 + i}", federations=("digits",)))
            client.heartbeat(aggregator, Progress(round=2, agent_count=i + 1, last_cluster_cid=cluster.cid if i == 0 else ""))
        client.report_agents(
            "agg-a",
            [AgentEntry(agent_id="phone-1", last_seen=5.0, capability="train", telemetry={"battery_percent": 42.0, "network": "wifi"})],
        )
    return Models(base=base, locals=device_updates, cluster=cluster, semi_global=semi_global, store_path=store_path)


def _reader(coordinator: str, store_path: Path | None = None, **settings: object) -> FleetReader:
    store = (lambda: LocalStore(store_path)) if store_path is not None else None
    return FleetReader(ReaderSettings(**{"coordinator": coordinator, "timeout_s": 5.0, "store": store, **settings}))  # type: ignore[arg-type]


@pytest.fixture
def dashboard(coordinator: str, models: Models) -> Iterator[str]:
    reader = _reader(coordinator, models.store_path)
    with serve_app(build_app(reader, poll_s=0.2)) as url:
        yield url
    reader.close()


def test_the_fleet_views_read_the_coordinator(dashboard: str, models: Models) -> None:
    status, ring = get_json(f"{dashboard}/api/ring")
    assert status == 200
    assert [a["id"] for a in ring["aggregators"]] == list(AGGREGATORS)
    assert all(a["in_ring"] and a["alive"] and a["round"] == 2 for a in ring["aggregators"])
    assert [a["agents"] for a in ring["aggregators"]] == [1, 2, 3]
    assert ring["aggregators"][0]["last_cluster"] == models.cluster.cid
    # the arcs are the ring's own placement: every member has a share, and the shares cover it
    assert {a["id"] for a in ring["arcs"]} == set(AGGREGATORS)
    assert sum(a["share"] for a in ring["arcs"]) == pytest.approx(1.0)

    status, agents = get_json(f"{dashboard}/api/agents")
    assert status == 200
    [phone] = agents["agents"]
    assert phone["id"] == "phone-1" and phone["home"] == "agg-a" and phone["telemetry"]["battery_percent"] == 42.0


def test_rounds_pair_each_cluster_with_its_semi_global(dashboard: str, models: Models) -> None:
    status, rounds = get_json(f"{dashboard}/api/rounds")
    assert status == 200
    [row] = rounds["aggregators"]["agg-a"]
    assert row["round"] == 1 and row["participants"] == 2
    assert row["cluster"]["cid"] == models.cluster.cid and row["cluster"]["metrics"]["accuracy"] == 0.8
    assert row["semi_global"]["cid"] == models.semi_global.cid and row["semi_global"]["metrics"]["loss"] == 0.35
    assert row["base_evaluated"] == {"accuracy": 0.1, "loss": 2.3}
    # the agents evaluated the round's base: that is the base model's held-out score, not the cluster's
    assert row["cluster"]["evaluated"] is None and row["semi_global"]["evaluated"] is None
    # no --state-dir: no journal read, and the page says where refusals would come from
    assert rounds["journals"] == [] and rounds["refusals"] == {}


def test_model_browser_page_and_lineage(dashboard: str, models: Models) -> None:
    status, listing = get_json(f"{dashboard}/api/models?kind=local")
    assert status == 200 and {m["cid"] for m in listing["models"]} == {m.cid for m in models.locals}
    status, found = get_json(f"{dashboard}/api/models?q={models.semi_global.cid[-10:].lower()}")
    assert [m["cid"] for m in found["models"]] == [models.semi_global.cid]
    status, exact = get_json(f"{dashboard}/api/models?q={models.base.cid}")
    assert [m["cid"] for m in exact["models"]] == [models.base.cid]
    assert get_json(f"{dashboard}/api/models?q={models.base.cid}&kind=cluster")[1]["models"] == []
    assert get_json(f"{dashboard}/api/models?q=QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG")[1]["models"] == []

    status, page = get_json(f"{dashboard}/api/models/{models.cluster.cid}")
    assert status == 200
    assert page["kind"] == "cluster" and page["signature"]["status"] == "valid"
    assert page["manifest"]["parents"] == list(models.cluster.parents)
    assert {t["name"]: t["shape"] for t in page["tensors"]} == {"b": [3], "w": [2, 3]}
    assert [c["cid"] for c in page["children"]] == [models.semi_global.cid]

    status, lineage = get_json(f"{dashboard}/api/lineage/{models.semi_global.cid}")
    assert status == 200 and lineage["root"] == models.semi_global.cid
    kinds = {n["cid"]: n["kind"] for n in lineage["nodes"]}
    assert kinds[models.cluster.cid] == "cluster" and {kinds[m.cid] for m in models.locals} == {"local"}
    edges = {(e["from"], e["to"]) for e in lineage["edges"]}
    assert (models.semi_global.cid, models.cluster.cid) in edges
    assert all((models.cluster.cid, m.cid) in edges for m in models.locals)
    assert not lineage["truncated"] and all(e["kind"] == "parent" for e in lineage["edges"])
    # bases=1: what each model was trained from, too (here the round's base, one generation up)
    status, shallow = get_json(f"{dashboard}/api/lineage/{models.semi_global.cid}?depth=1&bases=1")
    assert status == 200 and {n["cid"] for n in shallow["nodes"]} == {models.semi_global.cid, models.cluster.cid, models.base.cid}
    assert {(e["from"], e["to"], e["kind"]) for e in shallow["edges"]} == {
        (models.semi_global.cid, models.cluster.cid, "parent"), (models.semi_global.cid, models.base.cid, "base"),
        (models.cluster.cid, models.base.cid, "base"),  # an edge between two nodes shown is drawn, walked or not
    }  # fmt: skip


def test_weights_download_but_never_a_device_update(dashboard: str, models: Models) -> None:
    status, headers, body = get(f"{dashboard}/api/models/{models.semi_global.cid}/weights")
    assert status == 200 and body == _weights(8)
    assert models.semi_global.cid in headers["content-disposition"]
    status, refusal = get_json(f"{dashboard}/api/models/{models.locals[0].cid}/weights")
    assert status == 403 and refusal["error"]["reason"] == "device_update"


def test_an_audit_dashboard_serves_device_updates(coordinator: str, models: Models) -> None:
    reader = _reader(coordinator, models.store_path, may_read_device_updates=True)
    with serve_app(build_app(reader)) as url:
        status, _, body = get(f"{url}/api/models/{models.locals[0].cid}/weights")
    reader.close()
    assert status == 200 and body == _weights(1)


@pytest.mark.parametrize(
    ("path", "status", "reason"),
    [
        ("/api/models/not-a-cid!", 400, "bad_cid"),
        ("/api/models/QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", 404, "unknown_model"),
        ("/api/models?kind=weird", 400, "bad_kind"),
        ("/api/models?round=abc", 400, "bad_argument"),
        ("/api/models?limit=0", 400, "bad_argument"),
        ("/api/lineage/QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG?depth=-1", 400, "bad_argument"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(dashboard: str, path: str, status: int, reason: str) -> None:
    got, body = get_json(dashboard + path)
    assert (got, body["error"]["reason"]) == (status, reason)


def test_without_a_store_weights_are_not_found_but_the_rest_works(coordinator: str, models: Models) -> None:
    reader = _reader(coordinator)
    with serve_app(build_app(reader)) as url:
        status, body = get_json(f"{url}/api/models/{models.semi_global.cid}/weights")
        assert (status, body["error"]["reason"]) == (404, "no_store")
        assert get_json(f"{url}/api/models/{models.semi_global.cid}")[0] == 200
    reader.close()


def test_a_coordinator_away_is_unavailable_not_an_error_page() -> None:
    reader = _reader(f"127.0.0.1:{free_port()}", timeout_s=1)
    with serve_app(build_app(reader)) as url:
        status, body = get_json(f"{url}/api/ring")
    reader.close()
    assert status == 503 and body["error"]["reason"]


def test_the_event_stream_opens_with_a_snapshot(dashboard: str, models: Models) -> None:
    name, snapshot = first_sse_event(f"{dashboard}/api/events")
    assert name == "snapshot"
    assert [a["id"] for a in snapshot["ring"]["aggregators"]] == list(AGGREGATORS)
    assert snapshot["rounds"]["aggregators"]["agg-a"][0]["semi_global"]["cid"] == models.semi_global.cid


def test_the_event_stream_pushes_a_new_snapshot_when_the_fleet_moves_on(coordinator: str, dashboard: str, models: Models) -> None:
    def next_round(_: int) -> None:
        with CoordinatorClient(coordinator, timeout_s=5) as client:
            client.heartbeat("agg-b", Progress(round=3, agent_count=2))

    [(_, before), (name, after)] = sse_events(f"{dashboard}/api/events", 2, between=next_round)
    rounds = {a["id"]: a["round"] for a in after["ring"]["aggregators"]}
    assert name == "snapshot" and rounds["agg-b"] == 3
    assert {a["id"]: a["round"] for a in before["ring"]["aggregators"]}["agg-b"] == 2


def test_without_a_token_only_loopback_names_are_answered(coordinator: str, models: Models) -> None:
    reader = _reader(coordinator)
    with serve_app(build_app(reader, allowed_hosts=frozenset({"127.0.0.1", "localhost"}))) as url:
        assert get(f"{url}/api/ring")[0] == 200
        # a page whose name was rebound to 127.0.0.1 comes with its own name in Host
        status, body = get_json(f"{url}/api/ring", headers={"Host": "attacker.example"})
        assert (status, body["error"]["reason"]) == (403, "bad_host")
        assert get(url + "/", headers={"Host": "attacker.example:80"})[0] == 403
    reader.close()


def test_the_operator_token_guards_every_read(coordinator: str, models: Models) -> None:
    reader = _reader(coordinator, models.store_path)
    with serve_app(build_app(reader, token=TOKEN)) as url:
        for path in ("/", "/api/ring", f"/api/models/{models.semi_global.cid}/weights", "/api/events"):
            status, _, body = get(url + path)
            assert status == 401 and b"unauthenticated" in body, path
        assert get(f"{url}/api/ring", headers={"Authorization": "Bearer wrong-token"})[0] == 401
        assert get(f"{url}/api/ring", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
        assert get(f"{url}/?token=wrong")[0] == 401

        # ?token= once: an HttpOnly cookie, and the token leaves the URL
        status, headers, _ = get(f"{url}/?token={TOKEN}")
        assert status == 303 and headers["location"] == "/"
        cookie = headers["set-cookie"]
        assert cookie.startswith(f"{COOKIE}={TOKEN}") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert get(f"{url}/api/agents", headers={"Cookie": f"{COOKIE}={TOKEN}"})[0] == 200
        assert get(url + "/", headers={"Cookie": f"{COOKIE}={TOKEN}"})[0] == 200
        assert get(f"{url}/api/agents", headers={"Cookie": f"{COOKIE}=nope"})[0] == 401
    reader.close()


def test_the_page_and_its_vendored_libraries_are_served(dashboard: str) -> None:
    status, _, page = get(dashboard + "/")
    assert status == 200 and b'<svg id="ring"' in page
    for asset in ("app.js", "style.css", "vendor/uPlot.iife.min.js", "vendor/dagre.min.js"):
        assert get(f"{dashboard}/static/{asset}")[0] == 200, asset
    assert b"//" not in page.split(b"<script")[1].split(b">")[0].replace(b'"/static', b"")  # no CDN


def test_the_cli_listens_beyond_loopback_only_with_a_token(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["dashboard", "--listen", "0.0.0.0:18081"]) == EXIT_USAGE
    assert "[token_required]" in capsys.readouterr().err
    short = tmp_path / "token"
    short.write_text("short\n")
    assert main(["dashboard", "--listen", "127.0.0.1:18081", "--token-file", str(short)]) == EXIT_USAGE
    assert "[bad_token]" in capsys.readouterr().err
    assert main(["dashboard", "--listen", "nonsense"]) == EXIT_USAGE
    assert "[bad_argument]" in capsys.readouterr().err


def test_a_model_gets_its_held_out_score_once_a_later_round_starts_from_it(
    dashboard: str, coordinator: str, models: Models, keypair: KeyPair
) -> None:
    with LocalStore(models.store_path) as store:
        next_cluster = save_model(
            store, weights=_weights(9), kind="cluster", federation="digits", round=2, key=keypair,
            producer=Producer(role="aggregator", id="agg-a"), parents=(models.locals[0].cid,), base=models.semi_global.cid,
            num_samples=10, metrics={"accuracy": 0.9}, extra={"base_metrics": {"accuracy": 0.77, "loss": 0.6, "num_samples": 10}},
        )
    with CoordinatorClient(coordinator, timeout_s=5) as client:
        client.announce(next_cluster.to_bytes())
    status, rounds = get_json(f"{dashboard}/api/rounds")
    by_round = {r["round"]: r for r in rounds["aggregators"]["agg-a"]}
    assert by_round[1]["semi_global"]["evaluated"] == {"accuracy": 0.77, "loss": 0.6}
    assert by_round[2]["base_evaluated"] == {"accuracy": 0.77, "loss": 0.6} and by_round[2]["cluster"]["evaluated"] is None


def test_with_the_fleet_ca_the_model_page_names_the_certified_signer(coordinator: str, models: Models, tmp_path: Path) -> None:
    with FleetCA.init(tmp_path / "ca", "dashfleet") as ca:
        aggregator = ca.issue(Identity(Role.AGGREGATOR, "agg-a"), KeyPair.generate())
        certified_key = aggregator.manifest_key.with_certificate(aggregator.cert_pem.decode())
        with LocalStore(models.store_path) as store:
            signed = save_model(
                store, weights=_weights(11), kind="cluster", federation="digits", round=3, key=certified_key,
                producer=Producer(role="aggregator", id="agg-a"), parents=(models.locals[0].cid,), num_samples=10,
            )
        with CoordinatorClient(coordinator, timeout_s=5) as client:
            client.announce(signed.to_bytes())
        reader = _reader(coordinator, signers=Signers(aggregator.ca_cert))
        with serve_app(build_app(reader)) as url:
            _, certified = get_json(f"{url}/api/models/{signed.cid}")
            _, bare = get_json(f"{url}/api/models/{models.cluster.cid}")
        reader.close()
    assert certified["signature"]["status"] == "certified" and certified["signature"]["fleet"] == "dashfleet"
    assert certified["signature"]["signer"]["identity"] == "aggregator/agg-a"
    # signed, but by a key no certificate of this fleet stands behind
    assert bare["signature"]["status"] not in ("certified", "valid") and bare["signature"]["message"]


@pytest.mark.parametrize(("role", "reads_device_updates"), [(Role.OPERATOR, False), (Role.AUDIT, True)])
def test_a_bundle_gives_the_dashboard_its_fleet_ca_and_its_role(tmp_path: Path, role: Role, reads_device_updates: bool) -> None:
    with FleetCA.init(tmp_path / "ca", "dashfleet") as ca:
        ca.issue(Identity(role, "console"), KeyPair.generate()).write(tmp_path / "bundle")
    args = build_parser().parse_args(["dashboard", "--bundle", str(tmp_path / "bundle"), "--store", str(tmp_path / "store")])
    settings = reader_settings(args)
    assert settings.signers is not None and settings.signers.fleet == "dashfleet"
    assert settings.may_read_device_updates is reads_device_updates and settings.store is not None


def test_the_event_stream_pushes_a_snapshot_when_a_model_reaches_the_index(
    coordinator: str, dashboard: str, models: Models, keypair: KeyPair
) -> None:
    """Heartbeats and announcements travel apart: a model indexed after the heartbeat that named it still shows."""

    def announce_next_round(_: int) -> None:
        with LocalStore(models.store_path) as store:
            cluster = save_model(
                store, weights=_weights(12), kind="cluster", federation="digits", round=2, key=keypair,
                producer=Producer(role="aggregator", id="agg-c"), parents=(models.locals[1].cid,), num_samples=10,
            )
        with CoordinatorClient(coordinator, timeout_s=5) as client:
            client.announce(cluster.to_bytes())

    [_, (name, after)] = sse_events(f"{dashboard}/api/events", 2, between=announce_next_round)
    assert name == "snapshot" and [r["round"] for r in after["rounds"]["aggregators"]["agg-c"]] == [2]


def test_streams_opened_together_share_one_feed_and_each_gets_every_change(coordinator: str, dashboard: str) -> None:
    second_is_listening = threading.Event()

    def move_on(_: int) -> None:
        # only once both streams hold the first snapshot, so each has a change still to see
        assert second_is_listening.wait(15)
        with CoordinatorClient(coordinator, timeout_s=5) as client:
            client.heartbeat("agg-c", Progress(round=5, agent_count=1))

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(sse_events, f"{dashboard}/api/events", 2, between=move_on)
        second = pool.submit(sse_events, f"{dashboard}/api/events", 2, between=lambda _: second_is_listening.set())
        for events in (first.result(timeout=30), second.result(timeout=30)):
            rounds = {a["id"]: a["round"] for a in events[-1][1]["ring"]["aggregators"]}
            assert [name for name, _ in events] == ["snapshot", "snapshot"] and rounds["agg-c"] == 5


def test_refusals_by_reason_come_from_the_aggregators_journals(coordinator: str, models: Models, tmp_path: Path) -> None:
    state_dir = tmp_path / "agg-a"
    state_dir.mkdir()
    with Journal(state_dir / JOURNAL_FILE) as journal:
        journal.open_round(1, models.base.cid, now=1.0)
        for agent, reason in (("phone-8", "bad_signature"), ("phone-9", "bad_signature"), ("phone-9", "stale_base")):
            journal.record_refusal(1, agent, reason, "refused in the test")
    reader = _reader(coordinator, state_dirs={"agg-a": state_dir})
    with serve_app(build_app(reader)) as url:
        status, rounds = get_json(f"{url}/api/rounds")
    reader.close()
    assert status == 200 and rounds["journals"] == ["agg-a"]
    assert rounds["refusals"] == {"agg-a": {"bad_signature": 2, "stale_base": 1}}
    [row] = rounds["aggregators"]["agg-a"]
    assert row["round"] == 1 and row["refusals"] == {"bad_signature": 2, "stale_base": 1}


def test_the_hub_page_lists_federations_releases_forks_and_proposals(
    coordinator: str, dashboard: str, models: Models, keypair: KeyPair
) -> None:
    from coordinator.hub import ReleaseTag

    with CoordinatorClient(coordinator, timeout_s=5) as client:
        client.create_federation("digits", models.base.to_bytes(), task="digits", description="8x8 digits")
        tag = ReleaseTag(federation="digits", version="1.0.0", model=models.semi_global.cid, released_by="operator/op")
        client.release(tag.signed(keypair).to_bytes())
    status, hub = get_json(f"{dashboard}/api/hub")
    assert status == 200
    (digits,) = hub["federations"]
    assert digits["name"] == "digits" and digits["base"] == models.base.cid
    assert digits["heads"] == {"agg-a": models.semi_global.cid}  # agg-a's newest semi-global model, from the index
    assert [(r["version"], r["model"], r["lineage_root"]) for r in digits["releases"]] == [
        ("1.0.0", models.semi_global.cid, models.base.cid)
    ]
    assert hub["forks"] == [] and hub["proposals"] == []
    status, _, page = get(f"{dashboard}/")
    assert status == 200 and b'id="view-hub"' in page
