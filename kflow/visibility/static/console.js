// The kflow console: a plain script over the visibility API (no build step, no dependencies).
// Pages (hash routes): #/ instances, #/i/<id> one instance, #/definitions, #/d/<name>/<version>, #/audit,
// #/schedules, #/incidents, #/queues (limits and quotas), #/subscriptions (webhook delivery logs).
// Live updates come from the server-sent events of /api/stream.
// With auth on, the console asks /api/session who is logged in and shows the login form when
// nobody is; the session cookie is HttpOnly, so every POST carries the session's CSRF token in
// the X-CSRF-Token header instead. Every string from the API is added as a text node, never as HTML.
"use strict";

const view = document.getElementById("view");
const STATUSES = ["RUNNING", "BLOCKED", "COMPENSATING", "CANCELLING", "SUSPENDED", "INCIDENT", "QUEUED", "COMPLETED", "FAILED", "CANCELLED", "TERMINATED"];
const SVGNS = "http://www.w3.org/2000/svg";
let onChange = null;          // the current page's live-update handler
let pending = null;           // debounce timer for live refreshes
let session = null;           // /api/session: {auth, principal, tenant, roles, csrf, admin}
let live = null;              // the EventSource of /api/stream

class Unauthenticated extends Error {}

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "onclick" || k === "onchange" || k === "onsubmit") el[k] = v;
    else if (v !== null && v !== undefined && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function fill(el, ...children) {
  el.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined));
}

