"""The role table covers every RPC Strata serves, and nothing it does not."""

from __future__ import annotations

import pytest
from grpc_health.v1 import health_pb2

from proto import strata_pb2
from trust.identity import Role
from trust.roles import (
    ANYONE,
    DEVICE_UPDATE_READERS,
    HEALTH_METHODS,
    OPERATOR_WRITES,
    OWN_ID_FIELDS,
    PENDING_METHODS,
    ROLE_TABLE,
    allowed,
    is_public,
)


def _served_methods() -> dict[str, object]:
    """Every method of every service in strata.proto and grpc.health.v1: full name -> method descriptor."""
    methods = {}
    for file in (strata_pb2.DESCRIPTOR, health_pb2.DESCRIPTOR):
        for service in file.services_by_name.values():
            for method in service.methods:
                methods[f"/{service.full_name}/{method.name}"] = method
    return methods


def test_every_rpc_has_a_role_table_entry() -> None:
    missing = sorted(set(_served_methods()) - set(ROLE_TABLE))
    assert not missing, f"RPCs without a role-table entry in trust/roles.py: {missing}"


def test_every_entry_names_a_served_rpc_or_a_pending_one() -> None:
    served = set(_served_methods())
    assert not (set(ROLE_TABLE) - served - PENDING_METHODS), "role-table entries for RPCs that do not exist"
    # once a pending RPC lands in strata.proto, its entry leaves PENDING_METHODS
    assert not (PENDING_METHODS & served), f"now in strata.proto, remove from PENDING_METHODS: {PENDING_METHODS & served}"


def who(name: str) -> set[str]:
    entry = ROLE_TABLE[name]
    return {"*"} if entry is ANYONE else {r.value for r in entry}


def test_the_table_is_as_designed() -> None:
    for rpc in ("Join", "SubmitUpdate", "WatchModels", "Heartbeat", "GetRevocations"):
        assert who(f"/strata.v1.AgentService/{rpc}") == {"agent", "relay"}
    # auditors read models by CID, device updates included (the handler decides which kinds)
    assert who("/strata.v1.AgentService/GetModel") == {"agent", "relay", "audit"}
    assert who("/strata.v1.PeerService/GetLatest") == who("/strata.v1.PeerService/Announce") == {"aggregator"}
    assert who("/strata.v1.PeerService/FetchBlob") == {"aggregator", "audit"}
    for rpc in ("RegisterAggregator", "HeartbeatAggregator", "WatchRing", "AnnounceModel", "ReportAgents"):
        assert who(f"/strata.v1.CoordinatorService/{rpc}") == {"aggregator"}
    assert who("/strata.v1.CoordinatorService/GetRing") == {"aggregator", "operator", "audit"}
    for rpc in ("ListModels", "GetLineage", "ListAgents", "FleetStatus"):
        assert who(f"/strata.v1.CoordinatorService/{rpc}") == {"operator", "audit"}
    assert who("/strata.v1.CoordinatorService/Enroll") == {"*"}
    assert who("/strata.v1.CoordinatorService/Renew") == {"agent"}
    assert who("/strata.v1.CoordinatorService/GetRevocations") == {"aggregator", "operator", "audit"}
    for name in HEALTH_METHODS:
        assert is_public(name)
    assert DEVICE_UPDATE_READERS == {Role.AUDIT}


def test_hub_rpcs_operators_write_and_readers_read() -> None:
    for name in OPERATOR_WRITES:
        assert who(name) == {"operator"}
    for rpc in ("ListFederations", "ListReleases", "ListProposals"):
        assert who(f"/strata.v1.CoordinatorService/{rpc}") == {"operator", "audit"}
    # aggregators read the federations they serve: the hub's round-policy and strategy defaults
    assert who("/strata.v1.CoordinatorService/GetFederation") == {"aggregator", "operator", "audit"}
    assert who("/strata.v1.CoordinatorService/ResolveModel") == {"aggregator", "operator", "audit", "agent", "relay"}


def test_audit_reads_everything_an_operator_reads() -> None:
    for name, entry in ROLE_TABLE.items():
        if entry is not ANYONE and Role.OPERATOR in entry and name not in OPERATOR_WRITES:
            assert Role.AUDIT in entry, name


def test_coordinator_and_agents_never_reach_the_coordinator_writes() -> None:
    for rpc in ("RegisterAggregator", "HeartbeatAggregator", "AnnounceModel", "ReportAgents"):
        for role in (Role.AGENT, Role.RELAY, Role.OPERATOR, Role.AUDIT, Role.COORDINATOR, None):
            assert not allowed(f"/strata.v1.CoordinatorService/{rpc}", role)


def test_unknown_methods_are_closed_to_everyone() -> None:
    for role in [*Role, None]:
        assert not allowed("/strata.v1.AgentService/DropTables", role)
    assert allowed("/grpc.health.v1.Health/Check", None)
    assert not allowed("/strata.v1.AgentService/Join", None)


@pytest.mark.parametrize("name", sorted(OWN_ID_FIELDS))
def test_own_id_fields_name_real_string_fields(name: str) -> None:
    method = _served_methods()[name]
    for path in OWN_ID_FIELDS[name]:
        message = method.input_type
        *parents, leaf = path.split(".")
        for part in parents:
            message = message.fields_by_name[part].message_type
        field = message.fields_by_name[leaf]
        assert field.type == field.TYPE_STRING, f"{name}: {path}"
