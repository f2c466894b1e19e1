"""How the revocation list travels, piece by piece: the CA directory's file, the follower, the kept copy,
the wire answer; and the agent side's small parts (the renew address, dropping channels, config)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import grpc
import pytest

from agent.config import AgentConfig, EnrollSettings
from agent.enrollment import _resolve
from agent.session import Identity as JoinIdentity
from agent.session import Session
from coordinator.config import CoordinatorConfig
from proto.errors import ConfigError, Unavailable
from proto.retry import RetryPolicy
from storage.keys import KeyPair
from trust.ca import FleetCA
from trust.distribution import RevocationFile, RevocationFollower
from trust.identity import Identity, Role
from trust.messages import revocations_from_reply, revocations_reply
from trust.revocation import RevocationList
from trust.security import Security, TlsSettings


def _replace(path: Path, data: bytes) -> None:
    """Write as `strata certs revoke` does: a new file renamed over the old one."""
    fd, temp = tempfile.mkstemp(dir=path.parent)
    os.write(fd, data)
    os.close(fd)
    os.replace(temp, path)


@pytest.fixture
def ca(tmp_path: Path) -> FleetCA:
    with FleetCA.init(tmp_path / "ca", "demo") as ca:
        yield ca


@pytest.fixture
def security(ca: FleetCA, tmp_path: Path) -> Security:
    ca.issue(Identity(Role.AGGREGATOR, "agg"), KeyPair.generate()).write(tmp_path / "bundle")
    return Security(str(tmp_path / "bundle"))


def test_the_revocation_file_follows_the_ca_directory_and_never_goes_back(ca: FleetCA, tmp_path: Path) -> None:
    path = ca.directory / "revocations.json"
    file = RevocationFile(path, ca.cert)
    assert file.version == 0
    ca.revoke(identities=[Identity(Role.AGENT, "a1")])
    assert file.version == 1 and file.current().is_revoked(Identity(Role.AGENT, "a1"))

    # a list signed by another CA of the same fleet name is not taken
    with FleetCA.init(tmp_path / "other", "demo") as other:
        forged = other.revocations().with_revoked(identities=["agent/a2"], now=0).with_revoked(identities=["agent/a3"], now=0)
        _replace(path, forged.signed(other.sign_bytes).to_bytes())
    assert file.version == 1 and not file.current().is_revoked(Identity(Role.AGENT, "a2"))

    # an older list, even signed by the CA, does not un-revoke anyone
    _replace(path, RevocationList.empty("demo").signed(ca.sign_bytes).to_bytes())
    assert file.version == 1
    ca._save_revocations(ca.revocations().with_revoked(identities=["agent/a4"], now=0).signed(ca.sign_bytes))
    assert file.version == 1  # version 1 again (the file went back to 0 before): not newer, not taken
    ca.revoke(identities=[Identity(Role.AGENT, "a5")])
    assert file.version == 2 and file.current().is_revoked(Identity(Role.AGENT, "a5"))


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_follower_fetches_only_newer_lists_and_retries_after_a_failure(ca: FleetCA, security: Security) -> None:
    clock = _Clock()
    asked: list[int] = []
    failing = [True]

    def fetch(known: int) -> RevocationList | None:
        asked.append(known)
        if failing[0]:
            raise Unavailable("upstream away")
        return revocations_from_reply(revocations_reply(ca.revocations(), known))

    follower = RevocationFollower(security, fetch, upstream="coord", retry_s=1.0, clock=clock)
    assert not follower.announced(0) and asked == []  # nothing newer than nothing
    ca.revoke(identities=[Identity(Role.AGENT, "a1")])
    assert not follower.announced(1) and asked == [0]
    assert not follower.announced(1) and asked == [0]  # within retry_s of the failure: not asked again
    clock.now += 1.5
    failing[0] = False
    assert follower.announced(1) and security.revocations_version == 1
    assert not follower.announced(1) and asked == [0, 0]  # already held

    # a list the CA did not sign is fetched and refused; the one in force stays
    with FleetCA.init(ca.directory.parent / "other", "demo") as other:
        forged = other.revocations().with_revoked(identities=["agent/x"], now=0)
        forged = forged.with_revoked(identities=["agent/y"], now=0).signed(other.sign_bytes)
    bad = RevocationFollower(security, lambda known: forged, upstream="evil", clock=clock)
    assert not bad.announced(2) and security.revocations_version == 1


def test_the_enforced_list_is_kept_for_the_next_start(ca: FleetCA, security: Security, tmp_path: Path) -> None:
    kept = tmp_path / "state" / "revocations.json"
    security.keep_revocations(kept)
    assert not kept.exists()
    revocations = ca.revoke(identities=[Identity(Role.AGENT, "a1")])
    assert security.set_revocations(revocations) and kept.is_file()
    assert not security.set_revocations(revocations)  # the same version again: ignored

    restarted = Security(str(tmp_path / "bundle"))
    restarted.keep_revocations(kept)
    assert restarted.revocations_version == 1 and restarted.revocations.is_revoked(Identity(Role.AGENT, "a1"))

    kept.write_bytes(kept.read_bytes().replace(b"agent/a1", b"agent/a9"))  # tampered: the signature breaks
    tampered = Security(str(tmp_path / "bundle"))
    tampered.keep_revocations(kept)
    assert tampered.revocations is None


def test_get_revocations_answers_the_list_only_when_it_is_newer(ca: FleetCA) -> None:
    assert revocations_reply(None, 0).version == 0 and not revocations_reply(None, 0).revocations
    revocations = ca.revoke(identities=[Identity(Role.AGENT, "a1")])
    assert revocations_from_reply(revocations_reply(revocations, 0)) == revocations
    same = revocations_reply(revocations, 1)
    assert same.version == 1 and revocations_from_reply(same) is None


def test_the_renew_address_names_a_host_the_agent_can_reach() -> None:
    assert _resolve("0.0.0.0:7000", "coord.example:7443") == "coord.example:7000"
    assert _resolve("[::]:7000", "coord.example:7443") == "coord.example:7000"
    assert _resolve("10.0.0.5:7000", "coord.example:7443") == "10.0.0.5:7000"
    assert _resolve("", "coord.example:7443") == ""


class _Tracked:
    """A real (never connected) channel that remembers whether it was closed."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self.closed = False

    def __getattr__(self, name: str) -> object:
        return getattr(self._channel, name)

    def close(self) -> None:
        self.closed = True
        self._channel.close()


