"""THE role table: which role may call which RPC, keyed by full gRPC method name. Nothing else decides access.

`trust.interceptor.TrustInterceptor` enforces it on every call; no handler checks
roles itself. A method absent from the table is refused to everyone (fail closed),
and tests/test_trust_roles.py walks strata.proto's descriptors so that adding an RPC
without an entry here fails the build.

Who calls what, and why:

- agent, relay: AgentService. A relay is one agent upstream (it joins, downloads and
  submits its combined update like a device); downstream it serves AgentService, and
  fetches the revocation list it enforces from its home (GetRevocations). GetModel
  serves them base, cluster and semi-global models, never a device update (kind local
  or relay), whatever CID they ask for.
- agent: the coordinator's Renew (a new certificate for its own identity, while the
  one it presents is valid).
- aggregator: PeerService (its peers' synthesis: GetLatest, Announce, FetchBlob),
  and the coordinator's membership and index writes (RegisterAggregator,
  HeartbeatAggregator, GetRing, WatchRing, AnnounceModel(s), ReportAgents), and the
  revocation list it enforces (GetRevocations).
- operator: the coordinator's reads (ListModels, GetLineage, ListAgents, FleetStatus,
  GetRing, GetRevocations).
- audit: everything an operator reads, plus the two RPCs that return stored models by
  CID, AgentService.GetModel (on aggregators and relays) and PeerService.FetchBlob
  (on aggregators); `DEVICE_UPDATE_READERS` is the handlers' answer to "may this
  caller read a device's update?" (`trust.reads`), and each such read is logged.
- operator, again: the hub's writes (CreateFederation, CreateRelease, CreateProposal,
  DecideProposal); operators and auditors read it (ListFederations, ListReleases,
  ListProposals, GetFederation, ResolveModel); aggregators resolve a release (an
  `initial_model` of NAME@^1.0) and read the federations they serve (GetFederation: the
  round-policy and strategy defaults they apply), and agents and relays resolve a release
  too (a device predicting with `--model NAME@^1.0`).
- coordinator: nothing; it serves (aggregators pull the revocation list from it).
- anyone, with or without a certificate: grpc.health.v1 (probes) and the
  coordinator's Enroll (a bootstrap token authenticates it; the coordinator serves it
  on its TLS-only enrollment port only, since token holders have no certificate).

`OWN_ID_FIELDS` names, per method, the request field that must be the caller's own
id ("an id in a message must be the caller's own"); the interceptor checks it
before the handler runs. For client-streaming methods the field is read from the
stream's first message (its header).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from trust.identity import Role

__all__ = [
    "ANYONE",
    "DEVICE_UPDATE_READERS",
    "HEALTH_METHODS",
    "OPERATOR_WRITES",
    "OWN_ID_FIELDS",
    "PENDING_METHODS",
    "ROLE_TABLE",
    "allowed",
    "is_public",
    "method",
]


class _Anyone:
    """The marker for methods open to every caller, authenticated or not."""

    def __repr__(self) -> str:
        return "ANYONE"


ANYONE: Final = _Anyone()

AGENT_SERVICE = "strata.v1.AgentService"
PEER_SERVICE = "strata.v1.PeerService"
COORDINATOR_SERVICE = "strata.v1.CoordinatorService"
HEALTH_SERVICE = "grpc.health.v1.Health"


def method(service: str, name: str) -> str:
    """The full gRPC method name, as the server sees it: "/strata.v1.AgentService/Join"."""
    return f"/{service}/{name}"


_DEVICES = frozenset({Role.AGENT, Role.RELAY})
_AGGREGATOR = frozenset({Role.AGGREGATOR})
_READERS = frozenset({Role.OPERATOR, Role.AUDIT})
_OPERATOR = frozenset({Role.OPERATOR})

DEVICE_UPDATE_READERS: frozenset[Role] = frozenset({Role.AUDIT})

# the only writes an operator makes: the hub's (auditors read everything operators read, and write nothing)
OPERATOR_WRITES = tuple(
    method(COORDINATOR_SERVICE, name) for name in ("CreateFederation", "CreateRelease", "CreateProposal", "DecideProposal")
)

HEALTH_METHODS = (method(HEALTH_SERVICE, "Check"), method(HEALTH_SERVICE, "Watch"), method(HEALTH_SERVICE, "List"))

ROLE_TABLE: Mapping[str, frozenset[Role] | _Anyone] = {
    # AgentService: devices, and relays as agents of their upstream
    method(AGENT_SERVICE, "Join"): _DEVICES,
    method(AGENT_SERVICE, "GetModel"): _DEVICES | DEVICE_UPDATE_READERS,
    method(AGENT_SERVICE, "SubmitUpdate"): _DEVICES,
    method(AGENT_SERVICE, "WatchModels"): _DEVICES,
    method(AGENT_SERVICE, "Heartbeat"): _DEVICES,
    method(AGENT_SERVICE, "GetRevocations"): _DEVICES,
    # PeerService: aggregators synthesizing; auditors fetching stored objects
    method(PEER_SERVICE, "GetLatest"): _AGGREGATOR,
    method(PEER_SERVICE, "Announce"): _AGGREGATOR,
    method(PEER_SERVICE, "FetchBlob"): _AGGREGATOR | DEVICE_UPDATE_READERS,
    # CoordinatorService: membership and index writes by aggregators ...
    method(COORDINATOR_SERVICE, "RegisterAggregator"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "HeartbeatAggregator"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "WatchRing"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "AnnounceModel"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "AnnounceModels"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "ReportAgents"): _AGGREGATOR,
    method(COORDINATOR_SERVICE, "GetRing"): _AGGREGATOR | _READERS,
    # ... reads by operators and auditors
    method(COORDINATOR_SERVICE, "ListModels"): _READERS,
    method(COORDINATOR_SERVICE, "GetLineage"): _READERS,
    method(COORDINATOR_SERVICE, "ListAgents"): _READERS,
    method(COORDINATOR_SERVICE, "FleetStatus"): _READERS,
    method(COORDINATOR_SERVICE, "GetRevocations"): _AGGREGATOR | _READERS,
    # the hub: operators name, release, fork and merge models; auditors read. Aggregators resolve a
    # release (initial_model: NAME@^1.0), and so do devices (strata device predict --model NAME@^1.0);
    # aggregators read the federations they serve, for their round-policy and strategy defaults.
    **{name: _OPERATOR for name in OPERATOR_WRITES},
    method(COORDINATOR_SERVICE, "ListFederations"): _READERS,
    method(COORDINATOR_SERVICE, "ListReleases"): _READERS,
    method(COORDINATOR_SERVICE, "ListProposals"): _READERS,
    method(COORDINATOR_SERVICE, "GetFederation"): _READERS | _AGGREGATOR,
    method(COORDINATOR_SERVICE, "ResolveModel"): _READERS | _AGGREGATOR | _DEVICES,
    # enrollment: a bootstrap token, not a certificate, authenticates it; renewal: the
    # certificate being replaced does
    method(COORDINATOR_SERVICE, "Enroll"): ANYONE,
    method(COORDINATOR_SERVICE, "Renew"): frozenset({Role.AGENT}),
    # probes
    **{name: ANYONE for name in HEALTH_METHODS},
}

# Entries for RPCs not yet in strata.proto; the coverage test insists that each is
# still absent there, so an entry moves out of this set when its RPC lands.
PENDING_METHODS: frozenset[str] = frozenset()

# method -> dotted paths of the request fields holding the caller's own id. Empty values
# pass (handlers already refuse an empty id where one is required, and an empty id
# claims no one); any other value must equal the caller's id.
OWN_ID_FIELDS: Mapping[str, tuple[str, ...]] = {
    method(AGENT_SERVICE, "Join"): ("agent_id",),
    method(AGENT_SERVICE, "GetModel"): ("agent_id",),
    method(AGENT_SERVICE, "SubmitUpdate"): ("header.agent_id",),
    method(AGENT_SERVICE, "WatchModels"): ("agent_id",),
    method(AGENT_SERVICE, "Heartbeat"): ("agent_id",),
    method(PEER_SERVICE, "Announce"): ("producer",),
    method(COORDINATOR_SERVICE, "RegisterAggregator"): ("id",),
    method(COORDINATOR_SERVICE, "HeartbeatAggregator"): ("id", "info.id"),
    method(COORDINATOR_SERVICE, "ReportAgents"): ("aggregator_id",),
}


def is_public(full_method: str) -> bool:
    return ROLE_TABLE.get(full_method) is ANYONE


def allowed(full_method: str, role: Role | None) -> bool:
    """Whether a caller of `role` (None: no certificate) may call `full_method`. Unknown methods: nobody."""
    entry = ROLE_TABLE.get(full_method)
    if entry is None:
        return False
    if entry is ANYONE:
        return True
    return role is not None and role in entry
