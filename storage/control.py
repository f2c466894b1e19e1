"""SCAFFOLD's control variates (Karimireddy et al. 2020) as the fleet stores and names them.

Shared by the agent (which sends Δc_i and reads the server variate c), the intake (which
validates Δc_i) and the aggregator (which keeps c per cluster), none of which may import
another's package; like ``storage.encodings`` it also reads the one round-config key
that switches it on.

- ``round_config["scaffold"]`` ("true"/"false"; default off) switches SCAFFOLD on for a federation.
- An agent's Δc_i is a float32 safetensors blob over the tensors it trained; the update's
  manifest names its CID in ``extra.scaffold.delta_c`` and it travels after the weights in the
  same SubmitUpdate stream (``UpdateHeader.control_size`` / ``control_cid``).
- The server variate c of a cluster is a model object of kind ``control`` (signed by its
  aggregator, its weights blob holds c) so agents fetch it with GetModel like any model; the
  cluster and semi-global manifests name it in ``extra.scaffold.control``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from proto.errors import InvalidInput

SCAFFOLD = "scaffold"
# the manifest kind of a cluster's server variate c
CONTROL_KIND = "control"
# manifests' extra key: {"delta_c": CID} in an update, {"control": model CID, ...} in a cluster/semi-global
MANIFEST_KEY = "scaffold"
# A Δc_i is an average gradient minus c: on any sane model its L2 norm is a few units to a few
# hundred. Far above that it is garbage or an attack on every agent's next correction.
MAX_DELTA_NORM = 1e4

_TRUE = ("true", "1", "yes", "on")
_FALSE = ("false", "0", "no", "off", "")


def scaffold_enabled(round_config: Mapping[str, Any]) -> bool:
    """Whether a federation's round config asks for SCAFFOLD; InvalidInput(bad_round_config) on a bad value."""
    raw = round_config.get(SCAFFOLD, "false")
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise InvalidInput(f"round config {SCAFFOLD} must be true or false, got {raw!r}", reason="bad_round_config")


def delta_control_cid(extra: Mapping[str, Any]) -> str:
    """The CID of the Δc_i an update's manifest ``extra`` names ("" when none)."""
    entry = extra.get(MANIFEST_KEY)
    return str(entry.get("delta_c", "")) if isinstance(entry, Mapping) else ""


def server_control_cid(extra: Mapping[str, Any]) -> str:
    """The model CID of the server variate c a cluster or semi-global manifest's ``extra`` names ("" when none)."""
    entry = extra.get(MANIFEST_KEY)
    return str(entry.get("control", "")) if isinstance(entry, Mapping) else ""