def test_dropped_channels_are_dialled_anew_and_closed_one_drop_later() -> None:
    made: list[_Tracked] = []

    def factory(address: str) -> _Tracked:
        made.append(_Tracked(address))
        return made[-1]

    session = Session(
        ["127.0.0.1:1"],
        JoinIdentity(agent_id="a1", federation="digits", capability=1),
        channel_factory=factory,
        retry=RetryPolicy(),
        rpc_timeout_s=1.0,
        join_timeout_s=1.0,
    )
    first = session.channel("127.0.0.1:1")
    assert session.channel("127.0.0.1:1") is first
    session.drop_channels()
    second = session.channel("127.0.0.1:1")
    assert second is not first and not first.closed  # calls in flight on the first may finish
    session.drop_channels()
    assert first.closed and not second.closed
    session.close()
    assert all(channel.closed for channel in made)


def test_enrollment_config_is_checked_on_creation() -> None:
    token = "abcdef.0123456789abcdef"
    with pytest.raises(ConfigError, match="enroll.coordinator"):
        EnrollSettings(token=token, ca="ca.pem")
    with pytest.raises(ConfigError, match="host:port"):
        EnrollSettings(coordinator="nowhere")
    enroll = EnrollSettings(token=token, ca="ca.pem", coordinator="127.0.0.1:7001")
    with pytest.raises(ConfigError, match="tls.bundle"):
        AgentConfig(enroll=enroll)
    AgentConfig(enroll=enroll, tls=TlsSettings(bundle="bundle"))
    with pytest.raises(ConfigError, match="ca_dir"):
        CoordinatorConfig(enroll_listen="127.0.0.1:7001", tls=TlsSettings(bundle="b"))
    with pytest.raises(ConfigError, match="tls.bundle"):
        CoordinatorConfig(enroll_listen="127.0.0.1:7001", ca_dir="ca")
    with pytest.raises(ConfigError, match="enroll_validity_s"):
        CoordinatorConfig(enroll_validity_s=0)
    CoordinatorConfig(enroll_listen="127.0.0.1:7001", ca_dir="ca", tls=TlsSettings(bundle="b"))


def test_the_bootstrap_token_can_come_from_a_file(tmp_path: Path) -> None:
    # what the compose fleet's init service leaves for every agent replica
    token_file = tmp_path / "agent.token"
    settings = EnrollSettings(coordinator="coordinator:7001", ca=str(tmp_path / "ca.pem"), token_file=str(token_file))
    assert settings.has_token
    token_file.write_text("abcd.0123456789abcdef\n")
    assert settings.bootstrap_token() == "abcd.0123456789abcdef"
    token_file.unlink()
    with pytest.raises(ConfigError):
        settings.bootstrap_token()
    with pytest.raises(ConfigError):
        EnrollSettings(coordinator="c:1", ca="ca.pem", token="t", token_file=str(token_file))
    with pytest.raises(ConfigError):
        EnrollSettings(token_file=str(token_file))  # no enrollment port, no CA
    with pytest.raises(ConfigError):
        AgentConfig(enroll=settings)  # nowhere to write the bundle
