"""`strata aggregator serve`, `strata agent run`, `strata coordinator serve`, `strata relay serve`: load config, wire, run until a signal."""

from __future__ import annotations

import argparse
import gc
import signal
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from strata.cli_common import (
    EXIT_OK,
    add_actions,
    add_bundle_option,
    add_json_option,
    add_log_level_option,
    channel_factory_for,
    print_json,
)
from strata.config import config_to_dict, describe_config, load_config
from strata.logs import setup_logging


def _config_help(cls: type) -> str:
    lines = ["config keys (YAML file, or STRATA_<KEY> / STRATA_<SECTION>__<KEY> environment variables):"]
    for key, default, text in describe_config(cls):
        lines.append(f"  {key} = {default}  # {text}")
    return "\n".join(lines)


def _add_daemon(
    commands: argparse._SubParsersAction,
    role: str,
    action: str,
    help: str,
    action_help: str,
    handler: Callable[[argparse.Namespace], int],
    *,
    many_configs: bool = False,
) -> None:
    """`strata ROLE ACTION` with --config, --set, --print-config and --log-level, and every
    config key with its default in the epilog."""
    parser = add_actions(commands, role, help).add_parser(
        action,
        help=action_help,
        epilog=_config_help(config_class(role)),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if many_configs:
        parser.add_argument("--config", type=Path, action="append", default=[], help="YAML config file (repeatable)")
    else:
        parser.add_argument("--config", type=Path, help="YAML config file (optional: every key has a default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one config key (repeatable)")
    parser.add_argument("--print-config", action="store_true", help="print the effective config as JSON and exit")
    add_log_level_option(parser)
    parser.set_defaults(handler=handler)


def register(commands: argparse._SubParsersAction) -> None:
    _add_daemon(
        commands, "aggregator", "serve", "run a cluster aggregator",
        "serve AgentService and PeerService, run rounds", cmd_aggregator_serve,
    )
    _add_daemon(
        commands, "agent", "run", "run an edge agent",
        "join, train, upload, repeat (several --config files run several agents in one process)",
        cmd_agent_run, many_configs=True,
    )
    _add_daemon(
        commands, "coordinator", "serve", "run the coordinator (membership, ring, model index)",
        "serve CoordinatorService", cmd_coordinator_serve,
    )
    _add_daemon(
        commands, "relay", "serve", "run a relay in front of an aggregator for low-power devices",
        "serve AgentService to devices; cache models, pre-aggregate and store-and-forward upstream",
        cmd_relay_serve,
    )

    health = commands.add_parser("health", help="ask a daemon's gRPC health service (for healthchecks); exit 0 if SERVING")
    health.add_argument("address", help="host:port of any Strata daemon")
    health.add_argument("--service", default="", help="a service name, e.g. strata.v1.AgentService (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, help="deadline in seconds (default: 3)")
    add_bundle_option(health)
    add_json_option(health)
    health.set_defaults(handler=cmd_health)

    config = commands.add_parser("config", help="every config key of a daemon, with its default")
    config.add_argument("role", choices=sorted(CONFIG_CLASSES), help="which daemon")
    config.add_argument("--markdown", action="store_true", help="a Markdown table (as in the README)")
    add_json_option(config)
    config.set_defaults(handler=cmd_config)


CONFIG_CLASSES = {
    "aggregator": "aggregator.config:AggregatorConfig",
    "agent": "agent.config:AgentConfig",
    "coordinator": "coordinator.config:CoordinatorConfig",
    "relay": "relay.config:RelayConfig",
}


def config_class(role: str) -> type:
    import importlib

    module, name = CONFIG_CLASSES[role].split(":")
    return getattr(importlib.import_module(module), name)


def config_table(role: str) -> str:
    """The Markdown table of a daemon's config keys, as the README shows it."""
    from strata.config import env_var_for

    lines = ["| key | default | environment | meaning |", "| --- | --- | --- | --- |"]
    for key, default, text in describe_config(config_class(role)):
        lines.append(f"| `{key}` | `{default}` | `{env_var_for(key)}` | {text.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def cmd_health(args: argparse.Namespace) -> int:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from proto.errors import Unavailable
    from proto.wire import error_from_rpc

    with channel_factory_for(args)(args.address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from exc
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if args.json:
        print_json({"address": args.address, "service": args.service, "status": status})
    else:
        print(status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        raise Unavailable(f"{args.address} is {status}", reason="not_serving")
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    from strata.config import env_var_for

    rows = [
        {"key": key, "default": default, "env": env_var_for(key), "help": text}
        for key, default, text in describe_config(config_class(args.role))
    ]
    if args.json:
        print_json(rows)
    elif args.markdown:
        print(config_table(args.role), end="")
    else:
        for row in rows:
            print(f"{row['key']} = {row['default']}  # {row['help']}")
    return EXIT_OK


def _overrides(pairs: list[str]) -> dict[str, str]:
    from proto.errors import InvalidInput

    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--set expects KEY=VALUE, got {pair!r}", reason="bad_argument")
        out[key.strip()] = value
    return out


def _run_until_signal(stop: Callable[[], None], wait: Callable[[float], Any]) -> None:
    """Install SIGINT/SIGTERM handlers that call `stop`, then wait for it."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stopping.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stopping.is_set():
            if wait(0.5):
                break
    finally:
        stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _one_torch_thread() -> None:
    """Aggregation folds are memory-bound; a second torch thread only waits on a busy core
    (bench/README.md: 2 threads fold at 0.1-1.8 GB/s under load, 1 thread at 6-11 GB/s)."""
    import torch

    torch.set_num_threads(1)


def _serve(args: argparse.Namespace, role: str, make_daemon: Callable[[Any], Any], *, one_torch_thread: bool = False) -> int:
    """Load the role's config, then start its daemon and run it until SIGINT/SIGTERM."""
    config = load_config(config_class(role), args.config, overrides=_overrides(args.set))
    if args.print_config:
        print_json(config_to_dict(config))
        return EXIT_OK
    setup_logging(args.log_level or config.log_level)
    if one_torch_thread:
        _one_torch_thread()
    daemon = make_daemon(config)
    daemon.start()
    _settle_garbage_collector()
    _run_until_signal(daemon.stop, daemon.wait)
    return EXIT_OK


def _settle_garbage_collector() -> None:
    """A started daemon's objects (modules, models, the journal) live as long as it does: freeze them
    out of the collector's passes, and collect young objects less often. Full collections over a
    large fleet's registry otherwise stall the serving loop for a second at a time."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 50)


def cmd_aggregator_serve(args: argparse.Namespace) -> int:
    from aggregator.daemon import AggregatorDaemon
    from strata.wiring import heldout_evaluator, initial_model_factory

    def make(config: Any) -> AggregatorDaemon:
        # each federation's task:NAME initial model and held-out evaluator are made for that federation
        return AggregatorDaemon(
            config, federation_model_factory=initial_model_factory, federation_evaluator=heldout_evaluator
        )

    return _serve(args, "aggregator", make, one_torch_thread=True)


def cmd_agent_run(args: argparse.Namespace) -> int:
    from agent.daemon import AgentGroup, enroll_if_needed
    from proto.metrics import serve_metrics

    paths = args.config or [None]
    configs = [load_config(config_class("agent"), path, overrides=_overrides(args.set)) for path in paths]
    if len(configs) > 1:
        # agents without an id generate one and keep it in their state dir, so they need their own dirs
        configs = [
            replace(c, state_dir=f"~/.strata/agent/default-{i}") if not c.id and not c.state_dir else c
            for i, c in enumerate(configs)
        ]
    if args.print_config:
        print_json([config_to_dict(c) for c in configs])
        return EXIT_OK
    setup_logging(args.log_level or configs[0].log_level)
    stop = threading.Event()
    # enrollment comes first, before any trainer loads or agent runs: a refused token is the command's one-line error
    for config in configs:
        enroll_if_needed(config, stop=stop)
    group = AgentGroup(configs, stop)
    metrics = (
        serve_metrics(group.collect_metrics, host="0.0.0.0", port=configs[0].metrics_port)
        if configs[0].metrics_port
        else None
    )
    runner = threading.Thread(target=group.run, name="agents", daemon=True)
    runner.start()
    try:
        _run_until_signal(stop.set, lambda timeout: not runner.is_alive() or stop.wait(timeout))
        runner.join(timeout=10.0)
    finally:
        if metrics is not None:
            metrics.stop()
    return EXIT_OK


def cmd_coordinator_serve(args: argparse.Namespace) -> int:
    from coordinator.daemon import CoordinatorDaemon

    return _serve(args, "coordinator", CoordinatorDaemon)


def cmd_relay_serve(args: argparse.Namespace) -> int:
    from relay.daemon import RelayDaemon

    return _serve(args, "relay", RelayDaemon, one_torch_thread=True)
