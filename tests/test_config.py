"""strata.config (defaults < YAML < env < overrides) and strata.logs (one structured event per line)."""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal

import pytest
import yaml

from proto.errors import InvalidInput
from strata.config import (
    ConfigError,
    config_to_dict,
    describe_config,
    dump_config,
    env_var_for,
    load_config,
)
from strata.logs import parse_level, setup_logging


@dataclass(frozen=True, kw_only=True)
class RoundSection:
    min_updates: int = field(default=2, metadata={"help": "updates needed to close a round"})
    deadline_s: float = field(default=60.0, metadata={"help": "seconds before a round closes anyway"})

    def __post_init__(self) -> None:
        if self.min_updates < 1:
            raise ConfigError(f"round.min_updates must be >= 1, got {self.min_updates}")


@dataclass(frozen=True, kw_only=True)
class SampleConfig:
    listen: str = field(default="127.0.0.1:7070", metadata={"help": "address to serve on"})
    workers: int = 4
    debug: bool = False
    peers: tuple[str, ...] = ()
    tags: list[str] = field(default_factory=list)
    labels: dict[str, str] = field(default_factory=dict)
    data_dir: Path = Path("/tmp/strata")
    coordinator: str | None = None
    store: Literal["local", "ipfs"] = "local"
    round: RoundSection = field(default_factory=RoundSection)
    # a section whose default differs from its class defaults
    fast_round: RoundSection = field(default_factory=lambda: RoundSection(min_updates=9))


def _yaml(tmp_path: Path, data: object) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_with_no_file_and_empty_env() -> None:
    assert load_config(SampleConfig, None, env={}) == SampleConfig()


def test_precedence_defaults_yaml_env_overrides(tmp_path: Path) -> None:
    path = _yaml(tmp_path, {"workers": 8, "debug": True, "round": {"min_updates": 3, "deadline_s": 5}})
    env = {"STRATA_WORKERS": "16", "STRATA_ROUND__MIN_UPDATES": "5", "UNRELATED": "x"}
    cfg = load_config(SampleConfig, path, env=env, overrides={"round.min_updates": 7})
    assert cfg.listen == "127.0.0.1:7070"  # default
    assert cfg.debug is True  # yaml
    assert cfg.round.deadline_s == 5.0 and isinstance(cfg.round.deadline_s, float)  # yaml, int → float
    assert cfg.workers == 16  # env beats yaml
    assert cfg.round.min_updates == 7  # override beats env
    assert load_config(SampleConfig, path, env=env).round.min_updates == 5
    assert load_config(SampleConfig, path, env={}).round.min_updates == 3


def test_env_values_are_parsed_by_field_type() -> None:
    env = {
        "STRATA_WORKERS": "12",
        "STRATA_DEBUG": "yes",
        "STRATA_PEERS": "a:1, b:2,",
        "STRATA_TAGS": "x,y",
        "STRATA_LABELS": "{zone: eu, rack: '7'}",
        "STRATA_DATA_DIR": "/var/lib/strata",
        "STRATA_COORDINATOR": "coord:7000",
        "STRATA_STORE": "ipfs",
        "STRATA_ROUND__DEADLINE_S": "1.5",
    }
    cfg = load_config(SampleConfig, None, env=env)
    assert cfg.workers == 12 and cfg.debug is True
    assert cfg.peers == ("a:1", "b:2") and cfg.tags == ["x", "y"]
    assert cfg.labels == {"zone": "eu", "rack": "7"}
    assert cfg.data_dir == Path("/var/lib/strata")
    assert cfg.coordinator == "coord:7000" and cfg.store == "ipfs"
    assert cfg.round.deadline_s == 1.5
    for text in ("0", "false", "No", "OFF"):
        assert load_config(SampleConfig, None, env={"STRATA_DEBUG": text}).debug is False
    assert load_config(SampleConfig, None, env={"STRATA_COORDINATOR": ""}).coordinator is None


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STRATA_WORKERS": "many"}, "STRATA_WORKERS"),
        ({"STRATA_DEBUG": "maybe"}, "STRATA_DEBUG"),
        ({"STRATA_STORE": "s3"}, "'local', 'ipfs'"),
        ({"STRATA_ROUND__DEADLINE_S": "soon"}, "STRATA_ROUND__DEADLINE_S"),
    ],
)
def test_bad_env_value_names_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        load_config(SampleConfig, None, env=env)


