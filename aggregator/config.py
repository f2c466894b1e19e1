"""Aggregator configuration: frozen, keyword-only, validated on creation; each default defined once.

Loaded from YAML with `STRATA_*` environment overrides by `strata.config.load_config`
(e.g. `STRATA_ROUND__MIN_UPDATES=3`). Every key has a default, so
`strata aggregator serve` runs with no file at all.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from intake.config import ServingSettings
from privacy.config import PrivacySettings
from proto.errors import ConfigError, InvalidInput
from storage.control import SCAFFOLD, scaffold_enabled
from storage.encodings import EncodingError, parse_encoding
from trust.security import TlsSettings

# the names aggregator.rules knows (kept here so loading config does not import torch; a test keeps them equal).
# Their parameters are checked when the daemon builds the rule (ConfigError "bad_config" at start).
STRATEGY_NAMES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "clipped_fedavg", "bulyan")
SERVER_OPT_NAMES = ("none", "fedavgm", "fedadam", "fedyogi")
ROUND_MODES = ("sync", "buffered")


# the keys one federation of a multi-federation aggregator may set for itself (`federations`);
# the rest (identity, addresses, stores, serving, TLS, coordinator, peers) belong to the process
FEDERATION_KEYS = (
    "initial_model", "strategy", "strategy_params", "server_opt", "server_opt_params", "round", "synthesis",
    "selection", "round_config", "encoding", "privacy", "evaluation",
)  # fmt: skip
# a federation's name is a path component of its state directory and a label: keep it plain
_FEDERATION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _check_rule(key: str, name: str) -> None:
    if name not in STRATEGY_NAMES:
        raise ConfigError(f"{key} must be one of {list(STRATEGY_NAMES)}, got {name!r}")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class RoundSettings:
    mode: str = _help(
        "sync: a round closes on quorum or deadline; buffered (FedBuff): a server step every buffer_size "
        "accepted updates, no round barrier (each step is one round number)",
        default="sync",
    )
    buffer_size: int = _help("with mode buffered: accepted updates per server step (FedBuff's K)", default=10)
    min_updates: int = _help("updates a round needs before it may close at its deadline", default=1)
    quorum: float = _help("fraction of active training agents whose updates close a round early", default=0.8)
    deadline_s: float = _help("seconds after opening when a round closes with >= min_updates; else it extends", default=30.0)
    max_staleness: int = _help(
        "rounds (buffered: server steps) an update's base may lag the current one and still be accepted", default=2
    )
    staleness_discount: str = _help("discount for stale updates: polynomial | exponential | constant", default="polynomial")
    staleness_params: dict[str, float] = _help(
        "parameters of the discount (polynomial: exponent; exponential: half_life)",
        default_factory=lambda: {"exponent": 0.5},
    )
    max_update_bytes: int = _help("largest update accepted, in bytes", default=256 << 20)
    max_relative_norm: float = _help(
        "refuse updates with ||update - base|| > this x max(||base||, 1); 0 disables", default=10.0
    )
    agent_timeout_s: float = _help("an agent not heard from for this long is no longer active", default=30.0)
    max_num_samples: int = _help(
        "largest num_samples an update's weight may claim (sample counts are claims); 0: no cap", default=1_000_000_000
    )
    over_max_samples: str = _help("an update claiming more than max_num_samples is 'cap'ped to it or 'refuse'd", default="cap")
    max_claim_ratio: float = _help(
        "at close, each update's num_samples is credited with at most this x the round's (low) median claim "
        "per contributor (a relay's update counts its devices); 0 disables",
        default=10.0,
    )

    def __post_init__(self) -> None:
        if self.mode not in ROUND_MODES:
            raise ConfigError(f"round.mode must be one of {list(ROUND_MODES)}, got {self.mode!r}")
        if self.buffer_size < 1:
            raise ConfigError("round.buffer_size must be >= 1")
        if self.min_updates < 1:
            raise ConfigError("round.min_updates must be >= 1")
        if not (0 < self.quorum <= 1):
            raise ConfigError("round.quorum must be in (0, 1]")
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise ConfigError("round.deadline_s must be a positive number")
        if self.max_staleness < 0:
            raise ConfigError("round.max_staleness must be >= 0")
        if self.max_update_bytes <= 0:
            raise ConfigError("round.max_update_bytes must be > 0")
        if self.max_relative_norm < 0:
            raise ConfigError("round.max_relative_norm must be >= 0 (0 disables the check)")
        if self.agent_timeout_s <= 0:
            raise ConfigError("round.agent_timeout_s must be > 0")
        if not 0 <= self.max_num_samples < 2**63:
            raise ConfigError("round.max_num_samples must be in 0..2^63-1 (0: no cap)")
        if self.over_max_samples not in ("cap", "refuse"):
            raise ConfigError("round.over_max_samples must be 'cap' or 'refuse'")
        if not (math.isfinite(self.max_claim_ratio) and (self.max_claim_ratio == 0 or self.max_claim_ratio >= 1)):
            raise ConfigError("round.max_claim_ratio must be 0 (off) or >= 1")


@dataclass(frozen=True, kw_only=True)
class SynthesisSettings:
    enabled: bool = _help("synthesize a semi-global model from peers' cluster models after each round", default=True)
    peers: str = _help(
        "which peers to gather from: 'all', 'random:K' (K at random each round) or 'exp:K' (K at distances "
        "1, 2, 4, ... along the members sorted by id, rotating each round: mixes in about log2(N) rounds)",
        default="all",
    )
    decay: str = _help("staleness decay of peer models: polynomial | exponential | constant", default="exponential")
    decay_params: dict[str, float] = _help(
        "parameters of the decay (exponential: half_life)", default_factory=lambda: {"half_life": 2.0}
    )
    decay_unit: str = _help("age of a peer model measured in 'rounds' or 'seconds'", default="rounds")
    max_age: float = _help("peer models older than this (in decay_unit) are skipped", default=5.0)
    outlier_z: float = _help("robust z-score above which a peer model is refused as an outlier", default=3.5)
    strategy: str = _help(
        "rule merging our cluster model with peers' (see the top-level strategy key for the names)", default="fedavg"
    )
    strategy_params: dict[str, float] = _help("parameters of synthesis.strategy (as strategy_params)", default_factory=dict)
    fetch_timeout_s: float = _help("deadline for gathering one peer's pointer and blobs", default=10.0)
    peer_wait_s: float = _help(
        "how long to wait for peers that have not yet closed this round before blending what they have "
        "(sync rounds only: buffered aggregators blend what their peers last made, at once)",
        default=3.0,
    )
    every_steps: int = _help(
        "with round.mode buffered: synthesize after this many server steps since the last synthesis; 0: never by count",
        default=1,
    )
    every_s: float = _help(
        "with round.mode buffered: synthesize at the first step this many seconds after the last synthesis; "
        "0: never by time",
        default=0.0,
    )

    def __post_init__(self) -> None:
        mode, _, count = self.peers.partition(":")
        if self.peers != "all" and not (mode in ("random", "exp") and count.isdigit() and (mode == "random" or int(count) >= 1)):
            raise ConfigError("synthesis.peers must be 'all', 'random:K' or 'exp:K' (K >= 1)")
        if self.decay_unit not in ("rounds", "seconds"):
            raise ConfigError("synthesis.decay_unit must be 'rounds' or 'seconds'")
        if self.outlier_z <= 0:
            raise ConfigError("synthesis.outlier_z must be > 0")
        if self.peer_wait_s < 0:
            raise ConfigError("synthesis.peer_wait_s must be >= 0")
        if self.every_steps < 0 or not (self.every_s >= 0 and math.isfinite(self.every_s)):
            raise ConfigError("synthesis.every_steps and synthesis.every_s must be >= 0")
        _check_rule("synthesis.strategy", self.strategy)


_SELECTION_MODES = ("all", "fraction", "count")


@dataclass(frozen=True, kw_only=True)
class SelectionSettings:
    mode: str = _help("who trains each round: all | fraction | count", default="all")
    fraction: float = _help("with mode fraction: the share of eligible agents invited each round", default=0.1)
    count: int = _help("with mode count: agents invited per round (per aggregator)", default=100)
    min_battery_percent: float = _help("only agents reporting at least this battery; 0: no filter", default=0.0)
    require_charging: bool = _help("only agents reporting that they are charging", default=False)
    networks: list[str] = _help("only agents on one of these networks (e.g. [wifi, ethernet]); empty: any", default_factory=list)
    min_uplink_kbps: float = _help("only agents reporting at least this uplink; 0: no filter", default=0.0)
    check_back_s: float = _help("uninvited agents are told to check back after this long", default=30.0)

    def __post_init__(self) -> None:
        if self.mode not in _SELECTION_MODES:
            raise ConfigError(f"selection.mode must be one of {list(_SELECTION_MODES)}, got {self.mode!r}")
        if not 0 < self.fraction <= 1:
            raise ConfigError("selection.fraction must be in (0, 1]")
        if self.count < 1:
            raise ConfigError("selection.count must be >= 1")
        if not 0 <= self.min_battery_percent <= 100:
            raise ConfigError("selection.min_battery_percent must be in [0, 100]")
        if self.min_uplink_kbps < 0 or not self.check_back_s > 0:
            raise ConfigError("selection.min_uplink_kbps must be >= 0 and selection.check_back_s > 0")

    def params(self) -> dict[str, object]:
        """The settings that shaped a round's invitations, for its manifest."""
        chosen = {"fraction": self.fraction} if self.mode == "fraction" else {"count": self.count} if self.mode == "count" else {}
        filters = {
            "min_battery_percent": self.min_battery_percent,
            "require_charging": self.require_charging,
            "networks": list(self.networks),
            "min_uplink_kbps": self.min_uplink_kbps,
        }
        return {**chosen, **{k: v for k, v in filters.items() if v}}


