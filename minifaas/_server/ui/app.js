// minifaas web UI: vanilla JS, no build step. Every page is drawn from the JSON endpoints under /ui/api.
// Record fields (results, logs, names) are untrusted: they only ever reach the DOM as text nodes.
"use strict";

const ROOT = document.body.dataset.root || "";
const POLL_MS = 1000;
const SVG_NS = "http://www.w3.org/2000/svg";

// ------------------------------------------------------------------------------------------ helpers

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.setAttribute("class", v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

const url = (path) => ROOT + path;
// Fetched by origin, never relative to the page: opened as http://uuid:key@host/ui/, the page's URL carries the
// credentials, and the browser refuses to fetch any URL resolved against it (the origin has none; the browser
// still sends the credentials it was given for this server). Links stay relative.
const apiUrl = (path) => location.origin + ROOT + path;
const main = () => document.getElementById("main");

// Replaces el's children; like h(), accepts nested arrays and skips null/false.
function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

const setMain = (...children) => fill(main(), ...children);

async function getJSON(path) {
  const conn = document.getElementById("conn");
  try {
    const r = await fetch(apiUrl(path), { headers: { accept: "application/json" }, cache: "no-store" });
    const data = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
    conn.classList.remove("down");
    conn.textContent = "live";
    if (!r.ok) {
      const err = new Error(data.error || `HTTP ${r.status}`);
      err.status = r.status;
      throw err;
    }
    return data;
  } catch (e) {
    if (e.status === undefined) {
      conn.classList.add("down");
      conn.textContent = "offline";
    }
    throw e;
  }
}

// Runs fn now and then every `ms` until it returns false; pauses while the tab is hidden.
function poll(fn, ms = POLL_MS) {
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    let again = true;
    if (!document.hidden) {
      try {
        again = (await fn()) !== false;
      } catch (e) {
        console.warn("poll", e);
      }
    }
    if (again && !stopped) setTimeout(tick, ms);
  };
  tick();
  return () => { stopped = true; };
}

