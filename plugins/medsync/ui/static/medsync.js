// The medsync page: reads ./api/* (same origin: the UI's login cookie goes along) and draws it.
// Every value is put in the page as text (textContent), never as HTML.
"use strict";

const BASE = location.pathname.endsWith("/") ? location.pathname : location.pathname + "/";
const LEVELS = ["subject", "study", "sequence", "instance"];
const FIGURES = ["pulled", "inserted", "updated", "unchanged", "deleted", "quarantined", "pending", "difference"];
const KINDS = { scheduled: "scheduled", backfill: "backfill", manual: "manual", full_refresh: "full refresh" };
let airflowRoot = "/";
let sources = [];

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null) continue;
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children.flat()) node.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return node;
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return String(iso);
  return d.toISOString().slice(0, 16).replace("T", " ");  // UTC, as the page's header says
}

function since(iso) {
  // A full refresh syncs from the beginning (medsync.windows.BEGINNING, 1970).
  return iso && iso.startsWith("1970-01-01") ? "the beginning" : when(iso);
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "";
  const s = Math.round(seconds);
  if (s < 60) return `${s}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s`;
  return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
}

function num(v) {
  return v === null || v === undefined ? "–" : Number(v).toLocaleString("en-US");
}

function runLink(dagId, dagRunId, text) {
  // target=_top: the Airflow UI opens in the whole window, not inside this page's iframe.
  const href = `${airflowRoot}dags/${encodeURIComponent(dagId)}/runs/${encodeURIComponent(dagRunId)}`;
  return el("a", { href, target: "_top", class: "run-link" }, text);
}

async function getJson(path, payload) {
  // A payload is POSTed as JSON: a search term (maybe an MRN) must be in no URL, since URLs are logged.
  const init = payload === undefined ? {} : { method: "POST", body: JSON.stringify(payload) };
  const resp = await fetch(BASE + path, { credentials: "same-origin", ...init,
                                          headers: { Accept: "application/json", "Content-Type": "application/json" } });
  if (resp.status === 401) { location.reload(); throw new Error("not logged in"); }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.detail || `HTTP ${resp.status}`);
  return body;
}

function setStatus(text) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.hidden = !text;
}

function table(id, head, rows) {
  const t = document.getElementById(id);
  t.replaceChildren(el("thead", {}, el("tr", {}, head.map(([label, cls]) => el("th", { class: cls }, label)))),
                    el("tbody", {}, rows));
  return t;
}

function drawRuns(data) {
  const rows = [];
  for (const run of data.runs) {
    const levels = LEVELS.filter((l) => run.levels[l]);
    const span = String(Math.max(levels.length, 1));
    const lead = [
      el("td", { rowspan: span }, runLink(data.dag_id, run.dag_run_id, when(run.started_at)),
         el("div", { class: "run-id" }, run.dag_run_id)),
      el("td", { rowspan: span }, KINDS[run.kind] || run.kind),
      el("td", { rowspan: span }, run.window ? [since(run.window[0]), el("br"), `→ ${when(run.window[1])}`] : ""),
      el("td", { rowspan: span, class: `state-${run.status}` }, run.status),
      el("td", { rowspan: span, class: "num" }, duration(run.duration_seconds)),
    ];
    if (!levels.length) { rows.push(el("tr", { class: "run-first" }, lead)); continue; }
    levels.forEach((level, i) => {
      const f = run.levels[level];
      const cells = [el("td", {}, level), ...FIGURES.map((name) => {
        const bad = name === "difference" && f[name] ? " bad" : "";
        return el("td", { class: `num fig-${name}${bad}` }, num(f[name]));
      })];
      rows.push(el("tr", { class: i === 0 ? "run-first" : "", "data-run": run.dag_run_id, "data-level": level },
                   i === 0 ? lead : [], cells));
    });
  }
  table("runs", [["run"], ["kind"], ["window"], ["state"], ["duration", "num"], ["level"],
                 ...FIGURES.map((f) => [f, "num"])], rows);
  if (!data.runs.length) document.getElementById("runs").append(el("caption", {}, "No run yet."));
}

