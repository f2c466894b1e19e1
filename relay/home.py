"""The relay as its devices see it: a `Home` over the relay's core and its model cache.

`intake.service.AgentServicer` serves AgentService over this, exactly as it does
for an aggregator. What is particular to a relay lives here: it never redirects
(it has no ring of its own), models come from its cache (fetched upstream once),
and the bytes it serves are counted to show what the cache saved.
"""

from __future__ import annotations

from collections.abc import Callable

from intake.accept import Intake
from intake.home import BaseModel, Redirect
from relay.core import Relay
from storage.store import ContentStore


class RelayHome:
    def __init__(self, *, relay: Relay, round_config: Callable[[], dict[str, str]]) -> None:
        self.id = relay.relay_id
        self.federation = relay.federation
        self.intake: Intake = relay.intake
        self.store: ContentStore = relay.store
        self.max_update_bytes = relay.config.max_update_bytes
        self._relay = relay
        self._round_config = round_config

    def current(self) -> BaseModel:
        return self._relay.current

    def redirect_for(self, agent_id: str) -> Redirect | None:
        return None

    @property
    def ring_version(self) -> int:
        return 0

    def round_config(self) -> dict[str, str]:
        return dict(self._round_config())

    def invitation(self, agent_id: str) -> tuple[bool, float]:
        """A relay takes every device's update: its upstream invitation is its own, as one agent."""
        return True, 0.0

    def prepare_download(self, model_cid: str) -> None:
        self._relay.cache.ensure(model_cid)

    def downloaded(self, size: int) -> None:
        self._relay.cache.record_served(size)