def _check_prox_mu(round_config: dict[str, str]) -> None:
    """FedProx's mu is read by every agent: refuse a bad one here, once, rather than on each device."""
    if "prox_mu" not in round_config:
        return
    try:
        mu = float(round_config["prox_mu"])
    except (TypeError, ValueError):
        mu = math.nan
    if not math.isfinite(mu) or mu < 0:
        raise ConfigError(f"round_config.prox_mu must be a finite number >= 0, got {round_config['prox_mu']!r}")


def _check_buffered(config: AggregatorConfig) -> None:
    """Refuse what buffered rounds cannot honour, once, at load."""
    if config.selection.mode != "all":
        # invitations are per round, and a buffered round lasts one server step
        raise ConfigError("round.mode buffered invites every agent: set selection.mode: all")
    if config.privacy.central.enabled:
        # the accountant counts one release per round; every buffered step would be one, unplanned
        raise ConfigError("round.mode buffered cannot be combined with central DP (privacy.central) yet")
    if scaffold_enabled(config.round_config):
        # SCAFFOLD's server step takes |S|/N of a round's delta_c against the c every agent trained with;
        # a buffer mixes updates made against older c's, which that step does not account for
        raise ConfigError("round.mode buffered cannot be combined with round_config.scaffold yet")
    synthesis = config.synthesis
    if synthesis.enabled and synthesis.decay_unit != "seconds":
        # buffered aggregators step at their own cadences, so their round numbers are not comparable
        raise ConfigError(
            "round.mode buffered with synthesis needs synthesis.decay_unit: seconds "
            "(and max_age, decay_params in seconds); peers' step counts are not comparable"
        )
    if synthesis.enabled and synthesis.every_steps == 0 and synthesis.every_s == 0:
        raise ConfigError("round.mode buffered with synthesis needs synthesis.every_steps or synthesis.every_s > 0")


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    id: str = _help("this aggregator's id on the ring (default: agg-<hostname>)", default="")
    listen: str = _help("host:port for AgentService and PeerService", default="127.0.0.1:7070")
    advertise: str = _help("address agents and peers use to reach this aggregator (default: listen)", default="")
    federation: str = _help("the model family this aggregator trains", default="digits")
    initial_model: str = _help(
        "the round-0 base: a model CID in the store, a release NAME@1.2.0 / NAME@latest / NAME@^1.0 (resolved by the "
        "coordinator's hub; the model must be in the store), or task:NAME to create it from a built-in task",
        default="task:digits",
    )
    state_dir: str = _help("journal, key and history (default: ~/.strata/aggregator/<id>)", default="")
    store: str = _help("private store for updates and models (default: $STRATA_STORE or ~/.strata/store)", default="")
    shared_store: str = _help("store where cluster and semi-global models are published (default: store)", default="")
    strategy: str = _help(
        "rule for the updates inside a cluster: " + " | ".join(STRATEGY_NAMES) + "; left at fedavg, a federation "
        "registered in the coordinator's hub with a strategy uses that one (see coordinator)",
        default="fedavg",
    )
    strategy_params: dict[str, float] = _help(
        "parameters of the rule: trimmed_mean beta; krum f; multi_krum f, m (0: K-f); geomed iterations, nu; "
        "clipped_fedavg tau; bulyan f (needs 4f+3 updates; fewer lower f)",
        default_factory=dict,
    )
    server_opt: str = _help("server optimizer on top of the rule: " + " | ".join(SERVER_OPT_NAMES), default="none")
    server_opt_params: dict[str, float] = _help(
        "its parameters: fedavgm lr, momentum; fedadam and fedyogi lr, beta1, beta2, tau", default_factory=dict
    )
    round: RoundSettings = field(default_factory=RoundSettings, metadata={"help": "round policy"})
    synthesis: SynthesisSettings = field(default_factory=SynthesisSettings, metadata={"help": "semi-global synthesis"})
    selection: SelectionSettings = field(default_factory=SelectionSettings, metadata={"help": "who trains each round"})
    round_config: dict[str, str] = _help(
        "key/values handed to every trainer each round (built-in tasks: epochs, batch_size, lr, lr_decay, momentum, "
        "max_batches; prox_mu > 0: FedProx's proximal term; scaffold: true for SCAFFOLD's control variates)",
        default_factory=dict,
    )
    encoding: str = _help(
        "how devices encode their updates: float32 (the weights), or a delta against the base as fp16, bf16, "
        "int8 (per-tensor scale) or topk:F (the largest F of each tensor's entries, with error feedback); "
        "handed to agents as round_config encoding, and updates otherwise encoded are refused",
        default="float32",
    )
    privacy: PrivacySettings = field(
        default_factory=PrivacySettings, metadata={"help": "differential privacy: local and central DP, the ε budget"}
    )
    serving: ServingSettings = field(default_factory=ServingSettings, metadata={"help": "how agents are served"})
    tls: TlsSettings = field(default_factory=TlsSettings, metadata={"help": "mutual TLS"})
    federations: dict[str, dict[str, Any]] = _help(
        "serve several federations from this one process: name -> per-federation keys (" + ", ".join(FEDERATION_KEYS)
        + "), each overriding the top-level key of the same name; every federation has its own rounds, journal "
        "(state_dir/federations/NAME), ring membership and synthesis; empty: the one `federation`",
        default_factory=dict,
    )
    coordinator: str = _help(
        "coordinator address host:port; empty runs without one. At start, each served federation its hub has "
        "registered (`strata federation create --policy KEY=VALUE --strategy NAME`) takes the registered round "
        "policy (round.KEY) and strategy for every such key its effective config leaves at the built-in default: "
        "what the operator set (file, STRATA_* environment, --set, the federations entry) wins, but a key set to "
        "exactly its built-in value counts as unset. A registered value this aggregator cannot honour stops "
        "it from starting; a coordinator it cannot reach leaves the local config (warning hub_defaults_unavailable)",
        default="",
    )
    peers: list[str] = _help(
        "static membership without a coordinator: id=host:port entries (this aggregator included)",
        default_factory=list,
    )
    metrics_port: int = _help("Prometheus metrics port on the listen host; 0 disables", default=0)
    log_level: str = _help("debug | info | warning | error", default="info")
    evaluation: str = _help(
        "task:NAME evaluates each cluster and semi-global model on that built-in task's held-out split "
        "(manifest metrics heldout_*, `strata history` heldout_accuracy); empty: off",
        default="",
    )

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ConfigError(f"listen must be host:port, got {self.listen!r}")
        if self.evaluation and not (self.evaluation.startswith("task:") and self.evaluation.removeprefix("task:")):
            raise ConfigError(f"evaluation must be empty or task:NAME (a built-in task), got {self.evaluation!r}")
        if not self.federation:
            raise ConfigError("federation must not be empty")
        _check_prox_mu(self.round_config)
        try:
            scaffold = scaffold_enabled(self.round_config)
        except InvalidInput as exc:
            raise ConfigError(f"round_config.{SCAFFOLD}: {exc.message}") from None
        if scaffold and self.privacy.central.enabled:
            # agents' delta_c would reach c, and every agent, un-noised and uncounted by the accountant
            raise ConfigError("round_config.scaffold cannot be combined with central DP (privacy.central) yet")
        _check_rule("strategy", self.strategy)
        if self.server_opt not in SERVER_OPT_NAMES:
            raise ConfigError(f"server_opt must be one of {list(SERVER_OPT_NAMES)}, got {self.server_opt!r}")
        if self.server_opt != "none" and self.privacy.central.enabled:
            # the optimizer's state would carry un-noised aggregates into later releases, which
            # the accountant does not count; DP must wrap the rule under the optimizer first
            raise ConfigError("server_opt cannot be combined with central DP (privacy.central) yet; set server_opt: none")
        if self.round.mode == "buffered":
            _check_buffered(self)
        try:
            object.__setattr__(self, "encoding", parse_encoding(self.encoding).name)  # canonical, e.g. topk:0.01
        except EncodingError as exc:
            raise ConfigError(f"encoding: {exc}") from None
        if "encoding" in self.round_config:
            raise ConfigError("set the encoding with the top-level key `encoding`, not round_config.encoding")
        for entry in self.peers:
            if "=" not in entry or ":" not in entry.split("=", 1)[1]:
                raise ConfigError(f"peers entries must look like id=host:port, got {entry!r}")
        self.per_federation()  # each federation's effective config validates itself now, not at start

    @property
    def multi_federation(self) -> bool:
        return bool(self.federations)

    def served_federations(self) -> tuple[str, ...]:
        """The federations this process serves, in config order."""
        return tuple(self.federations) if self.federations else (self.federation,)

    def per_federation(self) -> dict[str, AggregatorConfig]:
        """Each served federation's effective config: this one, with its `federations` entry applied.

        Without `federations` that is this config alone. A federation entry may set only
        FEDERATION_KEYS; sections (round, synthesis, selection, privacy) merge key by key.
        """
        if not self.federations:
            return {self.federation: self}
        out: dict[str, AggregatorConfig] = {}
        for name, overrides in self.federations.items():
            if not isinstance(name, str) or not _FEDERATION_NAME.fullmatch(name):
                raise ConfigError(f"federations: {name!r} is not a federation name (letters, digits, . _ -; at most 64)")
            overrides = overrides or {}
            if not isinstance(overrides, Mapping):
                raise ConfigError(f"federations.{name} must be a mapping of per-federation keys, got {overrides!r}")
            foreign = sorted(set(overrides) - set(FEDERATION_KEYS))
            if foreign:
                raise ConfigError(
                    f"federations.{name} may set only {', '.join(FEDERATION_KEYS)}; not {', '.join(map(str, foreign))}"
                )
            try:
                out[name] = _with_overrides(self, {**overrides, "federation": name, "federations": {}})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"federations.{name}: {exc}") from None
            except ConfigError as exc:
                raise ConfigError(f"federations.{name}: {exc.message}", reason=exc.reason) from None
        return out


