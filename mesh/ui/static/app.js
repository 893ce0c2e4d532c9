// Webb UI: the service map and the live flow table, from the server's /api/graph and /api/flows.
// What a flow holds came from pods (a request path, a method, a name): it is written with textContent or
// setAttribute only, never parsed as HTML; the server's Content-Security-Policy forbids inline script too.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const FILTERS = ["verdict", "pod", "namespace", "protocol", "layer", "method", "status", "since"];
const CLASS = { forwarded: "forwarded", denied: "denied", dropped: "denied", failed: "denied", audit: "audit" };
const DETAIL_ORDER = ["verdict", "why", "policy", "layer", "reason", "src", "service", "dst", "dst_pod", "protocol",
  "method", "path", "status", "grpc_status", "via", "envoy_details", "time"];
const MAX_ROWS = 500;
const POLL_MS = 1000;
const COL_W = 380, ROW_H = 90, PAD_X = 200, PAD_Y = 60, R = 13;

let filters = new URLSearchParams();
let cursor = 0;
let graphSig = "";
let selectedEdge = "";
let pollTimer = 0;

function text(v) {
  if (v === null || v === undefined) return "";
  return typeof v === "string" ? v : JSON.stringify(v);
}

function verdictClass(v) {
  return CLASS[text(v).toLowerCase()] || "denied";
}

function clock(t) {
  const d = new Date(Number(t) * 1000);
  if (isNaN(d.getTime())) return "";
  const pad = (n, w) => String(n).padStart(w, "0");
  return `${pad(d.getHours(), 2)}:${pad(d.getMinutes(), 2)}:${pad(d.getSeconds(), 2)}.${pad(d.getMilliseconds(), 3)}`;
}

function svg(tag, attrs) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  return e;
}

function showError(message) {
  const p = document.getElementById("error");
  p.textContent = message;
  p.hidden = !message;
}

async function getJSON(path) {
  const res = await fetch(path, { cache: "no-store" });
  let doc;
  try {
    doc = await res.json();
  } catch (e) {
    throw new Error(`${path}: HTTP ${res.status}, not JSON`);
  }
  if (!res.ok) throw new Error(text(doc.error) || `${path}: HTTP ${res.status}`);
  return doc;
}

// ---- details pane ----
function detailList(entries) {
  const dl = document.createElement("dl");
  for (const [k, v] of entries) {
    const dt = document.createElement("dt");
    dt.textContent = k;
    const dd = document.createElement("dd");
    dd.textContent = k === "time" ? `${clock(v)} (${text(v)})` : text(v);
    dd.dataset.key = k;
    if (k === "why") dd.className = "why";
    dl.append(dt, dd);
  }
  return dl;
}

function flowEntries(f) {
  const keys = DETAIL_ORDER.filter((k) => f[k] !== undefined && f[k] !== null && f[k] !== "");
  for (const k of Object.keys(f).sort()) if (!keys.includes(k) && f[k] !== null && f[k] !== "") keys.push(k);
  return keys.map((k) => [k, f[k]]);
}

function showDetails(title, entries, flow) {
  document.getElementById("details-hint").hidden = true;
  const body = document.getElementById("details-body");
  const h = document.createElement("h3");
  h.textContent = title;
  const parts = [h, detailList(entries)];
  if (flow) {
    const h4 = document.createElement("h4");
    h4.textContent = entries.length ? "latest flow" : "flow";
    parts.push(h4, detailList(flowEntries(flow)));
  }
  body.replaceChildren(...parts);
}

function showEdge(e) {
  const counts = Object.entries(e.verdicts).map(([v, n]) => `${n} ${v}`).join(", ");
  showDetails(`${text(e.src)} → ${text(e.dst)}`, [
    ["edge", e.verdict], ["flows", counts], ["layers", e.layers.join(", ")],
    ["policies", e.policies.join(", ") || "—"],
  ], e.last);
}

// ---- the map ----
function layout(g) {
  const col = new Map(g.nodes.map((n) => [n.id, 0]));
  for (let i = 0; i < 4; i++) {
    for (const e of g.edges) {
      if (e.src !== e.dst && col.has(e.src) && col.has(e.dst)) {
        col.set(e.dst, Math.min(4, Math.max(col.get(e.dst), col.get(e.src) + 1)));
      }
    }
  }
  const rows = new Map();
  const pos = new Map();
  for (const n of g.nodes) {
    const c = col.get(n.id);
    const r = rows.get(c) || 0;
    rows.set(c, r + 1);
    pos.set(n.id, { x: PAD_X + c * COL_W, y: PAD_Y + r * ROW_H, first: c === 0 });
  }
  const width = PAD_X + Math.max(0, ...col.values()) * COL_W + 320;
  const height = PAD_Y * 2 + (Math.max(1, ...rows.values()) - 1) * ROW_H + 30;
  return { pos, width, height };
}

