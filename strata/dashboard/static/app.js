// The Strata dashboard: vanilla JS, no build step. It reads the dashboard's JSON API and
// follows /api/events (server-sent events) for live updates. Vendored: uPlot (chart) and
// dagre (lineage layout), both MIT, in /static/vendor.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#db2777", "#65a30d"];
const KIND_FILL = { "semi-global": "#bfdbfe", cluster: "#bbf7d0", relay: "#fde68a", local: "#fecaca", base: "#e5e7eb" };

const state = { ring: null, rounds: null, agents: [], chart: null, view: "fleet", model: null, lineage: null };
window.dashboard = state; // the browser tests read what the page drew from here

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "onclick") node.addEventListener("click", value);
    else if (value !== undefined && value !== null) node.setAttribute(key, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function short(cid) { return cid ? cid.slice(0, 8) + "…" + cid.slice(-4) : "-"; }
function fmt(value, digits = 3) { return typeof value === "number" ? value.toFixed(digits) : "-"; }
function ago(ts) {
  if (!ts) return "-";
  const s = Date.now() / 1000 - ts;
  return s < 90 ? `${s.toFixed(0)}s ago` : s < 5400 ? `${(s / 60).toFixed(0)}m ago` : `${(s / 3600).toFixed(1)}h ago`;
}
function colorOf(id) {
  const ids = (state.ring?.aggregators || []).map((a) => a.id);
  const i = ids.indexOf(id);
  return PALETTE[(i < 0 ? ids.length : i) % PALETTE.length];
}
function cidLink(cid) { return cid ? el("a", { class: "cid", href: `#/model/${cid}`, title: cid }, short(cid)) : "-"; }

async function api(path) {
  const response = await fetch(path, { credentials: "same-origin" });
  const body = await response.json();
  if (!response.ok) throw new Error(`${body.error?.reason}: ${body.error?.message}`);
  return body;
}

function showError(error) {
  const box = document.getElementById("error");
  box.hidden = !error;
  box.textContent = error ? String(error.message || error) : "";
}

function fill(tableId, rows) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
}

// ---------------------------------------------------------------- fleet

