// The ef21 dashboard: polls /status and /history?since=ROUND on the master that served this page and draws the
// curves with uPlot. No build step, no framework: the master serves this file as it is.
"use strict";

const POLL_MS = 1000;          // while the run goes
const IDLE_POLL_MS = 5000;     // once it has ended (the master may still be up)
const MAX_POINTS = 8192;       // the page thins its copy like the master does, so a long run stays light
const ENDED = new Set(["done", "failed", "stopped"]);

// --status-token: the token comes in the URL fragment (never sent to the server by the browser), is kept for
// this tab only, and travels as a Bearer header with each request.
let token = sessionStorage.getItem("ef21-token");
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  token = fragment.get("token");
  sessionStorage.setItem("ef21-token", token);
  history.replaceState(null, "", location.pathname + location.search);  // keep it out of the address bar
}

const cols = {};               // column name → array, as /history names them
let columns = [];
let lastRound = -1;
let xKey = "round";
let charts = [];
let ended = false;

class AuthNeeded extends Error {}

async function getJSON(path) {
  const headers = token ? { Authorization: "Bearer " + token } : {};
  const r = await fetch(path, { headers, cache: "no-store" });
  if (r.status === 401) throw new AuthNeeded();
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

const $ = (id) => document.getElementById(id);

function fmt(v, digits = 6) {
  if (v === null || v === undefined) return "—";
  if (typeof v !== "number") return String(v);
  if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString("en-US");
  return Math.abs(v) >= 1e-3 && Math.abs(v) < 1e6 ? v.toPrecision(digits) : v.toExponential(digits - 1);
}

function bytes(v) {
  if (v === null || v === undefined) return "—";
  const units = ["B", "kB", "MB", "GB", "TB"];
  let x = v, i = 0;
  while (x >= 1000 && i < units.length - 1) { x /= 1000; i++; }
  return i === 0 ? v + " B" : x.toFixed(2) + " " + units[i];
}

// Each figure is shown formatted, with its exact value in data-value (what /status said, to the last bit).
function show(id, value, text) {
  const el = $(id);
  el.dataset.value = value === null || value === undefined ? "" : String(value);
  el.textContent = text === undefined ? fmt(value) : text;
}

function renderStatus(s) {
  const lat = s.latest || {};
  $("run").textContent = "run " + s.run_id + " · " + s.method + " / " + s.compressor + " k=" + s.k +
    " · " + s.data + " (" + s.problem + ")";
  const st = $("state");
  st.dataset.value = s.state;
  st.textContent = s.state;
  $("detail").textContent = s.detail || "";
  show("v-round", s.round);
  $("v-planned").textContent = "of " + fmt(s.rounds_planned);
  show("v-rate", s.rounds_per_second, s.rounds_per_second === null ? "—" : s.rounds_per_second.toFixed(1));
  show("v-elapsed", s.elapsed_s, s.elapsed_s.toFixed(1) + " s");
  show("v-f", lat.f);
  show("v-grad", lat.last_grad_norm_sq);
  show("v-G", lat.G);
  show("v-gnorm", s.g_norm_sq);
  show("v-bits", lat.bits_per_worker);
  show("v-up", lat.wire_bytes_up, bytes(lat.wire_bytes_up));
  show("v-down", lat.wire_bytes_down, bytes(lat.wire_bytes_down));
  show("v-eval", lat.eval_bytes, bytes(lat.eval_bytes));
  show("v-workers", s.workers_connected, s.workers_connected + " / " + s.workers_expected);
  $("setup").textContent = s.gamma === null ? "" : "γ = " + fmt(s.gamma) +
    (s.constants ? " · L = " + fmt(s.constants.L) + " · L̃ = " + fmt(s.constants.L_tilde) : "");
  const body = $("workers").tBodies[0];
  body.replaceChildren(...s.workers.map((w) => {
    const tr = document.createElement("tr");
    tr.dataset.rank = w.rank;
    for (const [key, text] of [["rank", w.rank], ["state", w.state], ["hostname", w.hostname],
      ["address", w.address], ["rounds_done", fmt(w.rounds_done)], ["late_messages", fmt(w.late_messages)],
      ["bytes_up", bytes(w.bytes_up)], ["bytes_down", bytes(w.bytes_down)],
      ["last_seen_ago_s", w.last_seen_ago_s.toFixed(1) + " s ago"]]) {
      const td = document.createElement("td");
      td.dataset.key = key;
      td.dataset.value = String(w[key]);
      td.textContent = text;
      tr.appendChild(td);
    }
    return tr;
  }));
}

function append(h) {
  if (!columns.length) { columns = h.columns; for (const c of columns) cols[c] = []; }
  const r = cols.round;
  for (const p of h.points) {
    if (r.length && p[0] <= r[r.length - 1]) {  // a resumed run repeats rounds after its checkpoint
      const keep = r.findIndex((x) => x >= p[0]);
      for (const c of columns) cols[c].length = keep;
    }
    columns.forEach((c, i) => cols[c].push(p[i]));
    lastRound = p[0];
  }
  if (r.length > MAX_POINTS) {
    for (const c of columns) cols[c] = cols[c].filter((_, i) => i % 2 === 0 || i === r.length - 1);
  }
}

const positive = (a) => a.map((v) => (v !== null && v > 0 ? v : null));  // log scale: gaps for ≤ 0

const CHARTS = [
  // ‖∇f‖² last, so that it is drawn on top: near a stationary point ‖g‖² → ‖∇f‖² and would hide it.
  { id: "chart-grad", title: "‖∇f‖², G, ‖g‖²", log: true, series: [
    ["G", "G", "#e07b00", [5, 4]], ["g_norm_sq", "‖g‖²", "#9a7fc8", [2, 3]], ["grad_norm_sq", "‖∇f(x)‖²", "#1f5fbf"]] },
  { id: "chart-f", title: "f(x)", log: true, series: [["f", "f(x)", "#13803a"]] },
  { id: "chart-bytes", title: "wire bytes (cumulative)", log: true, series: [
    ["wire_bytes_up", "up", "#b0287a"], ["wire_bytes_down", "down", "#2a8f9e"]] },
];
const X_LABELS = { round: "round", bits_per_worker: "bits per worker", elapsed_s: "wall time (s)" };

// uPlot puts a tick and a grid line at every 1…9 × 10^k of a log axis; over many decades they run together into a
// grey band. Ticks at the decades only, and at every n-th decade when there are more than eight.
function decades(u, axisIdx, min, max) {
  if (!(min > 0 && max > min && Number.isFinite(max))) return [];  // no data yet
  const lo = Math.ceil(Math.log10(min) - 1e-9), hi = Math.floor(Math.log10(max) + 1e-9);
  const every = Math.max(1, Math.ceil((hi - lo + 1) / 8));
  const out = [];
  for (let e = lo; e <= hi; e++) if (e % every === 0) out.push(10 ** e);
  return out.length >= 2 ? out : [min, ...out, max];
}

function chartData(spec) {
  if (!columns.length) return [[], ...spec.series.map(() => [])];
  return [cols[xKey], ...spec.series.map(([key]) => positive(cols[key]))];
}

function makeCharts() {
  for (const c of charts) c.destroy();
  charts = CHARTS.map((spec) => {
    const el = $(spec.id);
    const opts = {
      title: spec.title,
      width: Math.max(el.clientWidth, 320),
      height: 280,
      scales: { x: { time: false }, y: spec.log ? { distr: 3, log: 10 } : {} },
      axes: [{ label: X_LABELS[xKey] }, spec.log ? {
        size: 70, splits: decades, filter: (u, splits) => splits,  // (its own filter would hide some again)
        values: (u, v) => v.map((x) => (x == null ? "" : x.toExponential(Number.isInteger(Math.log10(x)) ? 0 : 1))),
      } : { size: 70 }],
      series: [{ label: X_LABELS[xKey] },
        ...spec.series.map(([, label, stroke, dash]) => ({
          label, stroke, dash, width: dash ? 1.3 : 2, spanGaps: true, points: { show: false } }))],
      legend: { live: false },
      cursor: { drag: { x: true, y: false } },
    };
    const u = new uPlot(opts, chartData(spec), el);
    u.spec = spec;
    return u;
  });
}

function redraw() {
  for (const u of charts) {
    u.setData(chartData(u.spec));
    $(u.spec.id).dataset.points = String(columns.length ? cols.round.length : 0);
  }
}

async function poll() {
  let status;
  try {
    status = await getJSON("/status");
    $("auth").hidden = true;
    renderStatus(status);
    let h;
    do {  // the master sends the curves in bounded slices
      h = await getJSON("/history?since=" + lastRound);
      append(h);
    } while (h.more);
    redraw();
    $("conn").textContent = "updated " + new Date().toLocaleTimeString();
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
    document.body.dataset.round = String(status.round);
    document.body.dataset.historyRound = String(lastRound);
    ended = ENDED.has(status.state);
  } catch (e) {
    if (e instanceof AuthNeeded) {
      $("auth").hidden = false;
      $("conn").textContent = "run token needed";
    } else {
      $("conn").textContent = "master unreachable (" + e.message + "); retrying";
    }
  }
  setTimeout(poll, ended ? IDLE_POLL_MS : POLL_MS);
}

$("auth").addEventListener("submit", (ev) => {
  ev.preventDefault();
  token = $("token").value.trim();
  sessionStorage.setItem("ef21-token", token);
  $("auth").hidden = true;
});
for (const r of document.querySelectorAll("input[name=xaxis]")) {
  r.addEventListener("change", () => { xKey = r.value; makeCharts(); redraw(); });
}
let resizeTimer;
window.addEventListener("resize", () => {
  clearTimeout(resizeTimer);
  resizeTimer = setTimeout(() => { for (const u of charts) u.setSize({ width: Math.max($(u.spec.id).clientWidth, 320), height: 280 }); }, 150);
});
makeCharts();
poll();