function fmtMs(ms) {
  if (ms === null || ms === undefined) return "–";
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(2)} s`;
  return `${Math.floor(ms / 60000)} m ${Math.round((ms % 60000) / 1000)} s`;
}

// Activation records keep whole milliseconds: 0 means "under one".
const fmtRecMs = (ms) => (ms === 0 ? "<1 ms" : fmtMs(ms));

function fmtTime(epochMs) {
  if (!epochMs) return "–";
  const d = new Date(epochMs);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

function fmtDate(epochMs) {
  return epochMs ? `${new Date(epochMs).toLocaleDateString()} ${fmtTime(epochMs)}` : "–";
}

function ago(epochMs) {
  if (!epochMs) return "";
  const s = Math.max(0, (Date.now() - epochMs) / 1000);
  if (s < 60) return `${Math.floor(s)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

const short = (id) => (id ? id.slice(0, 12) : "");
const basename = (u) => String(u).split(/[\\/]/).pop();
const isError = (status) => /error$/.test(status || "");

function statusBadge(status) {
  const label = { application_error: "app error", developer_error: "dev error", internal_error: "internal error" };
  return h("span", { class: `badge ${status}`, "data-status": status }, label[status] || status);
}

function startBadge(cold) {
  if (cold === true) return h("span", { class: "badge cold nodot" }, "cold");
  if (cold === false) return h("span", { class: "badge warm nodot" }, "warm");
  return h("span", { class: "muted" }, "–");
}

function jsonBlock(value) {
  return h("pre", { class: "json" }, JSON.stringify(value, null, 2));
}

function pageHead(title, sub, ...actions) {
  return h("div", { class: "page-head" },
    h("div", {}, h("h1", {}, title), sub ? h("div", { class: "sub" }, sub) : null),
    actions.length ? h("div", { class: "actions" }, actions) : null);
}

function errorBox(e) {
  return h("div", { class: "empty" }, e.status === 404 ? "Not found: " : "Cannot load: ", e.message);
}

// ------------------------------------------------------------------------------------------ functions page

function compositionCard(fn) {
  return h("section", { class: "panel card", "data-function": fn.name, "data-kind": "composition" },
    h("div", { class: "title" },
      h("h2", {}, fn.name),
      h("span", { class: "badge nodot" }, "composition"),
      h("span", { class: "spacer" })),
    h("div", { class: "muted small" }, "Runs in the host; each action step is an activation of its own."),
    h("div", {},
      h("div", { class: "muted small" }, "Calls"),
      (fn.actions || []).length
        ? h("div", { class: "chips" }, fn.actions.map((a) => h("span", { class: "chip" }, a)))
        : h("div", { class: "small muted" }, "no action (host functions only)")),
    h("span", { class: "spacer" }),
    h("div", { class: "foot" },
      h("a", { href: url(`/ui/activations?name=${encodeURIComponent(fn.name)}`) }, "Activations →"),
      h("a", { href: url(`/ui/sessions?name=${encodeURIComponent(fn.name)}`) }, "Sessions →")));
}

// A file or folder by its last two path parts (the card is narrow; the title has it whole); else as given:
// "uploaded zip", "uploaded code", "code".
function originText(origin) {
  return origin.startsWith("/") ? origin.split("/").filter(Boolean).slice(-2).join("/") : origin;
}

function functionCard(fn) {
  if (fn.kind === "composition") return compositionCard(fn);
  const p = fn.pool;
  const pips = [];
  for (let i = 0; i < p.busy; i++) pips.push(h("span", { class: "pip busy", title: "busy sandbox" }));
  for (let i = 0; i < p.idle; i++) pips.push(h("span", { class: "pip idle", title: "idle warm sandbox" }));
  const other = Math.max(0, p.sandboxes - p.busy - p.idle);
  for (let i = 0; i < other; i++) pips.push(h("span", { class: "pip idle", title: "warm sandbox" }));
  for (let i = 0; i < p.starting; i++) pips.push(h("span", { class: "pip starting", title: "starting" }));
  for (let i = 0; i < Math.min(p.queued, 24); i++) pips.push(h("span", { class: "pip queued", title: "queued request" }));
  const lim = fn.limits || {};
  return h("section", { class: "panel card", "data-function": fn.name },
    h("div", { class: "title" },
      h("h2", {}, fn.name),
      h("span", { class: "badge version nodot", title: "latest version" }, `v${fn.version}`),
      fn.kind ? h("span", { class: "badge nodot" }, fn.kind) : null,
      h("span", { class: "spacer" }),
      p.busy ? h("span", { class: "badge running" }, "busy") : (p.sandboxes ? h("span", { class: "badge warm nodot" }, "warm") : h("span", { class: "badge nodot" }, "cold"))),
    fn.origin ? h("div", { class: "origin", title: fn.origin }, "from ", originText(fn.origin)) : null,
    h("div", {},
      h("div", { class: "pips" }, pips.length ? pips : h("span", { class: "muted small" }, "no sandbox (next call starts cold)")),
      h("div", { class: "pool-line", "data-pool": "" },
        h("b", {}, p.sandboxes), " warm · ", h("b", {}, p.busy), " busy · ", h("b", {}, p.idle), " idle",
        p.starting ? [" · ", h("b", {}, p.starting), " starting"] : null,
        " · ", h("b", {}, p.queued), " queued")),
    h("div", { class: "models" },
      h("span", { class: "muted small" }, "models loaded "),
      p.models.length
        ? h("span", { class: "chips" }, p.models.map((m) => h("span", { class: "chip", title: m }, basename(m))))
        : h("span", { class: "small muted" }, "none")),
    h("div", { class: "limits small muted" },
      [lim.memory_mb !== undefined ? `${lim.memory_mb} MB` : null,
        lim.timeout_s !== undefined ? `${lim.timeout_s} s timeout` : null,
        lim.concurrency !== undefined ? `concurrency ${lim.concurrency}` : null,
        `${lim.min_sandboxes ?? 0}–${lim.max_sandboxes ?? "?"} sandboxes`].filter(Boolean).join(" · ")),
    fn.pools.length > 1
      ? h("div", { class: "small muted" }, "live versions: ", fn.pools.map((v) => `v${v.version} (${v.sandboxes})`).join(", "))
      : null,
    h("span", { class: "spacer" }),
    h("div", { class: "foot" },
      h("span", { class: "muted small" }, fn.created ? `deployed ${ago(fn.created)}` : ""),
      h("a", { href: url(`/ui/activations?name=${encodeURIComponent(fn.name)}`) }, "Activations →")));
}

function functionsPage() {
  const stats = h("div", { class: "stats" });
  const cards = h("div", { class: "cards", id: "functions" });
  setMain(pageHead("Functions", "Deployed functions and their warm sandboxes"), stats, cards);
  let last = "";
  poll(async () => {
    const [ov, data] = await Promise.all([getJSON("/ui/api/overview"), getJSON("/ui/api/functions")]);
    const key = JSON.stringify([ov.stats, data]);
    if (key === last) return;
    last = key;
    const st = ov.stats;
    const stat = (k, v) => h("div", { class: "stat" }, h("div", { class: "v" }, v ?? 0), h("div", { class: "k" }, k));
    fill(stats,
      stat("functions", data.functions.length),
      stat("sandboxes", st.sandboxes),
      stat("in flight", st.in_flight),
      stat("queued", st.queued),
      stat("cold starts", st.cold_starts),
      stat("warm runs", st.warm_runs),
      stat("launcher", st.launcher));
    if (!data.functions.length) {
      fill(cards, h("div", { class: "empty" }, "No function is deployed yet."));
      cards.style.display = "block";
    } else {
      cards.style.display = "";
      fill(cards, ...data.functions.map(functionCard));
    }
  });
}

// ------------------------------------------------------------------------------------------ activations list

function activationRow(a, fresh) {
  return h("tr", { class: fresh ? "fresh" : null, "data-id": a.activation_id, "data-status": a.status },
    h("td", {}, statusBadge(a.status)),
    h("td", {}, h("a", { href: url(`/ui/activations?name=${encodeURIComponent(a.name)}`) }, a.name),
      h("span", { class: "muted" }, ` v${a.version}`)),
    h("td", { class: "mono" }, h("a", { href: url(`/ui/activations/${a.activation_id}`) }, short(a.activation_id))),
    h("td", { title: fmtDate(a.start || a.accepted) }, fmtTime(a.start || a.accepted),
      h("span", { class: "muted small" }, `  ${ago(a.start || a.accepted)}`)),
    h("td", { class: "num" }, fmtRecMs(a.duration)),
    h("td", { class: "num" }, fmtRecMs(a.wait_time)),
    h("td", { class: "num" }, a.init_time ? fmtRecMs(a.init_time) : h("span", { class: "muted" }, "–")),
    h("td", {}, a.conductor ? h("span", { class: "badge nodot" }, "composition") : startBadge(a.cold)),
    h("td", { class: "mono" }, a.conductor
      ? h("a", { href: url(`/ui/sessions/${a.activation_id}`) }, "flow graph")
      : a.cause ? h("a", { href: url(`/ui/sessions/${a.cause}`), title: "the session this step belongs to" }, `⤷ ${short(a.cause)}`) : ""));
}

function activationsPage() {
  const params = new URLSearchParams(location.search);
  let name = params.get("name") || "";
  let filter = params.get("status") || "all";
  let live = true;
  const seen = new Set();
  let first = true;

  const select = h("select", { id: "fn-filter", onchange: () => { name = select.value; sync(); } },
    h("option", { value: "" }, "all functions"));
  const segs = ["all", "success", "errors", "running"].map((f) =>
    h("button", { type: "button", "data-filter": f, class: f === filter ? "on" : null,
      onclick: () => { filter = f; segs.forEach((b) => b.classList.toggle("on", b.dataset.filter === f)); sync(); } }, f));
  const liveBtn = h("button", { type: "button", class: "on", id: "live", onclick: () => {
    live = !live;
    liveBtn.classList.toggle("on", live);
    liveBtn.textContent = live ? "● live" : "❚❚ paused";
    document.getElementById("conn").classList.toggle("paused", !live);
  } }, "● live");
  const count = h("span", { class: "muted small" });
  const tbody = h("tbody", { id: "activations" });
  const table = h("div", { class: "table-wrap" }, h("table", {},
    h("thead", {}, h("tr", {},
      ["Status", "Function", "Activation", "Started", "Duration", "Wait", "Init", "Start", "Session"].map((t, i) =>
        h("th", { class: i >= 4 && i <= 6 ? "num" : null }, t)))),
    tbody));
  setMain(pageHead("Activations", "Newest first, refreshed every second"),
    h("div", { class: "toolbar" }, select, h("div", { class: "seg" }, segs), liveBtn, h("span", { class: "spacer" }), count),
    table);

  getJSON("/ui/api/functions").then((d) => {
    const names = new Set(d.functions.map((f) => f.name));
    if (name) names.add(name);
    for (const n of [...names].sort()) select.append(h("option", { value: n }, n));
    select.value = name;
  }).catch(() => {});

  let last = "";
  let rows = [];
  const render = () => {
    const shown = rows.filter((a) => filter === "all"
      || (filter === "success" && a.status === "success")
      || (filter === "errors" && isError(a.status))
      || (filter === "running" && (a.status === "running" || a.status === "pending")));
    if (!shown.length) {
      fill(tbody, h("tr", {}, h("td", { colspan: 9, class: "muted", style: "text-align:center;padding:32px" },
        rows.length ? "No activation matches this filter." : "No activation yet: invoke a function.")));
    } else {
      fill(tbody, ...shown.map((a) => activationRow(a, !first && !seen.has(a.activation_id))));
    }
    for (const a of rows) seen.add(a.activation_id);
    first = false;
    count.textContent = `${shown.length} shown`;
  };
  const sync = () => {
    const q = new URLSearchParams();
    if (name) q.set("name", name);
    if (filter !== "all") q.set("status", filter);
    history.replaceState(null, "", `${location.pathname}${q.toString() ? "?" + q : ""}`);
    last = "";
    refresh();
  };
  const refresh = async () => {
    const q = new URLSearchParams({ limit: "100" });
    if (name) q.set("name", name);
    const data = await getJSON(`/ui/api/activations?${q}`);
    const key = JSON.stringify(data.activations) + filter;
    if (key === last) {
      // still tick the relative times
      return;
    }
    last = key;
    rows = data.activations;
    render();
  };
  poll(() => (live ? refresh() : undefined));
}

// ------------------------------------------------------------------------------------------ activation page

function logLines(lines) {
  if (!lines.length) return h("div", { class: "muted small" }, "No log lines.");
  return h("pre", { class: "logs", id: "logs" }, lines.map((line) => {
    // a composition's primary activation logs the ids of its steps' activations, as OpenWhisk does
    if (/^[0-9a-f]{32}$/.test(line)) return [h("a", { href: url(`/ui/activations/${line}`), class: "step-link" }, line), "\n"];
    const m = /^(\S+Z)\s+(stdout|stderr):\s?(.*)$/.exec(line);
    if (!m) return [line, "\n"];
    return [h("span", { class: "ts" }, `${m[1].slice(11, 23)} `), h("span", { class: m[2] }, m[3]), "\n"];
  }));
}

function timingPanel(a) {
  const wait = a.wait_time || 0;
  const init = a.init_time || 0;
  const run = Math.max(0, (a.duration || 0) - init);
  const total = Math.max(1, wait + init + run);
  const pct = (v) => `${(100 * v) / total}%`;
  return h("section", { class: "panel", id: "timings" },
    h("h2", {}, "Timings"),
    h("div", { class: "timeline" },
      wait ? h("span", { class: "wait", style: `width:${pct(wait)}`, title: `wait ${fmtRecMs(wait)}` }) : null,
      init ? h("span", { class: "init", style: `width:${pct(init)}`, title: `init ${fmtRecMs(init)}` }) : null,
      h("span", { class: "run", style: `width:${pct(run)}`, title: `run ${fmtRecMs(run)}` })),
    h("div", { class: "legend" },
      h("span", {}, h("i", { class: "wait" }), `wait ${fmtRecMs(a.wait_time)}`),
      h("span", {}, h("i", { class: "init" }), `init ${a.init_time ? fmtRecMs(a.init_time) : "– (warm)"}`),
      h("span", {}, h("i", { class: "run" }), `run ${a.duration === null ? "–" : fmtRecMs(run)}`)),
    h("dl", { class: "kv", style: "margin-top:12px" },
      h("dt", {}, "accepted"), h("dd", {}, fmtDate(a.accepted)),
      h("dt", {}, "start"), h("dd", {}, fmtDate(a.start)),
      h("dt", {}, "end"), h("dd", {}, fmtDate(a.end)),
      h("dt", {}, "duration"), h("dd", { "data-duration": "" }, fmtRecMs(a.duration)),
      h("dt", {}, "wait"), h("dd", {}, fmtRecMs(a.wait_time)),
      h("dt", {}, "init"), h("dd", {}, fmtRecMs(a.init_time)),
      h("dt", {}, "start kind"), h("dd", {}, startBadge(a.cold))));
}

function activationPage(id) {
  poll(async () => {
    let a;
    try {
      a = await getJSON(`/ui/api/activations/${encodeURIComponent(id)}`);
    } catch (e) {
      setMain(pageHead("Activation", h("span", { class: "id" }, id)), errorBox(e));
      return e.status !== 404;
    }
    const links = [];
    if (a.is_session) links.push(h("a", { href: url(`/ui/sessions/${a.activation_id}`), id: "session-link" }, "Flow graph →"));
    if (a.session) {
      links.push(h("a", { href: url(`/ui/sessions/${a.session.session_id}`), id: "session-link" },
        `Step ${a.session.step ? a.session.step.path || "root" : ""} of session ${a.session.name} →`));
    }
    const ann = Object.entries(a.annotations || {});
    setMain(
      pageHead(h("span", {}, a.name, h("span", { class: "muted" }, ` v${a.version}`)),
        h("span", {}, h("span", { class: "id", id: "activation-id" }, a.activation_id)),
        statusBadge(a.status), links),
      h("div", { class: "grid-2" },
        h("div", { class: "stack" },
          timingPanel(a),
          h("section", { class: "panel", id: "params" }, h("h2", {}, "Parameters"),
            a.params !== null && a.params !== undefined ? jsonBlock(a.params)
              : h("div", { class: "muted small" }, "Not recorded (the engine keeps the params of composition steps only).")),
          h("section", { class: "panel", id: "annotations" }, h("h2", {}, "Annotations"),
            ann.length ? h("dl", { class: "kv" }, ann.map(([k, v]) => [h("dt", {}, k),
              h("dd", { class: "mono" }, typeof v === "object" ? JSON.stringify(v) : String(v))])) : h("div", { class: "muted small" }, "none"))),
        h("div", { class: "stack" },
          h("section", { class: "panel", id: "result" }, h("h2", {}, "Result"), jsonBlock(a.result)),
          h("section", { class: "panel" }, h("h2", {}, "Logs ", h("span", { class: "muted small" }, `(${a.logs.length})`)), logLines(a.logs)))));
    return !a.done;
  });
}

// ------------------------------------------------------------------------------------------ sessions

function sessionsPage() {
  const name = new URLSearchParams(location.search).get("name") || "";
  const tbody = h("tbody", { id: "sessions" });
  setMain(pageHead("Sessions", name ? ["Runs of ", h("b", {}, name), ", newest first · ", h("a", { href: url("/ui/sessions") }, "all compositions")]
    : "Runs of compositions, newest first"),
    h("div", { class: "table-wrap" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Status", "Composition", "Session", "Started", "Duration", "Steps", "Not taken", "Failed"].map((t, i) =>
        h("th", { class: i >= 4 ? "num" : null }, t)))),
      tbody)));
  let last = "";
  poll(async () => {
    const q = new URLSearchParams({ limit: "100" });
    if (name) q.set("name", name);
    const data = await getJSON(`/ui/api/sessions?${q}`);
    const key = JSON.stringify(data);
    if (key === last) return;
    last = key;
    if (!data.sessions.length) {
      fill(tbody, h("tr", {}, h("td", { colspan: 8, class: "muted", style: "text-align:center;padding:32px" },
        "No session yet: invoke a composition.")));
      return;
    }
    fill(tbody, ...data.sessions.map((x) => h("tr", { "data-id": x.session_id },
      h("td", {}, statusBadge(x.status)),
      h("td", {}, h("a", { href: url(`/ui/sessions?name=${encodeURIComponent(x.name)}`) }, x.name)),
      h("td", { class: "mono" }, h("a", { href: url(`/ui/sessions/${x.session_id}`), class: "session-link" }, short(x.session_id))),
      h("td", { title: fmtDate(x.start) }, fmtTime(x.start), h("span", { class: "muted small" }, `  ${ago(x.start)}`)),
      h("td", { class: "num" }, fmtRecMs(x.duration)),
      h("td", { class: "num" }, x.steps),
      h("td", { class: "num" }, x.not_taken),
      h("td", { class: "num" }, x.failed ? h("span", { style: "color:var(--err)" }, x.failed) : 0))));
  });
}