function renderRing(ring) {
  document.getElementById("ring-version").textContent = `version ${ring.version}, ${ring.aggregators.filter((a) => a.in_ring).length} member(s)`;
  const root = document.getElementById("ring");
  root.replaceChildren();
  const R = 150;
  root.append(svg("circle", { cx: 0, cy: 0, r: R, fill: "none", stroke: "#e5e7eb", "stroke-width": 22 }));
  const shares = Object.fromEntries(ring.arcs.map((a) => [a.id, a.share]));
  const homes = relayHomes();
  let start = -Math.PI / 2;
  for (const agg of ring.aggregators.filter((a) => a.in_ring)) {
    const share = shares[agg.id] || 0;
    const end = start + share * 2 * Math.PI;
    const group = svg("g", { class: "aggregator" + (agg.alive ? "" : " dead"), "data-id": agg.id });
    const large = end - start > Math.PI ? 1 : 0;
    const p = (angle, r) => `${(r * Math.cos(angle)).toFixed(1)} ${(r * Math.sin(angle)).toFixed(1)}`;
    if (share > 0) {
      const path = share >= 0.999
        ? `M ${p(start, R)} A ${R} ${R} 0 1 1 ${p(start + Math.PI, R)} A ${R} ${R} 0 1 1 ${p(start, R)}`
        : `M ${p(start, R)} A ${R} ${R} 0 ${large} 1 ${p(end, R)}`;
      group.append(svg("path", { d: path, fill: "none", stroke: colorOf(agg.id), "stroke-width": 22 }));
    }
    const mid = (start + end) / 2;
    const [x, y] = [Math.cos(mid) * R, Math.sin(mid) * R];
    group.append(svg("circle", { cx: x, cy: y, r: 9, fill: "#fff", stroke: colorOf(agg.id), "stroke-width": 3 }));
    const [lx, ly] = [Math.cos(mid) * (R + 42), Math.sin(mid) * (R + 42)];
    const anchor = Math.abs(Math.cos(mid)) < 0.3 ? "middle" : Math.cos(mid) > 0 ? "start" : "end";
    group.append(svg("text", { x: lx, y: ly - 6, "text-anchor": anchor, class: "label" }, agg.id));
    const lease = agg.lease_s === null ? "no lease" : agg.lease_s > 0 ? `lease ${agg.lease_s.toFixed(0)}s` : "lease expired";
    group.append(svg("text", { x: lx, y: ly + 8, "text-anchor": anchor, class: "sub" }, `round ${agg.round} · ${agg.agents} agents`));
    group.append(svg("text", { x: lx, y: ly + 21, "text-anchor": anchor, class: "sub" }, `${lease} · ${Math.round(share * 100)}%`));
    // relays hang inside the ring under their home aggregator
    (homes[agg.id] || []).forEach((relay, i) => {
      const [rx, ry] = [Math.cos(mid) * (R - 45 - i * 24), Math.sin(mid) * (R - 45 - i * 24)];
      const r = svg("g", { class: "relay", "data-id": relay.id });
      r.append(svg("line", { x1: x, y1: y, x2: rx, y2: ry, stroke: "#d97706", "stroke-dasharray": "3 2" }));
      r.append(svg("rect", { x: rx - 7, y: ry - 7, width: 14, height: 14, fill: "#fde68a", stroke: "#d97706" }));
      r.append(svg("text", { x: rx, y: ry + 20, "text-anchor": "middle", class: "sub" }, `${relay.id} (${relay.updates})`));
      group.append(r);
    });
    root.append(group);
    start = end;
  }
  root.append(svg("text", { x: 0, y: -4, "text-anchor": "middle", class: "label" }, `ring v${ring.version}`));
  root.append(svg("text", { x: 0, y: 12, "text-anchor": "middle", class: "sub" }, `${ring.aggregators.reduce((n, a) => n + a.agents, 0)} agents`));

  fill("aggregators", ring.aggregators.map((a) => el("tr", {},
    el("td", {}, el("span", { style: `color:${colorOf(a.id)}` }, "■ "), a.id), el("td", {}, a.address),
    el("td", {}, a.alive ? "yes" : "no"), el("td", {}, a.lease_s === null ? "-" : `${a.lease_s.toFixed(1)}s`),
    el("td", {}, String(a.round)), el("td", {}, String(a.agents)),
    el("td", {}, cidLink(a.last_cluster)), el("td", {}, cidLink(a.last_semi_global)))));
  fill("relays", ring.relays.map((r) => el("tr", {},
    el("td", {}, r.id), el("td", {}, homeOf(r.id) || "-"), el("td", {}, String(r.round)), el("td", {}, String(r.updates)),
    el("td", {}, r.devices.join(", ") || "(in the relay's private store)"), el("td", {}, cidLink(r.last_update)))));
}

function homeOf(agentId) { return state.agents.find((a) => a.id === agentId)?.home; }
function relayHomes() {
  const homes = {};
  for (const relay of state.ring?.relays || []) {
    const home = homeOf(relay.id);
    if (home) (homes[home] ||= []).push(relay);
  }
  return homes;
}

function renderAgents() {
  const text = document.getElementById("agent-filter").value.trim().toLowerCase();
  const home = document.getElementById("agent-home").value;
  const select = document.getElementById("agent-home");
  const homes = [...new Set(state.agents.map((a) => a.home))].sort();
  if (select.options.length - 1 !== homes.length) {
    select.replaceChildren(el("option", { value: "" }, "every aggregator"), ...homes.map((h) => el("option", { value: h }, h)));
    select.value = homes.includes(home) ? home : "";
  }
  const shown = state.agents.filter((a) => (!home || a.home === home) &&
    (!text || [a.id, a.name, a.home, a.capability, a.telemetry.network].join(" ").toLowerCase().includes(text)));
  document.getElementById("agent-count").textContent = `${shown.length} of ${state.agents.length}`;
  fill("agents", shown.map((a) => {
    const t = a.telemetry || {};
    const battery = t.battery_percent === undefined || t.battery_percent < 0 ? "n/a" : `${t.battery_percent.toFixed(0)}%${t.charging ? " ⚡" : ""}`;
    return el("tr", { "data-id": a.id },
      el("td", {}, a.id), el("td", {}, a.home), el("td", {}, a.capability), el("td", {}, battery),
      el("td", {}, t.network || "-"), el("td", {}, t.uplink_kbps ? `${t.uplink_kbps.toFixed(0)} kbps` : "-"),
      el("td", {}, t.cpu_percent !== undefined ? `${t.cpu_percent.toFixed(0)}%` : "-"),
      el("td", {}, t.memory_mb ? `${t.memory_mb.toFixed(0)} MB` : "-"), el("td", {}, ago(a.last_seen)));
  }));
}

