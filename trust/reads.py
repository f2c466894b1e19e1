"""What a caller may read: every device's update is private to the home that received it.

Agents and devices fetch their federation's base, cluster and semi-global models;
a device update (`storage.manifest.DEVICE_UPDATE_KINDS`: a device's ``local``
update, a relay's combined ``relay`` update) is never served to them, whatever
CID they ask for. Only callers whose role is in `trust.roles.DEVICE_UPDATE_READERS`
(audit) may read one, and every such read is logged as one line on the
``strata.audit`` logger: who read what, through which RPC. Without TLS there is no
caller and so no reader: plaintext demos serve no device update at all.

This module never imports gRPC.
"""

from __future__ import annotations

import logging

from storage.manifest import DEVICE_UPDATE_KINDS
from trust.errors import PermissionDenied
from trust.identity import Certified
from trust.roles import DEVICE_UPDATE_READERS

__all__ = ["DEVICE_UPDATE", "is_device_update", "log_device_update_read", "may_read_device_updates", "refuse_device_update"]

# the reason (strata-reason trailer) of a device update refused to a caller who may not read it
DEVICE_UPDATE = "device_update"

audit_log = logging.getLogger("strata.audit")


def is_device_update(kind: str) -> bool:
    return kind in DEVICE_UPDATE_KINDS


def may_read_device_updates(caller: Certified | None) -> bool:
    """Whether `caller` (None: no certificate, plaintext) may read device updates."""
    return caller is not None and caller.identity.role in DEVICE_UPDATE_READERS


def refuse_device_update(cid: str, kind: str, caller: Certified | None) -> PermissionDenied:
    """The refusal for a caller asking for device update `cid`."""
    who = str(caller.identity) if caller is not None else "a caller without a certificate"
    return PermissionDenied(
        f"{cid} is a device update ({kind}); {who} may not read device updates", reason=DEVICE_UPDATE
    )


def log_device_update_read(caller: Certified, cid: str, what: str, *, via: str) -> None:
    """The audit line for one device-update read: who, what (`cid` and whether manifest or weights), where."""
    audit_log.info(
        "device_update_read",
        extra={"fields": {"who": str(caller.identity), "serial": caller.serial, "cid": cid, "what": what, "via": via}},
    )