function svg(tag, attrs, ...children) {
  const el = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

async function api(path, options) {
  const res = await fetch(path, Object.assign({credentials: "same-origin"}, options));
  const body = await res.json().catch(() => ({}));
  if (res.status === 401 && session && session.auth) { loginPage(body.error); throw new Unauthenticated(body.error); }
  if (!res.ok) throw new Error(body.error || `${res.status} ${res.statusText}`);
  return body;
}

function post(path, body) {
  const headers = {"Content-Type": "application/json"};
  if (session && session.csrf) headers["X-CSRF-Token"] = session.csrf;
  return api(path, {method: "POST", headers, body: JSON.stringify(body || {})});
}

const fmtTime = (ms) => ms ? new Date(ms).toISOString().replace("T", " ").replace("Z", "") : "";
const statusTag = (s) => h("span", {class: `status s-${s}`, "data-status": s}, s);

// -- live updates ------------------------------------------------------------------------------
function connectLive() {
  if (live) return;
  const dot = document.getElementById("live");
  const es = live = new EventSource("/api/stream");
  es.onopen = () => dot.classList.add("on");
  es.onerror = () => dot.classList.remove("on");
  es.addEventListener("change", (e) => {
    const data = JSON.parse(e.data);
    if (!onChange) return;
    clearTimeout(pending);
    pending = setTimeout(() => onChange(data), 150);
  });
}

// -- instances page ----------------------------------------------------------------------------
const listState = {filters: {}, cursors: [null], page: 0};

function filterQuery(f, withStatus) {
  const q = new URLSearchParams();
  if (withStatus && f.status) q.set("status", f.status);
  if (f.workflow) q.set("workflow", f.workflow);
  if (f.started_after) q.set("started_after", f.started_after);
  if (f.started_before) q.set("started_before", f.started_before);
  if (f.id_prefix) q.set("id_prefix", f.id_prefix);
  for (const s of (f.search || "").split(/\s+/).filter(Boolean)) q.append("search", s);
  return q;
}

async function instancesPage(params) {
  Object.assign(listState.filters, params);
  const f = listState.filters;
  const msg = h("div", {class: "msg", id: "list-msg"});
  const form = h("form", {class: "filters card", id: "filters", onsubmit: (e) => {
      e.preventDefault();
      const data = new FormData(form);
      for (const k of ["status", "workflow", "started_after", "started_before", "search", "id_prefix"]) {
        let v = (data.get(k) || "").trim();
        if ((k === "started_after" || k === "started_before") && v) v = new Date(v).toISOString();
        f[k] = v;
      }
      listState.cursors = [null]; listState.page = 0;
      refresh();
    }},
    h("label", {}, "Status", h("select", {name: "status", id: "f-status"},
      h("option", {value: ""}, "any"), STATUSES.map((s) => h("option", {value: s, selected: f.status === s}, s)))),
    h("label", {}, "Workflow", h("input", {name: "workflow", id: "f-workflow", value: f.workflow || "", placeholder: "name"})),
    h("label", {}, "Started after", h("input", {name: "started_after", type: "datetime-local"})),
    h("label", {}, "Started before", h("input", {name: "started_before", type: "datetime-local"})),
    h("label", {}, "Search attributes", h("input", {name: "search", id: "f-search", value: f.search || "", placeholder: "customer:acme tier:gold"})),
    h("label", {}, "Id prefix", h("input", {name: "id_prefix", id: "f-id", value: f.id_prefix || ""})),
    h("button", {type: "submit", id: "f-apply"}, "Filter"));
  const counts = h("div", {class: "counts card", id: "counts"});
  const table = h("table", {id: "instances"});
  const pager = h("div", {class: "pager"});
  fill(view, h("h2", {}, "Workflow instances"), form, counts, msg, table, pager);

  async function refresh() {
    try {
      const cursor = listState.cursors[listState.page];
      const q = filterQuery(f, true);
      q.set("limit", "50");
      if (cursor) q.set("cursor", cursor);
      const [page, c] = await Promise.all([api(`/api/instances?${q}`), api(`/api/instances/counts?${filterQuery(f, false)}`)]);
      msg.textContent = ""; msg.className = "msg";
      fill(counts, h("span", {class: "count" + (f.status ? "" : " active"), onclick: () => setStatus("")},
        "all", h("b", {"data-count": "total"}, c.total)),
        ...STATUSES.filter((s) => c.counts[s] || s === "RUNNING" || s === "COMPLETED" || s === "FAILED").map((s) =>
          h("span", {class: "count" + (f.status === s ? " active" : ""), onclick: () => setStatus(s)},
            s.toLowerCase(), h("b", {"data-count": s}, c.counts[s] || 0))));
      fill(table, h("tr", {}, ["Instance", "Workflow", "Status", "Started", "Closed", "Search attributes"].map((t) => h("th", {}, t))),
        ...page.items.map((r) => h("tr", {class: "row", "data-id": r.instance_id, onclick: () => { location.hash = `#/i/${encodeURIComponent(r.instance_id)}`; }},
          h("td", {class: "mono"}, r.instance_id), h("td", {}, `${r.workflow}@${r.version}`), h("td", {}, statusTag(r.status)),
          h("td", {}, fmtTime(r.started_ms)), h("td", {}, fmtTime(r.closed_ms)),
          h("td", {class: "mono"}, Object.entries(r.search || {}).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ")))));
      if (!page.items.length) table.append(h("tr", {}, h("td", {colspan: 6, class: "muted"}, "no instances match")));
      listState.cursors[listState.page + 1] = page.next_cursor;
      fill(pager, 
        h("button", {class: "secondary", disabled: listState.page === 0, onclick: () => { listState.page--; refresh(); }}, "Previous"),
        h("span", {class: "muted"}, `page ${listState.page + 1}`),
        h("button", {class: "secondary", id: "next-page", disabled: !page.next_cursor, onclick: () => { listState.page++; refresh(); }}, "Next"));
    } catch (err) {
      msg.textContent = err.message; msg.className = "msg err";
    }
  }
  function setStatus(s) {
    f.status = s; listState.cursors = [null]; listState.page = 0;
    form.querySelector("#f-status").value = s;
    refresh();
  }
  let last = 0;
  onChange = () => {  // at most one refresh a second, however busy the projection is
    const wait = Math.max(0, last + 1000 - Date.now());
    clearTimeout(listState.timer);
    listState.timer = setTimeout(() => { last = Date.now(); refresh(); }, wait);
  };
  await refresh();
}

// -- the definition graph ----------------------------------------------------------------------
function drawGraph(graph, steps) {
  const nodes = Object.fromEntries(graph.nodes.map((n) => [n.id, n]));
  const root = svg("svg", {width: graph.width, height: graph.height, viewBox: `0 0 ${graph.width} ${graph.height}`, id: "graph"});
  root.append(svg("defs", {}, svg("marker", {id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse"},
    svg("path", {d: "M0,0 L10,5 L0,10 z", fill: "#9aa3b5"}))));
  for (const e of graph.edges) {
    const a = nodes[e.source], b = nodes[e.target];
    if (!a || !b) continue;
    let d;
    const ax = a.x + a.w / 2, bx = b.x + b.w / 2;
    if (b.y > a.y) {
      const y1 = a.y + a.h, y2 = b.y, my = (y1 + y2) / 2;
      d = `M${ax},${y1} C${ax},${my} ${bx},${my} ${bx},${y2}`;
    } else {  // a jump back up: around the right side
      const x1 = a.x + a.w, x2 = b.x + b.w, out = Math.max(x1, x2) + 30;
      d = `M${x1},${a.y + a.h / 2} C${out},${a.y + a.h / 2} ${out},${b.y + b.h / 2} ${x2},${b.y + b.h / 2}`;
    }
    root.append(svg("path", {d, class: `edge ${e.kind}`, "marker-end": "url(#arrow)"}));
  }
  for (const n of graph.nodes) {
    const st = (steps || {})[n.id] || "pending";
    const g = svg("g", {class: `node st-${st}`, "data-step": n.id, "data-state": st, transform: `translate(${n.x},${n.y})`});
    g.append(svg("rect", {width: n.w, height: n.h, rx: 6}), svg("text", {x: 8, y: 16}, n.id), svg("text", {x: 8, y: 30, class: "kind"}, n.label));
    g.append(svg("title", {}, `${n.id}: ${st}`));
    root.append(g);
  }
  return root;
}

const legend = () => h("div", {class: "legend"}, [["pending", "#fff"], ["running", "#e3ecfd"], ["done", "#e0f6ec"], ["failed", "#fde6e6"]]
  .map(([k, c]) => h("span", {}, h("i", {style: `background:${c}`}), k)));

// -- instance page -----------------------------------------------------------------------------
async function instancePage(id) {
  const msg = h("div", {class: "msg", id: "action-msg"});
  const head = h("div", {class: "card", id: "summary"});
  const graphBox = h("div", {class: "card", id: "graph-box"});
  const histBox = h("div", {class: "card"}, h("h3", {}, "History"));
  const timeline = h("ul", {class: "timeline", id: "timeline"});
  const more = h("button", {class: "secondary", id: "history-more", style: "display:none"}, "Load more");
  histBox.append(timeline, more);
  const sigName = h("input", {id: "signal-name", placeholder: "signal name"});
  const sigData = h("input", {id: "signal-data", placeholder: "data (JSON)", value: ""});
  const actions = h("div", {class: "card actions"},
    sigName, sigData,
    h("button", {id: "btn-signal", onclick: () => act("signal", {name: sigName.value.trim(), data: parseData(sigData.value)})}, "Signal"),
    h("button", {class: "danger", id: "btn-cancel", onclick: () => confirmAct("cancel")}, "Cancel"),
    h("button", {class: "danger", id: "btn-terminate", onclick: () => confirmAct("terminate")}, "Terminate"),
    msg);
  fill(view, h("h2", {}, h("a", {href: "#/"}, "Instances"), " / ", h("span", {class: "mono"}, id)), head, actions,
    h("div", {class: "grid2"}, graphBox, histBox));
  let lastSeq = 0;

  function parseData(text) {
    if (!text.trim()) return null;
    try { return JSON.parse(text); } catch (e) { return text; }
  }
  function confirmAct(kind) {
    if (window.confirm(`${kind} ${id}?`)) act(kind, {reason: `${kind} from the console`});
  }
  async function act(kind, body) {
    if (kind === "signal" && !body.name) { msg.textContent = "enter a signal name"; msg.className = "msg err"; return; }
    try {
      await post(`/api/instances/${encodeURIComponent(id)}/${kind}`, body);
      msg.textContent = `${kind} sent`; msg.className = "msg";
    } catch (err) { msg.textContent = err.message; msg.className = "msg err"; }
  }

  async function loadHistory() {
    for (;;) {
      const page = await api(`/api/instances/${encodeURIComponent(id)}/history?after_seq=${lastSeq}&limit=200`);
      for (const ev of page.items) {
        // two refreshes may overlap (the page's own and a live change): each appends only what
        // neither appended yet, so an event is never listed twice
        if (ev.seq <= lastSeq) continue;
        lastSeq = ev.seq;
        const payload = h("pre", {style: "display:none", class: "payload"}, JSON.stringify(ev.data, null, 2));
        const cls = /Failed|TimedOut|Rejected|Terminated/.test(ev.type) ? "ev-fail" : /Completed|Fired|Received/.test(ev.type) ? "ev-done" : "";
        const attempt = ev.data && ev.data.attempt ? ` (attempt ${ev.data.attempt})` : "";
        const what = ev.data && (ev.data.activity_id || ev.data.name || ev.data.timer_id || ev.data.child_id || "");
        timeline.append(h("li", {class: cls, "data-type": ev.type},
          h("b", {}, `#${ev.seq} ${ev.type}`), what ? h("span", {class: "mono"}, ` ${what}`) : null, attempt,
          h("span", {class: "when"}, fmtTime(ev.ts)),
          h("button", {class: "secondary", onclick: () => { payload.style.display = payload.style.display === "none" ? "block" : "none"; }}, "payload"),
          payload));
      }
      if (!page.next_after_seq) break;
    }
  }

  async function callList() {
    // the calls of a code workflow, folded from its history
    const calls = [];
    const byId = {};
    let after = 0;
    for (;;) {
      const page = await api(`/api/instances/${encodeURIComponent(id)}/history?after_seq=${after}&limit=1000`);
      for (const ev of page.items) {
        after = ev.seq;
        const d = ev.data || {};
        if (ev.type === "ActivityScheduled" && !byId[d.activity_id]) { byId[d.activity_id] = {call: `activity ${d.name}`, id: d.activity_id, state: "running"}; calls.push(byId[d.activity_id]); }
        if (ev.type === "TimerStarted") { byId[d.timer_id] = {call: "sleep / timer", id: d.timer_id, state: "running"}; calls.push(byId[d.timer_id]); }
        if (ev.type === "ChildStarted") { byId[d.child_id] = {call: `child ${d.workflow}`, id: d.child_id, state: "running"}; calls.push(byId[d.child_id]); }
        if (ev.type === "SignalReceived") calls.push({call: `signal ${d.name}`, id: "", state: "done"});
        const k = d.activity_id || d.timer_id || d.child_id;
        if (k && byId[k]) {
          if (/Completed|Fired/.test(ev.type)) byId[k].state = "done";
          else if (/Failed|TimedOut/.test(ev.type)) byId[k].state = "failed";
        }
      }
      if (!page.next_after_seq) break;
    }
    return h("table", {id: "calls"}, h("tr", {}, h("th", {}, "Call"), h("th", {}, "Id"), h("th", {}, "State")),
      ...calls.map((c) => h("tr", {"data-state": c.state}, h("td", {}, c.call), h("td", {class: "mono"}, c.id), h("td", {}, c.state))));
  }

  async function refresh() {
    let inst;
    try {
      inst = await api(`/api/instances/${encodeURIComponent(id)}`);
    } catch (err) {
      fill(head, h("div", {class: "msg err", id: "not-found"}, err.message));
      return;
    }
    const kv = [["Status", statusTag(inst.status)], ["Workflow", `${inst.workflow}@${inst.version} (${inst.kind})`],
      ["Started", fmtTime(inst.started_ms)], ["Closed", fmtTime(inst.closed_ms)],
      ["Tenant", inst.tenant || ""], ["Search", h("span", {class: "mono"}, JSON.stringify(inst.search))],
      ["Waiting for", inst.waiting_for_signals.join(", ")],
      ["Pending", inst.pending_activities.map((a) => `${a.name} (step ${a.step}, attempt ${a.attempt})`).join("; ")],
      ["Timers", inst.timers.map((t) => `${t.purpose} at ${fmtTime(t.due_ms)}`).join("; ")],
      ["Children", h("span", {}, inst.children.map((c) => h("a", {href: `#/i/${encodeURIComponent(c)}`, class: "mono", style: "margin-right:8px"}, c)))],
      ["Error", inst.error_type ? `${inst.error_type}: ${inst.error_message}` : ""]];
    const vars = h("pre", {id: "variables"}, JSON.stringify(inst.variables, null, 2));
    const result = inst.result !== null && inst.result !== undefined ? h("pre", {id: "result"}, JSON.stringify(inst.result, null, 2)) : null;
    fill(head, h("dl", {class: "kv"}, kv.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
      h("h3", {}, "Input"), h("pre", {}, JSON.stringify(inst.input, null, 2)),
      h("h3", {}, "Variables"), vars, result ? [h("h3", {}, "Result"), result] : null);
    if (inst.graph) fill(graphBox, h("h3", {}, "Definition graph"), legend(), drawGraph(inst.graph, inst.steps));
    else fill(graphBox, h("h3", {}, "Calls"), await callList());
    const terminal = ["COMPLETED", "FAILED", "CANCELLED", "TERMINATED"].includes(inst.status);
    const may = inst.allowed || {};
    for (const [b, action] of [["btn-signal", "signal"], ["btn-cancel", "cancel"], ["btn-terminate", "terminate"]]) {
      const button = document.getElementById(b);
      button.disabled = terminal || may[action] === false;
      button.hidden = may[action] === false;  // not the caller's to press: neither shown nor pressable
      button.title = may[action] === false ? `you may not ${action} this instance` : "";
    }
    sigName.hidden = sigData.hidden = may.signal === false;
    await loadHistory();
  }
  onChange = (data) => { if (data.ids === null || data.ids.includes(id)) refresh(); };
  await refresh();
}

// -- definitions -------------------------------------------------------------------------------
async function definitionsPage() {
  const defs = await api("/api/definitions");
  fill(view, h("h2", {}, "Definitions"), h("table", {id: "definitions"},
    h("tr", {}, h("th", {}, "Name"), h("th", {}, "Kind"), h("th", {}, "Versions")),
    ...defs.items.map((d) => h("tr", {"data-name": d.name}, h("td", {}, d.name), h("td", {}, d.kind),
      h("td", {}, d.versions.map((v) => h("a", {href: `#/d/${encodeURIComponent(d.name)}/${v}`, style: "margin-right:8px"}, `v${v}`)))))));
  onChange = null;
}

async function definitionPage(name, version) {
  const d = await api(`/api/definitions/${encodeURIComponent(name)}/${version}`);
  const versions = h("div", {class: "actions"}, "Versions: ", d.versions.map((v) =>
    h("a", {href: `#/d/${encodeURIComponent(name)}/${v}`, style: v === d.version ? "font-weight:700" : ""}, `v${v}`)));
  fill(view, h("h2", {}, h("a", {href: "#/definitions"}, "Definitions"), ` / ${name}@${d.version}`),
    h("div", {class: "card"}, versions),
    h("div", {class: "grid2"}, h("div", {class: "card"}, d.graph ? drawGraph(d.graph, {}) : h("span", {class: "muted"}, "code workflow: no graph")),
      h("div", {class: "card"}, h("h3", {}, "Body"), h("pre", {}, JSON.stringify(d.body, null, 2)))));
  onChange = null;
}

// -- audit trail -------------------------------------------------------------------------------
async function auditPage() {
  const f = {};
  const msg = h("div", {class: "msg", id: "audit-msg"});
  const table = h("table", {id: "audit"});
  const form = h("form", {class: "filters card", id: "audit-filters", onsubmit: (e) => {
      e.preventDefault();
      const data = new FormData(form);
      for (const k of ["principal", "outcome", "action"]) f[k] = (data.get(k) || "").trim();
      refresh();
    }},
    h("label", {}, "Principal", h("input", {name: "principal", id: "a-principal"})),
    h("label", {}, "Outcome", h("select", {name: "outcome", id: "a-outcome"},
      ["", "granted", "denied", "success"].map((o) => h("option", {value: o}, o || "any")))),
    h("label", {}, "Action", h("input", {name: "action", id: "a-action", placeholder: "start, cancel, login ..."})),
    h("button", {type: "submit", id: "a-apply"}, "Filter"));
  fill(view, h("h2", {}, "Audit trail"), form, msg, table);
  async function refresh() {
    const q = new URLSearchParams({limit: "500"});
    for (const [k, v] of Object.entries(f)) if (v) q.set(k, v);
    try {
      const page = await api(`/api/audit?${q}`);
      msg.textContent = ""; msg.className = "msg";
      fill(table, h("tr", {}, ["Time", "Outcome", "Principal", "Action", "Resource", "Why", "Source"].map((t) => h("th", {}, t))),
        ...page.items.slice().reverse().map((r) => h("tr", {class: "audit-row", "data-outcome": r.outcome},
          h("td", {}, fmtTime(r.time)), h("td", {}, r.outcome), h("td", {}, `${r.principal || "-"}@${r.tenant}`),
          h("td", {}, r.action), h("td", {class: "mono"}, `${r.resource_type}:${r.resource_id}`),
          h("td", {}, (r.details && (r.details.reason || r.details.rule)) || ""), h("td", {class: "mono"}, r.source))));
    } catch (err) {
      if (!(err instanceof Unauthenticated)) { msg.textContent = err.message; msg.className = "msg err"; }
    }
  }
  onChange = null;
  await refresh();
}

// -- schedules, incidents, queues, subscriptions ------------------------------------------------
const fmtMs = (ms) => {
  if (!ms) return "";
  for (const [unit, n] of [["d", 86400000], ["h", 3600000], ["m", 60000], ["s", 1000]]) if (ms % n === 0) return `${ms / n}${unit}`;
  return `${ms}ms`;
};
const errText = (err) => err instanceof Unauthenticated ? null : err.message;

// Refresh on live changes of keys matching `wanted` (all when the server hides ids), at most once a second.
function liveRefresh(refresh, wanted) {
  let last = 0, timer = null;
  onChange = (data) => {
    if (data.ids !== null && !data.ids.some(wanted)) return;
    clearTimeout(timer);
    timer = setTimeout(() => { last = Date.now(); refresh(); }, Math.max(0, last + 1000 - Date.now()));
  };
}

async function schedulesPage() {
  const msg = h("div", {class: "msg", id: "schedules-msg"});
  const note = h("input", {id: "schedule-note", placeholder: "note for pause / unpause"});
  const table = h("table", {id: "schedules"});
  fill(view, h("h2", {}, "Schedules"), h("div", {class: "card actions"}, note, msg), table);
  async function act(sid, kind, body) {
    try {
      await post(`/api/schedules/${encodeURIComponent(sid)}/${kind}`, body);
      msg.textContent = `${kind} sent for ${sid}`; msg.className = "msg";
    } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; }
  }
  async function refresh() {
    let data;
    try { data = await api("/api/schedules?next=5"); } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; return; }
    const may = data.allowed || {};
    fill(table, h("tr", {}, ["Schedule", "Workflow", "Spec", "State", "Next runs", "Last runs", "Actions"].map((t) => h("th", {}, t))),
      ...data.items.map((s) => {
        const spec = s.spec || {};
        const when = spec.cron ? `cron ${spec.cron}` : `every ${fmtMs(spec.every_ms)}`;
        const recent = (s.recent || []).slice().reverse().slice(0, 5);
        return h("tr", {class: "schedule-row", "data-id": s.id},
          h("td", {class: "mono"}, s.id),
          h("td", {}, spec.version ? `${spec.workflow}@${spec.version}` : spec.workflow),
          h("td", {class: "spec"}, when, h("div", {class: "muted"}, `tz ${spec.timezone || "UTC"}, overlap ${spec.overlap || "skip"}`)),
          h("td", {class: "state"}, s.paused ? h("span", {class: "status s-SUSPENDED"}, "paused") : h("span", {class: "status s-RUNNING"}, "active"),
            s.note ? h("div", {class: "note"}, s.note) : null,
            (s.running || []).length ? h("div", {class: "muted"}, `${s.running.length} run(s) open`) : null),
          h("td", {class: "next mono"}, (s.next_runs || []).map((t) => h("div", {}, t.replace("T", " ").replace("Z", "")))),
          h("td", {class: "last"}, recent.map((r) => h("div", {},
            h("span", {class: "mono"}, fmtTime(r.at_ms)), ` ${r.trigger}`,
            (r.started || []).length ? h("span", {class: "muted"}, ` started ${r.started.length}`) : null,
            (r.skipped || []).length ? h("span", {class: "muted"}, ` skipped ${r.skipped.length}`) : null,
            r.missed ? h("span", {class: "muted"}, ` missed ${r.missed}`) : null))),
          h("td", {class: "sched-actions"},
            may.pause && !s.paused ? h("button", {class: "secondary sched-pause", onclick: () => act(s.id, "pause", {note: note.value})}, "Pause") : null,
            may.unpause && s.paused ? h("button", {class: "secondary sched-unpause", onclick: () => act(s.id, "unpause", {note: note.value})}, "Unpause") : null,
            may.trigger ? h("button", {class: "sched-trigger", onclick: () => act(s.id, "trigger", {})}, "Trigger") : null));
      }));
    if (!data.items.length) table.append(h("tr", {}, h("td", {colspan: 7, class: "muted"}, "no schedules")));
  }
  liveRefresh(refresh, (id) => id.startsWith("schedule:"));
  await refresh();
}

async function incidentsPage() {
  const msg = h("div", {class: "msg", id: "incidents-msg"});
  const table = h("table", {id: "incidents"});
  fill(view, h("h2", {}, "Open incidents"), msg, table);
  let shown = new Set();  // instances listed now: a change of one refreshes the page
  function resolveForm(r) {
    const action = h("select", {class: "inc-action"}, ["retry", "skip", "fail"].map((a) => h("option", {value: a}, a)));
    const data = h("input", {class: "inc-data", placeholder: "input patch (retry) / output (skip), JSON"});
    const reason = h("input", {class: "inc-reason", placeholder: "reason"});
    const form = h("form", {class: "resolve", onsubmit: async (e) => {
        e.preventDefault();
        const body = {action: action.value, reason: reason.value};
        const text = data.value.trim();
        if (text) {
          let value;
          try { value = JSON.parse(text); } catch (err) { msg.textContent = `not JSON: ${text}`; msg.className = "msg err"; return; }
          if (action.value === "retry") body.input_patch = value; else if (action.value === "skip") body.output = value;
        }
        try {
          await post(`/api/instances/${encodeURIComponent(r.instance_id)}/incidents/${encodeURIComponent(r.incident_id)}`, body);
          msg.textContent = `${action.value} sent for ${r.instance_id}`; msg.className = "msg";
        } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; }
      }}, action, data, reason, h("button", {type: "submit", class: "inc-resolve"}, "Resolve"));
    return form;
  }
  async function refresh() {
    let data;
    try { data = await api("/api/incidents"); } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; return; }
    shown = new Set(data.items.map((r) => r.instance_id));
    fill(table, h("tr", {}, ["Instance", "Step", "Error", "Instructions", "Role", "Raised", "Resolve"].map((t) => h("th", {}, t))),
      ...data.items.map((r) => h("tr", {class: "incident-row", "data-id": r.instance_id, "data-incident": r.incident_id},
        h("td", {}, h("a", {href: `#/i/${encodeURIComponent(r.instance_id)}`, class: "mono"}, r.instance_id),
          h("div", {class: "muted"}, `${r.workflow}@${r.version}`)),
        h("td", {class: "step"}, r.step, h("div", {class: "muted"}, `${r.activity || ""} after ${r.attempts || 0} attempt(s)`)),
        h("td", {class: "error"}, h("b", {}, r.error_type || ""), " ", r.message || ""),
        h("td", {class: "instructions"}, r.instructions),
        h("td", {class: "role"}, r.role || ""),
        h("td", {}, fmtTime(r.raised_ms)),
        h("td", {}, r.allowed ? resolveForm(r) : h("span", {class: "muted"}, "not yours to resolve")))));
    if (!data.items.length) table.append(h("tr", {}, h("td", {colspan: 7, class: "muted"}, "no open incidents")));
  }
  liveRefresh(refresh, (id) => shown.has(id) || !/^(schedule|limit):/.test(id));
  await refresh();
}

async function queuesPage() {
  const msg = h("div", {class: "msg", id: "queues-msg"});
  const levels = h("table", {id: "levels"});
  const limits = h("table", {id: "limits"});
  fill(view, h("h2", {}, "Queues & quotas"), msg, h("div", {class: "grid2"},
    h("div", {class: "card"}, h("h3", {}, "Queued by priority level"), levels),
    h("div", {class: "card"}, h("h3", {}, "Limits (per tenant or key)"), limits)));
  async function refresh() {
    let data;
    try { data = await api("/api/limits"); } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; return; }
    fill(levels, h("tr", {}, ["Level", "Starts", "Activities"].map((t) => h("th", {}, t))),
      ...data.levels.map((l) => h("tr", {"data-level": l.name}, h("td", {}, `${l.level} ${l.name}`),
        h("td", {class: "starts"}, l.starts), h("td", {class: "activities"}, l.activities))));
    fill(limits, h("tr", {}, ["Limit", "Tenant / key", "In use", "Allowed", "Queued", "Granted", "Refused"].map((t) => h("th", {}, t))),
      ...data.items.map((r) => h("tr", {class: "limit-row", "data-key": r.key},
        h("td", {}, r.limit), h("td", {class: "mono"}, r.key_part === null ? "-" : r.key_part),
        h("td", {class: "in-use"}, r.in_use), h("td", {class: "allowed"}, r.allowed === null ? "unbounded" : r.allowed),
        h("td", {class: "queued"}, r.queued, r.queued ? h("span", {class: "muted"}, ` (${r.queued_starts} starts, ${r.queued_activities} activities)`) : null),
        h("td", {}, r.granted), h("td", {}, r.refused))));
    if (!data.items.length) limits.append(h("tr", {}, h("td", {colspan: 7, class: "muted"}, "no limit has been used yet")));
  }
  liveRefresh(refresh, (id) => id.startsWith("limit:"));
  await refresh();
}

async function subscriptionsPage() {
  const msg = h("div", {class: "msg", id: "subscriptions-msg"});
  const box = h("div", {id: "subscriptions"});
  fill(view, h("h2", {}, "Webhook subscriptions"), msg, box);
  onChange = null;
  let data;
  try { data = await api("/api/subscriptions"); } catch (err) { msg.textContent = errText(err) || ""; msg.className = "msg err"; return; }
  const down = data.sources.filter((s) => !s.ok);
  msg.textContent = !data.deliveries ? "no delivery process is configured (KFLOW_SUBSCRIPTIONS_URL): deliveries are not shown"
    : down.map((s) => `${s.url}: ${s.error}`).join("; ");
  msg.className = down.length ? "msg err" : "msg";
  fill(box, data.items.map((s) => h("div", {class: "card subscription", "data-id": s.id},
    h("h3", {}, s.id, " ", h("span", {class: "mono muted"}, s.url)),
    h("div", {class: "muted"}, `workflows: ${(s.filter.workflows || []).join(", ") || "any"}; statuses: ${(s.filter.statuses || []).join(", ") || "any"}; tenant: ${s.filter.tenant || "any"}; max attempts ${s.max_attempts}`),
    h("table", {class: "deliveries"}, h("tr", {}, ["Time", "Instance", "Status", "Outcome", "HTTP", "Attempts", "Error"].map((t) => h("th", {}, t))),
      s.deliveries.map((d) => h("tr", {class: "delivery", "data-outcome": d.outcome},
        h("td", {}, fmtTime(d.time_ms)), h("td", {class: "mono"}, `${d.instance_id} #${d.seq}`), h("td", {}, d.status),
        h("td", {}, d.outcome), h("td", {}, d.http_status === null ? "-" : d.http_status), h("td", {}, d.attempts), h("td", {}, d.error || "")))))),
    data.items.length ? null : h("div", {class: "card muted"}, "no subscriptions"));
}

// -- login -------------------------------------------------------------------------------------
function loginPage(reason) {
  onChange = null;
  if (live) { live.close(); live = null; }
  showUser();
  const msg = h("div", {class: "msg err", id: "login-msg"}, reason && !/expected credentials/.test(reason) ? reason : "");
  const user = h("input", {id: "login-user", name: "username", autocomplete: "username", required: true});
  const pass = h("input", {id: "login-password", name: "password", type: "password", autocomplete: "current-password", required: true});
  const form = h("form", {class: "card login", id: "login-form", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const res = await fetch("/api/login", {method: "POST", credentials: "same-origin", headers: {"Content-Type": "application/json"},
          body: JSON.stringify({username: user.value, password: pass.value})});
        const body = await res.json().catch(() => ({}));
        if (!res.ok) { msg.textContent = body.error || `${res.status}`; pass.value = ""; return; }
        session = body; session.auth = true;
        await start();
      } catch (err) { msg.textContent = err.message; }
    }},
    h("h2", {}, "Log in"),
    h("label", {}, "Username", user), h("label", {}, "Password", pass),
    h("button", {type: "submit", id: "login-submit"}, "Log in"), msg);
  fill(view, form);
  user.focus();
}