async function refreshAgents() {
  state.agents = (await api("/api/agents")).agents;
  renderAgents();
  if (state.ring) renderRing(state.ring);
}

// ---------------------------------------------------------------- learning

function chartData(rounds, source) {
  const aggregators = Object.keys(rounds.aggregators).sort();
  const xs = [...new Set(aggregators.flatMap((a) => rounds.aggregators[a].map((r) => r.round)))].sort((a, b) => a - b);
  const series = [{ label: "round" }];
  const data = [xs];
  for (const agg of aggregators) {
    const byRound = Object.fromEntries(rounds.aggregators[agg].map((r) => [r.round, r]));
    for (const [kind, key, dash] of [["semi-global", "semi_global", undefined], ["cluster", "cluster", [6, 4]]]) {
      for (const metric of ["accuracy", "loss"]) {
        const values = xs.map((x) => byRound[x]?.[key]?.[source]?.[metric] ?? null);
        if (values.every((v) => v === null)) continue;
        series.push({
          label: `${agg} ${kind} ${metric}`, scale: metric === "accuracy" ? "acc" : "loss",
          stroke: colorOf(agg), width: metric === "accuracy" ? 2 : 1, dash, spanGaps: true,
          points: { show: true, size: metric === "accuracy" ? 7 : 4 },
          strata: { aggregator: agg, kind, metric, source },
        });
        data.push(values);
      }
    }
  }
  return { series, data };
}

function renderLearning(rounds) {
  const source = document.getElementById("chart-source").value;
  const { series, data } = chartData(rounds, source);
  const target = document.getElementById("chart");
  const width = Math.max(480, target.clientWidth || document.body.clientWidth - 80);
  if (state.chart) state.chart.destroy();
  state.chart = new uPlot({
    width, height: 360, series,
    scales: { x: { time: false }, acc: { range: [0, 1] }, loss: { auto: true } },
    axes: [
      { label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] },
      { scale: "acc", label: "accuracy" },
      { scale: "loss", label: "loss", side: 1, grid: { show: false } },
    ],
    legend: { live: false },
  }, data, target);
  state.chartSeries = series.slice(1).map((s, i) => ({ ...s.strata, rounds: data[0].filter((_, j) => data[i + 1][j] !== null) }));

  const refusalRows = [];
  for (const [agg, reasons] of Object.entries(rounds.refusals).sort()) {
    for (const [reason, count] of Object.entries(reasons).sort()) {
      refusalRows.push(el("tr", {}, el("td", {}, agg), el("td", {}, reason), el("td", {}, String(count))));
    }
  }
  fill("refusals", refusalRows);
  document.getElementById("refusals-hint").textContent = rounds.journals.length
    ? (refusalRows.length ? "" : `no refusals in the journals of ${rounds.journals.join(", ")}`)
    : "refusals live in the aggregators' journals: start the dashboard with --state-dir for each to see them";

  const rows = Object.values(rounds.aggregators).flat().sort((a, b) => b.round - a.round || a.aggregator.localeCompare(b.aggregator));
  fill("rounds", rows.map((r) => el("tr", {},
    el("td", {}, r.aggregator), el("td", {}, String(r.round)), el("td", {}, r.participants ?? "-"),
    el("td", {}, r.duration_s === null ? "-" : `${r.duration_s.toFixed(1)}s`),
    el("td", {}, r.aggregation_s === null ? "-" : `${(r.aggregation_s * 1000).toFixed(0)}ms`),
    el("td", {}, fmt(r.cluster?.metrics?.accuracy)), el("td", {}, fmt(r.semi_global?.metrics?.accuracy)),
    el("td", {}, fmt(r.base_evaluated?.accuracy)),
    el("td", {}, Object.entries(r.refusals).map(([k, v]) => `${k}=${v}`).join(", ") || "-"))));
}

// ---------------------------------------------------------------- models

