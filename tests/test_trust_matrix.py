"""Every RPC × every kind of caller, against real daemons under real mutual TLS on 127.0.0.1.

The RPCs come from the descriptors (strata.proto and grpc.health.v1), per daemon by the
services it serves, so a new RPC joins the matrix by existing; the role table
(`trust.roles.ROLE_TABLE`) says who is right for each, and every method in it must be
served by some daemon here. The callers (columns):

| column | who | expected on the mutual-TLS ports |
| --- | --- | --- |
| no certificate | TLS, trusts the fleet CA, presents nothing | UNAVAILABLE: the handshake fails |
| foreign CA | a certificate of a same-named fleet's other CA | UNAVAILABLE: the handshake fails |
| expired | issued by the fleet CA, expired a day ago | UNAVAILABLE: the handshake fails |
| revoked | a right role, on the CA's revocation list | PERMISSION_DENIED ``revoked`` |
| wrong role | each role the table does not list | PERMISSION_DENIED ``role_not_allowed`` |
| spoofed id | a right role, another id in an own-id field | PERMISSION_DENIED ``not_own_id`` |
| right role | each role the table lists | anything but UNAUTHENTICATED, PERMISSION_DENIED, UNAVAILABLE, UNKNOWN, INTERNAL |

Why UNAVAILABLE and not UNAUTHENTICATED for the first three: the mutual-TLS ports require
and verify a client certificate during the handshake (BoringSSL checks the chain and the
validity period), so these callers never open an HTTP/2 stream and no handler or
interceptor runs; gRPC reports a failed handshake as UNAVAILABLE. That the refusal is the
handshake's, not a dead server's, is checked by the right-role calls to the same port
passing in the same run. The interceptor's UNAUTHENTICATED ``no_certificate`` is what a
caller without a certificate gets where the handshake lets it in: the coordinator's
enrollment port (server-side TLS only), whose every method except Enroll is a wrong cell
here. (The interceptor's own checks of foreign and expired certificates, behind the
handshake, are tests/test_trust_grpc.py's.)

Public methods (health probes, Enroll) are right for every caller that completes the
handshake, revoked ones included: they need no identity. Right cells send the minimal
request with every own-id field set to the caller's id, so their answer is often a domain
refusal (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION ``wrong_port`` for Enroll on the
main port): that is past authorization, which is all a right cell claims.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2

from aggregator.config import AggregatorConfig, RoundSettings, SynthesisSettings
from aggregator.daemon import AggregatorDaemon
from coordinator.config import CoordinatorConfig
from coordinator.daemon import CoordinatorDaemon
from intake.config import ServingSettings
from proto import strata_pb2 as pb
from proto.wire import REASON_METADATA_KEY, create_channel
from relay.config import RelayConfig, WindowSettings
from relay.daemon import RelayDaemon
from storage.keys import KeyPair
from strata.wiring import initial_model_factory
from tests.agent_service_contract import wait_until
from tests.fuzz import AGGREGATOR_SERVICES, COORDINATOR_SERVICES, RELAY_SERVICES
from tests.fuzz.messages import message_class
from trust.bundle import Bundle
from trust.ca import FleetCA
from trust.identity import Identity, Role
from trust.roles import ANYONE, OWN_ID_FIELDS, ROLE_TABLE
from trust.security import TlsSettings

FLEET = "matrixfleet"
CALL_S = 5.0
# a server stream that sends nothing for this long was admitted (refusals end a stream at once)
STREAM_FIRST_MESSAGE_S = 1.5
SERVING_ROLES = (Role.AGGREGATOR, Role.COORDINATOR, Role.RELAY)


NEVER_FOR_A_RIGHT_CELL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)


def served_methods(services: tuple[str, ...]) -> list[MethodDescriptor]:
    """Every method of `services`, from strata.proto's and grpc.health.v1's descriptors."""
    out = []
    for file in (pb.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            if service.full_name in services:
                out.extend(service.methods)
    return out


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# ------------------------------------------------------------------ the fleet


@dataclass(frozen=True)
class Caller:
    """One column's client: how it dials (credentials) and who it claims to be in messages."""

    column: str
    credentials: grpc.ChannelCredentials
    id: str = "nobody"
    role: Role | None = None