def _with_overrides(obj: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of the dataclass `obj` with `overrides` applied, sections merged key by key (validated again)."""
    changes: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in names:
            raise ConfigError(f"unknown key {key!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = _with_overrides(current, value)
        else:
            changes[key] = _like(current, value, key)
    return dataclasses.replace(obj, **changes)


def _like(current: Any, value: Any, key: str) -> Any:
    """`value` as the type of the key's default: `--set federations.F.round.min_updates=3` gives the text "3"."""
    if isinstance(value, str) and isinstance(current, (bool, int, float)):
        text = value.strip().lower()
        try:
            if isinstance(current, bool):
                if text not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return text in ("true", "1", "yes", "on")
            return type(current)(text)
        except ValueError:
            raise ConfigError(f"{key}: expected {type(current).__name__}, got {value!r}") from None
    if isinstance(current, (int, float)) and not isinstance(current, bool) and isinstance(value, bool):
        raise ConfigError(f"{key}: expected {type(current).__name__}, got {value!r}")
    return value


# ---------------------------------------------------------------- a federation's registered defaults

# the RoundSettings keys a federation's registered round policy may set, one KEY=VALUE each: the scalar
# ones (staleness_params, a mapping, is set in the aggregator's own config only)
ROUND_POLICY_KEYS = tuple(f.name for f in dataclasses.fields(RoundSettings) if f.default is not dataclasses.MISSING)


def round_policy_values(round_policy: Mapping[str, str]) -> dict[str, Any]:
    """A registered round policy's text values as RoundSettings' types, each checked alone against
    the built-in defaults; ConfigError naming the key that is not a round setting or that RoundSettings refuses."""
    builtin = RoundSettings()
    values: dict[str, Any] = {}
    for key, text in round_policy.items():
        if key not in ROUND_POLICY_KEYS:
            raise ConfigError(f"round policy key {key!r} is not a round setting (one of {', '.join(ROUND_POLICY_KEYS)})")
        try:
            values[key] = getattr(_with_overrides(builtin, {key: text}), key)
        except ConfigError as exc:
            raise ConfigError(f"round policy {key}={text!r}: {exc.message}") from None
    return values


def with_federation_defaults(
    config: AggregatorConfig, round_policy: Mapping[str, str], strategy: str
) -> tuple[AggregatorConfig, dict[str, str]]:
    """`config` (one federation's effective config) with the federation's registered defaults applied,
    and what was applied (key -> the registered text; round keys by their RoundSettings name).

    A registered key applies where `config` leaves that key at its built-in default, so whatever the
    operator set wins; a key set to exactly the built-in value counts as unset (nothing records where a
    value came from). A registered value this aggregator cannot honour (not a round setting, refused by
    RoundSettings, an unknown strategy, or a combination the config refuses) is a ConfigError naming the
    federation and the key: the aggregator does not start with a policy it cannot honour.
    """
    where = f"federation {config.federation!r}: the hub's default"
    try:
        values = round_policy_values(round_policy)
        if strategy:
            _check_rule("strategy", strategy)
    except ConfigError as exc:
        raise ConfigError(f"{where} {exc.message}") from None
    builtin = RoundSettings()
    round_changes = {
        key: value
        for key, value in values.items()
        if getattr(config.round, key) == getattr(builtin, key) and value != getattr(builtin, key)
    }
    applied = {key: round_policy[key] for key in round_changes}
    changes: dict[str, Any] = {"round": round_changes} if round_changes else {}
    builtin_strategy = AggregatorConfig.__dataclass_fields__["strategy"].default
    if strategy and config.strategy == builtin_strategy and strategy != builtin_strategy:
        changes["strategy"] = applied["strategy"] = strategy
    if not changes:
        return config, {}
    try:
        return _with_overrides(config, changes), applied
    except ConfigError as exc:
        keys = ", ".join(f"{key}={text}" for key, text in applied.items())
        raise ConfigError(f"{where}s {keys} cannot be honoured: {exc.message}") from None
