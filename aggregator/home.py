"""The aggregator as its agents see it: a `Home` over the round manager and the ring.

`intake.service.AgentServicer` serves AgentService over this; what is particular
to an aggregator lives here: agents the ring places elsewhere are redirected,
and only models of its federation that this aggregator holds are downloadable.
"""

from __future__ import annotations

from aggregator.ringview import RingView
from aggregator.rounds import RoundManager
from intake.accept import Intake
from intake.home import BaseModel, Redirect
from proto.errors import NotFound
from storage.manifest import Manifest
from storage.store import ContentStore


class AggregatorHome:
    def __init__(
        self,
        *,
        aggregator_id: str,
        rounds: RoundManager,
        ring: RingView,
        store: ContentStore,
        round_config: dict[str, str],
    ) -> None:
        self.id = aggregator_id
        self.federation = rounds.federation
        self.intake: Intake = rounds.intake
        self.store = store
        self.max_update_bytes = rounds.settings.max_update_bytes
        self._rounds = rounds
        self._ring = ring
        self._round_config = dict(round_config)
        # egress counters: read by the metrics endpoint; += on an int from the serving loop only
        self.bytes_served = 0
        self.downloads_served = 0

    def current(self) -> BaseModel:
        return self._rounds.current

    def redirect_for(self, agent_id: str) -> Redirect | None:
        ring = self._ring.ring
        owner = ring.owner(agent_id)
        if owner.id == self.id:
            return None
        return Redirect(aggregator_id=owner.id, address=owner.address, ring_version=ring.version)

    @property
    def ring_version(self) -> int:
        return self._ring.ring.version

    def round_config(self) -> dict[str, str]:
        return dict(self._round_config)

    def invitation(self, agent_id: str) -> tuple[bool, float]:
        return self._rounds.invited(agent_id), self._rounds.check_back_s

    def prepare_download(self, model_cid: str) -> None:
        if model_cid == self._rounds.current.model_cid:
            return
        if not self.store.has(model_cid):
            raise NotFound(f"model {model_cid} is not in {self.id}'s store", reason="not_found")
        # the store may hold other federations' models (one process, several federations, one store):
        # an agent is served only its own federation's, and told no more than "not found" of the rest
        if Manifest.from_bytes(self.store.get(model_cid)).federation != self.federation:
            raise NotFound(f"model {model_cid} is not a {self.federation!r} model of {self.id}", reason="not_found")

    def downloaded(self, size: int) -> None:
        """Count model bytes streamed to agents: the aggregator's egress to its fleet."""
        self.bytes_served += size
        self.downloads_served += 1