@dataclass
class Matrix:
    targets: dict[str, str]  # daemon name -> address of its mutual-TLS port
    enroll_address: str
    ca_pem: bytes
    right: dict[Role, Caller]  # one valid, unrevoked caller per role
    revoked: dict[Role, Caller]
    strangers: list[Caller]  # no certificate, foreign CA, expired
    _channels: dict[tuple[str, str], grpc.Channel] = field(default_factory=dict)

    def channel(self, caller: Caller, address: str) -> grpc.Channel:
        key = (f"{caller.column}|{caller.role}|{caller.id}", address)
        if key not in self._channels:
            self._channels[key] = create_channel(address, credentials=caller.credentials)
        return self._channels[key]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()


def _credentials(bundle: Bundle, *, trust: bytes | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=trust or bundle.ca_pem, private_key=bundle.key_pem, certificate_chain=bundle.cert_pem
    )


def _issue(ca: FleetCA, role: Role, name: str, directory: Path, validity: timedelta | None = None) -> Bundle:
    hosts = ["localhost", "127.0.0.1"] if role in SERVING_ROLES else []
    return ca.issue(Identity(role, name), KeyPair.generate(), validity, hosts=hosts).write(directory / f"{role}-{name}")


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("matrix")
    ca = FleetCA.init(root / "ca", FLEET)
    bundles = root / "bundles"
    daemons: list[CoordinatorDaemon | AggregatorDaemon | RelayDaemon] = []
    matrix: Matrix | None = None
    try:
        right = {role: _issue(ca, role, f"{role}-ok", bundles) for role in Role}
        revoked = {role: _issue(ca, role, f"{role}-revoked", bundles) for role in Role}
        ca.revoke(identities=[b.identity for b in revoked.values()])
        # the same fleet name, another CA: its certificates name this fleet but chain to nothing it trusts
        with FleetCA.init(root / "other-ca", FLEET) as other:
            foreign = _issue(other, Role.OPERATOR, "operator-ok", root / "foreign")
        # issued two days ago for one day: it expired yesterday
        real_clock = ca.clock
        ca.clock = lambda: real_clock() - timedelta(days=2).total_seconds()
        try:
            expired = _issue(ca, Role.OPERATOR, "operator-expired", bundles, validity=timedelta(days=1))
        finally:
            ca.clock = real_clock

        coordinator = CoordinatorDaemon(
            CoordinatorConfig(
                listen="127.0.0.1:0",
                state_dir=str(root / "coord"),
                tls=TlsSettings(bundle=str(_issue(ca, Role.COORDINATOR, "coord", bundles).directory)),
                ca_dir=str(ca.directory),
                enroll_listen="127.0.0.1:0",
            )
        ).start()
        daemons.append(coordinator)
        config = AggregatorConfig(
            id="agg-a",
            listen="127.0.0.1:0",
            coordinator=coordinator.address,
            state_dir=str(root / "agg"),
            store=str(root / "store"),
            round=RoundSettings(quorum=1.0, min_updates=2, deadline_s=600.0),
            synthesis=SynthesisSettings(enabled=False),
            serving=ServingSettings(heartbeat_interval_s=0.5),
            tls=TlsSettings(bundle=str(_issue(ca, Role.AGGREGATOR, "agg-a", bundles).directory)),
        )
        aggregator = AggregatorDaemon(config, initial_model_factory=initial_model_factory(config)).start()
        daemons.append(aggregator)
        relay = RelayDaemon(
            RelayConfig(
                id="relay-1",
                seeds=[aggregator.address],
                listen="127.0.0.1:0",
                state_dir=str(root / "relay"),
                window=WindowSettings(max_devices=1, max_wait_s=600.0),
                tls=TlsSettings(bundle=str(_issue(ca, Role.RELAY, "relay-1", bundles).directory)),
            )
        ).start()
        daemons.append(relay)
        wait_until(lambda: relay.relay.has_base, 30, "the relay to adopt the aggregator's base")
        for name, daemon in (("coordinator", coordinator), ("aggregator", aggregator), ("relay", relay)):
            wait_until(lambda d=daemon: d.security.revocations_version >= 1, 30, f"the {name} to enforce the list")

        stranger_trust = ca.cert_pem
        matrix = Matrix(
            targets={"coordinator": coordinator.address, "aggregator": aggregator.address, "relay": relay.address},
            enroll_address=coordinator.enroll_address,
            ca_pem=ca.cert_pem,
            right={role: Caller("right role", _credentials(b), b.identity.id, role) for role, b in right.items()},
            revoked={role: Caller("revoked", _credentials(b), b.identity.id, role) for role, b in revoked.items()},
            strangers=[
                Caller("no certificate", grpc.ssl_channel_credentials(root_certificates=stranger_trust)),
                # it trusts the real fleet CA, so only the server's judgement of its certificate can fail
                Caller("foreign CA", _credentials(foreign, trust=stranger_trust), foreign.identity.id, Role.OPERATOR),
                Caller("expired", _credentials(expired), expired.identity.id, Role.OPERATOR),
            ],
        )
        yield matrix
    finally:
        if matrix is not None:
            matrix.close()
        for daemon in reversed(daemons):
            daemon.stop(grace=0)
        ca.close()


