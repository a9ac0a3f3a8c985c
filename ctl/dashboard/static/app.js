// fleetd dashboard: one page, views by the URL's #fragment, data from /api, live by SSE.
// Plain DOM, no framework: every text goes in through textContent, never as HTML.
"use strict";

const TOKEN_KEY = "fleetd-dashboard-token";
const CHART_HOURS = 3;
const FINAL = new Set(["SUCCESS", "FAILURE", "REVOKED"]);
const state = { info: { read_only: true }, snapshot: null, samples: [], view: "" };

// --- small helpers -----------------------------------------------------------------
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(key, value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB"];
  let value = bytes, unit = 0;
  while (value >= 1024 && unit < units.length - 1) { value /= 1024; unit += 1; }
  return `${value.toFixed(unit ? 1 : 0)} ${units[unit]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  if (seconds < 1) return `${Math.round(seconds * 1000)} ms`;
  if (seconds < 60) return `${seconds.toFixed(1)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.floor(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.floor((seconds % 3600) / 60)} min`;
}

function when(unix) {
  return unix ? new Date(unix * 1000).toLocaleString() : "";
}

function stateBadge(text) {
  return el("span", { class: `state state-${String(text || "").toLowerCase()}` }, text || "?");
}

function taskLink(id) {
  return el("a", { href: `#/task/${encodeURIComponent(id)}`, class: "mono" }, id);
}

function table(headers, rows, attrs) {
  return el("table", attrs || {},
    el("thead", {}, el("tr", {}, headers.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function flash(text, bad) {
  const box = document.getElementById("flash");
  box.replaceChildren(el("div", { class: bad ? "flash bad" : "flash" }, text));
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => box.replaceChildren(), 8000);
}

// --- the API -------------------------------------------------------------------------
async function get(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function askToken() {
  const dialog = document.getElementById("token-dialog");
  const input = document.getElementById("token-input");
  input.value = "";
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => {
      const token = dialog.returnValue === "ok" ? input.value.trim() : "";
      if (token) localStorage.setItem(TOKEN_KEY, token);
      resolve(token);
    }, { once: true });
    dialog.showModal();
  });
}

// An action: asks for the token once (again only if the dashboard refuses it), then POSTs.
async function act(path, body) {
  if (state.info.read_only) {
    flash("This dashboard is read-only: give it [dashboard] token_file to allow actions.", true);
    return null;
  }
  let token = localStorage.getItem(TOKEN_KEY) || await askToken();
  for (let tries = 0; token && tries < 2; tries += 1) {
    const response = await fetch(path, {
      method: "POST",
      headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify(body || {}),
    });
    const answer = await response.json();
    if (response.status !== 401) {
      if (!response.ok) flash(answer.error || response.statusText, true);
      return response.ok ? answer : null;
    }
    localStorage.removeItem(TOKEN_KEY);
    flash("The token was refused.", true);
    token = await askToken();
  }
  return null;
}

// What a control action did; where some hosts did not carry it out (a silent host, a
// node that refused), what they did not, in red: the others' part is done all the same.
function flashDone(answer, text) {
  flash(answer.problem ? `${text}; not done: ${answer.problem}` : text, Boolean(answer.problem));
}

// --- charts: an SVG line over the last hours, drawn here --------------------------
function chart(title, samples, key, unit, hours) {
  const width = 560, height = 140, pad = 34;
  // The last `hours`, or less while the history is younger: from its first sample on.
  const now = Date.now() / 1000;
  // A sample without this value (a wait when no task ended) is a gap in the line.
  const kept = samples.filter((s) => s.at >= now - hours * 3600 && typeof s[key] === "number");
  const start = Math.max(now - hours * 3600, Math.min(kept.length ? kept[0].at : now, now - 60));
  const span = now - start;
  const ago = span < 5400 ? `${Math.round(span / 60)} min ago` : `${(span / 3600).toFixed(1)} h ago`;
  const top = Math.max(1, ...kept.map((s) => s[key]));
  const x = (at) => pad + ((at - start) / (now - start)) * (width - pad - 6);
  const y = (value) => height - 18 - (value / top) * (height - 30);
  const gap = 3 * (state.info.sample_every || 2);
  let path = "";
  kept.forEach((s, i) => {
    const jump = i === 0 || s.at - kept[i - 1].at > gap;
    path += `${jump ? "M" : "L"}${x(s.at).toFixed(1)},${y(s[key]).toFixed(1)} `;
  });
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("class", `chart chart-${key}`);
  const add = (tag, attrs, text) => {
    const node = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    svg.append(node);
  };
  add("line", { x1: pad, y1: height - 18, x2: width - 6, y2: height - 18, class: "axis" });
  add("line", { x1: pad, y1: 12, x2: pad, y2: height - 18, class: "axis" });
  add("text", { x: pad - 4, y: 16, class: "label end" }, top.toFixed(top < 10 ? 1 : 0));
  add("text", { x: pad - 4, y: height - 18, class: "label end" }, "0");
  add("text", { x: pad, y: height - 4, class: "label" }, ago);
  add("text", { x: width - 6, y: height - 4, class: "label end" }, "now");
  add("path", { d: path.trim() || "M0,0", class: "line" });
  const last = kept.length ? kept[kept.length - 1][key] : null;
  const shown = last === null ? "–" : unit === "s" ? duration(last) : `${last.toFixed(1)} ${unit}`;
  return el("figure", { class: "card" },
    el("figcaption", {}, title, el("span", { class: "now" }, shown)),
    svg);
}

function charts() {
  return el("section", { class: "charts" },
    chart("Tasks ended", state.samples, "done", "/s", CHART_HOURS),
    chart("Failures", state.samples, "failed", "/s", CHART_HOURS));
}

// --- the fleet ---------------------------------------------------------------------------
function poolButtons(node) {
  const pool = (action) => async () => {
    const answer = await act(`/api/nodes/${encodeURIComponent(node)}/pool`, { action, n: 1 });
    if (answer) flashDone(answer, `${node}: ${answer.replies[node]?.ok || "done"}`);
  };
  return el("span", { class: "buttons" },
    el("button", { onclick: pool("shrink"), title: "retire an idle child", "data-pool": `shrink ${node}` }, "−"),
    el("button", { onclick: pool("grow"), title: "add a child", "data-pool": `grow ${node}` }, "+"));
}

function nodeRows(node, view) {
  if (!view || typeof view !== "object") {
    return [el("tr", { class: "node bad" }, el("td", { colspan: 9 }, `${node}: ${JSON.stringify(view)}`))];
  }
  const down = ["FATAL", "BACKOFF", "STOPPED"].includes(view.state);
  const status = view.silent ? "SILENT" : view.state;
  const children = Array.isArray(view.children) ? view.children : [];
  const done = children.reduce((sum, c) => sum + (c.tasks_done || 0), 0);
  const rows = [el("tr", { class: `node${down ? " bad" : ""}${view.silent ? " warn" : ""}`, "data-node": node },
    el("td", {}, el("strong", {}, node), view.error ? el("div", { class: "error" }, view.error) : null),
    el("td", { class: "num" }, view.pid ?? ""),
    el("td", {}, stateBadge(status)),
    el("td", {}, (view.queues || []).join(", ")),
    el("td", { class: "num" }, children.length ? `${children.length} / ${view.concurrency ?? ""}` : ""),
    el("td", { class: "num" }, size(view.rss)),
    el("td", { class: "num" }, duration(view.uptime)),
    el("td", { class: "num" }, children.length ? done : ""),
    el("td", {}, view.state === "RUNNING" ? poolButtons(node) : ""))];
  for (const child of children) {
    rows.push(el("tr", { class: "child", "data-child": child.pid },
      el("td", { class: "indent" }, "child"),
      el("td", { class: "num" }, child.pid),
      el("td", {}, stateBadge(child.state)),
      el("td", {}, child.task ? [taskLink(child.task), " ", el("span", { class: "dim" }, child.task_name || "")] : ""),
      el("td", { class: "num" }, child.runtime ? duration(child.runtime) : ""),
      el("td", { class: "num" }, size(child.rss)),
      el("td", { class: "num" }, duration(child.uptime)),
      el("td", { class: "num" }, child.tasks_done),
      el("td", {})));
  }
  return rows;
}

function fleetView() {
  const snap = state.snapshot;
  if (!snap) return [el("p", {}, "Asking the fleet…")];
  const { nodes, missing, errors } = snap.nodes;
  const problems = [...missing.map((h) => `no answer from ${h}`),
    ...Object.entries(errors).map(([h, e]) => `${h}: ${e}`)];
  const views = Object.values(nodes).filter((v) => v && typeof v === "object");
  const running = views.filter((v) => v.state === "RUNNING" && !v.silent).length;
  const children = views.flatMap((v) => (Array.isArray(v.children) ? v.children : []));
  const busy = children.filter((c) => c.state === "busy").length;
  return [
    problems.length ? el("div", { class: "banner bad" }, problems.join("; ")) : null,
    el("section", { class: "stats" },
      stat("nodes running", `${running} / ${views.length}`),
      stat("children busy", `${busy} / ${children.length}`),
      stat("queued", (snap.queues.queues || []).reduce((s, q) => s + q.ready, 0)),
      stat("dead letters", (snap.queues.dead_letters || []).length)),
    charts(),
    table(["node / child", "pid", "state", "queues / task", "pool / runtime", "rss", "uptime", "done", ""],
      Object.entries(nodes).flatMap(([node, view]) => nodeRows(node, view)), { id: "nodes" }),
  ];
}

function stat(label, value) {
  return el("div", { class: "card stat" }, el("div", { class: "value" }, value), el("div", { class: "dim" }, label));
}

// --- queues and dead letters --------------------------------------------------------
function queuesView() {
  const snap = state.snapshot;
  if (!snap) return [el("p", {}, "Asking the broker…")];
  if (snap.queues.error) return [el("div", { class: "banner bad" }, snap.queues.error)];
  const rows = snap.queues.queues.map((q) => el("tr", { "data-queue": q.queue },
    el("td", {}, el("strong", {}, q.queue)),
    el("td", { class: "num" }, q.ready),
    el("td", { class: "num" }, q.scheduled),
    el("td", { class: "num" }, q.reserved),
    el("td", { class: "num" }, q.oldest_wait === null || q.oldest_wait === undefined ? "–" : duration(q.oldest_wait))));
  return [
    table(["queue", "ready", "scheduled", "reserved", "oldest wait"], rows, { id: "queues" }),
    el("section", { class: "charts" },
      chart("Ready tasks", state.samples, "ready", "", CHART_HOURS),
      chart("Tasks ended", state.samples, "done", "/s", CHART_HOURS),
      state.info.queue_waits ? [
        chart("Wait p50 (due to start)", state.samples, "wait_p50", "s", CHART_HOURS),
        chart("Wait p99 (due to start)", state.samples, "wait_p99", "s", CHART_HOURS)]
        : el("p", { class: "dim" }, "Queue waits are charted from a SQLite broker (Redis keeps no submit times).")),
    rateLimitForm(),
  ];
}

function rateLimitForm() {
  const task = el("input", { name: "task", placeholder: "tasks.resize", required: true });
  const rate = el("input", { name: "rate", placeholder: "10/s (0 clears)", required: true });
  const submit = async (event) => {
    event.preventDefault();
    const answer = await act("/api/rate-limit", { task: task.value, rate: rate.value });
    if (answer) flashDone(answer, `rate limit of ${task.value}: ${Object.keys(answer.replies).length} nodes`);
  };
  return el("form", { class: "card inline", onsubmit: submit },
    el("strong", {}, "Rate limit"), task, rate, el("button", {}, "Set on every node"));
}

function deadView() {
  const snap = state.snapshot;
  if (!snap) return [el("p", {}, "Asking the broker…")];
  const letters = snap.queues.dead_letters || [];
  const boxes = [];
  const rows = letters.map((d) => {
    const box = el("input", { type: "checkbox", value: d.id });
    boxes.push(box);
    return el("tr", { "data-dead": d.id },
      el("td", {}, box), el("td", {}, taskLink(d.id)), el("td", {}, d.name || ""),
      el("td", {}, d.queue || ""), el("td", {}, d.reason || ""),
      el("td", { class: "wrap" }, d.message || ""), el("td", {}, when(d.at)));
  });
  const done = (answer) => {
    if (!answer) return;
    const failed = Object.entries(answer.failed || {}).map(([i, why]) => `${i}: ${why}`);
    flash(answer.purged !== undefined ? `purged ${answer.purged}` :
      `retried ${answer.retried.length}${failed.length ? `; not: ${failed.join("; ")}` : ""}`, failed.length > 0);
  };
  const retry = async () => {
    const ids = boxes.filter((b) => b.checked).map((b) => b.value);
    if (!ids.length) { flash("Tick the dead letters to retry.", true); return; }
    done(await act("/api/dead/retry", { ids }));
  };
  return [
    el("div", { class: "toolbar" },
      el("button", { onclick: retry, id: "retry-selected" }, "Retry selected"),
      el("button", { onclick: async () => done(await act("/api/dead/retry", { all: true })), id: "retry-all" }, "Retry all"),
      el("button", { class: "danger", id: "purge", onclick: async () => {
        if (confirm("Delete every dead letter for good?")) done(await act("/api/dead/purge"));
      } }, "Purge all")),
    letters.length ? table(["", "id", "task", "queue", "reason", "message", "at"], rows, { id: "dead" })
      : el("p", { class: "dim" }, "No dead letters."),
  ];
}

// --- tasks ---------------------------------------------------------------------------------
const filters = { state: "", name: "" };

function tasksView() {
  const stateSelect = el("select", { name: "state" },
    ["", "PENDING", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED"].map((s) =>
      el("option", { value: s, selected: s === filters.state }, s || "any state")));
  const name = el("input", { name: "name", placeholder: "task name", value: filters.name });
  const id = el("input", { name: "id", placeholder: "task id", class: "mono" });
  const list = el("div", { id: "task-list" }, el("p", {}, "Loading…"));
  const apply = (event) => {
    event.preventDefault();
    if (id.value.trim()) { location.hash = `#/task/${encodeURIComponent(id.value.trim())}`; return; }
    filters.state = stateSelect.value;
    filters.name = name.value.trim();
    loadTasks();
  };
  setTimeout(loadTasks);
  return [el("form", { class: "card inline", onsubmit: apply },
    stateSelect, name, el("button", {}, "Filter"), el("span", { class: "sep" }), id, el("button", {}, "Find")), list];
}

async function loadTasks() {
  const list = document.getElementById("task-list");
  if (!list) return;
  const query = new URLSearchParams({ state: filters.state, name: filters.name, limit: "100" });
  try {
    const { tasks, partial } = await get(`/api/tasks?${query}`);
    // Redrawn only when it changed: a row under the pointer stays put between updates.
    const drawn = JSON.stringify([query.toString(), tasks, partial]);
    if (list.dataset.drawn === drawn) return;
    list.dataset.drawn = drawn;
    const rows = tasks.map((t) => el("tr", { "data-task": t.id },
      el("td", {}, taskLink(t.id)), el("td", {}, t.name), el("td", {}, stateBadge(t.state)),
      el("td", {}, t.queue || ""), el("td", {}, t.node || ""), el("td", { class: "num" }, t.deliveries ?? ""),
      el("td", { class: "num" }, duration(t.runtime)), el("td", {}, when(t.finished)),
      el("td", {}, t.exc_type || "")));
    list.replaceChildren(
      partial ? el("p", { class: "dim" }, "A sample of the broker's records (Redis keeps no index of them).") : "",
      tasks.length ? table(["id", "task", "state", "queue", "node", "deliveries", "runtime", "finished", "error"], rows, { id: "tasks" })
        : el("p", { class: "dim" }, "No tasks."));
  } catch (error) {
    list.replaceChildren(el("div", { class: "banner bad" }, error.message));
  }
}

async function taskView(id) {
  const box = el("div", { id: "task" }, el("p", {}, "Loading…"));
  const load = async () => {
    let t;
    try { t = await get(`/api/tasks/${encodeURIComponent(id)}`); } catch (error) {
      box.replaceChildren(el("div", { class: "banner bad" }, error.message));
      return;
    }
    const revoke = (terminate) => async () => {
      const answer = await act(`/api/tasks/${encodeURIComponent(id)}/revoke${terminate ? "?terminate=1" : ""}`);
      if (answer) { flashDone(answer, `revoked ${id}`); load(); }
    };
    const facts = [["state", stateBadge(t.state)], ["task", t.name], ["queue", t.queue], ["node", t.node],
      ["deliveries", t.deliveries], ["runtime", duration(t.runtime)], ["submitted", when(t.created)],
      ["due", when(t.eta)], ["finished", when(t.finished)]];
    box.replaceChildren(...[
      el("h2", { class: "mono" }, t.id),
      el("div", { class: "toolbar" },
        el("button", { onclick: revoke(false), id: "revoke", disabled: FINAL.has(t.state) }, "Revoke"),
        el("button", { onclick: revoke(true), id: "terminate", class: "danger", disabled: FINAL.has(t.state) }, "Revoke and terminate")),
      el("table", { class: "facts" }, el("tbody", {}, facts.filter(([, v]) => v !== null && v !== undefined && v !== "")
        .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", { "data-fact": k }, v))))),
      el("h3", {}, "Arguments"),
      el("pre", { id: "args" }, t.args === undefined || t.args === null ? "(not kept by the broker)" :
        JSON.stringify({ args: t.args, kwargs: t.kwargs }, null, 2)),
      t.state === "FAILURE" ? [el("h3", {}, "Error"),
        el("pre", { id: "error", class: "bad" }, `${t.exc_type}: ${t.exc_message || ""}`),
        t.traceback ? el("pre", { id: "traceback" }, t.traceback) : ""]
        : [el("h3", {}, "Result"), el("pre", { id: "result" }, JSON.stringify(t.result, null, 2))],
    ].flat().filter((node) => node !== ""));
    if (!FINAL.has(t.state)) taskView.timer = setTimeout(() => box.isConnected && load(), 1000);
  };
  clearTimeout(taskView.timer);
  load();
  return [box];
}

// --- schedules ------------------------------------------------------------------------------
function schedulesView() {
  setTimeout(loadSchedules);
  return [el("div", { id: "schedule-list" }, el("p", {}, "Asking the broker…"))];
}

async function loadSchedules() {
  const list = document.getElementById("schedule-list");
  if (!list) return;
  try {
    const { schedules, leader } = await get("/api/schedules");
    const drawn = JSON.stringify([schedules, leader]);
    if (list.dataset.drawn === drawn) return;
    list.dataset.drawn = drawn;
    const steer = (name, verb) => async () => {
      const answer = await act(`/api/schedules/${encodeURIComponent(name)}/${verb}`);
      if (answer) { flash(answer.ok); loadSchedules(); }
    };
    const rows = schedules.map((s) => el("tr", { "data-schedule": s.name, class: s.paused ? "warn" : "" },
      el("td", {}, el("strong", {}, s.name)), el("td", {}, s.task), el("td", { class: "mono" }, s.when),
      el("td", {}, s.timezone), el("td", {}, s.paused ? "paused" : when(s.next_run)),
      el("td", {}, s.last_run ? when(s.last_run) : "never"),
      el("td", {}, s.last_id ? taskLink(s.last_id) : ""),
      el("td", {}, el("span", { class: "buttons" },
        el("button", { onclick: steer(s.name, s.paused ? "resume" : "pause"), "data-steer": `${s.paused ? "resume" : "pause"} ${s.name}` },
          s.paused ? "Resume" : "Pause"),
        el("button", { onclick: steer(s.name, "trigger"), "data-steer": `trigger ${s.name}` }, "Run now")))));
    list.replaceChildren(
      el("p", { id: "leader", class: leader ? "" : "banner bad" },
        leader ? `Led by ${leader}` : "Nobody leads: no worker runs, or its lease ran out."),
      schedules.length ? table(["name", "task", "when", "timezone", "next run", "last run", "last task", ""], rows, { id: "schedules" })
        : el("p", { class: "dim" }, "No [[schedule]] in the config."));
  } catch (error) {
    list.replaceChildren(el("div", { class: "banner bad" }, error.message));
  }
}

// --- routing and the live stream ----------------------------------------------------------
async function render() {
  const [, view, arg] = location.hash.split("/");
  state.view = view || "fleet";
  document.querySelectorAll("nav a").forEach((a) =>
    a.classList.toggle("active", a.dataset.view === state.view || (state.view === "task" && a.dataset.view === "tasks")));
  const main = document.getElementById("main");
  const views = { fleet: fleetView, queues: queuesView, dead: deadView, tasks: tasksView, schedules: schedulesView };
  const content = state.view === "task" ? await taskView(decodeURIComponent(arg || "")) : (views[state.view] || fleetView)();
  main.replaceChildren(...content.filter(Boolean));
}

function live() {
  const status = document.getElementById("live");
  const events = new EventSource("/api/events");
  events.onopen = () => { status.textContent = "live"; status.className = "live on"; };
  events.onerror = () => { status.textContent = "reconnecting"; status.className = "live off"; };
  events.onmessage = (message) => {
    state.snapshot = JSON.parse(message.data);
    if (state.snapshot.sample) state.samples.push(state.snapshot.sample);
    if (["fleet", "queues", "dead"].includes(state.view)) {
      // Not while the operator is choosing letters to retry: ticks would be lost.
      if (state.view !== "dead" || !document.querySelector("#dead input:checked")) render();
    } else if (state.view === "tasks") loadTasks();
    else if (state.view === "schedules") loadSchedules();
  };
}

async function start() {
  state.info = await get("/api/info");
  const mode = document.getElementById("mode");
  mode.textContent = state.info.read_only ? "read-only" : "actions need the token";
  mode.classList.toggle("ro", state.info.read_only);
  state.samples = (await get(`/api/history?hours=${CHART_HOURS}`)).samples;
  window.addEventListener("hashchange", render);
  render();
  live();
}

start();