function drawChart(data) {
  const box = document.getElementById("chart");
  const runs = data.changes;
  if (!runs.length) { box.replaceChildren(el("p", { class: "note" }, "No run in the last 4 weeks.")); return; }
  const NS = "http://www.w3.org/2000/svg";
  const svgEl = (tag, attrs, ...kids) => {
    const n = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    for (const kid of kids) n.append(kid instanceof Node ? kid : document.createTextNode(kid));
    return n;
  };
  const parts = [["inserted", "var(--ins)"], ["updated", "var(--upd)"], ["deleted", "var(--del)"]];
  const W = 900, H = 220, left = 56, bottom = 28, top = 10;
  const max = Math.max(1, ...runs.map((r) => r.inserted + r.updated + r.deleted));
  const step = (W - left - 10) / runs.length;
  const bar = Math.max(2, Math.min(40, step * 0.7));
  const y = (v) => H - bottom - (v / max) * (H - bottom - top);
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, width: W, height: H, role: "img",
                             "aria-label": "rows changed per run", id: "changes-chart" });
  for (const frac of [0, 0.5, 1]) {
    const v = Math.round(max * frac);
    svg.append(svgEl("line", { x1: left, x2: W - 10, y1: y(v), y2: y(v), stroke: "#d9e2ec" }),
               svgEl("text", { x: left - 6, y: y(v) + 4, "text-anchor": "end", "font-size": 11, fill: "#616e7c" },
                     v.toLocaleString("en-US")));
  }
  runs.forEach((run, i) => {
    const x = left + i * step + (step - bar) / 2;
    let base = 0;
    const g = svgEl("g", { class: "bar", "data-run": run.dag_run_id });
    for (const [name, color] of parts) {
      const v = run[name];
      if (v > 0) g.append(svgEl("rect", { x, width: bar, y: y(base + v), height: y(base) - y(base + v), fill: color }));
      base += v;
    }
    g.append(svgEl("title", {}, `${run.dag_run_id} (${KINDS[run.kind] || run.kind}, ${when(run.started_at)}): ` +
      `${num(run.inserted)} inserted, ${num(run.updated)} updated, ${num(run.deleted)} deleted`));
    svg.append(g);
  });
  const first = runs[0].started_at, last = runs[runs.length - 1].started_at;
  svg.append(svgEl("text", { x: left, y: H - 8, "font-size": 11, fill: "#616e7c" }, when(first)),
             svgEl("text", { x: W - 10, y: H - 8, "font-size": 11, fill: "#616e7c", "text-anchor": "end" }, when(last)));
  const legend = el("div", { class: "legend" },
    parts.map(([name, color]) => el("span", {}, el("i", { style: `background:${color}` }), name)));
  box.replaceChildren(svg, legend);
}

function drawWatermarks(data) {
  const rows = LEVELS.map((level) => {
    const w = data.watermarks[level] || {};
    const live = data.live_counts[level] || {};
    return el("tr", {}, el("td", {}, level), el("td", {}, when(w.synced_until) || "none yet"),
              el("td", { class: "num" }, num(live.live)), el("td", {}, when(live.counted_at)));
  });
  table("watermarks", [["level"], ["synced until"], ["live rows", "num"], ["last exact count"]], rows);
}

function drawFiles(data) {
  const box = document.getElementById("files");
  const f = data.file_check;
  if (!f) { box.replaceChildren(el("p", { class: "note" }, "No file check yet.")); return; }
  const failed = f.missing + f.denied + f.refused + f.errors;
  const items = [
    el("p", {}, "Run ", runLink(data.dag_id, f.dag_run_id, f.dag_run_id), ` (${when(f.started_at)}): `,
       el("strong", { class: failed ? "bad" : "state-succeeded", id: "files-summary" },
          `${num(f.ok)} of ${num(f.checked)} sampled files readable`),
       ` (sampled from ${num(f.candidates)} new or changed instances).`),
  ];
  if (failed) {
    items.push(el("p", {}, `missing ${f.missing}, denied ${f.denied}, refused ${f.refused}, errors ${f.errors}`));
    for (const [kind, where] of Object.entries(f.examples || {})) {
      if (where.length) items.push(el("p", { class: "keys" }, `${kind}: ${where.join(", ")}`));
    }
  }
  box.replaceChildren(...items);
}

function drawQuarantine(data) {
  const rows = data.quarantine.map((g) => el("tr", { class: "quarantine-group" },
    el("td", {}, g.level), el("td", { class: "reason" }, g.reason), el("td", { class: "num" }, num(g.count)),
    el("td", {}, when(g.oldest)), el("td", {}, when(g.newest)), el("td", { class: "keys" }, g.sample_keys.join(", "))));
  table("quarantine", [["level"], ["reason"], ["records", "num"], ["oldest"], ["newest"], ["oldest keys"]], rows);
  if (!rows.length) document.getElementById("quarantine").append(el("caption", {}, "Nothing held back."));
}