# ------------------------------------------------------------------ one call


def _set(message: Message, path: str, value: str) -> None:
    *parents, leaf = path.split(".")
    for part in parents:
        message = getattr(message, part)
    setattr(message, leaf, value)


def request_for(path: str, method: MethodDescriptor, own_id: str, spoof: str | None = None) -> bytes:
    """The minimal request: every own-id field the caller's id (`spoof`: that one field someone else's)."""
    message = message_class(method.input_type)()
    for field_path in OWN_ID_FIELDS.get(path, ()):
        _set(message, field_path, own_id)
    if spoof is not None:
        _set(message, spoof, "someone-else")
    return message.SerializeToString()


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    reason: str
    details: str


def call(channel: grpc.Channel, method: MethodDescriptor, request: bytes) -> Outcome:
    """One raw-bytes call; a server stream is read to its first message (an open stream counts as OK)."""
    path = path_of(method)
    try:
        if method.client_streaming and method.server_streaming:
            stream = channel.stream_stream(path)(iter([request]), timeout=STREAM_FIRST_MESSAGE_S)
            next(stream, None)
            stream.cancel()
        elif method.client_streaming:
            channel.stream_unary(path)(iter([request]), timeout=CALL_S)
        elif method.server_streaming:
            stream = channel.unary_stream(path)(request, timeout=STREAM_FIRST_MESSAGE_S)
            next(stream, None)
            stream.cancel()
        else:
            channel.unary_unary(path)(request, timeout=CALL_S)
    except grpc.RpcError as e:
        code = e.code()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and method.server_streaming:
            return Outcome(grpc.StatusCode.OK, "", "stream open")  # admitted, waiting for something to send
        if code == grpc.StatusCode.CANCELLED and method.server_streaming:
            return Outcome(grpc.StatusCode.OK, "", "stream cancelled by us after its first message")
        reason = str(dict(e.trailing_metadata() or ()).get(REASON_METADATA_KEY, ""))
        return Outcome(code, reason, e.details() or "")
    return Outcome(grpc.StatusCode.OK, "", "")


# ------------------------------------------------------------------ the matrix


@dataclass(frozen=True)
class Cell:
    target: str
    method: str
    column: str
    caller: str
    wrong: bool
    expected: str
    got: str
    passed: bool


def _expect_refusal(code: grpc.StatusCode, reason: str | None = None):  # noqa: ANN202 - a small closure
    def check(outcome: Outcome) -> bool:
        return outcome.code == code and (reason is None or outcome.reason == reason)

    return check, f"{code.name} {reason or ''}".strip()


def _right(outcome: Outcome) -> bool:
    return outcome.code not in NEVER_FOR_A_RIGHT_CELL


