"""The `/asyncflow` page: one self-contained HTML document (no CDN, no Bokeh session).

The state at request time is embedded in the page, so it renders at once (also in a
headless browser taking a screenshot); then it polls `api/state.json` once a second
and redraws: the workflow DAG with each operator's state, throughput and busy share;
queue occupancy per column and leases in flight; weight versions and the staleness of
trained samples; reward/accuracy, step time and throughput curves; and a per-worker
timeline of operator activity, where idle gaps (bubbles) show.
"""

# The page's HTML, CSS and JavaScript are data here; their lines follow their own style.
# ruff: noqa: E501

from __future__ import annotations


def render_page(state_json: bytes) -> bytes:
    """The page, with `state_json` (the board's view) embedded as its first state."""
    safe = state_json.replace(b"</", b"<\\/")  # never close the <script> early
    return _HEAD + safe + _TAIL


_HEAD = b"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>asyncflow - Dask dashboard</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="shortcut icon" href="statics/images/favicon.ico">
<style>
  :root { --fg:#212529; --muted:#6c757d; --line:#dee2e6; --bg:#f8f9fa; --card:#fff;
          --run:#2b8a3e; --idle:#868e96; --done:#1c7ed6; --fail:#c92a2a; --sync:#e8590c; }
  * { box-sizing: border-box; }
  body { margin:0; font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; font-size:13px;
         color:var(--fg); background:var(--bg); }
  nav { background:#ececec; border-bottom:1px solid #d0d0d0; display:flex; align-items:center;
        padding:0 10px; height:38px; gap:2px; }
  nav a { color:#333; text-decoration:none; padding:10px 10px; font-size:13px; }
  nav a:hover { background:#ddd; }
  nav a.active { background:#fff; border-bottom:2px solid #ee7a00; font-weight:bold; }
  nav .brand { font-weight:bold; color:#ee7a00; margin-right:8px; }
  main { padding:10px 14px; }
  .grid { display:grid; grid-template-columns: 1fr 1fr; gap:12px; margin-bottom:12px; }
  .grid4 { display:grid; grid-template-columns: repeat(4, 1fr); gap:12px; }
  .card { background:var(--card); border:1px solid var(--line); border-radius:6px;
          padding:10px 12px; min-width:0; }
  .card h2 { font-size:13px; margin:0 0 6px 0; color:#495057; text-transform:uppercase;
             letter-spacing:.04em; }
  .wide { grid-column: 1 / span 2; }
  #header { display:flex; flex-wrap:wrap; align-items:center; gap:14px; margin-bottom:12px; }
  #title { font-size:18px; font-weight:bold; }
  .badge { border-radius:10px; padding:2px 9px; font-size:12px; color:#fff; background:var(--idle); }
  .badge.running { background:var(--run); } .badge.finished { background:var(--done); }
  .badge.failed { background:var(--fail); } .badge.mode { background:#5f3dc4; }
  .stat { display:flex; flex-direction:column; min-width:70px; }
  .stat b { font-size:16px; } .stat span { color:var(--muted); font-size:11px; }
  .bar { height:10px; background:#e9ecef; border-radius:5px; overflow:hidden; width:220px; }
  .bar > div { height:100%; background:var(--run); }
  table { border-collapse:collapse; width:100%; }
  th, td { text-align:right; padding:3px 6px; border-bottom:1px solid #f1f3f5; white-space:nowrap; }
  th:first-child, td:first-child { text-align:left; }
  th { color:#495057; font-weight:600; font-size:12px; }
  .dot { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:5px;
         vertical-align:middle; }
  .muted { color:var(--muted); }
  svg text { font-family: "DejaVu Sans", Helvetica, Arial, sans-serif; }
  #waiting { padding:40px; font-size:15px; }
  #messages div { font-size:12px; color:#862e9c; }
</style>
</head>
<body>
<nav>
  <span class="brand">asyncflow</span>
  <a href="status">Status</a><a href="workers">Workers</a><a href="tasks">Tasks</a>
  <a href="system">System</a><a href="profile">Profile</a><a href="graph">Graph</a>
  <a href="individual-fine-performance-metrics">Fine Performance Metrics</a>
  <a href="info">Info</a><a class="active" href="asyncflow">Asyncflow</a>
  <span style="flex:1"></span>
  <a href="asyncflow/api/state.json">state.json</a><a href="metrics">/metrics</a>
</nav>
<main>
<div id="waiting" style="display:none">Waiting for an asyncflow run to report here.
  <div class="muted">Start one with <code>asyncflow run grpo --scheduler ADDRESS</code>
  (or <code>asyncflow run grpo</code>, which starts its own cluster and prints this page's
  address). The page updates by itself.</div></div>
<div id="run" style="display:none">
  <div id="header"></div>
  <div class="card" style="margin-bottom:12px"><h2>Workflow</h2><div id="dag"></div></div>
  <div class="grid">
    <div class="card"><h2>Operators</h2><div id="ops"></div></div>
    <div class="card"><h2>TransferQueue</h2><div id="queue"></div></div>
    <div class="card wide"><h2 id="timeline-title">Operator activity per worker</h2>
      <div id="timeline"></div><div id="messages"></div></div>
  </div>
  <div class="grid4">
    <div class="card"><h2>Reward and accuracy</h2><div id="curve-reward"></div></div>
    <div class="card"><h2>Step time</h2><div id="curve-time"></div></div>
    <div class="card"><h2>Rows/s per operator</h2><div id="curve-thr"></div></div>
    <div class="card"><h2>Weights and staleness</h2><div id="weights"></div></div>
  </div>
</div>
</main>
<script type="application/json" id="initial-state">"""

_TAIL = b"""</script>
<script>
"use strict";
const NS = "http://www.w3.org/2000/svg";
const PALETTE = ["#1f77b4","#ff7f0e","#2ca02c","#d62728","#9467bd","#8c564b","#e377c2",
                 "#7f7f7f","#bcbd22","#17becf"];
const STATE_STYLE = {running:["#d3f9d8","#2b8a3e"], idle:["#f1f3f5","#868e96"],
                     done:["#e7f5ff","#1c7ed6"], failed:["#ffe3e3","#c92a2a"]};
let ORDER = [];

function el(tag, attrs, text) {
  const e = document.createElementNS(NS, tag);
  for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
  if (text !== undefined) e.textContent = text;
  return e;
}
function svgRoot(w, h) { return el("svg", {width: w, height: h, viewBox: `0 0 ${w} ${h}`}); }
function color(op) { const i = ORDER.indexOf(op); return PALETTE[(i < 0 ? 0 : i) % PALETTE.length]; }
function num(x, d) {
  if (x === null || x === undefined || Number.isNaN(x)) return "-";
  const a = Math.abs(x);
  if (d !== undefined) return x.toFixed(d);
  if (a >= 1e6) return (x / 1e6).toFixed(1) + "M";
  if (a >= 1e4) return (x / 1e3).toFixed(1) + "k";
  if (a >= 100) return x.toFixed(0);
  if (a >= 10) return x.toFixed(1);
  return x.toFixed(2);
}
function pct(x) { return (x === null || x === undefined) ? "-" : (100 * x).toFixed(1) + "%"; }
function dur(s) {
  if (s === null || s === undefined || !isFinite(s)) return "-";
  s = Math.max(0, Math.round(s));
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return h ? `${h}h${String(m).padStart(2, "0")}m` : `${m}:${String(r).padStart(2, "0")}`;
}
function bytes(b) {
  if (!b) return "0 B";
  const u = ["B","KiB","MiB","GiB"]; let i = 0;
  while (b >= 1024 && i < u.length - 1) { b /= 1024; i++; }
  return b.toFixed(i ? 1 : 0) + " " + u[i];
}
function short(s, n) { return s.length > n ? s.slice(0, n - 1) + "\\u2026" : s; }
function stat(label, value) { return `<div class="stat"><b>${value}</b><span>${label}</span></div>`; }

function renderHeader(s) {
  const run = s.run, last = s.last_step || {};
  const total = run.steps - run.first_step, done = s.steps_done || 0;
  const times = (s.steps || []).slice(-10).map(r => r.step_time).filter(x => x !== null);
  const mean = times.length ? times.reduce((a, b) => a + b, 0) / times.length : null;
  const eta = s.status === "running" && mean !== null ? mean * (total - done) : null;
  const version = Object.values((s.weights || {}).published || {});
  const st = s.staleness || {};
  document.getElementById("header").innerHTML =
    `<span id="title">${run.workflow}</span>` +
    `<span class="badge mode">${run.mode}${run.mode === "async" ? " S=" + run.max_staleness : ""}</span>` +
    `<span class="badge ${s.status}" id="status">${s.status}</span>` +
    `<div class="stat"><b id="step">step ${Math.min(run.first_step + done, run.steps)}/${run.steps}</b>` +
    `<div class="bar"><div style="width:${(100 * done / Math.max(total, 1)).toFixed(1)}%"></div></div></div>` +
    stat("ETA", eta === null ? "-" : dur(eta)) + stat("elapsed", dur(s.elapsed)) +
    stat("reward", num(last.reward, 3)) + stat("accuracy", pct(last.accuracy)) +
    stat("samples/s", num((s.rates || {}).samples_per_s)) +
    stat("tokens/s", num((s.rates || {}).tokens_per_s)) +
    stat("trained", `<i id="trained" style="font-style:normal">${(s.totals || {}).trained || 0}</i>`) +
    stat("weight version", version.length ? "v" + Math.max(...version) : "-") +
    stat("staleness mean", st.mean === null || st.mean === undefined ? "-" : num(st.mean, 2)) +
    stat("recoveries", (s.totals || {}).recoveries || 0) +
    `<span class="muted">${run.run_dir}</span>`;
}

function layers(run) {
  const ops = run.graph.operators.map(o => o.name), layer = {};
  for (const n of run.order) layer[n] = 0;
  for (const n of run.order)
    for (const [u, v] of run.graph.edges) if (v === n) layer[n] = Math.max(layer[n], layer[u] + 1);
  const cols = [];
  for (const n of run.order) (cols[layer[n]] = cols[layer[n]] || []).push(n);
  return {cols, ops};
}

function renderDag(s) {
  const run = s.run, ops = s.operators || {};
  const {cols} = layers(run);
  const W = Math.max(document.getElementById("dag").clientWidth || 900, 420);
  const bw = Math.max(110, Math.min(200, (W - 20) / cols.length - 60)), bh = 58;
  const rows = Math.max(...cols.map(c => c.length));
  const H = rows * (bh + 22) + (run.graph.weight_syncs.length ? 50 : 16);
  const pos = {};
  cols.forEach((c, i) => c.forEach((n, j) => {
    const x = 10 + i * ((W - 20 - bw) / Math.max(cols.length - 1, 1));
    const y = 8 + (rows - c.length) * (bh + 22) / 2 + j * (bh + 22);
    pos[n] = {x, y};
  }));
  const svg = svgRoot(W, H);
  const defs = el("defs");
  const marker = el("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5,
                               markerWidth: 7, markerHeight: 7, orient: "auto"});
  marker.appendChild(el("path", {d: "M0,0 L10,5 L0,10 z", fill: "#868e96"}));
  defs.appendChild(marker); svg.appendChild(defs);
  for (const [u, v, cols_] of run.graph.edges) {
    const a = pos[u], b = pos[v]; if (!a || !b) continue;
    const x1 = a.x + bw, y1 = a.y + bh / 2, x2 = b.x, y2 = b.y + bh / 2, mx = (x1 + x2) / 2;
    svg.appendChild(el("path", {d: `M${x1},${y1} C${mx},${y1} ${mx},${y2} ${x2 - 2},${y2}`,
      fill: "none", stroke: "#adb5bd", "stroke-width": 1.4, "marker-end": "url(#arrow)"}));
    const room = Math.max(4, Math.floor((x2 - x1 - 10) / 6.2));
    const t = el("text", {x: mx, y: (y1 + y2) / 2 - 4, "font-size": 9, fill: "#868e96",
                          "text-anchor": "middle"}, short(cols_.join(", "), room));
    t.appendChild(el("title", {}, cols_.join(", ")));
    svg.appendChild(t);
  }
  const published = (s.weights || {}).published || {};
  for (const [src, dst] of run.graph.weight_syncs) {
    const a = pos[src], b = pos[dst]; if (!a || !b) continue;
    const x1 = a.x + bw / 2, x2 = b.x + bw / 2, y1 = a.y + bh, y2 = b.y + bh;
    const low = Math.max(y1, y2) + 34;
    svg.appendChild(el("path", {d: `M${x1},${y1} C${x1},${low} ${x2},${low} ${x2},${y2 + 2}`,
      fill: "none", stroke: "#e8590c", "stroke-width": 1.6, "stroke-dasharray": "5,3",
      "marker-end": "url(#arrow)"}));
    const v = published[src];
    svg.appendChild(el("text", {x: (x1 + x2) / 2, y: low - 4, "font-size": 10, fill: "#e8590c",
      "text-anchor": "middle"}, "weights" + (v === undefined ? "" : " v" + v)));
  }
  for (const n of run.order) {
    const p = pos[n], o = ops[n] || {}, state = o.state || "idle";
    const [fill, stroke] = STATE_STYLE[state] || STATE_STYLE.idle;
    const g = el("g", {"class": "op", "data-op": n, "data-state": state});
    g.appendChild(el("rect", {x: p.x, y: p.y, width: bw, height: bh, rx: 6, fill, stroke,
                              "stroke-width": state === "running" ? 2.2 : 1.2}));
    g.appendChild(el("rect", {x: p.x, y: p.y, width: 5, height: bh, rx: 2, fill: color(n)}));
    g.appendChild(el("text", {x: p.x + 11, y: p.y + 15, "font-size": 12, "font-weight": "bold"},
                     short(n, 18) + ((o.replicas || 1) > 1 ? ` \\u00d7${o.replicas}` : "")));
    g.appendChild(el("text", {x: p.x + bw - 6, y: p.y + 15, "font-size": 10, fill: stroke,
                              "text-anchor": "end", "class": "state"}, state));
    g.appendChild(el("text", {x: p.x + 11, y: p.y + 31, "font-size": 10, fill: "#495057"},
                     `${num(o.throughput || 0)} rows/s \\u00b7 ${o.consumed || o.produced || 0} rows`));
    const bwid = bw - 20, f = Math.max(0, Math.min(1, o.busy_fraction || 0));
    g.appendChild(el("rect", {x: p.x + 11, y: p.y + 40, width: bwid, height: 7, rx: 3, fill: "#e9ecef"}));
    g.appendChild(el("rect", {x: p.x + 11, y: p.y + 40, width: bwid * f, height: 7, rx: 3, fill: color(n)}));
    g.appendChild(el("text", {x: p.x + 11, y: p.y + bh - 1, "font-size": 8, fill: "#868e96"},
                     `busy ${(100 * f).toFixed(0)}%`));
    svg.appendChild(g);
  }
  const box = document.getElementById("dag"); box.replaceChildren(svg);
}

function renderOps(s) {
  const ops = s.operators || {};
  let h = "<table><tr><th>operator</th><th>state</th><th>replicas</th><th>in</th><th>out</th>" +
          "<th>rows/s</th><th>busy</th><th>busy (run)</th><th>leases</th><th>weights</th></tr>";
  for (const n of s.run.order) {
    const o = ops[n] || {};
    const w = Object.values(o.weight_versions || {});
    h += `<tr data-op="${n}"><td><span class="dot" style="background:${color(n)}"></span>${n}</td>` +
      `<td>${o.state || "-"}</td><td>${o.replicas || 1}</td><td class="consumed">${o.consumed || 0}</td>` +
      `<td class="produced">${o.produced || 0}</td><td>${num(o.throughput || 0)}</td>` +
      `<td>${pct(o.busy_fraction || 0)}</td><td>${pct(o.busy_fraction_total || 0)}</td>` +
      `<td>${o.in_flight || 0}</td><td>${w.length ? "v" + w.join(",v") : ""}</td></tr>`;
  }
  document.getElementById("ops").innerHTML = h + "</table>";
}

function hbars(items, max, fmt, width) {
  const W = Math.max(width || 560, 360), rowH = 16, H = items.length * rowH + 4, svg = svgRoot(W, H);
  items.forEach(([label, value, c], i) => {
    const y = i * rowH + 2, w = max > 0 ? (W - 250) * Math.min(1, value / max) : 0;
    svg.appendChild(el("text", {x: 0, y: y + 11, "font-size": 10}, short(label, 22)));
    svg.appendChild(el("rect", {x: 140, y, width: W - 250, height: rowH - 4, fill: "#f1f3f5"}));
    svg.appendChild(el("rect", {x: 140, y, width: w, height: rowH - 4, fill: c || "#4dabf7"}));
    svg.appendChild(el("text", {x: W - 104, y: y + 11, "font-size": 10}, fmt(value)));
  });
  return svg;
}

function renderQueue(s) {
  const q = s.queue || {}, box = document.getElementById("queue");
  if (q.live_rows === undefined) { box.textContent = "no queue statistics yet"; return; }
  const head = document.createElement("div");
  head.className = "muted";
  head.textContent = `${q.live_rows} rows live in ${q.partitions} step(s)` +
    (q.capacity_rows ? ` of ${q.capacity_rows}` : "") + ` \\u00b7 ${bytes(q.bytes)} \\u00b7 ` +
    `${q.leases_in_flight} lease(s) in flight`;
  const ready = Object.entries(q.ready || {}).map(([c, v]) => [c, v, "#74c0fc"]);
  const max = Math.max(q.live_rows || 0, ...ready.map(r => r[1]), 1);
  const W = box.clientWidth;
  box.replaceChildren(head, hbars(ready, max, v => `${v} ready`, W));
  const leases = s.run.order.filter(n => !s.run.graph.operators.find(o => o.name === n).is_source)
    .map(n => [n + " leases", (s.operators[n] || {}).in_flight || 0, color(n)]);
  box.appendChild(hbars(leases, Math.max(4, ...leases.map(l => l[1])), v => `${v} in flight`, W));
}

function lineChart(boxId, series, opts) {
  const box = document.getElementById(boxId);
  const W = Math.max(box.clientWidth || 300, 260), H = opts.height || 170;
  const L = 46, R = 10, T = 10, B = 30;
  const pts = series.flatMap(s => s.points).filter(p => p[1] !== null && p[1] !== undefined);
  const svg = svgRoot(W, H);
  if (!pts.length) {
    svg.appendChild(el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#adb5bd"},
                       "no data yet"));
    box.replaceChildren(svg); return;
  }
  let x0 = Math.min(...pts.map(p => p[0])), x1 = Math.max(...pts.map(p => p[0]));
  let y0 = opts.yMin !== undefined ? opts.yMin : Math.min(...pts.map(p => p[1]));
  let y1 = Math.max(...pts.map(p => p[1]));
  if (opts.yMax !== undefined) y1 = Math.max(y1, opts.yMax);
  if (x1 === x0) { x0 -= 1; x1 += 1; }
  if (y1 === y0) { y1 = y0 + 1; }
  const sx = x => L + (W - L - R) * (x - x0) / (x1 - x0);
  const sy = y => T + (H - T - B) * (1 - (y - y0) / (y1 - y0));
  for (let i = 0; i <= 4; i++) {
    const y = y0 + (y1 - y0) * i / 4;
    svg.appendChild(el("line", {x1: L, x2: W - R, y1: sy(y), y2: sy(y), stroke: "#f1f3f5"}));
    svg.appendChild(el("text", {x: L - 4, y: sy(y) + 3, "font-size": 9, "text-anchor": "end",
                                fill: "#868e96"}, opts.yFmt ? opts.yFmt(y) : num(y)));
  }
  const xt = opts.integerX && x1 - x0 <= 5 ? Math.round(x1 - x0) : 5;
  for (let i = 0; i <= xt; i++) {
    const x = x0 + (x1 - x0) * i / xt;
    svg.appendChild(el("text", {x: sx(x), y: H - B + 13, "font-size": 9, "text-anchor": "middle",
                                fill: "#868e96"}, opts.xFmt ? opts.xFmt(x) : num(x)));
  }
  svg.appendChild(el("text", {x: (L + W - R) / 2, y: H - 3, "font-size": 10, "text-anchor": "middle",
                              fill: "#495057"}, opts.xLabel || ""));
  let lx = L + 6;
  for (const s of series) {
    const p = s.points.filter(q => q[1] !== null && q[1] !== undefined);
    if (!p.length) continue;
    const d = p.map((q, i) => (i ? "L" : "M") + sx(q[0]).toFixed(1) + "," + sy(q[1]).toFixed(1)).join(" ");
    svg.appendChild(el("path", {d, fill: "none", stroke: s.color, "stroke-width": 1.8,
                                "class": "series", "data-name": s.name}));
    if (p.length < 40) for (const q of p)
      svg.appendChild(el("circle", {cx: sx(q[0]), cy: sy(q[1]), r: 2.2, fill: s.color}));
    svg.appendChild(el("rect", {x: lx, y: T + 2, width: 10, height: 3, fill: s.color}));
    const label = el("text", {x: lx + 13, y: T + 7, "font-size": 10}, s.name);
    svg.appendChild(label);
    lx += 20 + 6.5 * s.name.length;
  }
  box.replaceChildren(svg);
}

function renderCurves(s) {
  const steps = s.steps || [];
  const pick = k => steps.map(r => [r.step + 1, r[k] === undefined ? null : r[k]]);
  lineChart("curve-reward", [
    {name: "reward", color: "#1971c2", points: pick("reward")},
    {name: "accuracy", color: "#2b8a3e", points: pick("accuracy")},
  ], {xLabel: "step", xFmt: x => x.toFixed(0), integerX: true});
  lineChart("curve-time", [
    {name: "step time (s)", color: "#e8590c", points: pick("step_time")},
  ], {xLabel: "step", yMin: 0, xFmt: x => x.toFixed(0), integerX: true});
  const series = s.series || [], t1 = s.time || 0;
  lineChart("curve-thr", s.run.order.map(n => ({name: n, color: color(n),
    points: series.map(p => [p.t - t1, (p.throughput || {})[n] === undefined ? null : p.throughput[n]])})),
    {xLabel: "seconds (0 = now)", yMin: 0,
     xFmt: x => x.toFixed(series.length && t1 - series[0].t < 10 ? 1 : 0)});
}

function renderWeights(s) {
  const box = document.getElementById("weights"), w = s.weights || {}, st = s.staleness || {};
  const lines = [];
  for (const [op, v] of Object.entries(w.published || {})) lines.push(`<b>${op}</b> published v${v}`);
  for (const [op, reps] of Object.entries(w.loaded || {}))
    lines.push(`<b>${op}</b> runs ` + Object.entries(reps).map(([r, v]) => `#${r}: v${v}`).join(", "));
  const head = document.createElement("div");
  head.innerHTML = (lines.join("<br>") || "no weights yet") +
    `<div class="muted" style="margin-top:6px">staleness of trained samples (versions behind the ` +
    `trainer): ${st.samples || 0} samples, mean ${st.mean === null || st.mean === undefined ? "-" : num(st.mean, 2)}` +
    `, max ${st.max === null || st.max === undefined ? "-" : st.max}</div>`;
  const hist = st.hist || [];
  let top = 0; hist.forEach((c, i) => { if (c) top = i; });
  const n = Math.max(top + 1, (s.run.max_staleness || 0) + 2, 3);
  const W = Math.max(box.clientWidth || 300, 240), H = 110, L = 30, B = 20;
  const bw = (W - L) / n, max = Math.max(1, ...hist);
  const svg = svgRoot(W, H);
  for (let i = 0; i < n; i++) {
    const c = hist[i] || 0, h = (H - B - 12) * c / max;
    svg.appendChild(el("rect", {x: L + i * bw + 2, y: H - B - h, width: bw - 4, height: h,
                                fill: i <= (s.run.max_staleness || 0) ? "#4dabf7" : "#ff8787"}));
    svg.appendChild(el("text", {x: L + i * bw + bw / 2, y: H - 6, "font-size": 10,
                                "text-anchor": "middle"}, String(i)));
    if (c) svg.appendChild(el("text", {x: L + i * bw + bw / 2, y: H - B - h - 2, "font-size": 9,
                                       "text-anchor": "middle", fill: "#495057"}, String(c)));
  }
  svg.appendChild(el("text", {x: 0, y: H - 6, "font-size": 9, fill: "#868e96"}, "lag"));
  box.replaceChildren(head, svg);
}

function renderTimeline(s) {
  const box = document.getElementById("timeline"), segs = s.segments || [];
  const W = Math.max(box.clientWidth || 1100, 600), L = 190, R = 10, T = 6, laneH = 16;
  const end = s.status === "running" ? s.time : Math.max(...segs.map(x => x[6]), 0) || s.time;
  const first = segs.length ? Math.min(...segs.map(x => x[5])) : end - 60;
  const span = Math.min(60, Math.max(2, Math.ceil((end - first) * 1.05)));
  const start = end - span;
  document.getElementById("timeline-title").textContent =
    `Operator activity per worker (last ${span} s; dark: busy, light: in flight, dotted: step ends)`;
  const lanes = {};
  for (const [op, rep, worker] of segs) {
    const key = `${worker}|${String(ORDER.indexOf(op)).padStart(3, "0")}|${String(rep).padStart(3, "0")}`;
    lanes[key] = [worker, op, rep];
  }
  const keys = Object.keys(lanes).sort();
  const H = T + Math.max(keys.length, 1) * laneH + 36, svg = svgRoot(W, H);
  const sx = t => L + (W - L - R) * (t - start) / (end - start);
  keys.forEach((k, i) => {
    const [worker, op, rep] = lanes[k], y = T + i * laneH;
    if (i % 2 === 0) svg.appendChild(el("rect", {x: L, y, width: W - L - R, height: laneH, fill: "#f8f9fa"}));
    const where = worker.replace(/^[a-z]+:\\/\\//, "");
    svg.appendChild(el("text", {x: 0, y: y + 12, "font-size": 10},
                            `${short(where, 21)}  ${op}#${rep}`));
  });
  for (const r of s.steps || []) if (r.time >= start) {
    svg.appendChild(el("line", {x1: sx(r.time), x2: sx(r.time), y1: T, y2: H - 20,
                                stroke: "#adb5bd", "stroke-dasharray": "2,2"}));
  }
  for (const [op, rep, worker, step, rows, t0, t1, busy] of segs) {
    if (t1 < start) continue;
    const key = `${worker}|${String(ORDER.indexOf(op)).padStart(3, "0")}|${String(rep).padStart(3, "0")}`;
    const y = T + keys.indexOf(key) * laneH + 2, a = Math.max(sx(t0), L), b = Math.min(sx(t1), W - R);
    const rect = el("rect", {x: a, y, width: Math.max(b - a, 1), height: laneH - 4,
                             fill: color(op), opacity: 0.35, "class": "seg", "data-op": op});
    svg.appendChild(rect);
    const bb = Math.max(sx(t1 - busy), L);
    svg.appendChild(el("rect", {x: bb, y, width: Math.max(b - bb, 1), height: laneH - 4,
                                fill: color(op)}));
  }
  for (let i = 0; i <= 6; i++) {
    const t = start + span * i / 6;
    svg.appendChild(el("text", {x: sx(t), y: H - 22, "font-size": 9, "text-anchor": "middle",
                                fill: "#868e96"}, `${(t - end).toFixed(span < 10 ? 1 : 0)}s`));
  }
  let lx = L;
  for (const op of ORDER) {
    svg.appendChild(el("rect", {x: lx, y: H - 11, width: 10, height: 8, fill: color(op)}));
    svg.appendChild(el("text", {x: lx + 13, y: H - 3, "font-size": 9}, op));
    lx += 24 + 6 * op.length;
  }
  if (!keys.length) svg.appendChild(el("text", {x: W / 2, y: 16, "text-anchor": "middle",
                                                fill: "#adb5bd"}, "no operator activity yet"));
  box.replaceChildren(svg);
  document.getElementById("messages").innerHTML =
    (s.messages || []).slice(-5).map(m => `<div>${m.replace(/</g, "&lt;")}</div>`).join("");
}

function render(s) {
  const waiting = !s || !s.run;
  document.getElementById("waiting").style.display = waiting ? "block" : "none";
  document.getElementById("run").style.display = waiting ? "none" : "block";
  document.body.dataset.status = waiting ? "waiting" : s.status;
  if (waiting) return;
  ORDER = s.run.order;
  document.title = `asyncflow: ${s.run.workflow} ${s.status} - Dask`;
  for (const f of [renderHeader, renderDag, renderOps, renderQueue, renderCurves, renderWeights,
                   renderTimeline]) {
    try { f(s); } catch (e) { console.error(f.name, e); }
  }
}

const STATE_URL = location.pathname.replace(/\\/+$/, "") + "/api/state.json";
async function poll() {
  try {
    const r = await fetch(STATE_URL, {cache: "no-store"});
    if (r.ok) render(await r.json());
  } catch (e) { /* the scheduler went away; try again */ }
  setTimeout(poll, 1000);
}
render(JSON.parse(document.getElementById("initial-state").textContent));
setTimeout(poll, 1000);
</script>
</body>
</html>
"""