function edgePath(a, b, bend, self) {
  // a quadratic curve from circle to circle, bent sideways by `bend` (parallel edges of one pair apart);
  // the label sits on the curve's middle
  if (self) {
    return { d: `M ${a.x - 6} ${a.y - R} C ${a.x - 40} ${a.y - 70}, ${a.x + 40} ${a.y - 70}, ${a.x + 6} ${a.y - R}`,
      lx: a.x, ly: a.y - 60 };
  }
  const dx = b.x - a.x, dy = b.y - a.y;
  const len = Math.hypot(dx, dy) || 1;
  const ux = dx / len, uy = dy / len;
  const sx = a.x + ux * R, sy = a.y + uy * R, ex = b.x - ux * (R + 4), ey = b.y - uy * (R + 4);
  const cx = (sx + ex) / 2 - uy * bend, cy = (sy + ey) / 2 + ux * bend;
  return { d: `M ${sx} ${sy} Q ${cx} ${cy} ${ex} ${ey}`, lx: (sx + ex) / 4 + cx / 2, ly: (sy + ey) / 4 + cy / 2 - 5 };
}

function drawGraph(g) {
  const map = document.getElementById("map");
  document.getElementById("map-empty").hidden = g.nodes.length > 0;
  const { pos, width, height } = layout(g);
  map.setAttribute("viewBox", `0 0 ${width} ${height}`);
  map.setAttribute("width", width);
  const defs = svg("defs");
  for (const c of ["forwarded", "denied", "audit"]) {
    const m = svg("marker", { id: `arrow-${c}`, class: c, viewBox: "0 0 10 10", refX: 8, refY: 5, markerWidth: 6,
      markerHeight: 6, orient: "auto-start-reverse" });
    m.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z" }));
    defs.append(m);
  }
  const edges = svg("g", { class: "edges" });
  const pairs = new Map();
  for (const e of g.edges) {
    const k = `${e.src}\u0000${e.dst}`;
    pairs.set(k, (pairs.get(k) || []).concat([e]));
  }
  for (const group of pairs.values()) {
    group.forEach((e, i) => {
      const a = pos.get(e.src), b = pos.get(e.dst);
      if (!a || !b) return;
      const back = b.x <= a.x && e.src !== e.dst;
      const bend = (i - (group.length - 1) / 2) * 44 + (back ? 60 : 0);
      const cls = verdictClass(e.verdict);
      const key = `${e.src}\u0000${e.dst}\u0000${cls}`;
      const curve = edgePath(a, b, bend, e.src === e.dst);
      const p = svg("path", { d: curve.d, class: `edge v-${cls}`,
        "marker-end": `url(#arrow-${cls})` });
      p.setAttribute("data-src", text(e.src));
      p.setAttribute("data-dst", text(e.dst));
      p.setAttribute("data-verdict", cls);
      if (key === selectedEdge) p.classList.add("selected");
      const title = svg("title");
      title.textContent = `${text(e.src)} → ${text(e.dst)}: ${e.count} ${cls}`;
      p.append(title);
      p.addEventListener("click", () => {
        selectedEdge = key;
        for (const s of map.querySelectorAll(".edge.selected")) s.classList.remove("selected");
        p.classList.add("selected");
        showEdge(e);
      });
      edges.append(p);
      const label = svg("text", { class: "edge-label", x: curve.lx, y: curve.ly, "text-anchor": "middle" });
      label.textContent = `${e.count} ${cls}`;
      edges.append(label);
    });
  }
  const nodes = svg("g", { class: "nodes" });
  for (const n of g.nodes) {
    const { x, y, first } = pos.get(n.id);
    const gn = svg("g", { class: `node ${text(n.kind)}`, transform: `translate(${x} ${y})` });
    gn.setAttribute("data-id", text(n.id));
    gn.append(svg("circle", { r: R }));
    // labels away from the edges: left of the sources' column, right of the others
    const side = first ? { x: -R - 8, "text-anchor": "end" } : { x: R + 8, "text-anchor": "start" };
    const label = svg("text", { ...side, y: 5 });
    label.textContent = text(n.id);
    gn.append(label);
    if (n.pods && n.pods.length) {
      const pods = svg("text", { ...side, class: "pods", y: 21 });
      pods.textContent = `${n.kind === "service" ? "backends: " : ""}${n.pods.map(text).join(", ")}`;
      gn.append(pods);
    }
    const title = svg("title");
    title.textContent = `${text(n.kind)} ${text(n.id)}`;
    gn.append(title);
    nodes.append(gn);
  }
  map.replaceChildren(defs, edges, nodes);
}