def test_unknown_key_names_it_and_lists_valid_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SampleConfig, _yaml(tmp_path, {"round": {"min_updatez": 3}}), env={})
    message = str(info.value)
    assert "'round.min_updatez'" in message
    assert "round.min_updates" in message and "round.deadline_s" in message
    assert info.value.reason == "unknown_key" and isinstance(info.value, InvalidInput)

    with pytest.raises(ConfigError, match="'wokers'.*valid keys: listen, workers"):
        load_config(SampleConfig, None, env={}, overrides={"wokers": 1})


def test_yaml_type_errors_and_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"workers \(in .*cfg.yaml\): expected an integer"):
        load_config(SampleConfig, _yaml(tmp_path, {"workers": "lots"}), env={})
    with pytest.raises(ConfigError, match=r"round \(in .*\) must be a mapping"):
        load_config(SampleConfig, _yaml(tmp_path, {"round": 3}), env={})
    # the dataclass's own validation runs on the loaded values
    with pytest.raises(ConfigError, match="round.min_updates must be >= 1"):
        load_config(SampleConfig, None, env={"STRATA_ROUND__MIN_UPDATES": "0"})


def test_missing_file_and_non_mapping_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(SampleConfig, tmp_path / "nope.yaml", env={})
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(SampleConfig, bad, env={})
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_config(SampleConfig, empty, env={}) == SampleConfig()


def test_nested_section_keeps_its_non_default_default() -> None:
    cfg = load_config(SampleConfig, None, env={"STRATA_FAST_ROUND__DEADLINE_S": "2"})
    assert cfg.fast_round == RoundSection(min_updates=9, deadline_s=2.0)


def test_required_fields_are_reported() -> None:
    @dataclass(frozen=True, kw_only=True)
    class NeedsId:
        node_id: str
        port: int = 0

    with pytest.raises(ConfigError, match="missing required config key.*node_id"):
        load_config(NeedsId, None, env={})
    assert load_config(NeedsId, None, env={"STRATA_NODE_ID": "a1"}).node_id == "a1"


def test_describe_config_lists_every_key_with_default_and_help() -> None:
    rows = {key: (default, help_) for key, default, help_ in describe_config(SampleConfig)}
    assert rows["listen"] == ("'127.0.0.1:7070'", "address to serve on")
    assert rows["round.min_updates"] == ("2", "updates needed to close a round")
    assert rows["fast_round.min_updates"][0] == "9"
    assert rows["coordinator"] == ("None", "")
    assert env_var_for("round.min_updates") == "STRATA_ROUND__MIN_UPDATES"


def test_config_to_dict_round_trips_through_yaml(tmp_path: Path) -> None:
    cfg = load_config(
        SampleConfig, None, env={"STRATA_PEERS": "a,b", "STRATA_LABELS": "{k: v}", "STRATA_COORDINATOR": "c:1"}
    )
    plain = config_to_dict(cfg)
    assert plain["round"] == {"min_updates": 2, "deadline_s": 60.0}
    assert plain["data_dir"] == "/tmp/strata" and plain["peers"] == ["a", "b"]
    assert load_config(SampleConfig, _yaml(tmp_path, plain), env={}) == cfg


def _round_trip(tmp_path: Path, cfg: object) -> object:
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    return load_config(type(cfg), path, env={})


