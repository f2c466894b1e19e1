"""`strata certs`: the fleet CA from the command line: init, issue, token, revoke, list, show.

Thin: parse, call `trust`, render. The CA lives in --dir (default $STRATA_CA, else
~/.strata/ca); bootstrap tokens in --db (default <CA dir>/tokens.db), where the
coordinator's enrollment reads them.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from proto.errors import FailedPrecondition, InvalidInput, NotFound
from storage.keys import KeyPair
from storage.manifest import rfc3339
from strata import render
from strata.cli_common import EXIT_OK, add_actions, add_json_option, print_json
from trust.bundle import MANIFEST_KEY_FILE, Bundle
from trust.ca import DEFAULT_VALIDITY, SERVER_ROLES, FleetCA, parse_duration
from trust.identity import Identity, Role, read_certificate
from trust.tokens import TokenStore

_ISSUABLE = [r.value for r in Role if r is not Role.AGENT]  # agents enroll with tokens
_LOCAL_HOSTS = ("localhost", "127.0.0.1")


def default_ca_dir() -> Path:
    """$STRATA_CA if set, else ~/.strata/ca (honouring $HOME)."""
    return Path(os.environ.get("STRATA_CA") or Path.home() / ".strata" / "ca").expanduser()


def _add_ca_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dir", type=Path, default=None, metavar="DIR", help="the CA directory (default: $STRATA_CA or ~/.strata/ca)"
    )


def _add_db(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", type=Path, default=None, metavar="FILE", help="the token store (default: <CA dir>/tokens.db)")


def _ca_dir(args: argparse.Namespace) -> Path:
    return (args.dir or default_ca_dir()).expanduser()


def _token_db(args: argparse.Namespace) -> Path:
    return (args.db or _ca_dir(args) / "tokens.db").expanduser()


def register(commands: argparse._SubParsersAction) -> None:
    certs = add_actions(commands, "certs", "the fleet CA: certificates, bootstrap tokens, revocation")

    init = certs.add_parser("init", help="create the fleet's CA (ECDSA P-256) in the CA directory")
    init.add_argument("--fleet", required=True, help="fleet name: lower-case letters, digits and '-'")
    _add_ca_dir(init)
    add_json_option(init)
    init.set_defaults(handler=cmd_init)

    issue = certs.add_parser(
        "issue", help="issue a bundle (ca.pem, cert.pem, key.pem, manifest.key) for a daemon or an operator"
    )
    issue.add_argument("--role", required=True, choices=_ISSUABLE, help="agents enroll with `strata certs token` instead")
    issue.add_argument("--id", required=True, help="the holder's id (e.g. the aggregator id)")
    issue.add_argument(
        "--out", type=Path, default=None, metavar="DIR",
        help="bundle directory (default: ./<role>-<id>); an existing bundle of the same identity is renewed, keeping its manifest key",
    )  # fmt: skip
    issue.add_argument(
        "--validity", default=None, metavar="DURATION",
        help="e.g. 30d, 24h (default: " + ", ".join(f"{r.value} {_human(v.total_seconds())}" for r, v in DEFAULT_VALIDITY.items()) + ")",
    )  # fmt: skip
    issue.add_argument(
        "--san", action="extend", nargs="+", default=[], metavar="HOST",
        help="DNS names / IP addresses a serving role answers on (default: localhost 127.0.0.1)",
    )  # fmt: skip
    issue.add_argument(
        "--manifest-key", type=Path, default=None, metavar="FILE",
        help="certify this existing manifest key (storage.keys format) instead of the bundle's own or a new one",
    )  # fmt: skip
    _add_ca_dir(issue)
    add_json_option(issue)
    issue.set_defaults(handler=cmd_issue)

    token = certs.add_parser("token", help="create a bootstrap token for enrolling agents (printed once), or --revoke one")
    token.add_argument("--role", default=Role.AGENT.value, choices=[Role.AGENT.value], help="what the token enrolls")
    token.add_argument("--ttl", default="24h", metavar="DURATION", help="how long the token is good for (default: 24h)")
    token.add_argument("--uses", type=int, default=1, help="how many enrollments it buys (default: 1)")
    token.add_argument("--description", default="", help="a note shown in listings")
    token.add_argument("--revoke", default=None, metavar="TOKEN_ID", help="revoke this token (its public id) instead")
    _add_ca_dir(token)
    _add_db(token)
    add_json_option(token)
    token.set_defaults(handler=cmd_token)

    revoke = certs.add_parser("revoke", help="revoke an identity (role/id, or an id issued once) or a serial; re-signs the list")
    revoke.add_argument("target", metavar="ID", help="role/id, a bare id this CA issued to exactly one role, or with --serial a serial")
    revoke.add_argument("--serial", action="store_true", help="TARGET is a certificate serial (hex)")
    _add_ca_dir(revoke)
    add_json_option(revoke)
    revoke.set_defaults(handler=cmd_revoke)

    listing = certs.add_parser("list", help="certificates issued (with their state), or --tokens")
    listing.add_argument("--tokens", action="store_true", help="list bootstrap tokens (never their secrets)")
    _add_ca_dir(listing)
    _add_db(listing)
    add_json_option(listing)
    listing.set_defaults(handler=cmd_list)

    show = certs.add_parser("show", help="the CA and its revocation list, or a bundle directory or certificate file")
    show.add_argument("path", nargs="?", type=Path, default=None, help="a bundle directory or a PEM certificate")
    _add_ca_dir(show)
    add_json_option(show)
    show.set_defaults(handler=cmd_show)


def _human(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


# ---------------------------------------------------------------- init


def cmd_init(args: argparse.Namespace) -> int:
    with FleetCA.init(_ca_dir(args), args.fleet) as ca:
        summary = _ca_json(ca)
    if args.json:
        print_json(summary)
    else:
        print(f"created the CA of fleet {summary['fleet']} in {summary['directory']}")
        print(f"fingerprint (sha256): {summary['fingerprint']}")
    return EXIT_OK


# ---------------------------------------------------------------- issue


def _manifest_key_for(args: argparse.Namespace, out: Path, identity: Identity) -> KeyPair:
    """The key to certify: --manifest-key, else the one already in the bundle (renewal), else a new one."""
    existing_cert = out / "cert.pem"
    if existing_cert.is_file():
        held = read_certificate(existing_cert.read_bytes()).identity
        if held != identity:
            raise FailedPrecondition(
                f"{out} holds the bundle of {held}, not {identity}; choose another --out", reason="bundle_exists"
            )
    if args.manifest_key is not None:
        if not args.manifest_key.is_file():
            raise NotFound(f"no such file: {args.manifest_key}", reason="file_not_found")
        return KeyPair.load(args.manifest_key)
    if (out / MANIFEST_KEY_FILE).is_file():
        return KeyPair.load(out / MANIFEST_KEY_FILE)
    return KeyPair.generate()


def cmd_issue(args: argparse.Namespace) -> int:
    identity = Identity(Role(args.role), args.id)
    out = (args.out or Path(f"{identity.role.value}-{identity.id}")).expanduser()
    validity = parse_duration(args.validity) if args.validity else None
    hosts = list(args.san)
    if identity.role in SERVER_ROLES and not hosts:
        hosts = list(_LOCAL_HOSTS)
    renewing = (out / "cert.pem").is_file()
    manifest_key = _manifest_key_for(args, out, identity)
    with FleetCA.load(_ca_dir(args)) as ca:
        bundle = ca.issue(identity, manifest_key, validity, hosts=hosts).write(out)
    summary = {**bundle.certified.to_json(), "bundle": str(out), "renewed": renewing}
    if args.json:
        print_json(summary)
    else:
        print(f"{'renewed' if renewing else 'issued'} {identity} -> {out}")
        print(f"serial {bundle.certified.serial}, valid until {rfc3339(bundle.certified.not_after)}")
        if bundle.certified.hosts:
            print(f"serves as {', '.join(bundle.certified.hosts)}")
        print(f"point the daemon's config at it:  tls: {{bundle: {out}}}")
    return EXIT_OK


# ---------------------------------------------------------------- tokens


def cmd_token(args: argparse.Namespace) -> int:
    with TokenStore(_token_db(args)) as tokens:
        if args.revoke is not None:
            tokens.revoke(args.revoke)
            if args.json:
                print_json({"revoked": args.revoke})
            else:
                print(f"token {args.revoke} revoked")
            return EXIT_OK
        ttl = parse_duration(args.ttl)
        token = tokens.create(role=args.role, ttl_s=ttl.total_seconds(), max_uses=args.uses, description=args.description)
    expires = rfc3339(time.time() + ttl.total_seconds())
    if args.json:
        print_json({"token": token, "id": token.split(".")[0], "role": args.role, "uses": args.uses, "expires_at": expires})
    else:
        print(token)
        print(f"(enrolls up to {args.uses} {args.role}(s) until {expires}; the secret is not shown again)")
    return EXIT_OK


# ---------------------------------------------------------------- revoke


def _revocation_target(ca: FleetCA, target: str) -> Identity:
    if "/" in target:
        return Identity.parse(target)
    roles = sorted({issued.certified.identity.role.value for issued in ca.issued() if issued.certified.identity.id == target})
    if not roles:
        raise NotFound(
            f"this CA issued nothing to id {target!r}; name it as role/id to revoke it anyway", reason="not_found"
        )
    if len(roles) > 1:
        raise InvalidInput(
            f"id {target!r} was issued as {' and '.join(roles)}; name one as role/id", reason="ambiguous_identity"
        )
    return Identity(Role(roles[0]), target)


def cmd_revoke(args: argparse.Namespace) -> int:
    with FleetCA.load(_ca_dir(args)) as ca:
        if args.serial:
            serial = ca.find(args.target).certified.serial
            revocations = ca.revoke(serials=[serial])
            what = f"serial {serial}"
        else:
            identity = _revocation_target(ca, args.target)
            revocations = ca.revoke(identities=[identity])
            what = str(identity)
        path = ca.directory / "revocations.json"
    if args.json:
        print_json({"revoked": what, "version": revocations.version, "file": str(path)})
    else:
        print(f"revoked {what}; revocation list version {revocations.version} ({path})")
    return EXIT_OK


# ---------------------------------------------------------------- list, show


def cmd_list(args: argparse.Namespace) -> int:
    now = time.time()
    if args.tokens:
        db = _token_db(args)
        if not db.exists():
            raise NotFound(f"no token store at {db}", reason="not_found")
        with TokenStore(db, readonly=True) as tokens:
            rows = [t.to_json(now) for t in tokens.list()]
        if args.json:
            print_json({"tokens": rows})
        else:
            for row in rows:
                row["expires"] = rfc3339(row["expires_at"])  # type: ignore[arg-type]
                row["used"] = f"{row['uses']}/{row['max_uses']}"
            print(render.table(rows, ["id", "role", "state", "used", "expires", "description"]))
        return EXIT_OK
    with FleetCA.load(_ca_dir(args)) as ca:
        revocations = ca.revocations()
        rows = []
        for issued in ca.issued():
            c = issued.certified
            state = "revoked" if revocations.is_revoked(c) else "expired" if now >= c.not_after else "valid"
            rows.append({**issued.to_json(), "state": state})
    if args.json:
        print_json({"certificates": rows, "revocation_version": revocations.version})
    else:
        for row in rows:
            row["not_after"] = rfc3339(row["not_after"])  # type: ignore[arg-type]
        print(render.table(rows, ["identity", "state", "how", "not_after", "serial"]))
    return EXIT_OK


def _ca_json(ca: FleetCA) -> dict[str, Any]:
    return {
        "fleet": ca.fleet,
        "directory": str(ca.directory),
        "fingerprint": ca.fingerprint,
        "not_after": ca.cert.not_valid_after_utc.timestamp(),
    }


def _show_ca(args: argparse.Namespace) -> int:
    with FleetCA.load(_ca_dir(args)) as ca:
        revocations = ca.revocations()
        summary = {**_ca_json(ca), "issued": len(ca.issued()), "revocations": revocations.to_json()}
    if args.json:
        print_json(summary)
    else:
        print(f"fleet {summary['fleet']}  CA {summary['directory']}")
        print(f"fingerprint (sha256) {summary['fingerprint']}, valid until {rfc3339(summary['not_after'])}")
        print(f"{summary['issued']} certificate(s) issued")
        print(
            f"revocation list version {revocations.version}: "
            + (", ".join(sorted(revocations.identities) + [f"serial {s}" for s in sorted(revocations.serials)]) or "nothing revoked")
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    if args.path is None:
        return _show_ca(args)
    path = args.path.expanduser()
    if path.is_dir():
        bundle = Bundle.load(path)
        certified, kind = bundle.certified, "bundle (ca, certificate, TLS key and manifest key belong together)"
    elif path.is_file():
        certified, kind = read_certificate(path.read_bytes()), "certificate"
    else:
        raise NotFound(f"no such file or directory: {path}", reason="file_not_found")
    summary: dict[str, Any] = {**certified.to_json(), "path": str(path), "kind": kind.split(" ")[0]}
    ca_dir = _ca_dir(args)
    if (ca_dir / "ca.pem").is_file():
        with FleetCA.load(ca_dir) as ca:
            summary["revoked"] = ca.revocations().is_revoked(certified)
    if args.json:
        print_json(summary)
    else:
        print(f"{path}: {kind}")
        print(f"identity {certified.identity} in fleet {certified.fleet}")
        print(f"serial {certified.serial}, valid {rfc3339(certified.not_before)} .. {rfc3339(certified.not_after)}")
        print(f"manifest key {certified.manifest_key}")
        if certified.hosts:
            print(f"hosts {', '.join(certified.hosts)}")
        if "revoked" in summary:
            print("REVOKED" if summary["revoked"] else "not revoked")
    return EXIT_OK