async function searchModels(form) {
  const params = new URLSearchParams();
  for (const [key, value] of new FormData(form)) if (value) params.set(key, value);
  const { models } = await api(`/api/models?${params}`);
  fill("models", models.map((m) => el("tr", { class: "clickable", "data-cid": m.cid, "data-kind": m.kind, onclick: () => { location.hash = `#/model/${m.cid}`; } },
    el("td", { class: "cid" }, m.cid), el("td", {}, m.kind), el("td", {}, String(m.round)), el("td", {}, m.producer),
    el("td", {}, String(m.num_samples)), el("td", {}, String(m.parents.length)), el("td", {}, fmt(m.metrics.accuracy)))));
}

async function showModel(cid) {
  document.getElementById("model-cid").textContent = cid;
  const [model, lineage] = await Promise.all([api(`/api/models/${cid}`), api(`/api/lineage/${cid}`)]);
  state.model = model;
  const sig = model.signature;
  const facts = [
    ["kind", model.kind], ["federation", model.federation], ["round", String(model.round)], ["producer", model.producer],
    ["samples", String(model.num_samples)], ["parents", String(model.parents.length)], ["children", String(model.children.length)],
    ["created", new Date(model.created_at * 1000).toISOString()],
    ["signature", signatureText(sig)],
    ["metrics", Object.entries(model.metrics).map(([k, v]) => `${k} ${fmt(v)}`).join(", ") || "-"],
    ["weights", model.device_update ? "device update: not served (audit role only)"
      : el("a", { href: `/api/models/${cid}/weights`, download: `${cid}.safetensors`, id: "download" }, "download (safetensors)")],
  ];
  document.getElementById("model-facts").replaceChildren(...facts.flatMap(([k, v]) => [el("dt", {}, k), el("dd", {}, v)]));
  fill("tensors", (model.tensors || []).map((t) => el("tr", {}, el("td", {}, t.name), el("td", {}, t.dtype), el("td", {}, `[${t.shape.join(", ")}]`), el("td", {}, String(t.elements)))));
  document.getElementById("manifest").textContent = JSON.stringify(model.manifest, null, 2);
  renderLineage(lineage);
}

function signatureText(sig) {
  if (sig.status === "certified") return el("span", { class: "sig-valid" }, `valid, signed by ${sig.signer.identity} (certified by fleet ${sig.fleet}'s CA)`);
  if (sig.status === "valid") return el("span", { class: "sig-valid" }, `valid${sig.certified ? ", certificate embedded (no fleet CA to check it: run with --bundle)" : ", bare key"}`);
  return el("span", { class: "sig-bad" }, `${sig.status}: ${sig.message || ""}`);
}

