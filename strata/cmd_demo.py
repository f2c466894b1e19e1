"""`strata demo`: start a fleet on this machine, train on real data, show progress and lineage."""

from __future__ import annotations

import argparse

from strata.cli_common import add_json_option


def register(commands: argparse._SubParsersAction) -> None:
    demo = commands.add_parser(
        "demo",
        help="run a local fleet (coordinator, aggregators, agents) on real data and show each round",
        description="Starts a coordinator, aggregators and agents as local processes, trains the digits task "
        "with class-skewed data per aggregator, prints cluster and semi-global accuracy per round on a "
        "held-out test split, and ends with the final model's CID and lineage. Every process is stopped "
        "at the end and on Ctrl-C.",
    )
    demo.add_argument("--aggregators", type=int, default=3, help="number of aggregators (default: 3)")
    demo.add_argument("--agents", type=int, default=12, help="number of agents (default: 12)")
    demo.add_argument("--rounds", type=int, default=10, help="rounds per aggregator (default: 10)")
    demo.add_argument(
        "--task", default="digits", help="built-in task: digits, mnist or fashion_mnist (default: digits)")
    demo.add_argument("--no-coordinator", action="store_true", help="static membership instead of a coordinator")
    demo.add_argument("--devices", type=int, default=6, help="low-power devices behind one relay; 0: no relay (default: 6)")
    demo.add_argument(
        "--tls",
        action="store_true",
        help="mutual TLS on every hop: a throwaway fleet CA and a bundle per process in the demo's directory",
    )
    demo.add_argument("--no-dashboard", action="store_true", help="do not serve the web dashboard beside the fleet")
    demo.add_argument("--timeout", type=float, default=170.0, help="give up after this many seconds (default: 170)")
    add_json_option(demo)
    demo.set_defaults(handler=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from strata.demo import DemoOptions, run_demo
    from strata.logs import setup_logging

    setup_logging("warning")
    options = DemoOptions(
        aggregators=args.aggregators,
        agents=args.agents,
        rounds=args.rounds,
        task=args.task,
        coordinator=not args.no_coordinator,
        relay_devices=args.devices,
        timeout_s=args.timeout,
        tls=args.tls,
        dashboard=not args.no_dashboard and not args.no_coordinator,
    )
    return run_demo(options, as_json=args.json)
