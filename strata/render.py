"""Rendering for the CLI: lineage as a tree, Graphviz dot or JSON; manifests and tables as text.

Pure functions from core results to strings; the commands decide where they go.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from storage.lineage import LineageGraph
from storage.manifest import Manifest


@dataclass(frozen=True, kw_only=True)
class LineageNode:
    """One model in a lineage, wherever it was read from (the store or the coordinator's index)."""

    cid: str
    kind: str
    producer: str
    round: int
    num_samples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    parents: tuple[str, ...] = ()
    note: str = ""
    # which aggregation rule made it (empty where the manifest was not read)
    rule: str = ""
    # the model it was trained from, when the lineage followed bases (`strata lineage --bases`)
    base: str = ""

    @property
    def links(self) -> tuple[str, ...]:
        """Its parents, then the base walked (if any): every edge the lineage drew from it."""
        return (*self.parents, self.base) if self.base else self.parents


@dataclass(frozen=True, kw_only=True)
class LineageView:
    root: str
    nodes: Mapping[str, LineageNode]
    problems: Sequence[Mapping[str, str]] = ()
    truncated: Sequence[str] = ()
    source: str = "store"
    # what stopped the walk at the truncated nodes
    cut_by: str = "--depth"


def view_from_graph(graph: LineageGraph) -> LineageView:
    nodes = {
        cid: node_from_manifest(cid, manifest, base=graph.bases.get(cid, "")) for cid, manifest in graph.nodes.items()
    }
    problems = [{"cid": p.cid, "where": p.where, "reason": p.reason, "message": p.message} for p in graph.problems]
    return LineageView(root=graph.root, nodes=nodes, problems=problems, truncated=list(graph.truncated))


def node_from_manifest(cid: str, manifest: Manifest, *, base: str = "") -> LineageNode:
    refused = manifest.extra.get("refused_peers") if isinstance(manifest.extra, dict) else None
    note = f"refused {len(refused)} peer model(s)" if refused else ""
    note = "  ".join(part for part in (note, _privacy_tag(manifest)) if part)
    return LineageNode(
        cid=cid,
        kind=manifest.kind,
        producer=f"{manifest.producer.role}:{manifest.producer.id}",
        round=manifest.round,
        num_samples=manifest.num_samples,
        metrics=dict(manifest.metrics),
        parents=tuple(manifest.parents),
        note=note,
        rule=rule_of(manifest),
        base=base,
    )


def _call(described: Any) -> str:
    """{"name": "krum", "params": {"f": 1}} -> "krum(f=1)"."""
    if not isinstance(described, Mapping) or not described.get("name"):
        return ""
    params = described.get("params") if isinstance(described.get("params"), Mapping) else {}
    inner = ",".join(f"{k}={v}" for k, v in sorted(params.items()) if not isinstance(v, Mapping | list))
    return f"{described['name']}({inner})" if inner else str(described["name"])


def rule_of(manifest: Manifest) -> str:
    """The rule that made a model, in one word-ish: 'median', 'multi_krum(f=1,m=0)+fedadam(lr=0.1,…)';
    a semi-global model names its merge rule ('semi-global: geomed(iterations=10,nu=1e-06)')."""
    algorithm = manifest.algorithm if isinstance(manifest.algorithm, Mapping) else {}
    if manifest.kind == "semi-global":
        merge = _call(algorithm.get("strategy")) or "fedavg"
        return f"semi-global: {merge}"
    if manifest.kind not in ("cluster", "relay"):
        return ""
    rule = _call(algorithm)
    optimizer = _call(algorithm.get("server_opt"))
    return f"{rule}+{optimizer}" if rule and optimizer else rule


def rule_effects(manifest: Manifest) -> str:
    """What the rule did to individual inputs, from the manifest's record: '2 refused, 1 down-weighted'."""
    extra = manifest.extra if isinstance(manifest.extra, Mapping) else {}
    report = extra.get("aggregation") if isinstance(extra.get("aggregation"), Mapping) else {}
    parts = []
    for key, word in (("refused", "refused"), ("down_weighted", "down-weighted")):
        entries = report.get(key)
        if isinstance(entries, list) and entries:
            who = ", ".join(str(e.get("agent") or e.get("cid", "?"))[:24] for e in entries[:5] if isinstance(e, Mapping))
            parts.append(f"{len(entries)} {word} ({who}{', …' if len(entries) > 5 else ''})")
    capped = extra.get("capped_num_samples")
    if isinstance(capped, Mapping) and isinstance(capped.get("claimed"), Mapping):
        parts.append(f"{len(capped['claimed'])} sample claim(s) capped at {capped.get('max')}")
    rescaled = extra.get("rescaled_num_samples")
    if isinstance(rescaled, Mapping) and isinstance(rescaled.get("claims"), Mapping) and rescaled["claims"]:
        claims = [c for c in rescaled["claims"].values() if isinstance(c, Mapping)]
        who = ", ".join(str(c.get("agent") or "?")[:24] for c in claims[:5])
        parts.append(
            f"{len(rescaled['claims'])} sample claim(s) lowered to {rescaled.get('ratio')} x the round's median "
            f"({who}{', …' if len(claims) > 5 else ''})"
        )
    return "; ".join(parts)


def _label(node: LineageNode) -> str:
    metrics = " ".join(f"{k}={v:.3f}" for k, v in sorted(node.metrics.items()) if k in ("accuracy", "loss"))
    parts = [node.kind, node.cid, f"round {node.round}", node.producer, f"n={node.num_samples}"]
    if node.rule:
        parts.append(f"rule={node.rule}")
    if metrics:
        parts.append(metrics)
    if node.note:
        parts.append(node.note)
    return "  ".join(parts)


def lineage_tree(view: LineageView) -> str:
    """An indented tree from the root down to its ancestors; repeated subtrees are shown once."""
    lines: list[str] = []
    seen: set[str] = set()
    problems = {p["cid"]: p for p in view.problems}

    def visit(cid: str, prefix: str, connector: str, child_prefix: str, parent: LineageNode | None = None) -> None:
        node = view.nodes.get(cid)
        if node is None:
            problem = problems.get(cid)
            if parent is not None and parent.kind == "relay" and problem and problem["reason"] == "missing":
                why = f"held in {parent.producer}'s private store: add --store there to go on"
            else:
                why = f"{problem['reason']}: {problem['message']}" if problem else "not read"
            lines.append(f"{prefix}{connector}? {cid}  ({why})")
            return
        marker = "  (shown above)" if cid in seen and node.links else ""
        flag = f"  !! {problems[cid]['reason']}" if cid in problems else ""
        lines.append(f"{prefix}{connector}{_label(node)}{marker}{flag}")
        if cid in seen:
            return
        seen.add(cid)
        if cid in view.truncated:
            lines.append(f"{prefix}{child_prefix}└─ … ({len(node.links)} parents beyond {view.cut_by})")
            return
        for index, parent in enumerate(node.links):
            last = index == len(node.links) - 1
            connector = "└─ " if last else "├─ "
            if parent == node.base:
                connector += "trained from: "  # its base: what it started from, not what it was made of
            visit(parent, prefix + child_prefix, connector, "   " if last else "│  ", node)

    visit(view.root, "", "", "")
    if view.problems:
        lines.append("")
        lines.append(f"{len(view.problems)} problem(s):")
        lines += [f"  {p['reason']}: {p['cid']} ({p['where']}): {p['message']}" for p in view.problems]
    return "\n".join(lines)


def lineage_dot(view: LineageView) -> str:
    colors = {"local": "lightblue", "relay": "khaki", "cluster": "palegreen", "semi-global": "salmon", "base": "grey90"}
    lines = ["digraph lineage {", "  rankdir=BT;", '  node [shape=box, style=filled, fontname="monospace"];']
    for cid, node in view.nodes.items():
        label = f"{node.kind}\\n{cid[:12]}…\\nround {node.round} {node.producer}\\nn={node.num_samples}"
        lines.append(f'  "{cid}" [label="{label}", fillcolor="{colors.get(node.kind, "white")}"];')
    for cid, node in view.nodes.items():
        for parent in node.parents:
            lines.append(f'  "{parent}" -> "{cid}";')
        if node.base:
            lines.append(f'  "{node.base}" -> "{cid}" [style=dashed, label="base"];')
    for problem in view.problems:
        lines.append(f'  "{problem["cid"]}" [label="{problem["reason"]}\\n{problem["cid"][:12]}…", color=red];')
    lines.append("}")
    return "\n".join(lines)


def lineage_json(view: LineageView) -> dict[str, Any]:
    return {
        "root": view.root,
        "source": view.source,
        "ok": not view.problems,
        "nodes": {
            cid: {
                "kind": n.kind,
                "producer": n.producer,
                "round": n.round,
                "num_samples": n.num_samples,
                "metrics": dict(n.metrics),
                "parents": list(n.parents),
                "rule": n.rule,
                **({"base": n.base} if n.base else {}),
            }
            for cid, n in view.nodes.items()
        },
        "problems": list(view.problems),
        "truncated": list(view.truncated),
    }


def manifest_text(cid: str, manifest: Manifest) -> str:
    lines = [
        f"model      {cid}",
        f"kind       {manifest.kind}",
        f"federation {manifest.federation}",
        f"round      {manifest.round}",
        f"producer   {manifest.producer.role}:{manifest.producer.id}",
        f"weights    {manifest.weights}",
        f"base       {manifest.base or '-'}",
        f"samples    {manifest.num_samples}",
        f"created    {manifest.created_at}",
        f"signed     {'ed25519 ' + manifest.signature['public_key'][:16] + '…' if manifest.signature else 'no'}",
        f"cert       {'embedded (check the signer: strata verify --ca)' if manifest.certificate else 'none'}",
    ]
    if manifest.metrics:
        lines.append("metrics    " + " ".join(f"{k}={v:.4g}" for k, v in sorted(manifest.metrics.items())))
    if manifest.algorithm:
        lines.append(f"algorithm  {manifest.algorithm}")
    privacy = privacy_text(manifest)
    if privacy:
        lines.append(f"privacy    {privacy}")
    rule, effects = rule_of(manifest), rule_effects(manifest)
    if rule:
        lines.append(f"rule       {rule}")
    if effects:
        lines.append(f"rule did   {effects}")
    lines.append(f"parents    {len(manifest.parents)}")
    lines += [f"  {p}" for p in manifest.parents]
    lines.append(f"tensors    {len(manifest.tensors)}")
    for name, info in sorted(manifest.tensors.items()):
        lines.append(f"  {name:<32} {info.dtype:<5} {list(info.shape)}")
    return "\n".join(lines)


def _privacy_tag(manifest: Manifest) -> str:
    """A lineage node's DP in a few characters: a cluster's cumulative ε, a device's local DP."""
    extra = manifest.extra if isinstance(manifest.extra, dict) else {}
    spent, local = extra.get("privacy"), extra.get("dp")
    if isinstance(spent, dict):
        epsilon = spent.get("epsilon")
        return f"DP ε={epsilon:.3g}" if isinstance(epsilon, int | float) else "DP ε=∞"
    if isinstance(local, dict):
        return f"local DP σ={local.get('noise_multiplier')} C={local.get('clip')}"
    return ""


def privacy_text(manifest: Manifest) -> str:
    """The DP a model was made under, in one line: a cluster's ledger entry or a device's local DP."""
    extra = manifest.extra if isinstance(manifest.extra, dict) else {}
    parts = []
    spent = extra.get("privacy")
    if isinstance(spent, dict):
        epsilon = spent.get("epsilon")
        parts.append(f"ε={epsilon:.4g}" if isinstance(epsilon, int | float) else "ε=∞ (no noise)")
        parts.append(f"δ={spent.get('delta')}")
        central = spent.get("central")
        if isinstance(central, dict):
            adaptive = " adaptive" if "adaptive" in central else ""
            parts.append(f"central(clip={central.get('clip'):.4g}{adaptive} σ={central.get('noise_multiplier')} rounds={central.get('rounds')})")
        local = spent.get("local")
        if isinstance(local, dict):
            parts.append(f"local(clip={local.get('clip')} σ={local.get('noise_multiplier')} devices={local.get('devices')})")
        if spent.get("target_epsilon"):
            parts.append(f"budget ε≤{spent['target_epsilon']}")
    local_dp = extra.get("dp")
    if isinstance(local_dp, dict):
        parts.append(f"local DP on device (clip={local_dp.get('clip')} σ={local_dp.get('noise_multiplier')})")
    return " ".join(parts)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(line.rstrip() for line in out)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def signers_text(rows: Sequence[Mapping[str, Any]]) -> str:
    """Who signed what: one line per model of a lineage, from `strata verify --ca`'s rows."""
    lines = []
    for row in rows:
        head = f"  {row['cid']}  {row['kind']:<11} {row['producer']:<28}"
        signer = row.get("signer")
        if signer is not None:
            recorded = f", recorded for {signer['recorded_for']}" if signer.get("recorded_for") else ""
            lines.append(f"{head} signed by {signer['identity']} (serial {signer['serial']}){recorded}")
        else:
            lines.append(f"{head} NOT CERTIFIED ({row['problem']}): {row['message']}")
    return "\n".join(lines)
