"""Enrollment: a token and a CSR become a short-lived certificate; one identity, one key; renewal."""

from __future__ import annotations

import pytest

from proto.errors import Conflict, InvalidInput
from storage.keys import KeyPair
from trust.ca import FleetCA, new_tls_key
from trust.enroll import Enrollment, bundle_from_enrollment, enrollment_request
from trust.errors import PermissionDenied
from trust.identity import Identity, Role
from trust.tokens import TokenReason, TokenRefused, TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_900_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def ca(tmp_path, clock: Clock) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "demo", clock=clock) as ca:
        yield ca


@pytest.fixture
def tokens(clock: Clock) -> TokenStore:
    with TokenStore(None, clock=clock) as store:
        yield store


def _request(token: str, agent_id: str = "agent-1", manifest_key: KeyPair | None = None):
    tls_key, manifest_key = new_tls_key(), manifest_key or KeyPair.generate()
    return enrollment_request(token=token, requested_id=agent_id, tls_key=tls_key, manifest_key=manifest_key), tls_key, manifest_key


def test_a_device_enrolls_with_a_token(ca: FleetCA, tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=3600, max_uses=10)
    request, tls_key, manifest_key = _request(token)
    enrolled = Enrollment(ca, tokens).enroll(request)
    assert enrolled.identity == Identity(Role.AGENT, "agent-1")
    bundle = bundle_from_enrollment(enrolled, tls_key, manifest_key)
    assert bundle.identity == enrolled.identity and bundle.certified.manifest_key == manifest_key.public_key
    assert bundle.certified.not_after - ca.clock() == pytest.approx(86400, abs=1)
    assert tokens.list()[0].uses == 1


def test_a_bad_csr_or_proof_spends_no_token_use(ca: FleetCA, tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=3600, max_uses=1)
    request, _, _ = _request(token)
    forged = type(request)(**{**request.__dict__, "manifest_key": KeyPair.generate().public_key})
    with pytest.raises(InvalidInput):
        Enrollment(ca, tokens).enroll(forged)
    assert tokens.list()[0].uses == 0


def test_a_bad_token_is_refused(ca: FleetCA, tokens: TokenStore) -> None:
    request, _, _ = _request("abcdef.0123456789abcdef")
    with pytest.raises(TokenRefused) as info:
        Enrollment(ca, tokens).enroll(request)
    assert info.value.why is TokenReason.UNKNOWN
    assert ca.issued() == []


def test_one_identity_one_key(ca: FleetCA, tokens: TokenStore, clock: Clock) -> None:
    token = tokens.create(ttl_s=10 * 86400, max_uses=10)
    enrollment = Enrollment(ca, tokens)
    first, _, key = _request(token)
    enrollment.enroll(first)
    # the same device (same manifest key) may enroll again, e.g. after losing its certificate
    again, _, _ = _request(token, manifest_key=key)
    enrollment.enroll(again)
    # another key may not take the identity while a certificate for it is valid
    impostor, _, _ = _request(token)
    with pytest.raises(Conflict) as info:
        enrollment.enroll(impostor)
    assert info.value.reason == "identity_taken"
    # once those certificates expire, the id is free again
    clock.now += 2 * 86400
    later, _, _ = _request(token)
    enrollment.enroll(later)


def test_a_revoked_identity_cannot_enroll(ca: FleetCA, tokens: TokenStore) -> None:
    ca.revoke(identities=[Identity(Role.AGENT, "agent-1")])
    request, _, _ = _request(tokens.create(ttl_s=60))
    with pytest.raises(PermissionDenied) as info:
        Enrollment(ca, tokens).enroll(request)
    assert info.value.reason == "revoked"


def test_renewal_keeps_identity_and_manifest_key(ca: FleetCA, tokens: TokenStore, clock: Clock) -> None:
    enrollment = Enrollment(ca, tokens)
    request, tls_key, key = _request(tokens.create(ttl_s=60))
    current = bundle_from_enrollment(enrollment.enroll(request), tls_key, key).certified
    clock.now += 3600
    renewal, new_tls, _ = _request("", agent_id="ignored", manifest_key=key)
    renewed = enrollment.renew(current, renewal)
    assert renewed.identity == current.identity
    assert bundle_from_enrollment(renewed, new_tls, key).certified.not_after > current.not_after
    switch, _, _ = _request("", manifest_key=KeyPair.generate())
    with pytest.raises(PermissionDenied) as info:
        enrollment.renew(current, switch)
    assert info.value.reason == "manifest_key_changed"