def test_dump_config_round_trips_every_field_type(tmp_path: Path) -> None:
    cfg = SampleConfig(
        listen="0.0.0.0:1",
        workers=3,
        debug=True,
        peers=("a:1", "b:2"),
        tags=["x", "007", "true"],  # strings that look like numbers and bools stay strings
        labels={"zone": "eu", "rack": "7"},
        data_dir=Path("/var/lib/strata"),
        coordinator="c:7000",
        store="ipfs",
        round=RoundSection(min_updates=5, deadline_s=0.25),
        fast_round=RoundSection(min_updates=1),
    )
    assert _round_trip(tmp_path, cfg) == cfg
    assert _round_trip(tmp_path, SampleConfig()) == SampleConfig()
    text = dump_config(cfg)
    assert list(yaml.safe_load(text)) == [f.name for f in fields(SampleConfig)]  # every key, in field order
    assert yaml.safe_load(text)["round"] == {"min_updates": 5, "deadline_s": 0.25}
    with pytest.raises(TypeError):
        dump_config(SampleConfig)


def test_dump_config_round_trips_the_daemon_configs(tmp_path: Path) -> None:
    from agent.config import AgentConfig
    from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
    from coordinator.config import CoordinatorConfig
    from relay.config import RelayConfig, WindowSettings

    configs = [
        CoordinatorConfig(listen="127.0.0.1:7001", state_dir="/tmp/c", members=["a=h:1"], lease_ttl_s=9.5),
        AggregatorConfig(
            id="agg-a",
            listen="127.0.0.1:7071",
            initial_model="task:digits",
            round=RoundSettings(quorum=1.0, deadline_s=10.0, staleness_params={"exponent": 1.0}),
            synthesis=SynthesisSettings(peers="random:2", decay_params={"half_life": 3.0}),
            round_config={"epochs": "2"},
            peers=["agg-a=127.0.0.1:7071", "agg-b=127.0.0.1:7072"],
        ),
        AgentConfig(
            id="agent-1",
            seeds=["127.0.0.1:7071"],
            task_options={"partition": {"scheme": "dirichlet", "alpha": 0.5, "index": 0, "count": 4}, "seed": 0},
            capability="inference",
            max_rounds=3,
        ),
        RelayConfig(id="relay-1", window=WindowSettings(max_devices=4, max_wait_s=8.0), metrics_port=9100),
    ]
    for cfg in configs:
        assert _round_trip(tmp_path, cfg) == cfg, type(cfg).__name__


# ---------------------------------------------------------------- logs


def test_json_logs_one_line_per_event() -> None:
    stream = io.StringIO()
    setup_logging("debug", stream=stream)
    setup_logging("debug", stream=stream)  # idempotent: still one handler
    log = logging.getLogger("strata.test")
    log.info("update accepted", extra={"fields": {"agent": "a1", "round": 3, "event": "clash"}})
    log.info("multi\nline", extra={"fields": {"cid": "Qm1"}})
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("failed")
    log.debug("hidden?")

    lines = stream.getvalue().splitlines()
    assert len(lines) == 4
    first, second, third, fourth = (json.loads(line) for line in lines)
    assert first["event"] == "update accepted" and first["agent"] == "a1" and first["round"] == 3
    assert first["field_event"] == "clash"  # a field cannot overwrite the envelope
    assert first["level"] == "info" and first["logger"] == "strata.test"
    assert first["ts"].endswith("Z") and "T" in first["ts"]
    assert second == {**second, "event": "multi\nline", "cid": "Qm1"}
    assert third["level"] == "error" and "ValueError: bad" in third["exc"]
    assert fourth["level"] == "debug"


def test_level_filters_and_text_format() -> None:
    stream = io.StringIO()
    setup_logging("warning", stream=stream, fmt="text")
    log = logging.getLogger("strata.test")
    log.info("dropped")
    log.warning("peer slow", extra={"fields": {"peer": "b", "note": "two words"}})
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert " warning strata.test peer slow peer=b note=\"two words\"" in lines[0]


def test_parse_level() -> None:
    assert parse_level("DEBUG") == logging.DEBUG
    assert parse_level("warn") == logging.WARNING
    assert parse_level(logging.ERROR) == logging.ERROR
    with pytest.raises(ConfigError, match="unknown log level 'loud'; valid levels: debug, info"):
        parse_level("loud")
    with pytest.raises(ConfigError):
        setup_logging("info", fmt="xml")  # type: ignore[arg-type]
