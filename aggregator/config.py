"""Aggregator configuration: frozen, keyword-only, validated on creation; each default defined once.

Loaded from YAML with `STRATA_*` environment overrides by `strata.config.load_config`
(e.g. `STRATA_ROUND__MIN_UPDATES=3`). Every key has a default, so
`strata aggregator serve` runs with no file at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from intake.config import ServingSettings
from privacy.config import PrivacySettings
from proto.errors import ConfigError
from storage.encodings import EncodingError, parse_encoding
from trust.security import TlsSettings

# the names aggregator.rules knows (kept here so loading config does not import torch; a test keeps them equal).
# Their parameters are checked when the daemon builds the rule (ConfigError "bad_config" at start).
STRATEGY_NAMES = ("fedavg", "median", "trimmed_mean", "krum", "multi_krum", "geomed", "clipped_fedavg")
SERVER_OPT_NAMES = ("none", "fedavgm", "fedadam", "fedyogi")


def _check_rule(key: str, name: str) -> None:
    if name not in STRATEGY_NAMES:
        raise ConfigError(f"{key} must be one of {list(STRATEGY_NAMES)}, got {name!r}")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class RoundSettings:
    min_updates: int = _help("updates a round needs before it may close at its deadline", default=1)
    quorum: float = _help("fraction of active training agents whose updates close a round early", default=0.8)
    deadline_s: float = _help("seconds after opening when a round closes with >= min_updates; else it extends", default=30.0)
    max_staleness: int = _help("rounds an update's base may lag the current round and still be accepted", default=2)
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

    def __post_init__(self) -> None:
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
        "how long to wait for peers that have not yet closed this round before blending what they have",
        default=3.0,
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


@dataclass(frozen=True, kw_only=True)
class AggregatorConfig:
    id: str = _help("this aggregator's id on the ring (default: agg-<hostname>)", default="")
    listen: str = _help("host:port for AgentService and PeerService", default="127.0.0.1:7070")
    advertise: str = _help("address agents and peers use to reach this aggregator (default: listen)", default="")
    federation: str = _help("the model family this aggregator trains", default="digits")
    initial_model: str = _help(
        "the round-0 base: a model CID in the store, or task:NAME to create it from a built-in task",
        default="task:digits",
    )
    state_dir: str = _help("journal, key and history (default: ~/.strata/aggregator/<id>)", default="")
    store: str = _help("private store for updates and models (default: $STRATA_STORE or ~/.strata/store)", default="")
    shared_store: str = _help("store where cluster and semi-global models are published (default: store)", default="")
    strategy: str = _help(
        "rule for the updates inside a cluster: " + " | ".join(STRATEGY_NAMES), default="fedavg"
    )
    strategy_params: dict[str, float] = _help(
        "parameters of the rule: trimmed_mean beta; krum f; multi_krum f, m (0: K-f); geomed iterations, nu; "
        "clipped_fedavg tau",
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
        "max_batches; prox_mu > 0: FedProx's proximal term)",
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
    coordinator: str = _help("coordinator address host:port; empty runs without one", default="")
    peers: list[str] = _help(
        "static membership without a coordinator: id=host:port entries (this aggregator included)",
        default_factory=list,
    )
    metrics_port: int = _help("Prometheus metrics port on the listen host; 0 disables", default=0)
    log_level: str = _help("debug | info | warning | error", default="info")

    def __post_init__(self) -> None:
        if ":" not in self.listen:
            raise ConfigError(f"listen must be host:port, got {self.listen!r}")
        if not self.federation:
            raise ConfigError("federation must not be empty")
        _check_prox_mu(self.round_config)
        _check_rule("strategy", self.strategy)
        if self.server_opt not in SERVER_OPT_NAMES:
            raise ConfigError(f"server_opt must be one of {list(SERVER_OPT_NAMES)}, got {self.server_opt!r}")
        if self.server_opt != "none" and self.privacy.central.enabled:
            # the optimizer's state would carry un-noised aggregates into later releases, which
            # the accountant does not count; DP must wrap the rule under the optimizer first
            raise ConfigError("server_opt cannot be combined with central DP (privacy.central) yet; set server_opt: none")
        try:
            object.__setattr__(self, "encoding", parse_encoding(self.encoding).name)  # canonical, e.g. topk:0.01
        except EncodingError as exc:
            raise ConfigError(f"encoding: {exc}") from None
        if "encoding" in self.round_config:
            raise ConfigError("set the encoding with the top-level key `encoding`, not round_config.encoding")
        for entry in self.peers:
            if "=" not in entry or ":" not in entry.split("=", 1)[1]:
                raise ConfigError(f"peers entries must look like id=host:port, got {entry!r}")
