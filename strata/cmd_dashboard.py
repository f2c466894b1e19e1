"""`strata dashboard`: the operator's web console (fleet, learning, models and lineage), read-only."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from proto.errors import InvalidInput
from strata.cli_common import EXIT_OK, add_bundle_option, add_log_level_option, add_store_option

if TYPE_CHECKING:
    from strata.dashboard.reader import ReaderSettings

log = logging.getLogger("strata.dashboard")

MIN_TOKEN_CHARS = 16


def register(commands: argparse._SubParsersAction) -> None:
    dashboard = commands.add_parser(
        "dashboard",
        help="serve the web dashboard: the ring, agents, learning per round, models and lineage, live",
        description="Serves a read-only web dashboard and its JSON API over what the coordinator's index "
        "(and, with --state-dir, the aggregators' journals) already know. Without --token-file it binds "
        "loopback only.",
    )
    dashboard.add_argument(
        "--coordinator",
        metavar="HOST:PORT",
        default=os.environ.get("STRATA_COORDINATOR", "127.0.0.1:7000"),
        help="coordinator address (default: $STRATA_COORDINATOR or 127.0.0.1:7000)",
    )
    dashboard.add_argument("--listen", default="127.0.0.1:8080", metavar="HOST:PORT", help="where to serve (default: 127.0.0.1:8080)")
    dashboard.add_argument(
        "--token-file",
        type=Path,
        help="a file holding the operator token browsers must present (Bearer header, or /?token= once); "
        "required to listen beyond loopback",
    )
    dashboard.add_argument(
        "--state-dir",
        type=Path,
        action="append",
        default=[],
        help="an aggregator's state directory, for refusals by reason from its journal (repeatable)",
    )
    dashboard.add_argument("--timeout", type=float, default=5.0, help="deadline per coordinator call in seconds (default: 5)")
    add_store_option(dashboard)
    add_bundle_option(dashboard)
    add_log_level_option(dashboard)
    dashboard.set_defaults(handler=cmd_dashboard)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise InvalidInput(f"--listen must be HOST:PORT, got {text!r}", reason="bad_argument")
    return host.strip("[]"), int(port_text)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_token(path: Path | None) -> str:
    if path is None:
        return ""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise InvalidInput(f"cannot read --token-file {path}: {exc.strerror}", reason="bad_argument") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise InvalidInput(
            f"the operator token in {path} must be at least {MIN_TOKEN_CHARS} characters with no spaces "
            "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)",
            reason="bad_token",
        )
    return token


def reader_settings(args: argparse.Namespace) -> ReaderSettings:
    """How the dashboard reads the fleet, from its options: whom to dial and how (--bundle),
    which journals and store, and what its own role may read."""
    from storage.store import default_store_path
    from strata.cmd_model import resolve_store
    from strata.dashboard.reader import JOURNAL_FILE, ReaderSettings
    from trust.roles import DEVICE_UPDATE_READERS
    from trust.security import Security, TlsSettings, channel_factory
    from trust.signers import Signers

    if args.timeout <= 0:
        raise InvalidInput("--timeout must be > 0", reason="bad_argument")
    missing = [str(d) for d in args.state_dir if not (d / JOURNAL_FILE).is_file()]
    if missing:
        raise InvalidInput(f"no aggregator journal in {', '.join(missing)}", reason="bad_argument")
    has_store = bool(args.store or os.environ.get("STRATA_STORE") or default_store_path().exists())
    # the fleet side: mutual TLS as the bundle's identity (logged as tls_on, like every daemon)
    security = Security.configure(TlsSettings(bundle=args.bundle or ""), who="dashboard")
    return ReaderSettings(
        coordinator=args.coordinator,
        timeout_s=args.timeout,
        channel_factory=channel_factory(security),
        state_dirs={d.name: d for d in args.state_dir},
        store=(lambda: resolve_store(args)) if has_store else None,
        may_read_device_updates=security is not None and security.identity.role in DEVICE_UPDATE_READERS,
        # each model's signer, judged against the fleet CA the bundle trusts
        signers=Signers(security.bundle.current().ca_cert) if security is not None else None,
    )


def cmd_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from strata.dashboard.app import build_app
    from strata.dashboard.reader import FleetReader
    from strata.logs import setup_logging

    setup_logging(args.log_level or "info")
    host, port = parse_listen(args.listen)
    token = read_token(args.token_file)
    if not token and not is_loopback(host):
        raise InvalidInput(
            f"--listen {args.listen} is beyond loopback: give --token-file so browsers must present an operator token",
            reason="token_required",
        )
    reader = FleetReader(reader_settings(args))
    # without a token only loopback can reach it; the Host check keeps rebound names out too
    loopback_names = frozenset({"127.0.0.1", "localhost", "::1", host})
    app = build_app(reader, token=token, allowed_hosts=frozenset() if token else loopback_names)
    # an open event stream never ends by itself: on SIGTERM give streams 2 s, then close them
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, lifespan="off", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{port}/"
    log.info("dashboard_started", extra={"fields": {"url": url, "coordinator": args.coordinator, "token": bool(token)}})
    print(f"dashboard at {url}" + ("  (open it once with ?token=YOUR_TOKEN)" if token else ""), flush=True)
    try:
        server.run()
    finally:
        reader.close()
    return EXIT_OK
