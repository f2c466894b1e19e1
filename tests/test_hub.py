"""The model hub through a real coordinator daemon and the real `strata` CLI, one local store.

The CLI runs in this process (`strata.cli.main`, the same parser, handlers and error renderer the console
script calls): on this shared machine a subprocess spends ~15 s importing before it does anything, and these
tests make about forty calls. One call per test goes through a real subprocess to check the exit code and
the one-line error there too.

Federations from a task and from a model, releases (semantic versions, immutable, signed, resolvable as
NAME@1.2.0 / latest / ^1.0 wherever a CID is accepted), whole and feature forks with lineage across
federations, proposals evaluated, accepted as a merge (new base, released) or declined, and `strata hub`.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from proto.errors import NotFound
from storage.codec import decode_tensors
from storage.manifest import Manifest
from storage.store import LocalStore
from strata.cli import main
from tests.procs import run_strata

EXIT_OK, EXIT_USAGE, EXIT_NOT_FOUND = 0, 2, 3


@dataclass(frozen=True)
class Hub:
    address: str
    home: Path
    store: Path

    def run(self, *args: str) -> tuple[int, Any, str]:
        """(exit code, parsed --json output or None, stderr)."""
        # stderr is left alone: in-process, it also carries the coordinator's own log lines (loggers other
        # tests configured); the one-line error on stderr is checked through a subprocess below
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main([*args, "--coordinator", self.address, "--json"])
        try:
            out = json.loads(stdout.getvalue()) if stdout.getvalue().strip() else None
        except json.JSONDecodeError:
            out = stdout.getvalue()
        return code, out, stderr.getvalue()

    def ok(self, *args: str) -> Any:
        code, out, err = self.run(*args)
        assert code == EXIT_OK, f"strata {' '.join(args)} -> {code}\n{err}"
        return out

    def refused(self, expected_code: int, reason: str, *args: str) -> None:
        code, out, err = self.run(*args)
        assert code == expected_code, f"strata {' '.join(args)} -> {code}, wanted {expected_code}\n{err}"
        assert out["error"]["reason"] == reason, out


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    workdir = tmp_path_factory.mktemp("hub")
    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(workdir / "coordinator"))
    home = workdir / "home"
    home.mkdir()
    # the operator key the CLI signs with lives under $HOME; STRATA_* settings of the caller must not leak in
    with CoordinatorDaemon(config) as daemon, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(home))
        for name in [n for n in os.environ if n.startswith("STRATA_")]:
            patch.delenv(name)
        patch.setenv("STRATA_STORE", str(workdir / "store"))
        yield Hub(address=daemon.address, home=home, store=workdir / "store")


@pytest.fixture(scope="module")
def digits(hub: Hub) -> dict[str, Any]:
    return hub.ok("federation", "create", "digits", "--base", "task:digits", "--description", "8x8 digits", "--strategy", "fedavg", "--policy", "quorum=0.5")


def test_federation_create_list_show(hub: Hub, digits: dict[str, Any]) -> None:
    assert digits["name"] == "digits" and digits["task"] == "digits" and digits["strategy"] == "fedavg"
    assert {s["name"]: s["shape"] for s in digits["spec"]}["head.weight"] == [10, 32] or any(
        s["name"] == "head.weight" for s in digits["spec"]
    )
    assert digits["round_policy"] == {"quorum": "0.5"}
    listed = hub.ok("federation", "list")["federations"]
    assert "digits" in [f["name"] for f in listed]
    shown = hub.ok("federation", "show", "digits")
    assert shown["base"] == digits["base"] and shown["releases"] == [] and shown["heads"] == {}
    # the base manifest is in the store and the coordinator's index alike
    assert Manifest.from_bytes(LocalStore(hub.store).get(digits["base"])).kind == "base"
    hub.refused(EXIT_USAGE, "federation_exists", "federation", "create", "digits", "--base", "task:digits")
    hub.refused(EXIT_NOT_FOUND, "unknown_federation", "federation", "show", "nope")
    hub.refused(EXIT_USAGE, "bad_name", "federation", "show", "-bad name-")
    hub.refused(EXIT_USAGE, "unknown_task", "federation", "create", "other", "--base", "task:nothing")


def test_releases_are_immutable_and_resolve_anywhere(hub: Hub, digits: dict[str, Any]) -> None:
    base = digits["base"]
    first = hub.ok("release", base, "--federation", "digits", "--version", "1.0.0", "--notes", "seed", "--evaluate", "digits")
    assert first["model"] == base and first["evaluation"] == "task:digits/test"
    assert 0.0 <= first["accuracy"] <= 1.0 and first["lineage_root"] == base
    hub.refused(EXIT_USAGE, "release_exists", "release", base, "--federation", "digits", "--version", "1.0.0")
    hub.refused(EXIT_USAGE, "bad_version", "release", base, "--federation", "digits", "--version", "1.0")
    hub.refused(EXIT_NOT_FOUND, "model_not_indexed", "release", "QmYwAPJzv5CZsnA625s3Xf2nemtYgPpHdWEz79ojWnPbdG", "--federation", "digits", "--version", "9.0.0")
    hub.ok("release", "digits@1.0.0", "--federation", "digits", "--version", "1.1.0")
    hub.ok("release", base, "--federation", "digits", "--version", "2.0.0-rc.1")
    versions = [r["version"] for r in hub.ok("releases", "digits")["releases"]]
    assert versions == ["2.0.0-rc.1", "1.1.0", "1.0.0"]
    # a release name works wherever a CID does
    assert hub.ok("model", "show", "digits@1.0.0")["model"] == base
    assert hub.ok("model", "show", "digits@latest")["model"] == base
    assert hub.ok("model", "show", "digits@^1.0")["model"] == base
    assert hub.ok("verify", "digits@1.1.0")["ok"] is True
    hub.refused(EXIT_NOT_FOUND, "unknown_release", "model", "show", "digits@3.0.0")
    hub.refused(EXIT_NOT_FOUND, "unknown_release", "model", "show", "digits@^4")
    hub.refused(EXIT_USAGE, "bad_ref", "model", "show", "digits@one")


def test_forks_proposals_and_merges(hub: Hub, digits: dict[str, Any]) -> None:
    base = digits["base"]
    hub.ok("release", base, "--federation", "digits", "--version", "1.5.0")
    whole = hub.ok("fork", "digits@1.5.0", "--as", "digits-tuned")
    assert whole["forked_from"] == base and whole["source_federation"] == "digits" and whole["fork_layers"] == "all"
    assert whole["reset"] == [] and len(whole["kept"]) == len(digits["spec"]) and whole["task"] == "digits"
    store = LocalStore(hub.store)
    fork_manifest = Manifest.from_bytes(store.get(whole["base"]))
    assert fork_manifest.kind == "fork" and fork_manifest.parents == (base,)
    assert fork_manifest.weights == Manifest.from_bytes(store.get(base)).weights  # a whole fork copies every tensor

    features = hub.ok("fork", "digits@1.5.0", "--as", "letters", "--layers", "features", "--new-head", "classes=5", "--task", "")
    assert sorted(features["reset"]) == ["head.bias", "head.weight"]
    shapes = {s["name"]: s["shape"] for s in features["spec"]}
    assert shapes["head.bias"] == [5] and shapes["head.weight"][0] == 5
    source = decode_tensors(store.get(Manifest.from_bytes(store.get(base)).weights))
    forked = decode_tensors(store.get(Manifest.from_bytes(store.get(features["base"])).weights))
    assert np.array_equal(source["fc1.weight"], forked["fc1.weight"])  # the backbone is kept
    hub.refused(EXIT_USAGE, "usage", "fork", "digits@1.5.0", "--as", "x", "--layers", "features")

    # lineage crosses federations: the fork's lineage (from the coordinator's index) reaches digits' base
    lineage = hub.ok("lineage", features["base"], "--coordinator", hub.address)
    assert base in json.dumps(lineage)

    # a proposal back: evaluated, accepted as a merge that becomes the new base, and released
    hub.ok("release", whole["base"], "--federation", "digits-tuned", "--version", "0.1.0")
    proposal = hub.ok("propose", "digits-tuned@0.1.0", "--to", "digits")
    assert proposal["state"] == "open" and proposal["target_head"] == base and proposal["from"] == "digits-tuned"
    assert [p["proposal"] for p in hub.ok("proposals", "digits", "--state", "open")["proposals"]] == [proposal["proposal"]]
    evaluated = hub.ok("evaluate", "digits-tuned@0.1.0", "--task", "digits")
    assert 0.0 <= evaluated["accuracy"] <= 1.0
    hub.refused(EXIT_USAGE, "incompatible_shapes", "evaluate", features["base"], "--task", "digits")
    hub.refused(EXIT_USAGE, "incompatible_shapes", "propose", features["base"], "--to", "digits")
    accepted = hub.ok("accept", proposal["proposal"], "--release", "1.6.0")
    assert accepted["state"] == "accepted" and accepted["release"]["version"] == "1.6.0"
    merge = Manifest.from_bytes(store.get(accepted["merge"]))
    assert merge.kind == "merge" and merge.parents == (base, whole["base"])
    assert hub.ok("federation", "show", "digits")["base"] == accepted["merge"]
    # the merge's whole lineage re-hashes and verifies, across both federations
    verified = hub.ok("verify", "digits@1.6.0")
    assert verified["ok"] is True and verified["models_checked"] == 3  # merge, the fork, digits' base
    hub.refused(EXIT_USAGE, "already_decided", "decline", proposal["proposal"])

    # a second proposal against the old base is stale; a fresh one can be declined
    hub.ok("release", whole["base"], "--federation", "digits-tuned", "--version", "0.2.0")
    second = hub.ok("propose", "digits-tuned@0.2.0", "--to", "digits")
    assert second["target_head"] == accepted["merge"]
    assert hub.ok("decline", second["proposal"])["state"] == "declined"

    view = hub.ok("hub")
    names = {f["name"] for f in view["federations"]}
    assert {"digits", "digits-tuned", "letters"} <= names
    assert {f["name"] for f in view["forks"]} >= {"digits-tuned", "letters"}
    assert {p["state"] for p in view["proposals"]} == {"accepted", "declined"}
    text = run_strata("hub", "--coordinator", hub.address, home=hub.home)
    assert text.returncode == 0 and "digits-tuned" in text.stdout


def test_a_subprocess_exits_with_the_error_code_and_one_line(hub: Hub, digits: dict[str, Any]) -> None:
    result = run_strata("model", "show", "digits@7.7.7", "--coordinator", hub.address, home=hub.home)
    assert result.returncode == EXIT_NOT_FOUND
    assert result.stderr.strip().startswith("strata: no release of 'digits'") and "[unknown_release]" in result.stderr


def test_an_aggregator_starts_from_the_newest_compatible_release(hub: Hub, digits: dict[str, Any], tmp_path: Path) -> None:
    from aggregator.config import AggregatorConfig
    from aggregator.daemon import AggregatorDaemon

    hub.ok("release", digits["base"], "--federation", "digits", "--version", "3.1.0")
    compatible = hub.ok("model", "show", "digits@^3.0")["model"]
    config = AggregatorConfig(
        id="agg-release",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg"),
        store=str(hub.store),
        coordinator=hub.address,
        initial_model="digits@^3.0",
    )
    daemon = AggregatorDaemon(config).start()
    try:
        assert daemon.rounds.current.model_cid == compatible
        # and an inference device predicts with the newest compatible release, served by its home
        hub.ok("release", daemon.rounds.current.model_cid, "--federation", "digits", "--version", "3.2.0")
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main([
                "device", "predict", "--relay", daemon.address, "--model", "digits@^3.0", "--coordinator", hub.address,
                "--sample", "3", "--json",
            ])  # fmt: skip
        predicted = json.loads(stdout.getvalue())
        assert code == EXIT_OK and predicted["model"] == compatible and len(predicted["predictions"]) == 3
    finally:
        daemon.stop()
    unresolvable = AggregatorConfig(**{**config.__dict__, "state_dir": str(tmp_path / "agg2"), "initial_model": "digits@^9"})
    refused = AggregatorDaemon(unresolvable)
    try:
        with pytest.raises(NotFound) as error:
            refused.start()
        assert error.value.reason == "unknown_release"
    finally:
        refused.stop()  # the half-started daemon bound its port and opened its journal


def test_text_output_names_what_matters(hub: Hub, digits: dict[str, Any]) -> None:
    def text(*args: str) -> str:
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            assert main([*args, "--coordinator", hub.address]) == EXIT_OK
        return stdout.getvalue()

    shown = text("federation", "show", "digits")
    assert "spec" in shown and "head.weight" in shown and digits["base"] in shown and "fedavg" in shown
    assert "digits" in text("federation", "list")
    hub.ok("release", digits["base"], "--federation", "digits", "--version", "0.0.1")
    assert "0.0.1" in text("releases", "digits")
    # a base given as a model from the store that another federation already uses becomes a new base naming it
    again = hub.ok("federation", "create", "digits-copy", "--base", digits["base"])
    assert Manifest.from_bytes(LocalStore(hub.store).get(again["base"])).parents == (digits["base"],)


def test_listings_page_under_the_message_limit(hub: Hub, monkeypatch: pytest.MonkeyPatch) -> None:
    """A release tag may carry 4 KiB of notes: thousands of releases outgrow one 4 MiB reply, so listings
    page. The page budget is shrunk here (the daemon runs in this process) to make ~3 releases a page."""
    from coordinator import messages
    from coordinator.client import CoordinatorClient
    from proto import strata_pb2 as pb

    base = hub.ok("federation", "create", "paged", "--base", "task:digits")["base"]
    versions = [f"1.{minor}.0" for minor in range(9)]
    for version in versions:
        hub.ok("release", base, "--federation", "paged", "--version", version, "--notes", "n" * 4000)
    monkeypatch.setattr(messages, "PAGE_BYTES", 12_000)
    with CoordinatorClient(hub.address) as client:
        first = client._stub.ListReleases(pb.ListReleasesRequest(federation="paged"), timeout=10)
        assert 1 <= len(first.releases) < len(versions) and first.next_offset == len(first.releases)
        last = client._stub.ListReleases(pb.ListReleasesRequest(federation="paged", offset=8), timeout=10)
        assert [r.version for r in last.releases] == ["1.0.0"] and last.next_offset == 0
        beyond = client._stub.ListReleases(pb.ListReleasesRequest(federation="paged", offset=2**32 - 1), timeout=10)
        assert not beyond.releases and beyond.next_offset == 0
    listed = hub.ok("releases", "paged")["releases"]
    assert [r["version"] for r in listed] == versions[::-1]  # every page, newest version first
    assert [r["version"] for r in hub.ok("releases", "paged", "--limit", "4")["releases"]] == versions[:-5:-1]
    hub.refused(EXIT_USAGE, "usage", "releases", "paged", "--limit", "-1")
    assert "paged" in [f["name"] for f in hub.ok("federation", "list")["federations"]]