function showStatus(st) {
  const p = document.getElementById("node-status");
  const parts = [`node ${text(st.node) || "?"}: agent ${st.alive ? "running" : "not running"}`];
  if (st.alive) parts.push(`${st.pods.length} pods, ${st.services} service ports`);
  if (st.problems && st.problems.length) parts.push(st.problems.map(text).join("; "));
  p.textContent = parts.join(" · ");
  p.classList.toggle("bad", !st.alive || (st.problems && st.problems.length > 0));
}

async function refreshGraph() {
  const g = await getJSON(`/api/graph?${filters}`);
  showStatus(g.status);
  const sig = JSON.stringify([g.nodes, g.edges.map((e) => [e.src, e.dst, e.verdict, e.count])]);
  if (sig !== graphSig) {
    graphSig = sig;
    drawGraph(g);
  }
  document.body.dataset.edges = String(g.edges.length);
}

// ---- the flow table ----
function flowRow(id, f) {
  const tr = document.createElement("tr");
  tr.className = `v-${verdictClass(f.verdict)}`;
  tr.dataset.id = String(id);
  let dst = text(f.service) || text(f.dst);
  if (f.dst_pod) dst += ` (${text(f.dst_pod)})`;
  const request = f.layer === "L7" ? `${text(f.method)} ${text(f.path)}` : "";
  const cells = [
    ["time", clock(f.time)], ["src", text(f.src)], ["dst", dst], ["layer", text(f.layer)],
    ["verdict", text(f.verdict).toUpperCase()], ["reason", text(f.reason)], ["request", request],
    ["status", f.status ? text(f.status) : ""], ["policy", text(f.policy)],
  ];
  for (const [k, v] of cells) {
    const td = document.createElement("td");
    td.className = k;
    td.textContent = v;
    tr.append(td);
  }
  tr.addEventListener("click", () => {
    for (const s of document.querySelectorAll("#flows tr.selected")) s.classList.remove("selected");
    tr.classList.add("selected");
    showDetails(`${text(f.src)} → ${dst}`, [], f);
  });
  return tr;
}

async function refreshFlows() {
  const doc = await getJSON(`/api/flows?${filters}${filters.toString() ? "&" : ""}after=${cursor}`);
  const body = document.querySelector("#flows tbody");
  const rows = doc.flows.map((x) => flowRow(x.id, x.flow)).reverse();  // newest first
  body.prepend(...rows);
  while (body.rows.length > MAX_ROWS) body.deleteRow(-1);
  cursor = doc.next;
  document.getElementById("flow-count").textContent = `${body.rows.length} shown, newest first`;
}

async function refresh() {
  clearTimeout(pollTimer);
  try {
    await refreshFlows();
    await refreshGraph();
    showError("");
    document.body.dataset.loaded = "1";
  } catch (e) {
    showError(String(e.message || e));
  }
  pollTimer = setTimeout(refresh, POLL_MS);
}

function applyFilters(form) {
  const next = new URLSearchParams();
  for (const k of FILTERS) {
    const v = form.elements[k].value.trim();
    if (v) next.set(k, v);
  }
  filters = next;
  cursor = 0;
  graphSig = "";
  document.querySelector("#flows tbody").replaceChildren();
  history.replaceState(null, "", next.toString() ? `?${next}` : location.pathname);
  refresh();
}

function start() {
  const form = document.getElementById("filters");
  const given = new URLSearchParams(location.search);
  for (const k of FILTERS) if (given.has(k)) form.elements[k].value = given.get(k);
  form.addEventListener("submit", (ev) => { ev.preventDefault(); applyFilters(form); });
  form.addEventListener("reset", () => setTimeout(() => applyFilters(form), 0));
  applyFilters(form);
}

document.addEventListener("DOMContentLoaded", start);
