"""What a simulated fleet is: frozen, keyword-only options, validated on creation; each default once.

`Delay` is the one distribution type of the simulator (straggler delays): a
spec string such as ``exp:5`` parses into it, and it draws from a caller's RNG.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from agent.sim.attacks import AttackOptions
from proto.errors import ConfigError
from proto.wire import DEFAULT_TIMEOUT_S

TRAINER_NONE = "none"  # join, watch and heartbeat only: a connected, idle device
TRAINER_NOISE = "noise"  # the base plus Gaussian noise: the cheap trainer for scale runs
PARTITION_SCHEMES = ("iid", "dirichlet", "shards")
# joins per second the automatic ramp aims at (10,000 devices join over 20 s)
AUTO_RAMP_JOINS_PER_S = 500.0

_DELAY_KINDS = {"fixed": 1, "uniform": 2, "exp": 1, "lognormal": 2}


@dataclass(frozen=True, kw_only=True)
class Delay:
    """A non-negative delay distribution in seconds.

    ``fixed:S``, ``uniform:A:B``, ``exp:MEAN`` (exponential) or ``lognormal:MEDIAN:SIGMA``.
    """

    kind: str
    params: tuple[float, ...]

    def __post_init__(self) -> None:
        arity = _DELAY_KINDS.get(self.kind)
        if arity is None:
            raise ConfigError(f"delay kind must be one of {sorted(_DELAY_KINDS)}, got {self.kind!r}", reason="bad_delay")
        if len(self.params) != arity:
            raise ConfigError(f"delay {self.kind} takes {arity} parameter(s), got {len(self.params)}", reason="bad_delay")
        if not all(math.isfinite(p) and p >= 0 for p in self.params):
            raise ConfigError(f"delay parameters must be finite and >= 0, got {self.params}", reason="bad_delay")
        if self.kind == "uniform" and self.params[0] > self.params[1]:
            raise ConfigError("uniform:A:B needs A <= B", reason="bad_delay")

    @classmethod
    def parse(cls, spec: str) -> Delay:
        kind, *raw = spec.strip().split(":")
        try:
            params = tuple(float(p) for p in raw)
        except ValueError:
            raise ConfigError(f"delay {spec!r}: parameters must be numbers", reason="bad_delay") from None
        return cls(kind=kind, params=params)

    def draw(self, rng: random.Random) -> float:
        p = self.params
        if self.kind == "fixed":
            return p[0]
        if self.kind == "uniform":
            return rng.uniform(p[0], p[1])
        if self.kind == "exp":
            return rng.expovariate(1.0 / p[0]) if p[0] > 0 else 0.0
        return p[0] * math.exp(rng.gauss(0.0, p[1]))  # lognormal around its median

    def mean(self) -> float:
        p = self.params
        if self.kind in ("fixed", "exp"):
            return p[0]
        if self.kind == "uniform":
            return (p[0] + p[1]) / 2
        return p[0] * math.exp(p[1] ** 2 / 2)

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])


@dataclass(frozen=True, kw_only=True)
class SimOptions:
    """One simulated fleet: how many devices, what they train, and how they misbehave."""

    seeds: tuple[str, ...] = ("127.0.0.1:7070",)
    agents: int = 1000
    federation: str = "digits"
    # none | noise | a built-in task name (digits, mnist, fashion_mnist)
    trainer: str = TRAINER_NOISE
    noise_scale: float = 1e-3
    # stop after every home closed this many rounds (0: no limit)
    rounds: int = 0
    # stop after this many seconds (0: no limit; Ctrl-C always stops)
    duration_s: float = 0.0
    # first joins spread uniformly over this many seconds; None: agents / AUTO_RAMP_JOINS_PER_S
    ramp_s: float | None = None
    # churn, per minute: an online device leaves with rate leave_rate, an offline one returns with join_rate
    leave_rate: float = 0.0
    join_rate: float = 6.0
    # chance that an upload attempt breaks off mid-stream (the device then resends the same update)
    dropout: float = 0.0
    # share of devices that are stragglers, and their extra delay after training
    stragglers: float = 0.0
    straggler_delay: Delay = Delay(kind="exp", params=(5.0,))
    # devices behind a relay: its address and the share of the fleet it serves
    relay: str = ""
    relay_share: float = 0.0
    # non-IID data for task trainers (agent.tasks.partition)
    partition: str = "dirichlet"
    alpha: float = 0.5
    # gRPC connections: 0 gives every device its own (as real devices have); N shares N per address
    connections: int = 0
    # misbehaving clients that open a SubmitUpdate, send its header and stall
    stalled_uploads: int = 0
    train_workers: int = 2
    seed: int = 0
    id_prefix: str = "sim"
    rpc_timeout_s: float = DEFAULT_TIMEOUT_S
    join_timeout_s: float = 600.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 10.0
    # a hostile share of the fleet and what it sends (agent.sim.attacks)
    attack: AttackOptions = AttackOptions()

    def __post_init__(self) -> None:
        if not self.seeds or not all(self.seeds):
            raise ConfigError("at least one aggregator address is needed (--seeds)")
        if self.agents < 0:
            raise ConfigError("agents must be >= 0")
        if not self.trainer:
            raise ConfigError("trainer must be none, noise or a built-in task name")
        for name in ("rounds", "connections", "stalled_uploads", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0")
        for name in ("duration_s", "leave_rate", "join_rate", "noise_scale"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0")
        if self.ramp_s is not None and not (math.isfinite(self.ramp_s) and self.ramp_s >= 0):
            raise ConfigError("ramp_s must be a finite number >= 0")
        if self.leave_rate > 0 and self.join_rate <= 0:
            raise ConfigError("with leave_rate > 0, join_rate must be > 0 (devices that leave come back)")
        if not 0 <= self.dropout < 1:
            raise ConfigError("dropout must be in [0, 1)")
        for name in ("stragglers", "relay_share"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"{name} must be in [0, 1]")
        if self.relay_share > 0 and not self.relay:
            raise ConfigError("relay_share > 0 needs a relay address")
        if self.partition not in PARTITION_SCHEMES:
            raise ConfigError(f"partition must be one of {PARTITION_SCHEMES}")
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise ConfigError("alpha must be > 0")
        if self.train_workers < 1:
            raise ConfigError("train_workers must be >= 1")
        for name in ("rpc_timeout_s", "join_timeout_s", "backoff_base_s", "backoff_max_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0")
        if self.attack.name == "label_flip" and self.trainer in (TRAINER_NONE, TRAINER_NOISE):
            raise ConfigError("the label_flip attack needs a task trainer (digits, mnist, fashion_mnist)", reason="bad_attack")
        if self.backoff_max_s < self.backoff_base_s:
            raise ConfigError("backoff_max_s must be >= backoff_base_s")

    @property
    def effective_ramp_s(self) -> float:
        return self.agents / AUTO_RAMP_JOINS_PER_S if self.ramp_s is None else self.ramp_s

    @property
    def trains(self) -> bool:
        return self.trainer != TRAINER_NONE