const NODE_W = 196;
const NODE_H = 56;
const GAP_X = 40;
const GAP_Y = 44;
const PAD = 24;
const KIND_TAG = { action: "ACTION", function: "HOST FN", literal: "LITERAL", dynamic: "DYNAMIC", async: "ASYNC" };

function clip(text, n) {
  text = String(text ?? "");
  return text.length > n ? `${text.slice(0, n - 1)}…` : text;
}

function drawGraph(graph, session, onSelect) {
  const cols = Math.max(1, graph.columns);
  const width = PAD * 2 + cols * NODE_W + (cols - 1) * GAP_X;
  const height = PAD * 2 + graph.rows * NODE_H + (graph.rows - 1) * GAP_Y;
  const pos = new Map();
  for (const n of graph.nodes) {
    const cx = width / 2 + (n.col - (n.cols - 1) / 2) * (NODE_W + GAP_X);
    const y = PAD + n.row * (NODE_H + GAP_Y);
    pos.set(n.id, { cx, y, n });
  }
  const svg = s("svg", { class: "graph", id: "flow-graph", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `flow graph of session ${session.session_id}` });
  svg.append(s("defs", {},
    s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 4.5, markerHeight: 4.5, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow" })),
    s("marker", { id: "arrow-untaken", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 6, markerHeight: 6, orient: "auto-start-reverse" },
      s("path", { d: "M0,0 L10,5 L0,10 z", class: "arrow untaken" }))));
  const edges = s("g", { class: "edges" });
  for (const e of graph.edges) {
    const a = pos.get(e.from);
    const b = pos.get(e.to);
    if (!a || !b) continue;
    const x1 = a.cx, y1 = a.y + NODE_H, x2 = b.cx, y2 = b.y - 2;
    const mid = (y1 + y2) / 2;
    edges.append(s("path", {
      class: `edge ${e.taken ? "taken" : "untaken"}`, "data-from": e.from, "data-to": e.to,
      d: `M${x1},${y1} C${x1},${mid} ${x2},${mid} ${x2},${y2}`,
      "marker-end": e.taken ? "url(#arrow)" : "url(#arrow-untaken)",
    }));
  }
  svg.append(edges);
  const nodesG = s("g", { class: "nodes" });
  for (const { cx, y, n } of pos.values()) {
    const terminal = n.kind === "start" || n.kind === "end";
    const failed = isError(n.status);
    const cls = ["node", n.taken === false ? "untaken" : "taken", failed ? "failed" : "", n.status === "success" ? "success" : "",
      n.status === "running" ? "running" : "", terminal ? "terminal" : "", n.kind === "end" && n.status === "success" ? "ok" : ""];
    const x = cx - NODE_W / 2;
    const g = s("g", { class: cls.filter(Boolean).join(" "), "data-node": n.id, "data-status": n.status, "data-path": n.path ?? null,
      "data-activation": n.activation_id || null, tabindex: n.activation_id ? null : 0, transform: `translate(${x},${y})` });
    const title = terminal ? n.label
      : `${n.label}\n${n.path || "root"} · ${n.taken === false ? "not taken" : n.status}${n.duration_ms !== undefined ? " · " + fmtMs(n.duration_ms) : ""}`;
    g.append(s("title", {}, title));
    if (terminal) {
      const w = Math.min(NODE_W, 40 + 8 * String(n.label).length);
      g.append(s("rect", { x: (NODE_W - w) / 2, y: NODE_H / 2 - 17, width: w, height: 34, rx: 17 }));
      g.append(s("text", { class: "label", x: NODE_W / 2, y: NODE_H / 2 + 5, "text-anchor": "middle" },
        clip(n.kind === "start" ? `▶ ${n.label}` : n.label.replace("_", " "), 24)));
    } else {
      g.append(s("rect", { width: NODE_W, height: NODE_H, rx: 10 }));
      const tag = n.taken === false ? "NOT TAKEN" : (KIND_TAG[n.kind] || String(n.kind).toUpperCase());
      g.append(s("text", { class: "tag", x: 12, y: 16 }, tag));
      g.append(s("text", { class: "tag", x: NODE_W - 12, y: 16, "text-anchor": "end" }, clip(n.role || "", 14)));
      g.append(s("text", { class: "label", x: 12, y: 34 }, clip(n.label, 24)));
      const meta = n.taken === false ? clip(n.path, 28)
        : `${failed ? n.status.replace("_", " ") : n.status === "running" ? "running" : "ok"} · ${fmtMs(n.duration_ms)}`;
      g.append(s("text", { class: "meta", x: 12, y: 49 }, meta));
    }
    if (n.step !== undefined) {
      g.addEventListener("mouseenter", () => onSelect(n));
      g.addEventListener("focus", () => onSelect(n));
      if (!n.activation_id) {
        g.classList.add("selectable");
        g.addEventListener("click", () => onSelect(n, true));
      }
    } else if (n.taken === false) {
      g.addEventListener("mouseenter", () => onSelect(n));
    }
    // a node that ran as an activation links to its page (SVG 2 <a href>)
    nodesG.append(n.activation_id ? s("a", { href: url(`/ui/activations/${n.activation_id}`), class: "node-link" }, g) : g);
  }
  svg.append(nodesG);
  return svg;
}