function drawPending(data) {
  const ages = ["under 1 h", "1 h to 1 day", "1 to 7 days", "over 7 days"];
  const rows = Object.entries(data.pending).map(([level, p]) => el("tr", {},
    el("td", {}, level), el("td", { class: "num" }, num(p.count)), el("td", {}, `${p.parent_level} (${p.parent_key_is})`),
    ...ages.map((a) => el("td", { class: "num" }, num(p.ages[a]))), el("td", {}, when(p.oldest)),
    el("td", { class: "keys" }, p.longest_waiting.map((w) => `${w.source_key} → ${w.parent_key}`).join(", "))));
  table("pending", [["level"], ["waiting", "num"], ["for parent (by)"], ...ages.map((a) => [a, "num"]),
                    ["since"], ["longest waiting → parent"]], rows);
}

async function showSource(name) {
  for (const b of document.querySelectorAll("#sources button")) b.setAttribute("aria-current", b.dataset.source === name);
  setStatus(`Loading ${name}…`);
  try {
    const data = await getJson(`api/sources/${encodeURIComponent(name)}`);
    if (!data.synced) {
      setStatus(`${name}: no run has written to A's database yet.`);
      data.runs = []; data.changes = []; data.watermarks = {}; data.live_counts = {};
      data.quarantine = []; data.pending = {}; data.file_check = null;
    } else {
      setStatus("");
    }
    drawRuns(data); drawChart(data); drawWatermarks(data); drawFiles(data); drawQuarantine(data); drawPending(data);
    document.body.dataset.loaded = name;
  } catch (err) {
    setStatus(`${name}: ${err.message}`);
  }
}

function describe(r) {
  const dl = el("dl");
  const add = (k, v) => { if (v !== null && v !== undefined && v !== "") dl.append(el("dt", {}, k), el("dd", {}, v)); };
  if (r.stored) {
    add("A's id", r.stored.a_id);
    add("source version", when(r.stored.source_updated_at));
    add("in A since", when(r.stored.created_at));
    add("last written", when(r.stored.updated_at));
    add("deleted in A", when(r.stored.deleted_at));
  }
  if (r.quarantine) {
    add(r.quarantine.resolved_at ? "was quarantined" : "quarantined", r.quarantine.reason);
    add("held version", when(r.quarantine.source_updated_at));
    add("held since", when(r.quarantine.since));
    add("tries", r.quarantine.attempts);
    add("resolved", when(r.quarantine.resolved_at));
  }
  if (r.pending) {
    add("waits for", `${r.pending.parent_level} ${r.pending.parent_key} (${r.pending.parent_key_is})`);
    add("waiting since", when(r.pending.since));
    if (r.pending.parent) add("that parent is", r.pending.parent.states.join(", ") +
      (r.pending.parent.quarantine ? `: ${r.pending.parent.quarantine.reason}` : ""));
  }
  if (r.tombstone) add("deleted in the source at", when(r.tombstone.source_updated_at));
  return dl;
}

async function search(term) {
  const section = document.getElementById("search-results");
  const body = document.getElementById("search-body");
  section.hidden = false;
  body.replaceChildren(el("p", { class: "note" }, "Searching…"));
  try {
    const data = await getJson("api/search", { q: term });
    if (!data.results.length) {
      body.replaceChildren(el("p", { class: "note" }, "Not found among the sources you may read."));
      return;
    }
    // A miss names the sources searched, not the term: it may be an MRN, which the page never shows.
    body.replaceChildren(...data.results.map((r) => el("div", { class: "found" },
      el("strong", { class: "search-state" }, r.states.join(", ")), " ",
      r.source ? `${r.source} ${r.level} ${r.source_key}` : `in source ${r.sources.join(", ")}`,
      describe(r))));
  } catch (err) {
    body.replaceChildren(el("p", { class: "bad" }, err.message));
  }
}

async function start() {
  try {
    const data = await getJson("api/sources");
    airflowRoot = data.airflow_root || "/";
    sources = data.sources;
  } catch (err) {
    setStatus(err.message);
    return;
  }
  const nav = document.getElementById("sources");
  nav.replaceChildren(...sources.map((s) => {
    const b = el("button", { type: "button", "data-source": s.name, title: s.description }, `source ${s.name}`);
    b.addEventListener("click", () => showSource(s.name));
    return b;
  }));
  document.getElementById("search").addEventListener("submit", (ev) => {
    ev.preventDefault();
    search(document.getElementById("search-term").value);
  });
  const wanted = new URLSearchParams(location.search).get("source");
  await showSource(sources.some((s) => s.name === wanted) ? wanted : sources[0].name);
}

start();