def run_matrix(matrix: Matrix) -> list[Cell]:
    cells: list[Cell] = []

    def record(target: str, method: MethodDescriptor, caller: Caller, wrong: bool, check, expected: str, request: bytes, address: str) -> None:  # noqa: ANN001
        outcome = call(matrix.channel(caller, address), method, request)
        cells.append(
            Cell(
                target=target,
                method=path_of(method),
                column=caller.column,
                caller=f"{caller.role}/{caller.id}" if caller.role else caller.id,
                wrong=wrong,
                expected=expected,
                got=f"{outcome.code.name} {outcome.reason}".strip() + (f" ({outcome.details[:80]})" if outcome.details else ""),
                passed=check(outcome),
            )
        )

    handshake_refused = _expect_refusal(grpc.StatusCode.UNAVAILABLE)
    for target, services in (
        ("coordinator", COORDINATOR_SERVICES),
        ("aggregator", AGGREGATOR_SERVICES),
        ("relay", RELAY_SERVICES),
    ):
        address = matrix.targets[target]
        for method in served_methods(services):
            path = path_of(method)
            entry = ROLE_TABLE[path]
            allowed = set(Role) if entry is ANYONE else set(entry)
            for stranger in matrix.strangers:
                record(target, method, stranger, True, *handshake_refused, request_for(path, method, stranger.id), address)
            for role in sorted(Role):
                right = matrix.right[role]
                request = request_for(path, method, right.id)
                if role in allowed:
                    record(target, method, right, False, _right, "past authorization", request, address)
                    for spoof in OWN_ID_FIELDS.get(path, ()):
                        spoofer = Caller(f"spoofed id ({spoof})", right.credentials, right.id, role)
                        check = _expect_refusal(grpc.StatusCode.PERMISSION_DENIED, "not_own_id")
                        record(target, method, spoofer, True, *check, request_for(path, method, right.id, spoof), address)
                    revoked = matrix.revoked[role]
                    revoked_request = request_for(path, method, revoked.id)
                    if entry is ANYONE:
                        record(target, method, revoked, False, _right, "past authorization (public)", revoked_request, address)
                    else:
                        check = _expect_refusal(grpc.StatusCode.PERMISSION_DENIED, "revoked")
                        record(target, method, revoked, True, *check, revoked_request, address)
                else:
                    wrong_role = Caller("wrong role", right.credentials, right.id, role)
                    check = _expect_refusal(grpc.StatusCode.PERMISSION_DENIED, "role_not_allowed")
                    record(target, method, wrong_role, True, *check, request, address)

    # the enrollment port asks for no certificate: every caller there is anonymous
    anonymous = Caller("no certificate (enrollment port)", grpc.ssl_channel_credentials(root_certificates=matrix.ca_pem))
    for method in served_methods(("strata.v1.CoordinatorService",)):
        path = path_of(method)
        request = request_for(path, method, anonymous.id)
        if ROLE_TABLE[path] is ANYONE:
            record("coordinator-enroll", method, anonymous, False, _right, "past authorization (public)", request, matrix.enroll_address)
        else:
            check = _expect_refusal(grpc.StatusCode.UNAUTHENTICATED, "no_certificate")
            record("coordinator-enroll", method, anonymous, True, *check, request, matrix.enroll_address)
    return cells


def test_every_rpc_refuses_every_wrong_caller_and_admits_every_right_one(matrix: Matrix) -> None:
    # a new service in strata.proto must be given a daemon here; a new RPC in a served one joins by itself
    daemons_serve = {*COORDINATOR_SERVICES, *AGGREGATOR_SERVICES, *RELAY_SERVICES}
    assert set(pb.DESCRIPTOR.services_by_name[name].full_name for name in pb.DESCRIPTOR.services_by_name) <= daemons_serve
    served = {path_of(m) for m in served_methods(tuple(daemons_serve))}
    assert set(ROLE_TABLE) <= served, f"methods in the role table that no daemon here serves: {set(ROLE_TABLE) - served}"

    started = time.monotonic()
    cells = run_matrix(matrix)
    elapsed = time.monotonic() - started

    wrong = [c for c in cells if c.wrong]
    right = [c for c in cells if not c.wrong]
    refused = sum(c.passed for c in wrong)
    admitted = sum(c.passed for c in right)
    by_column = Counter(c.column.split(" (")[0] for c in cells)
    print(
        f"\ntrust matrix: {len(cells)} cells over {len({(c.target, c.method) for c in cells})} (daemon, RPC) pairs "
        f"in {elapsed:.1f}s; wrong cells refused {refused}/{len(wrong)} ({100 * refused / len(wrong):.1f}%), "
        f"right cells admitted {admitted}/{len(right)}; cells per column {dict(sorted(by_column.items()))}"
    )
    failures = [c for c in cells if not c.passed]
    assert not failures, "\n".join(
        f"{c.target} {c.method} [{c.column}] {c.caller}: expected {c.expected}, got {c.got}" for c in failures
    )
    # every column has cells: a column that silently produced none would prove nothing
    assert {"no certificate", "foreign CA", "expired", "revoked", "wrong role", "spoofed id", "right role"} <= set(by_column)
    assert refused == len(wrong)
