"""Agent configuration: frozen, keyword-only, validated on creation; each default defined once.

Loaded from YAML with `STRATA_*` environment overrides (e.g. `STRATA_SEEDS=host:7070`),
so `strata agent run` works with no file at all against a local aggregator.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proto.errors import ConfigError
from trust.security import TlsSettings


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True, kw_only=True)
class EnrollSettings:
    coordinator: str = _help(
        "host:port of the coordinator's enrollment port (its enroll_listen): with a token and no usable bundle "
        "at tls.bundle yet, the agent enrolls there on start and writes its bundle to tls.bundle",
        default="",
    )
    token: str = _help("bootstrap token from `strata certs token`: buys the agent its first certificate", default="")
    token_file: str = _help(
        "a file holding the bootstrap token, read when the agent enrolls (e.g. one an init container wrote); "
        "used when token is empty",
        default="",
    )
    ca: str = _help("the fleet CA certificate (a ca.pem) the coordinator is verified with before the token is sent", default="")
    renew_address: str = _help(
        "host:port of the coordinator's mutual-TLS port, where the agent renews its certificate at ~2/3 of its "
        "lifetime; empty: the address the coordinator named when the agent enrolled",
        default="",
    )

    def __post_init__(self) -> None:
        for name in ("coordinator", "renew_address"):
            value = getattr(self, name)
            if value and not _is_host_port(value):
                raise ConfigError(f"enroll.{name} must be host:port, got {value!r}")
        if self.token and self.token_file:
            raise ConfigError("set enroll.token or enroll.token_file, not both")
        if self.has_token and not (self.coordinator and self.ca):
            raise ConfigError("enroll.token needs enroll.coordinator (the enrollment port) and enroll.ca (the fleet CA)")

    @property
    def has_token(self) -> bool:
        """Whether a bootstrap token is configured (inline or as a file, which may not exist yet)."""
        return bool(self.token or self.token_file)

    def bootstrap_token(self) -> str:
        """The token, read from `token_file` when it is not inline; ConfigError if that file is unreadable."""
        if self.token or not self.token_file:
            return self.token
        path = Path(self.token_file).expanduser()
        try:
            return path.read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"enroll.token_file {path}: {e}") from None


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit())


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    id: str = _help("agent id (default: generated once and kept in state_dir)", default="")
    name: str = _help("display name shown to operators (default: the id)", default="")
    seeds: list[str] = _help("aggregator (or relay) addresses to join through", default_factory=lambda: ["127.0.0.1:7070"])
    federation: str = _help("the model family to train", default="digits")
    task: str = _help("trainer: a built-in task (digits, mnist, fashion_mnist) or module:object", default="digits")
    task_options: dict[str, Any] = _help(
        "keyword options for the trainer, e.g. {partition: {scheme: dirichlet, alpha: 0.5, index: 0, count: 5}}",
        default_factory=dict,
    )
    capability: str = _help("train | partial_train | inference", default="train")
    state_dir: str = _help("identity, key and pending update (default: ~/.strata/agent/<id or 'default'>)", default="")
    rpc_timeout_s: float = _help("deadline of each unary call", default=30.0)
    join_timeout_s: float = _help("give up joining after this long with no aggregator answering", default=600.0)
    backoff_base_s: float = _help("first retry delay; doubles per attempt, with full jitter", default=0.5)
    backoff_max_s: float = _help("longest retry delay", default=10.0)
    start_jitter_s: float = _help(
        "wait a random 0..start_jitter_s before the first join, so a fleet started together does not arrive together",
        default=1.0,
    )
    tls: TlsSettings = field(
        default_factory=TlsSettings,
        metadata={"help": "mutual TLS (the agent's bundle; where enrollment writes it)"},
    )
    enroll: EnrollSettings = field(
        default_factory=EnrollSettings, metadata={"help": "enrollment with a bootstrap token, and renewal"}
    )
    max_rounds: int = _help("stop after this many submitted updates; 0 runs until stopped", default=0)
    metrics_port: int = _help("Prometheus metrics port on 0.0.0.0 (one per process: the first config's); 0 disables", default=0)
    log_level: str = _help("debug | info | warning | error", default="info")

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds must name at least one aggregator address")
        if self.capability not in ("train", "partial_train", "inference"):
            raise ConfigError(f"capability must be train, partial_train or inference, got {self.capability!r}")
        if not 0 <= self.metrics_port < 65536:
            raise ConfigError("metrics_port must be 0..65535")
        if self.max_rounds < 0:
            raise ConfigError("max_rounds must be >= 0")
        if self.start_jitter_s < 0:
            raise ConfigError("start_jitter_s must be >= 0")
        for name in ("rpc_timeout_s", "join_timeout_s", "backoff_base_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be > 0")
        if self.enroll.has_token and not self.tls.bundle:
            raise ConfigError("enroll.token needs tls.bundle: the directory the enrolled bundle is written to")
