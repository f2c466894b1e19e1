"""What every `strata` command shares: exit codes and the error mapping, common options, JSON output.

A leaf: the command modules (`strata/cmd_*.py`) and the parser in `strata/cli.py`
import it, and it imports none of them.

Exit codes:
  0  success
  1  unexpected internal error (a bug: please report it)
  2  usage error or invalid input (bad arguments, bad file, bad config)
  3  not found (no such model, file or aggregator state)
  4  integrity failure (a hash or signature does not verify)
  5  unavailable (a daemon or store could not be reached in time)
  6  refused (a bad credential: a bootstrap token or certificate the fleet does not accept, or a revoked one)
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from proto.errors import IntegrityError, NotFound, StrataError, Unavailable

EXIT_OK, EXIT_INTERNAL, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_INTEGRITY, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
EXIT_REFUSED = 6
EXIT_INTERRUPTED = 130


def exit_code_for(error: StrataError) -> int:
    if isinstance(error, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(error, IntegrityError):
        return EXIT_INTEGRITY
    if isinstance(error, Unavailable) or error.status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        return EXIT_UNAVAILABLE
    if error.status in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "ALREADY_EXISTS"):
        return EXIT_USAGE
    if error.status in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        return EXIT_REFUSED
    return EXIT_INTERNAL


def add_actions(commands: argparse._SubParsersAction, name: str, help: str) -> argparse._SubParsersAction:
    """`strata NAME ACTION ...`: a command made of actions, one of which must be given."""
    actions = commands.add_parser(name, help=help).add_subparsers(dest=f"{name}_command", metavar="ACTION")
    actions.required = True
    return actions


def add_store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--store",
        metavar="URL",
        action="append",
        help="content store: a directory, local:/path or ipfs:/multiaddr (default: $STRATA_STORE or "
        "~/.strata/store); repeat to read several in order, e.g. an aggregator's and a relay's",
    )


def add_bundle_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bundle",
        metavar="DIR",
        default=os.environ.get("STRATA_BUNDLE", ""),
        help="your bundle (strata certs issue --role operator): mutual TLS to a fleet that requires it "
        "(default: $STRATA_BUNDLE; none: plaintext)",
    )


def channel_factory_for(args: argparse.Namespace) -> Callable[[str], Any]:
    """How this command dials daemons: with the operator's certificate (--bundle), or in plaintext."""
    from trust.security import Security, channel_factory

    return channel_factory(Security(args.bundle) if getattr(args, "bundle", "") else None)


def add_json_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")


def add_coordinator_options(parser: argparse.ArgumentParser, handler: Callable[[argparse.Namespace], int]) -> None:
    """The options every coordinator command shares (address, deadline, bundle, --json), and its handler."""
    parser.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=os.environ.get("STRATA_COORDINATOR", "127.0.0.1:7000"),
        help="coordinator address (default: $STRATA_COORDINATOR or 127.0.0.1:7000)",
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="deadline per call in seconds (default: 5)")
    add_bundle_option(parser)
    add_json_option(parser)
    parser.set_defaults(handler=handler)


def add_log_level_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--log-level", metavar="LEVEL", help="debug | info | warning | error (overrides the config's log_level)"
    )


def print_json(value: object) -> None:
    json.dump(value, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")