function stepDetail(panel, session, n) {
  const step = n.step !== undefined ? session.steps[n.step] : null;
  fill(panel,
    h("h2", {}, n.label, n.taken === false ? h("span", { class: "badge nodot" }, "not taken") : statusBadge(n.status)),
    h("dl", { class: "kv" },
      h("dt", {}, "path"), h("dd", { class: "mono" }, n.path || "root"),
      h("dt", {}, "kind"), h("dd", {}, n.kind),
      step ? [h("dt", {}, "started"), h("dd", {}, fmtTime(step.start)), h("dt", {}, "duration"), h("dd", {}, fmtMs(step.duration_ms))] : null,
      n.activation_id ? [h("dt", {}, "activation"), h("dd", { class: "mono" }, h("a", { href: url(`/ui/activations/${n.activation_id}`) }, short(n.activation_id)))] : null),
    step ? [h("div", { class: "muted small" }, "input"), jsonBlock(step.input), h("div", { class: "muted small", style: "margin-top:8px" }, "output"), jsonBlock(step.output)]
      : h("div", { class: "muted small" }, n.taken === false ? "This branch did not run in this session." : ""));
}

function sessionPage(id) {
  poll(async () => {
    let data;
    try {
      data = await getJSON(`/ui/api/sessions/${encodeURIComponent(id)}`);
    } catch (e) {
      setMain(pageHead("Session", h("span", { class: "id" }, id)), errorBox(e));
      return e.status !== 404;
    }
    const ses = data.session;
    const panel = h("section", { class: "panel detail", id: "step-detail" },
      h("h2", {}, "Result"), jsonBlock(ses.result),
      h("div", { class: "muted small", style: "margin-top:10px" }, "Hover a node to see its input and output; click a node that ran as an activation to open it."));
    let pinned = false;
    const onSelect = (n, pin) => {
      if (pinned && !pin) return;
      pinned = pinned || Boolean(pin);
      stepDetail(panel, ses, n);
    };
    const failedSteps = ses.steps.filter((x) => isError(x.status)).length;
    setMain(
      pageHead(h("span", {}, ses.name || "session"),
        h("span", {}, h("span", { class: "id" }, ses.session_id), "  ·  ", fmtDate(ses.start), "  ·  ", fmtRecMs(ses.duration)),
        statusBadge(ses.status),
        h("a", { href: url(`/ui/activations/${ses.session_id}`) }, "Primary activation →")),
      h("div", { class: "stats" },
        h("div", { class: "stat" }, h("div", { class: "v" }, ses.steps.length), h("div", { class: "k" }, "steps")),
        h("div", { class: "stat" }, h("div", { class: "v" }, ses.activation_ids.length), h("div", { class: "k" }, "activations")),
        h("div", { class: "stat" }, h("div", { class: "v" }, ses.not_taken.length), h("div", { class: "k" }, "not taken")),
        h("div", { class: "stat" }, h("div", { class: "v" }, failedSteps), h("div", { class: "k" }, "failed steps"))),
      h("div", { class: "flow" },
        h("section", { class: "panel graph-wrap" }, drawGraph(data.graph, ses, onSelect),
          data.graph.truncated ? h("div", { class: "muted small", style: "text-align:center" }, "Only the first steps are drawn.") : null,
          h("div", { class: "graph-legend" },
            h("span", {}, h("i", { class: "taken" }), "path taken"),
            h("span", {}, h("i", { class: "untaken" }), "not taken"),
            h("span", {}, h("i", { class: "failed" }), "failed"))),
        panel));
    return ses.status === "running";
  });
}

