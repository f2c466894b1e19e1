"""Moved to `aggregator.ringview`; kept only for `aggregator.service`, which another change is moving.

Delete this file once nothing imports `aggregator.membership`.
"""

from aggregator.ringview import RingView

__all__ = ["RingView"]
