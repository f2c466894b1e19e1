"""The hub under mutual TLS: a release records the caller's certificate identity, only owners release,
and a tag must be signed by the caller's certified manifest key. A real coordinator with a fleet CA;
the CLI runs in this process (see tests/test_hub.py for why)."""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from coordinator.client import CoordinatorClient
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from coordinator.hub import ReleaseTag
from proto.errors import StrataError
from storage.keys import KeyPair
from strata.cli import main
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.security import Security, TlsSettings, channel_factory


def _issue(ca: FleetCA, role: Role, name: str, directory: Path) -> Path:
    hosts = ["localhost", "127.0.0.1"] if role in (Role.COORDINATOR, Role.AGGREGATOR) else []
    return ca.issue(Identity(role, name), KeyPair.generate(), None, hosts=hosts).write(directory / name).directory


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("hub-tls")
    with FleetCA.init(root / "ca", "hub-fleet") as ca:
        bundles = {name: _issue(ca, role, name, root / "bundles") for role, name in (
            (Role.COORDINATOR, "coord"), (Role.OPERATOR, "alice"), (Role.OPERATOR, "mallory"), (Role.AUDIT, "auditor"),
            (Role.AGGREGATOR, "agg-tls"),
        )}  # fmt: skip
    config = CoordinatorConfig(
        listen="127.0.0.1:0", state_dir=str(root / "coord"), tls=TlsSettings(bundle=str(bundles["coord"]))
    )
    home = root / "home"
    home.mkdir()
    with CoordinatorDaemon(config) as daemon, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        for name in [n for n in os.environ if n.startswith("STRATA_")]:
            patch.delenv(name)
        patch.setenv("STRATA_STORE", str(root / "store"))
        yield {"address": daemon.address, "bundles": bundles, "ca_pem": root / "ca" / "ca.pem", "root": root}


def _cli(fleet: dict[str, Any], who: str, *args: str) -> tuple[int, Any]:
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([*args, "--coordinator", fleet["address"], "--bundle", str(fleet["bundles"][who]), "--json"])
    return code, json.loads(stdout.getvalue()) if stdout.getvalue().strip() else None


def test_releases_record_the_certificate_identity_and_only_owners_release(fleet: dict[str, Any]) -> None:
    code, created = _cli(fleet, "alice", "federation", "create", "digits", "--base", "task:digits")
    assert code == 0 and created["owners"] == ["operator/alice"] and created["created_by"] == "operator/alice"
    code, release = _cli(fleet, "alice", "release", created["base"], "--federation", "digits", "--version", "1.0.0")
    assert code == 0 and release["released_by"] == "operator/alice"
    code, refused = _cli(fleet, "mallory", "release", created["base"], "--federation", "digits", "--version", "1.0.1")
    assert code == 6 and refused["error"]["reason"] == "not_owner"
    # auditors read the hub and may not write it
    code, listing = _cli(fleet, "auditor", "releases", "digits")
    assert code == 0 and [r["version"] for r in listing["releases"]] == ["1.0.0"]
    code, denied = _cli(fleet, "auditor", "federation", "create", "other", "--base", "task:digits")
    assert code == 6 and denied["error"]["reason"] == "role_not_allowed"

    # a tag claiming alice but signed by another key, sent over alice's own connection, is refused
    security = Security(str(fleet["bundles"]["alice"]))
    forged = ReleaseTag(federation="digits", version="2.0.0", model=created["base"], released_by="operator/alice")
    with CoordinatorClient(fleet["address"], channel_factory=channel_factory(security)) as alice:
        with pytest.raises(StrataError) as error:
            alice.release(forged.signed(KeyPair.generate()).to_bytes())
        assert error.value.reason == "uncertified_signer"
        spoofed = ReleaseTag(federation="digits", version="2.0.0", model=created["base"], released_by="operator/bob")
        with pytest.raises(StrataError) as error:
            alice.release(spoofed.signed(security.manifest_key).to_bytes())
        assert error.value.reason == "not_releaser"
        tag = alice.releases("digits")[0].tag
    # the stored tag carries alice's certificate: anyone with the fleet CA can check who released it offline
    assert json.loads(tag)["certificate"].startswith("-----BEGIN CERTIFICATE-----")


def test_release_tags_verify_offline_against_the_fleet_ca(fleet: dict[str, Any]) -> None:
    code, _ = _cli(fleet, "alice", "federation", "create", "mnist-ish", "--base", "task:digits")
    assert code == 0
    code, _ = _cli(fleet, "alice", "release", _base(fleet, "mnist-ish"), "--federation", "mnist-ish", "--version", "1.0.0")
    assert code == 0
    code, checked = _cli(fleet, "auditor", "releases", "mnist-ish", "--ca", str(fleet["ca_pem"]))
    assert code == 0 and checked["ok"] and [r["signed_by"] for r in checked["releases"]] == ["operator/alice"]
    # against another fleet's CA, the same tags do not count
    with FleetCA.init(Path(fleet["ca_pem"]).parent.parent / "other-ca", "other-fleet") as other:
        other_pem = other.cert_pem
    elsewhere = Path(fleet["ca_pem"]).parent.parent / "other.pem"
    elsewhere.write_bytes(other_pem)
    code, refused = _cli(fleet, "auditor", "releases", "mnist-ish", "--ca", str(elsewhere))
    assert code == 4 and refused["releases"][0]["problem"] == "wrong_ca"


def _base(fleet: dict[str, Any], name: str) -> str:
    code, shown = _cli(fleet, "alice", "federation", "show", name)
    assert code == 0
    return shown["base"]


def test_an_aggregator_under_mtls_reads_its_federations_defaults(fleet: dict[str, Any]) -> None:
    from aggregator.config import AggregatorConfig
    from aggregator.daemon import AggregatorDaemon

    code, created = _cli(
        fleet, "alice", "federation", "create", "tuned-tls", "--base", "task:digits", "--policy", "min_updates=2",
        "--strategy", "median",
    )  # fmt: skip
    assert code == 0
    config = AggregatorConfig(
        id="agg-tls", listen="127.0.0.1:0", federation="tuned-tls", initial_model=created["base"],
        coordinator=fleet["address"], state_dir=str(fleet["root"] / "agg-tls"), store=str(fleet["root"] / "store"),
        tls=TlsSettings(bundle=str(fleet["bundles"]["agg-tls"])),
    )  # fmt: skip
    daemon = AggregatorDaemon(config)  # its certificate's role may read the federation it serves
    try:
        effective = daemon.federation("tuned-tls").config
        assert effective.round.min_updates == 2 and effective.strategy == "median"
    finally:
        daemon.stop()
