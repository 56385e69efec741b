// The admin page: reads the API with the operator's key (if keys are set), redraws
// on WebSocket events, and drives cancel / re-drive / pause / resume. No framework,
// no build step; every piece of data reaches the DOM through textContent, never HTML.
"use strict";

const STATUSES = ["blocked", "ready", "running", "retrying", "completed", "failed", "cancelled"];
const PRIORITIES = ["critical", "high", "normal", "low"];
const KEY_STORAGE = "taskqueue-api-key";
const PAGE_SIZE = 50;
const REFRESH_MS = 700; // coalesce bursts of events into one redraw
const POLL_MS = 5000; // fallback refresh, in case the stream is down

const state = { key: sessionStorage.getItem(KEY_STORAGE), cursor: null, filters: {}, socket: null, timers: {} };
const $ = (id) => document.getElementById(id);

function el(tag, props = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  node.append(...children);
  return node;
}

const badge = (status) => el("span", { class: `badge s-${status}`, text: status });
const jobLink = (id) => el("a", { href: `/admin/jobs/${encodeURIComponent(id)}`, text: id });
const when = (iso) => (iso ? new Date(iso).toLocaleTimeString([], { hour12: false }) + "." + iso.slice(20, 23) : "—");

class Unauthorized extends Error {}

async function api(path, options = {}) {
  const headers = { Accept: "application/json", ...(options.headers || {}) };
  if (state.key) headers.Authorization = `Bearer ${state.key}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) throw new Unauthorized("unauthorized");
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) throw new Error(body?.detail || `${response.status} ${response.statusText}`);
  return body;
}

function toast(text, bad = false) {
  const box = $("toast");
  box.textContent = text;
  box.className = bad ? "bad" : "";
  box.hidden = false;
  clearTimeout(state.timers.toast);
  state.timers.toast = setTimeout(() => (box.hidden = true), 4000);
}

function later(name, fn, ms = REFRESH_MS) {
  if (state.timers[name]) return;
  state.timers[name] = setTimeout(() => {
    state.timers[name] = null;
    fn().catch(handleError);
  }, ms);
}

function handleError(error) {
  if (error instanceof Unauthorized) showLogin(state.key ? "that key was refused" : "");
  else toast(String(error.message || error), true);
}

// ------------------------------------------------------------------ login
function showLogin(message) {
  for (const id of ["dashboard", "job"]) $(id).hidden = true;
  $("login").hidden = false;
  $("key-error").textContent = message;
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  state.key = $("key-input").value.trim();
  sessionStorage.setItem(KEY_STORAGE, state.key);
  $("login").hidden = true;
  start();
});

$("forget-key").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_STORAGE);
  location.reload();
});

// -------------------------------------------------------------- dashboard
function renderDepth(depth) {
  const counts = {};
  for (const d of depth) counts[`${d.status}/${d.priority}`] = d.jobs;
  const table = $("depth");
  table.replaceChildren();
  table.append(el("tr", {}, el("th", { text: "status" }), ...PRIORITIES.map((p) => el("th", { class: "num", text: p })), el("th", { class: "num", text: "total" })));
  const totals = Object.fromEntries(PRIORITIES.map((p) => [p, 0]));
  for (const status of STATUSES) {
    const row = el("tr", {}, el("td", {}, badge(status)));
    let sum = 0;
    for (const p of PRIORITIES) {
      const n = counts[`${status}/${p}`] || 0;
      sum += n;
      totals[p] += n;
      row.append(el("td", { class: n ? "num" : "num zero", text: n.toLocaleString() }));
    }
    row.append(el("td", { class: "num", text: sum.toLocaleString() }));
    table.append(row);
  }
  const all = Object.values(totals).reduce((a, b) => a + b, 0);
  table.append(el("tr", { class: "total" }, el("td", { text: "all" }), ...PRIORITIES.map((p) => el("td", { class: "num", text: totals[p].toLocaleString() })), el("td", { class: "num", text: all.toLocaleString() })));
}

function bar(label, used, capacity, unit) {
  const fill = el("span");
  const share = capacity ? used / capacity : 0;
  fill.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  return el("div", { class: "bar-row" }, el("span", { text: label }), el("div", { class: share > 0.85 ? "bar hot" : "bar" }, fill), el("span", { text: `${used.toLocaleString()} / ${capacity.toLocaleString()} ${unit}` }));
}

function renderNodes(nodes) {
  const box = $("nodes");
  box.replaceChildren();
  if (!nodes.length) box.append(el("p", { class: "empty", text: "no worker node is running" }));
  for (const node of nodes) {
    const list = el("ul", { class: "running-list" });
    for (const job of node.running) {
      list.append(el("li", { title: `${job.type} · ${job.priority} · ${job.cpu_units} CPU / ${job.memory_mb} MB since ${job.started_at}` }, jobLink(job.job_id), ` ${job.cpu_units}c/${job.memory_mb}MB`));
    }
    if (!node.running.length) list.append(el("li", { class: "empty", text: "idle" }));
    box.append(el("div", { class: "node" },
      el("div", { class: "node-head" }, el("span", { text: node.node_id }), el("small", { text: `${node.status} · ${node.running.length} running · heartbeat ${when(node.heartbeat_at)}` })),
      bar("CPU", node.cpu.used, node.cpu.capacity, "units"),
      bar("Memory", node.memory.used, node.memory.capacity, "MB"),
      list));
  }
}

function renderDispatch(paused) {
  const pill = $("dispatch-state");
  pill.textContent = paused ? "dispatch paused" : "dispatching";
  pill.className = paused ? "pill paused" : "pill on";
  $("pause").disabled = paused;
  $("resume").disabled = !paused;
}

async function loadOverview() {
  const overview = await api("/admin/api/overview");
  renderDepth(overview.depth);
  renderNodes(overview.nodes);
  renderDispatch(overview.paused);
}

function jobRow(job) {
  const row = el("tr", { "data-job": job.job_id },
    el("td", {}, jobLink(job.job_id)), el("td", { text: job.type }), el("td", { text: job.priority }),
    el("td", { class: "status" }, badge(job.status)), el("td", { class: "attempts", text: job.attempts ?? 0 }),
    el("td", { text: when(job.created_at) }));
  return row;
}

function jobQuery(cursor) {
  const params = new URLSearchParams({ limit: PAGE_SIZE });
  for (const [name, value] of Object.entries(state.filters)) if (value) params.set(name, value);
  if (cursor) params.set("cursor", cursor);
  return `/jobs?${params}`;
}

async function loadJobs(append = false) {
  const page = await api(jobQuery(append ? state.cursor : null));
  const body = $("jobs").tBodies[0];
  if (!append) body.replaceChildren();
  for (const job of page.items) body.append(jobRow(job));
  if (!body.rows.length) body.append(el("tr", { class: "placeholder" }, el("td", { class: "empty", colspan: 6, text: "no jobs match" })));
  state.cursor = page.next_cursor;
  $("more").hidden = !page.next_cursor;
}

async function loadDeadLetter() {
  const page = await api("/dead-letter?limit=20");
  const body = $("dlq").tBodies[0];
  body.replaceChildren();
  for (const job of page.items) {
    const redrive = el("button", { type: "button", text: "Re-drive" });
    redrive.addEventListener("click", () => act(`/jobs/${encodeURIComponent(job.job_id)}/retry`, "POST", `re-driven ${job.job_id}`));
    body.append(el("tr", {}, el("td", {}, jobLink(job.job_id)), el("td", { text: job.type }), el("td", { text: job.failure_reason || "" }), el("td", { class: "wrap", text: job.last_error || "" }), el("td", { text: when(job.finished_at) }), el("td", {}, redrive)));
  }
  if (!page.items.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: 6, text: "nothing has failed" })));
}

function matchesFilters(event) {
  const f = state.filters;
  return (!f.status || f.status === event.status) && (!f.type || f.type === event.type) && (!f.priority || f.priority === event.priority);
}

function onDashboardEvent(event) {
  const body = $("jobs").tBodies[0];
  const row = body.querySelector(`tr[data-job="${CSS.escape(event.job_id)}"]`);
  if (row) {
    row.querySelector(".status").replaceChildren(badge(event.status));
    row.querySelector(".attempts").textContent = event.attempt;
    row.classList.remove("flash");
    void row.offsetWidth; // restart the highlight animation
    row.classList.add("flash");
  } else if (event.previous_status === null && matchesFilters(event)) {
    body.querySelector("tr.placeholder")?.remove();
    const fresh = jobRow({ ...event, attempts: event.attempt, created_at: event.at });
    fresh.classList.add("flash");
    body.prepend(fresh);
    while (body.rows.length > PAGE_SIZE * 2) body.deleteRow(-1); // keep a long-lived page light
  }
  later("overview", loadOverview);
  if (event.status === "failed" || event.previous_status === "failed") later("dlq", loadDeadLetter);
}

async function showDashboard() {
  $("dashboard").hidden = false;
  for (const status of STATUSES) $("f-status").append(el("option", { value: status, text: status }));
  for (const p of PRIORITIES) $("f-priority").append(el("option", { value: p, text: p }));
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    state.filters = { status: $("f-status").value, priority: $("f-priority").value, type: $("f-type").value.trim() };
    loadJobs().catch(handleError);
  });
  $("more").addEventListener("click", () => loadJobs(true).catch(handleError));
  await Promise.all([loadOverview(), loadJobs(), loadDeadLetter()]);
  connect(onDashboardEvent, () => Promise.all([loadOverview(), loadJobs(), loadDeadLetter()]));
  setInterval(() => loadOverview().catch(handleError), POLL_MS);
}

// ---------------------------------------------------------------- job page
function field(list, name, value) {
  const shown = value === null || value === undefined || value === "" ? "—" : value;
  list.append(el("dt", { text: name }), el("dd", {}, typeof shown === "object" ? el("pre", { text: JSON.stringify(shown, null, 2) }) : String(shown)));
}

function renderFields(job) {
  const list = $("fields");
  list.replaceChildren();
  const r = job.resource_requirements;
  const rows = [
    ["type", job.type], ["priority", job.priority], ["resources", `${r.cpu_units} CPU units · ${r.memory_mb} MB`],
    ["depends on", job.depends_on.join(", ")], ["blocked by", job.blocked_by.join(", ")],
    ["attempts", `${job.attempts} of ${job.retry_config.max_attempts}`], ["position in queue", job.position_in_queue],
    ["worker", job.worker_id], ["timeout", `${job.timeout_seconds} s`], ["created", job.created_at], ["ready", job.ready_at],
    ["started", job.started_at], ["finished", job.finished_at], ["next attempt", job.next_attempt_at],
    ["last error", job.last_error], ["failure reason", job.failure_reason], ["cancel reason", job.cancel_reason],
    ["retry config", job.retry_config], ["payload", job.payload], ["result", job.result],
  ];
  for (const [name, value] of rows) field(list, name, value);
}

function renderGraph(graph, focus) {
  const box = $("dag");
  box.replaceChildren();
  if (graph.nodes.length <= 1) {
    box.append(el("p", { class: "empty", text: "no dependencies and no dependants" }));
    return;
  }
  const W = 170, H = 44, GX = 44, GY = 14, PAD = 10;
  const columns = new Map();
  for (const node of graph.nodes) {
    if (!columns.has(node.depth)) columns.set(node.depth, []);
    columns.get(node.depth).push(node);
  }
  const depths = [...columns.keys()].sort((a, b) => a - b);
  const tallest = Math.max(...[...columns.values()].map((c) => c.length));
  const width = PAD * 2 + depths.length * W + (depths.length - 1) * GX;
  const height = PAD * 2 + tallest * H + (tallest - 1) * GY;
  const at = new Map();
  depths.forEach((depth, i) => {
    const column = columns.get(depth);
    const offset = (height - (column.length * H + (column.length - 1) * GY)) / 2;
    column.forEach((node, j) => at.set(node.job_id, { x: PAD + i * (W + GX), y: offset + j * (H + GY) }));
  });
  const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: "9", refY: "5", markerWidth: "7", markerHeight: "7", orient: "auto" }, svg("path", { d: "M0,0 L10,5 L0,10 z", fill: "#98a2b3" }));
  const drawing = svg("svg", { width, height, viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": "dependency graph" }, svg("defs", {}, marker));
  for (const edge of graph.edges) {
    const from = at.get(edge.depends_on), to = at.get(edge.job_id);
    if (!from || !to) continue;
    const x1 = from.x + W, y1 = from.y + H / 2, x2 = to.x - 2, y2 = to.y + H / 2, mid = (x1 + x2) / 2;
    drawing.append(svg("path", { class: "edge", d: `M${x1},${y1} C${mid},${y1} ${mid},${y2} ${x2},${y2}`, "marker-end": "url(#arrow)" }));
  }
  for (const node of graph.nodes) {
    const { x, y } = at.get(node.job_id);
    const label = node.job_id.length > 22 ? node.job_id.slice(0, 21) + "…" : node.job_id;
    const group = svg("a", { href: `/admin/jobs/${encodeURIComponent(node.job_id)}`, class: node.job_id === focus ? "focus" : "" },
      svg("title", {}, `${node.job_id} · ${node.type} · ${node.status}`),
      svg("rect", { class: `box g-${node.status}`, x, y, width: W, height: H }),
      svg("text", { x: x + 8, y: y + 18 }, label),
      svg("text", { class: "sub", x: x + 8, y: y + 34 }, `${node.status} · ${node.type}`));
    drawing.append(group);
  }
  box.append(drawing);
}

function renderAttempts(attempts) {
  const body = $("attempts").tBodies[0];
  body.replaceChildren();
  for (const a of attempts) body.append(el("tr", {}, el("td", { text: a.attempt }), el("td", { text: a.node_id }), el("td", { text: when(a.started_at) }), el("td", { text: when(a.ended_at) }), el("td", { text: a.outcome || "running" }), el("td", { class: "wrap", text: a.error || "" })));
  if (!attempts.length) body.append(el("tr", {}, el("td", { class: "empty", colspan: 6, text: "not started yet" })));
}

function renderLogs(entries) {
  const body = $("logs").tBodies[0];
  body.replaceChildren();
  for (const e of entries) {
    const data = Object.keys(e.data || {}).length ? JSON.stringify(e.data) : "";
    body.append(el("tr", { class: `lvl-${e.level}` }, el("td", { text: when(e.at) }), el("td", { text: e.attempt ?? "" }), el("td", { text: e.level }), el("td", { text: e.event }), el("td", { class: "wrap", text: e.message }), el("td", { class: "wrap" }, el("pre", { text: data }))));
  }
}

async function loadJob(jobId) {
  const detail = await api(`/admin/api/jobs/${encodeURIComponent(jobId)}`);
  const job = detail.job;
  document.title = `${job.job_id} · Smart Task Queue`;
  $("job-title").textContent = job.job_id;
  $("job-status").className = `badge s-${job.status}`;
  $("job-status").textContent = job.status;
  const why = $("why");
  why.textContent = detail.waiting.text;
  why.className = `why k-${detail.waiting.kind}`;
  $("cancel").disabled = ["completed", "failed", "cancelled"].includes(job.status);
  $("redrive").disabled = job.status !== "failed";
  renderDispatch(detail.paused);
  renderFields(job);
  renderGraph(detail.graph, job.job_id);
  renderAttempts(detail.attempts);
  renderLogs(detail.logs);
  state.graphIds = new Set(detail.graph.nodes.map((n) => n.job_id).concat([job.job_id]));
}

async function showJob(jobId) {
  $("job").hidden = false;
  $("cancel").addEventListener("click", () => {
    if (confirm(`Cancel ${jobId}? A running attempt is stopped and its dependants are cancelled too.`)) {
      act(`/jobs/${encodeURIComponent(jobId)}/cancel`, "PATCH", `cancelled ${jobId}`);
    }
  });
  $("redrive").addEventListener("click", () => act(`/jobs/${encodeURIComponent(jobId)}/retry`, "POST", `re-driven ${jobId}`));
  await loadJob(jobId);
  connect((event) => {
    if (state.graphIds.has(event.job_id)) later("job", () => loadJob(jobId), 150);
  }, () => loadJob(jobId));
}

// ----------------------------------------------------------------- actions
async function act(path, method, done) {
  try {
    await api(path, { method });
    toast(done);
  } catch (error) {
    handleError(error);
  }
  refreshAll();
}

let refreshAll = () => {};
$("pause").addEventListener("click", () => act("/dispatch/pause", "POST", "dispatch paused on every node"));
$("resume").addEventListener("click", () => act("/dispatch/resume", "POST", "dispatch resumed"));

// --------------------------------------------------------------- live stream
function connect(onEvent, resync) {
  let delay = 500;
  const live = $("live");
  const open = () => {
    const url = new URL("/jobs/stream", location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    if (state.key) url.searchParams.set("token", state.key);
    const socket = new WebSocket(url);
    state.socket = socket;
    let subscribed = false;
    socket.addEventListener("message", (message) => {
      const event = JSON.parse(message.data);
      if (event.event === "stream.subscribed") {
        live.textContent = "live";
        live.className = "pill on";
        if (delay > 500) resync().catch(handleError); // events may have been missed while away
        delay = 500;
        subscribed = true;
      } else if (event.event === "job.updated") onEvent(event);
    });
    socket.addEventListener("close", (closed) => {
      live.textContent = closed.code === 1008 ? "stream refused" : "reconnecting…";
      live.className = "pill off";
      if (closed.code === 1008) return showLogin("the stream refused the key");
      delay = subscribed ? 1000 : Math.min(delay * 2, 15000);
      setTimeout(open, delay);
    });
  };
  open();
  refreshAll = () => resync().catch(handleError);
}

// --------------------------------------------------------------------- start
async function start() {
  $("forget-key").hidden = !state.key;
  const match = location.pathname.match(/^\/admin\/jobs\/(.+)$/);
  try {
    await api("/dispatch"); // a protected endpoint: asks for a key before anything is set up
  } catch (error) {
    return handleError(error);
  }
  try {
    if (match) await showJob(decodeURIComponent(match[1]));
    else await showDashboard();
  } catch (error) {
    handleError(error);
  }
}

start();
