"""Keep the README's generated tables true: `python -m strata.readme` (or `make docs`) regenerates them.

Each `<!-- config:ROLE -->` … `<!-- /config -->` block is replaced by the table of
that daemon's config keys and defaults, and the `<!-- roles -->` … `<!-- /roles -->`
block by the role table (`trust.roles.ROLE_TABLE`: who may call which RPC, and which
request fields must be the caller's own id), and the `<!-- metrics -->` … `<!-- /metrics -->`
block by the metrics catalogue (each daemon's `METRICS`, the specs its collector serves);
tests/test_readme.py fails when a block is stale.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import agent.daemon
import aggregator.daemon
import coordinator.daemon
import relay.daemon
from proto.metrics import MetricSpec
from strata.cmd_daemons import CONFIG_CLASSES, config_table
from trust.identity import Role
from trust.roles import ANYONE, DEVICE_UPDATE_READERS, OWN_ID_FIELDS, ROLE_TABLE

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"(<!-- config:(\w+) -->\n).*?(<!-- /config -->)", re.S)
_ROLES_BLOCK = re.compile(r"(<!-- roles -->\n).*?(<!-- /roles -->)", re.S)
_METRICS_BLOCK = re.compile(r"(<!-- metrics -->\n).*?(<!-- /metrics -->)", re.S)

# daemon -> the metrics its /metrics endpoint serves, in catalogue order
METRICS_BY_DAEMON: dict[str, tuple[MetricSpec, ...]] = {
    "coordinator": coordinator.daemon.METRICS,
    "aggregator": aggregator.daemon.METRICS,
    "relay": relay.daemon.METRICS,
    "agent": agent.daemon.METRICS,
}


def metrics_catalogue() -> str:
    """Every exported metric as Markdown: daemon, sample name, type, labels, meaning."""
    rows = ["| daemon | metric | type | labels | meaning |", "| --- | --- | --- | --- | --- |"]
    for daemon, specs in METRICS_BY_DAEMON.items():
        for spec in specs:
            labels = ", ".join(f"`{label}`" for label in spec.labels) or "—"
            rows.append(f"| {daemon} | `{spec.sample_name}` | {spec.kind} | {labels} | {spec.documentation} |")
    return "\n".join(rows) + "\n"
_DEVICE_UPDATE_READS = ("/strata.v1.AgentService/GetModel", "/strata.v1.PeerService/FetchBlob")


def role_table() -> str:
    """The role table as Markdown, one row per RPC in ROLE_TABLE's order."""
    rows = ["| service | RPC | who may call it | fields that must be the caller's own id |", "| --- | --- | --- | --- |"]
    for full_method, entry in ROLE_TABLE.items():
        service, name = full_method.strip("/").rsplit("/", 1)
        if entry is ANYONE:
            callers = "anyone"
        else:
            callers = ", ".join(role.value for role in Role if role in entry)
            if full_method in _DEVICE_UPDATE_READS:
                readers = ", ".join(role.value for role in Role if role in DEVICE_UPDATE_READERS)
                callers += f" (device updates: {readers} only, logged)"
        own = ", ".join(f"`{field}`" for field in OWN_ID_FIELDS.get(full_method, ())) or "—"
        rows.append(f"| `{service.rsplit('.', 1)[-1]}` | `{name}` | {callers} | {own} |")
    return "\n".join(rows) + "\n"


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        role = match.group(2)
        if role not in CONFIG_CLASSES:
            raise SystemExit(f"README names an unknown config block {role!r}")
        return match.group(1) + config_table(role) + match.group(3)

    text = _BLOCK.sub(replace, text)
    text = _METRICS_BLOCK.sub(lambda match: match.group(1) + metrics_catalogue() + match.group(2), text)
    return _ROLES_BLOCK.sub(lambda match: match.group(1) + role_table() + match.group(2), text)


def main() -> int:
    current = README.read_text()
    updated = render(current)
    if updated != current:
        README.write_text(updated)
        print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
