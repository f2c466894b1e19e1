"""What an agent-facing server is to its agents: a *home* that hands out base models and takes updates.

An aggregator and a relay are both homes, and `intake.service.AgentServicer`
serves AgentService for either: a device cannot tell them apart. Each side
implements `Home`; the difference between them lives there, not in the service.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from intake.accept import Intake
from storage.store import ContentStore


@dataclass(frozen=True, kw_only=True)
class BaseModel:
    """The model a home hands its agents to train from."""

    model_cid: str
    round: int
    weights_cid: str
    federation: str


@dataclass(frozen=True, kw_only=True)
class Redirect:
    """Where an agent belongs instead of here."""

    aggregator_id: str
    address: str
    ring_version: int


class Home(Protocol):
    id: str
    federation: str
    intake: Intake
    # models are streamed to agents from here
    store: ContentStore
    max_update_bytes: int

    def current(self) -> BaseModel:
        """The base agents train from now; raises Unavailable before there is one."""
        ...

    def redirect_for(self, agent_id: str) -> Redirect | None:
        """Where the ring places `agent_id`, when that is not here; None for a home without a ring."""
        ...

    @property
    def ring_version(self) -> int: ...

    def round_config(self) -> dict[str, str]:
        """Key/values handed to every trainer (epochs, lr, ...)."""
        ...

    def invitation(self, agent_id: str) -> tuple[bool, float]:
        """(whether `agent_id` trains on the current base, when an uninvited agent should check back)."""
        ...

    def prepare_download(self, model_cid: str) -> None:
        """Make `model_cid` streamable from `store` (a relay fetches it upstream once), or raise NotFound."""
        ...

    def downloaded(self, size: int) -> None:
        """`size` bytes of weights were streamed to an agent."""
        ...
