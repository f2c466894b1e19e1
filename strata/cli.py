"""The `strata` command: parse, call the core, render. One shared error handler sets the exit code.

The exit codes, shared options and JSON output live in `strata.cli_common`, which
the command modules import; this module only assembles their parsers and runs one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from proto.errors import StrataError
from strata import (
    cmd_certs,
    cmd_daemons,
    cmd_dashboard,
    cmd_demo,
    cmd_device,
    cmd_fleet,
    cmd_history,
    cmd_hub,
    cmd_model,
    cmd_simulate,
)
from strata.cli_common import EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_OK, exit_code_for, print_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Strata: federated learning across a ring of aggregators, with content-addressed model lineage.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 usage/invalid input, 3 not found, 4 integrity failure, "
        "5 unavailable, 6 refused (bad or revoked credentials), 130 interrupted. "
        "Run `strata COMMAND --help` for details.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True
    for module in (cmd_model, cmd_hub, cmd_history, cmd_daemons, cmd_fleet, cmd_device, cmd_certs, cmd_demo, cmd_simulate, cmd_dashboard):
        module.register(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int | None] = args.handler
    try:
        return handler(args) or EXIT_OK
    except KeyboardInterrupt:
        print("strata: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except StrataError as error:
        if getattr(args, "json", False):
            print_json({"error": {"reason": error.reason, "message": error.message}})
        print(f"strata: {error.message} [{error.reason}]", file=sys.stderr)
        return exit_code_for(error)
    except BrokenPipeError:
        return EXIT_OK
    except Exception as error:  # a bug: say so in one line, keep the traceback for --log-level debug
        logging.getLogger("strata.cli").debug("internal error", exc_info=True)
        print(f"strata: internal error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
