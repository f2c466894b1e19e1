"""`strata certs`, in process: init, issue and renew, tokens, revoke, list, show; exit codes and JSON."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from strata.cli import main
from strata.cli_common import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from trust.bundle import Bundle
from trust.identity import Identity, Role
from trust.tokens import TokenStore


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("STRATA_CA", raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def run_json(capsys, *argv: str) -> dict:
    code, out, err = run(capsys, *argv, "--json")
    assert code == EXIT_OK, err
    return json.loads(out)


def test_init_uses_strata_home_and_refuses_a_second_ca(home: Path, capsys) -> None:
    summary = run_json(capsys, "certs", "init", "--fleet", "demo")
    assert summary["fleet"] == "demo" and Path(summary["directory"]) == home / ".strata" / "ca"
    code, _, err = run(capsys, "certs", "init", "--fleet", "demo")
    assert code == EXIT_USAGE
    assert err.count("\n") == 1 and "[ca_exists]" in err


def test_strata_ca_env_and_dir_option(home: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("STRATA_CA", str(home / "env-ca"))
    assert Path(run_json(capsys, "certs", "init", "--fleet", "demo")["directory"]) == home / "env-ca"
    assert Path(run_json(capsys, "certs", "init", "--fleet", "demo", "--dir", str(home / "flag-ca"))["directory"]) == home / "flag-ca"


def test_issue_and_renew_a_daemon_bundle(home: Path, capsys) -> None:
    run_json(capsys, "certs", "init", "--fleet", "demo")
    first = run_json(capsys, "certs", "issue", "--role", "aggregator", "--id", "a1")
    assert first["bundle"] == "aggregator-a1" and not first["renewed"]
    assert first["hosts"] == ["localhost", "127.0.0.1"]  # serving roles default to local names
    bundle = Bundle.load(home / "aggregator-a1")
    assert bundle.identity == Identity(Role.AGGREGATOR, "a1")
    renewed = run_json(capsys, "certs", "issue", "--role", "aggregator", "--id", "a1", "--validity", "2d", "--san", "agg-a", "10.0.0.5")
    assert renewed["renewed"] and renewed["serial"] != first["serial"]
    assert renewed["manifest_key"] == first["manifest_key"]  # one identity, one key, across renewals
    assert renewed["hosts"] == ["agg-a", "10.0.0.5"]
    assert renewed["not_after"] - renewed["not_before"] == pytest.approx(2 * 86400 + 300, abs=2)


def test_issue_refusals(home: Path, capsys) -> None:
    run_json(capsys, "certs", "init", "--fleet", "demo")
    run_json(capsys, "certs", "issue", "--role", "relay", "--id", "r1", "--out", "b")
    code, _, err = run(capsys, "certs", "issue", "--role", "relay", "--id", "r2", "--out", "b")
    assert code == EXIT_USAGE and "[bundle_exists]" in err
    code, _, err = run(capsys, "certs", "issue", "--role", "operator", "--id", "ops", "--san", "host")
    assert code == EXIT_USAGE and "[bad_host]" in err
    code, _, err = run(capsys, "certs", "issue", "--role", "operator", "--id", "bad/id")
    assert code == EXIT_USAGE and "[bad_identity]" in err
    with pytest.raises(SystemExit):  # agents enroll with tokens
        main(["certs", "issue", "--role", "agent", "--id", "d1"])
    code, _, err = run(capsys, "certs", "issue", "--role", "operator", "--id", "ops", "--dir", str(home / "no-ca"))
    assert code == EXIT_NOT_FOUND and "[no_ca]" in err


def test_tokens_are_printed_once_and_listed_without_secrets(home: Path, capsys) -> None:
    run_json(capsys, "certs", "init", "--fleet", "demo")
    code, out, _ = run(capsys, "certs", "token", "--role", "agent", "--ttl", "24h", "--uses", "1000")
    assert code == EXIT_OK
    token = out.splitlines()[0]
    with TokenStore(home / ".strata" / "ca" / "tokens.db") as tokens:
        assert tokens.redeem(token).role is Role.AGENT
    listing = run_json(capsys, "certs", "list", "--tokens")
    [row] = listing["tokens"]
    assert row["id"] == token.split(".")[0] and row["uses"] == 1 and row["max_uses"] == 1000
    assert token.split(".")[1] not in json.dumps(listing)
    assert run_json(capsys, "certs", "token", "--revoke", row["id"]) == {"revoked": row["id"]}
    assert run_json(capsys, "certs", "list", "--tokens")["tokens"][0]["state"] == "revoked"


def test_revoke_list_and_show(home: Path, capsys) -> None:
    run_json(capsys, "certs", "init", "--fleet", "demo")
    a1 = run_json(capsys, "certs", "issue", "--role", "aggregator", "--id", "a1")
    ops = run_json(capsys, "certs", "issue", "--role", "operator", "--id", "ops")
    assert run_json(capsys, "certs", "revoke", "a1")["version"] == 1
    assert run_json(capsys, "certs", "revoke", "--serial", ops["serial"])["version"] == 2
    assert run_json(capsys, "certs", "revoke", "agent/never-seen")["version"] == 3
    code, _, err = run(capsys, "certs", "revoke", "nobody")
    assert code == EXIT_NOT_FOUND and "role/id" in err
    listing = run_json(capsys, "certs", "list")
    assert {row["identity"]: row["state"] for row in listing["certificates"]} == {"aggregator/a1": "revoked", "operator/ops": "revoked"}
    assert listing["revocation_version"] == 3
    shown = run_json(capsys, "certs", "show", "aggregator-a1")
    assert shown["identity"] == "aggregator/a1" and shown["revoked"] and shown["kind"] == "bundle"
    assert shown["serial"] == a1["serial"]
    assert run_json(capsys, "certs", "show", "operator-ops/cert.pem")["kind"] == "certificate"
    ca = run_json(capsys, "certs", "show")
    assert ca["issued"] == 2 and ca["revocations"]["identities"] == ["agent/never-seen", "aggregator/a1"]
    code, _, _ = run(capsys, "certs", "show", "missing")
    assert code == EXIT_NOT_FOUND
    code, out, _ = run(capsys, "certs", "list")
    assert code == EXIT_OK and "aggregator/a1" in out and "revoked" in out
