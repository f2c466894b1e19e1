"""The hub as JSON: what `strata hub --json` prints and the dashboard's /api/hub serves, built once here."""

from __future__ import annotations

from typing import Any

from coordinator.client import CoordinatorClient
from coordinator.hub import Federation, Proposal, Release

__all__ = ["federation_json", "hub_view", "proposal_json", "release_json"]


def federation_json(federation: Federation, releases: list[Release] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": federation.name,
        "description": federation.description,
        "task": federation.task,
        "base": federation.base,
        "spec": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in federation.spec],
        "owners": list(federation.owners),
        "round_policy": federation.round_policy,
        "strategy": federation.strategy,
        "forked_from": federation.forked_from,
        "source_federation": federation.source_federation,
        "fork_layers": federation.fork_layers,
        "heads": federation.heads,
        "created_by": federation.created_by,
        "created_at": federation.created_at,
    }
    if releases is not None:
        out["releases"] = [release_json(r) for r in releases]
    return out


def release_json(release: Release) -> dict[str, Any]:
    return {
        "ref": release.ref,
        "federation": release.federation,
        "version": release.version,
        "model": release.model,
        "notes": release.notes,
        "evaluation": release.evaluation,
        "accuracy": release.accuracy,
        "lineage_root": release.lineage_root,
        "released_by": release.released_by,
        "created_at": release.created_at,
    }


def proposal_json(proposal: Proposal) -> dict[str, Any]:
    return {
        "proposal": proposal.cid,
        "from": proposal.from_federation,
        "to": proposal.to_federation,
        "model": proposal.model,
        "target_head": proposal.target_head,
        "state": proposal.state,
        "proposed_by": proposal.proposed_by,
        "decided_by": proposal.decided_by,
        "merge": proposal.merge,
    }


def hub_view(coordinator: CoordinatorClient) -> dict[str, Any]:
    """Every federation with its releases (newest version first), the forks among them, and every proposal."""
    # the listing leaves heads out (they cost index reads per federation); each one read alone carries them
    federations = [coordinator.federation(f.name) for f in coordinator.federations()]
    proposals = coordinator.proposals()
    return {
        "federations": [federation_json(f, coordinator.releases(f.name)) for f in federations],
        "forks": [
            {"name": f.name, "source": f.forked_from, "source_federation": f.source_federation, "layers": f.fork_layers}
            for f in federations
            if f.forked_from
        ],
        "proposals": [proposal_json(p) for p in proposals],
    }