function showUser() {
  const who = document.getElementById("whoami");
  const audit = document.getElementById("nav-audit");
  const auth = session && session.auth;
  audit.hidden = !auth;
  if (!auth || !session.principal) { fill(who); return; }
  fill(who, h("span", {id: "user", class: "mono"}, `${session.principal}@${session.tenant}`),
    h("button", {class: "secondary", id: "logout", onclick: async () => {
      await fetch("/api/logout", {method: "POST", credentials: "same-origin"});
      session = {auth: true};
      loginPage("");
    }}, "Log out"));
}

// -- routing -----------------------------------------------------------------------------------
async function route() {
  const hash = location.hash || "#/";
  onChange = null;
  if (session && session.auth && !session.principal) { loginPage(""); return; }
  try {
    let m;
    if ((m = hash.match(/^#\/i\/(.+)$/))) await instancePage(decodeURIComponent(m[1]));
    else if (hash === "#/definitions") await definitionsPage();
    else if (hash === "#/audit") await auditPage();
    else if (hash === "#/schedules") await schedulesPage();
    else if (hash === "#/incidents") await incidentsPage();
    else if (hash === "#/queues") await queuesPage();
    else if (hash === "#/subscriptions") await subscriptionsPage();
    else if ((m = hash.match(/^#\/d\/([^/]+)\/(\d+)$/))) await definitionPage(decodeURIComponent(m[1]), Number(m[2]));
    else {
      const q = new URLSearchParams(hash.split("?")[1] || "");
      await instancesPage(Object.fromEntries(q));
    }
  } catch (err) {
    if (!(err instanceof Unauthenticated)) fill(view, h("div", {class: "card msg err"}, err.message));
  }
}

async function start() {
  const res = await fetch("/api/session", {credentials: "same-origin"});
  const body = await res.json().catch(() => ({}));
  if (res.status === 401) { session = {auth: true}; loginPage(body.error); return; }
  session = body;
  showUser();
  connectLive();
  await route();
}

window.addEventListener("hashchange", route);
start();
