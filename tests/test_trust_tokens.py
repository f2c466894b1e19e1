"""Bootstrap tokens: format, listing without secrets, redeeming (uses, expiry, bad secret, revoked), durability."""

from __future__ import annotations

import re
import sqlite3
import threading

import pytest

from proto.errors import InvalidInput, NotFound
from trust.identity import Role
from trust.tokens import TokenReason, TokenRefused, TokenStore


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def tokens(tmp_path, clock: Clock) -> TokenStore:
    with TokenStore(tmp_path / "tokens.db", clock=clock) as store:
        yield store


def _refusal(tokens: TokenStore, token: str) -> TokenRefused:
    with pytest.raises(TokenRefused) as info:
        tokens.redeem(token)
    assert info.value.status == "UNAUTHENTICATED"
    assert info.value.reason == f"token_{info.value.why.value}"
    return info.value


def test_a_token_is_id_dot_secret_and_buys_the_agent_role(tokens: TokenStore) -> None:
    token = tokens.create(role="agent", ttl_s=3600, max_uses=2)
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", token)
    grant = tokens.redeem(token)
    assert grant.role is Role.AGENT and grant.token_id == token.split(".")[0]


def test_only_agent_tokens(tokens: TokenStore) -> None:
    for role in ("aggregator", "operator", "audit", "relay", "coordinator"):
        with pytest.raises(InvalidInput):
            tokens.create(role=role, ttl_s=60)
    with pytest.raises(InvalidInput):
        tokens.create(ttl_s=0)
    with pytest.raises(InvalidInput):
        tokens.create(ttl_s=60, max_uses=0)


def test_the_secret_is_stored_only_as_a_hash_and_never_listed(tmp_path, tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=60, description="batch 7")
    token_id, secret = token.split(".")
    [info] = tokens.list()
    assert info.id == token_id and info.description == "batch 7" and info.uses == 0
    assert secret not in repr(info) and secret not in repr(info.to_json(0))
    raw = sqlite3.connect(tmp_path / "tokens.db").execute("SELECT * FROM tokens").fetchall()
    assert secret not in repr(raw)


def test_uses_are_counted_and_capped(tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=60, max_uses=3)
    for _ in range(3):
        tokens.redeem(token)
    assert _refusal(tokens, token).why is TokenReason.USED_UP
    assert tokens.list()[0].uses == 3


def test_expiry(tokens: TokenStore, clock: Clock) -> None:
    token = tokens.create(ttl_s=60, max_uses=10)
    clock.now += 59
    tokens.redeem(token)
    clock.now += 1
    assert _refusal(tokens, token).why is TokenReason.EXPIRED
    assert tokens.list()[0].state(clock.now) == "expired"


def test_a_bad_secret_is_refused_and_spends_nothing(tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=60, max_uses=1)
    token_id = token.split(".")[0]
    wrong = f"{token_id}.{'0' * 16}" if not token.endswith("0" * 16) else f"{token_id}.{'1' * 16}"
    refusal = _refusal(tokens, wrong)
    assert refusal.why is TokenReason.BAD_SECRET and refusal.token_id == token_id
    assert tokens.list()[0].uses == 0
    tokens.redeem(token)  # the real one still works


def test_a_bad_secret_is_reported_before_anything_else_about_the_token(tokens: TokenStore, clock: Clock) -> None:
    """A guesser learns "wrong secret" of an expired, used-up or revoked token, nothing more."""
    token = tokens.create(ttl_s=60, max_uses=1)
    tokens.redeem(token)
    tokens.revoke(token.split(".")[0])
    clock.now += 120
    assert _refusal(tokens, token.split(".")[0] + ".abcdefghijklmnop").why is TokenReason.BAD_SECRET


def test_unknown_malformed_and_revoked(tokens: TokenStore) -> None:
    assert _refusal(tokens, "abcdef.0123456789abcdef").why is TokenReason.UNKNOWN
    for bad in ("", "abcdef", "ABCDEF.0123456789ABCDEF", "abcdef.0123456789abcde", "abc.def", None):
        assert _refusal(tokens, bad).why is TokenReason.MALFORMED
    token = tokens.create(ttl_s=60, max_uses=5)
    tokens.revoke(token.split(".")[0])
    tokens.revoke(token.split(".")[0])  # idempotent
    assert _refusal(tokens, token).why is TokenReason.REVOKED
    with pytest.raises(NotFound):
        tokens.revoke("nosuch")


def test_concurrent_redeems_never_overspend(tokens: TokenStore) -> None:
    token = tokens.create(ttl_s=60, max_uses=5)
    grants, refusals = [], []

    def redeem() -> None:
        try:
            grants.append(tokens.redeem(token))
        except TokenRefused as e:
            refusals.append(e.why)

    threads = [threading.Thread(target=redeem) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(grants) == 5 and refusals == [TokenReason.USED_UP] * 15


def test_tokens_survive_a_reopen(tmp_path, clock: Clock) -> None:
    with TokenStore(tmp_path / "t.db", clock=clock) as store:
        token = store.create(ttl_s=60, max_uses=2)
        store.redeem(token)
    with TokenStore(tmp_path / "t.db", clock=clock) as store:
        store.redeem(token)
        assert _refusal(store, token).why is TokenReason.USED_UP