function renderLineage(lineage) {
  state.lineage = lineage;
  const g = new dagre.graphlib.Graph();
  g.setGraph({ rankdir: "TB", nodesep: 10, ranksep: 46, marginx: 10, marginy: 10 });
  g.setDefaultEdgeLabel(() => ({}));
  for (const node of lineage.nodes) g.setNode(node.cid, { width: 150, height: 40, node });
  for (const missing of lineage.missing) g.setNode(missing, { width: 150, height: 40, node: { cid: missing, kind: "missing", producer: "", round: "" } });
  for (const edge of lineage.edges) g.setEdge(edge.from, edge.to);
  for (const node of lineage.nodes) for (const parent of node.parents) if (lineage.missing.includes(parent)) g.setEdge(node.cid, parent);
  dagre.layout(g);
  const root = document.getElementById("lineage");
  const { width, height } = g.graph();
  root.setAttribute("viewBox", `0 0 ${Math.max(width, 200)} ${Math.max(height, 60)}`);
  root.style.height = `${Math.min(Math.max(height, 60), 640)}px`;
  root.replaceChildren();
  const defs = svg("defs");
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto" });
  marker.append(svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#94a3b8" }));
  defs.append(marker);
  root.append(defs);
  for (const e of g.edges()) {
    const points = g.edge(e).points;
    root.append(svg("path", { class: "edge", d: "M" + points.map((p) => `${p.x},${p.y}`).join(" L") }));
  }
  for (const id of g.nodes()) {
    const { x, y, width: w, height: h, node } = g.node(id);
    const group = svg("g", { class: "node" + (id === lineage.root ? " root" : ""), "data-cid": id, "data-kind": node.kind, transform: `translate(${x - w / 2},${y - h / 2})` });
    group.append(svg("rect", { width: w, height: h, fill: KIND_FILL[node.kind] || "#f1f5f9" }));
    const missing = node.kind === "missing";
    group.append(svg("text", { x: 6, y: 15 }, missing ? "not in the index" : `${node.kind} · round ${node.round}`));
    group.append(svg("text", { x: 6, y: 30 }, missing ? short(id) : `${node.producer.slice(0, 16)} ${id.slice(2, 7)}`));
    group.append(svg("title", {}, `${id}\n${node.kind} by ${node.producer}, round ${node.round}`));
    if (node.kind !== "missing") group.addEventListener("click", () => { location.hash = `#/model/${id}`; });
    root.append(group);
  }
}

// ---------------------------------------------------------------- the hub

async function showHub() {
  const hub = await api("/api/hub");
  fill("hub-federations", hub.federations.map((f) => el("tr", {},
    el("td", {}, f.name), el("td", {}, f.task || "-"), el("td", {}, cidLink(f.base)),
    el("td", {}, f.forked_from ? `${f.source_federation} (${f.fork_layers})` : "-"),
    el("td", {}, f.owners.join(", ") || "-"), el("td", {}, String(Object.keys(f.heads).length)),
    el("td", {}, f.releases.length ? f.releases[0].version : "-"))));
  fill("hub-releases", hub.federations.flatMap((f) => f.releases).map((r) => el("tr", {},
    el("td", {}, r.ref), el("td", {}, cidLink(r.model)), el("td", {}, fmt(r.accuracy)), el("td", {}, r.evaluation || "-"),
    el("td", {}, cidLink(r.lineage_root)), el("td", {}, r.released_by || "-"), el("td", {}, r.notes || ""))));
  fill("hub-proposals", hub.proposals.map((p) => el("tr", {},
    el("td", {}, cidLink(p.proposal)), el("td", {}, p.from), el("td", {}, p.to), el("td", {}, cidLink(p.model)),
    el("td", {}, p.state), el("td", {}, p.proposed_by || "-"), el("td", {}, p.merge ? cidLink(p.merge) : "-"))));
}

// ---------------------------------------------------------------- routing and live updates

function route() {
  const [, view = "fleet", arg] = (location.hash || "#/fleet").split("/");
  state.view = view;
  for (const section of document.querySelectorAll(".view")) section.hidden = section.id !== `view-${view}`;
  for (const link of document.querySelectorAll("nav a")) link.classList.toggle("active", link.dataset.view === view || (view === "model" && link.dataset.view === "models"));
  showError(null);
  if (view === "model" && arg) showModel(arg).catch(showError);
  if (view === "models" && !document.querySelector("#models tbody tr")) searchModels(document.getElementById("model-search")).catch(showError);
  if (view === "learning" && state.rounds) renderLearning(state.rounds);
  if (view === "hub") showHub().catch(showError);
}

function applySnapshot(snapshot) {
  state.ring = snapshot.ring;
  state.rounds = snapshot.rounds;
  state.snapshots = (state.snapshots || 0) + 1;
  renderRing(state.ring);
  if (state.view === "learning") renderLearning(state.rounds);
  refreshAgents().catch(showError);
}

function connect() {
  const live = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.addEventListener("snapshot", (e) => {
    live.className = "live on";
    live.textContent = `live · updated ${new Date().toLocaleTimeString()}`;
    applySnapshot(JSON.parse(e.data));
  });
  events.addEventListener("fleet_error", (e) => {
    live.className = "live off";
    live.textContent = `coordinator unreachable: ${JSON.parse(e.data).reason}`;
  });
  events.onerror = () => { live.className = "live off"; live.textContent = "reconnecting…"; };
}

document.getElementById("agent-filter").addEventListener("input", renderAgents);
document.getElementById("chart-source").addEventListener("change", () => state.rounds && renderLearning(state.rounds));
document.getElementById("agent-home").addEventListener("change", renderAgents);
document.getElementById("model-search").addEventListener("submit", (e) => { e.preventDefault(); searchModels(e.target).catch(showError); });
window.addEventListener("hashchange", route);
route();
connect();