// ------------------------------------------------------------------------------------------ theme, router

function setupTheme() {
  const btn = document.getElementById("theme");
  const order = ["auto", "light", "dark"];
  const show = () => { btn.textContent = { auto: "◐ auto", light: "☀ light", dark: "☾ dark" }[document.documentElement.dataset.theme] || "◐ auto"; };
  btn.addEventListener("click", () => {
    const cur = document.documentElement.dataset.theme || "auto";
    const next = order[(order.indexOf(cur) + 1) % order.length];
    document.documentElement.dataset.theme = next;
    localStorage.setItem("minifaas-theme", next);
    show();
  });
  show();
}

function route() {
  const path = location.pathname.slice(ROOT.length).replace(/\/+$/, "") || "/ui";
  let m;
  let tab = "functions";
  if (path === "/ui" || path === "/ui/functions") {
    functionsPage();
  } else if (path === "/ui/activations") {
    tab = "activations";
    activationsPage();
  } else if ((m = /^\/ui\/activations\/([^/]+)$/.exec(path))) {
    tab = "activations";
    activationPage(decodeURIComponent(m[1]));
  } else if (path === "/ui/sessions") {
    tab = "sessions";
    sessionsPage();
  } else if ((m = /^\/ui\/sessions\/([^/]+)$/.exec(path))) {
    tab = "sessions";
    sessionPage(decodeURIComponent(m[1]));
  } else {
    setMain(h("div", { class: "empty" }, "No such page."));
  }
  for (const a of document.querySelectorAll("[data-nav]")) a.classList.toggle("active", a.dataset.nav === tab);
  document.title = `${tab[0].toUpperCase()}${tab.slice(1)} · minifaas`;
}

setupTheme();
route();
