"""A federation's registered round policy and strategy are the defaults of the aggregators serving it.

The pure rule (`aggregator.config.with_federation_defaults`), then a real coordinator with a
federation created through the in-process CLI (`strata.cli.main`) and real aggregator daemons
on 127.0.0.1: one that takes the hub's defaults where its own config leaves the built-in
ones, and one whose coordinator is a closed port, which starts on its local config at once.
Every daemon a test starts is stopped by that test.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from aggregator.config import AggregatorConfig, RoundSettings, with_federation_defaults
from aggregator.daemon import AggregatorDaemon
from coordinator.client import CALL_TIMEOUT_S
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from proto.errors import ConfigError
from strata.cli import main
from tests.procs import free_port

EXIT_OK, EXIT_USAGE = 0, 2

# ------------------------------------------------------------------ the rule


def test_registered_defaults_fill_only_the_keys_left_at_their_built_in_default() -> None:
    # deadline_s set by the operator; quorum set too, but to its built-in value
    config = AggregatorConfig(round=RoundSettings(deadline_s=12.5, quorum=0.8))
    policy = {"min_updates": "2", "deadline_s": "7", "quorum": "0.5", "mode": "sync"}
    tuned, applied = with_federation_defaults(config, policy, "median")
    # deadline_s was set by the operator and wins; quorum equals the built-in value, so it counts as unset;
    # mode=sync changes nothing and is not reported
    assert applied == {"min_updates": "2", "quorum": "0.5", "strategy": "median"}
    assert (tuned.round.min_updates, tuned.round.deadline_s, tuned.round.quorum) == (2, 12.5, 0.5)
    assert tuned.strategy == "median" and config.round.min_updates == 1  # the input is left alone
    # an operator's strategy wins; nothing registered, nothing applied
    operators, _ = with_federation_defaults(AggregatorConfig(strategy="krum"), {}, "median")
    assert operators.strategy == "krum"
    assert with_federation_defaults(config, {}, "") == (config, {})
    # a federations entry is the operator's too: each federation's effective config is what the rule sees
    per = AggregatorConfig(
        federations={"a": {"round": {"min_updates": 4}}, "b": {}}
    ).per_federation()
    assert with_federation_defaults(per["a"], {"min_updates": "2"}, "")[1] == {}
    assert with_federation_defaults(per["b"], {"min_updates": "2"}, "")[0].round.min_updates == 2


@pytest.mark.parametrize(("policy", "strategy", "words"), [
    ({"min_updates": "0"}, "", "min_updates='0': round.min_updates must be >= 1"),
    ({"min_updates": "two"}, "", "min_updates: expected int, got 'two'"),
    ({"no_such_key": "1"}, "", "'no_such_key' is not a round setting"),
    ({"staleness_params": "{}"}, "", "'staleness_params' is not a round setting"),
    ({}, "nope", "strategy must be one of"),
    # valid alone, but buffered rounds need settings this config lacks: refused, not half-applied
    ({"mode": "buffered"}, "", "mode=buffered cannot be honoured"),
])  # fmt: skip
def test_a_registered_default_the_aggregator_cannot_honour_is_a_config_error(
    policy: dict[str, str], strategy: str, words: str
) -> None:
    with pytest.raises(ConfigError) as info:
        with_federation_defaults(AggregatorConfig(federation="tuned"), policy, strategy)
    assert "federation 'tuned'" in info.value.message and words in info.value.message


# ------------------------------------------------------------------ a real coordinator, real aggregators


class Hub:
    def __init__(self, address: str, store: Path) -> None:
        self.address, self.store = address, store

    def run(self, *args: str, coordinator: str = "") -> tuple[int, Any]:
        """(exit code, parsed --json output) of one in-process `strata` command."""
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            code = main(
                [*args, "--coordinator", coordinator or self.address, "--json", "--timeout", "2"]
            )
        return code, json.loads(stdout.getvalue()) if stdout.getvalue().strip() else None


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    workdir = tmp_path_factory.mktemp("hub-defaults")
    (workdir / "home").mkdir()
    config = CoordinatorConfig(listen="127.0.0.1:0", state_dir=str(workdir / "coordinator"))
    # the operator key the CLI signs with lives under $HOME; STRATA_* settings of the caller must not leak in
    with CoordinatorDaemon(config) as daemon, pytest.MonkeyPatch.context() as patch:
        patch.setenv("HOME", str(workdir / "home"))
        for name in [n for n in os.environ if n.startswith("STRATA_")]:
            patch.delenv(name)
        patch.setenv("STRATA_STORE", str(workdir / "store"))
        yield Hub(daemon.address, workdir / "store")


def aggregator_config(tmp_path: Path, hub: Hub, **keys: Any) -> AggregatorConfig:
    return AggregatorConfig(
        id="agg-defaults",
        listen="127.0.0.1:0",
        state_dir=str(tmp_path / "agg"),
        store=str(hub.store),
        **keys,
    )


def fields_of(caplog: pytest.LogCaptureFixture, event: str) -> list[dict[str, Any]]:
    return [record.fields for record in caplog.records if record.getMessage() == event]  # type: ignore[attr-defined]


def test_an_aggregator_serving_a_registered_federation_applies_its_defaults(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code, tuned = hub.run(
        "federation", "create", "tuned", "--base", "task:digits",
        "--policy", "min_updates=2", "--policy", "deadline_s=7", "--strategy", "median",
    )  # fmt: skip
    assert code == EXIT_OK and tuned["round_policy"] == {"deadline_s": "7", "min_updates": "2"}
    config = aggregator_config(
        tmp_path, hub, federation="tuned", initial_model=tuned["base"], coordinator=hub.address,
        round=RoundSettings(deadline_s=12.5),
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="strata.aggregator")
    daemon = AggregatorDaemon(config)
    try:
        daemon.start()
        effective = daemon.federation("tuned").config
        assert effective.round.min_updates == 2 and effective.strategy == "median"
        assert effective.round.deadline_s == 12.5  # set here: the operator's value wins
        assert daemon.rounds.current.model_cid == tuned["base"]
    finally:
        daemon.stop()
    assert fields_of(caplog, "hub_defaults_applied") == [
        {"federation": "tuned", "applied": {"min_updates": "2", "strategy": "median"}}
    ]
    assert fields_of(caplog, "hub_defaults_unavailable") == []


def test_an_aggregator_whose_coordinator_is_down_starts_with_its_local_config(
    hub: Hub, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"127.0.0.1:{free_port()}"
    code, tuned = hub.run(
        "federation", "create", "offline", "--base", "task:digits", "--policy", "min_updates=3"
    )
    assert code == EXIT_OK
    config = aggregator_config(
        tmp_path, hub, federation="offline", initial_model=tuned["base"], coordinator=closed,
        round=RoundSettings(deadline_s=12.5),
    )  # fmt: skip
    caplog.set_level(logging.INFO, logger="strata.aggregator")
    began = time.monotonic()
    daemon = AggregatorDaemon(config)
    try:
        daemon.start()
        assert (
            time.monotonic() - began < CALL_TIMEOUT_S
        )  # refused at once; the client's deadline bounds it anyway
        assert daemon.federation("offline").config == config  # the local config, untouched
    finally:
        daemon.stop()
    warned = fields_of(caplog, "hub_defaults_unavailable")
    assert [(w["federation"], w["coordinator"]) for w in warned] == [
        ("offline", closed)
    ] and warned[0]["error"]
    assert fields_of(caplog, "hub_defaults_applied") == []


@pytest.mark.parametrize(("args", "reason"), [
    (("--policy", "no_such_key=1"), "bad_round_policy"),
    (("--policy", "quorum=3"), "bad_round_policy"),
    (("--policy", "deadline_s=soon"), "bad_round_policy"),
    (("--strategy", "average"), "bad_strategy"),
])  # fmt: skip
def test_federation_create_refuses_defaults_no_aggregator_could_honour(
    hub: Hub, args: tuple[str, ...], reason: str
) -> None:
    # refused before the coordinator is asked: a closed port would otherwise be "unavailable" (exit 5)
    closed = f"127.0.0.1:{free_port()}"
    code, out = hub.run(
        "federation", "create", "refused", "--base", "task:digits", *args, coordinator=closed
    )
    assert code == EXIT_USAGE and out["error"]["reason"] == reason, out
    assert args[1].split("=")[0] in out["error"]["message"]
    code, out = hub.run("federation", "show", "refused")
    assert out["error"]["reason"] == "unknown_federation"
