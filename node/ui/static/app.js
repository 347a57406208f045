// The operator page: renders the director's snapshots as they arrive over server-sent
// events. Every piece of data goes in through textContent or SVG attributes, never as HTML.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const STAGES = {
  waiting: "waiting for envoys",
  training: "local training",
  advertise_keys: "SecAgg: advertise keys",
  share_keys: "SecAgg: share keys",
  masked_input: "SecAgg: masked input",
  consistency: "SecAgg: consistency check",
  unmask: "SecAgg: unmask",
  evaluate: "federated evaluation",
  round_end: "round complete",
  finished: "finished",
  failed: "FAILED",
  starting: "starting",
};

// Per-class ROC curves of a multi-class federation: colours k0..k7 in style.css.
const PALETTE_SIZE = 8;

let snap = null;       // the last snapshot
let receivedAt = 0;    // browser time (s) when it arrived

const $ = (id) => document.getElementById(id);
const nowServer = () => (snap ? snap.now + (Date.now() / 1000 - receivedAt) : Date.now() / 1000);
const fmt = (v, digits = 3) => (typeof v === "number" ? v.toFixed(digits) : "–");

function ago(t) {
  if (typeof t !== "number") return "never";
  const s = Math.max(0, nowServer() - t);
  if (s < 90) return `${Math.round(s)} s ago`;
  if (s < 5400) return `${Math.round(s / 60)} min ago`;
  return `${Math.round(s / 3600)} h ago`;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined) node.textContent = text;
  if (cls) node.className = cls;
  return node;
}

function svg(parent, tag, attrs, text) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  parent.appendChild(node);
  return node;
}

function clear(node) {
  while (node.firstChild) node.removeChild(node.firstChild);
}

function renderHeader() {
  $("federation").textContent = snap.federation || "fedbus";
  const total = snap.rounds_total;
  $("round").textContent = total ? `${snap.round ?? 0} / ${total}` : `${snap.round ?? 0}`;
  const done = snap.rounds.length;
  $("progress").style.width = total ? `${Math.min(100, (100 * done) / total)}%` : "0";
  $("stage").textContent = STAGES[snap.stage] || snap.stage || "–";
  $("secure").textContent = snap.secure ? "secure" : "PLAIN (insecure)";
  $("secure").className = "big " + (snap.secure ? "secure" : "plain");
  const online = snap.envoys.filter((e) => e.online).length;
  $("online").textContent = `${online} / ${snap.envoys.length}`;
  $("best").textContent = snap.best_round ? `best model: round ${snap.best_round}` : "";
  document.title = `${snap.federation} · round ${snap.round ?? 0} · fedbus`;
}

function renderClock() {
  if (!snap) return;
  const left = typeof snap.stage_deadline === "number" ? snap.stage_deadline - nowServer() : null;
  $("deadline").textContent =
    left === null ? "" : left >= 0 ? `deadline in ${Math.ceil(left)} s` : `deadline passed ${Math.floor(-left)} s ago`;
  $("updated").textContent = snap.updated ? `status updated ${ago(snap.updated)}` : "";
  for (const row of $("envoys").tBodies[0].rows) {
    row.cells[2].textContent = ago(Number(row.dataset.lastSeen) || undefined);
  }
}

function renderEnvoys() {
  const body = $("envoys").tBodies[0];
  clear(body);
  for (const e of snap.envoys) {
    const row = el("tr");
    row.dataset.envoy = e.name;
    row.dataset.lastSeen = e.last_seen ?? "";
    row.appendChild(el("td", e.name));
    const state = e.refused ? `refused: ${e.refused}` : e.online ? "online" : "offline";
    row.appendChild(el("td", state, e.refused ? "refused" : e.online ? "online" : "offline"));
    row.appendChild(el("td", ago(e.last_seen), "num"));
    row.appendChild(el("td", STAGES[e.stage] || e.stage || ""));
    body.appendChild(row);
  }
}

function renderRounds() {
  const body = $("rounds").tBodies[0];
  clear(body);
  for (const r of [...snap.rounds].reverse().slice(0, 50)) {
    const row = el("tr");
    row.dataset.round = r.round;
    const v = r.val || {};
    row.appendChild(el("td", String(r.round), "num"));
    row.appendChild(el("td", `${r.survivors.length} of ${r.participants.length}`, "num"));
    row.appendChild(el("td", r.dropped.length ? r.dropped.join(", ") : "none"));
    row.appendChild(el("td", fmt(v.auc), "num"));
    row.appendChild(el("td", fmt(v.accuracy), "num"));
    row.appendChild(el("td", fmt(v.threshold), "num"));
    row.appendChild(el("td", fmt(r.seconds, 1), "num"));
    body.appendChild(row);
  }
}

function axes(root, x0, y0, w, h, yTicks) {
  for (const t of yTicks) {
    const y = y0 + h - t * h;
    svg(root, "line", { x1: x0, x2: x0 + w, y1: y, y2: y, class: "grid" });
    svg(root, "text", { x: x0 - 4, y: y + 3, "text-anchor": "end" }, t.toFixed(1));
  }
  svg(root, "line", { x1: x0, x2: x0, y1: y0, y2: y0 + h, class: "axis" });
  svg(root, "line", { x1: x0, x2: x0 + w, y1: y0 + h, y2: y0 + h, class: "axis" });
}

function renderCurves() {
  const root = $("curves");
  clear(root);
  const [x0, y0, w, h] = [34, 10, 330, 190];
  axes(root, x0, y0, w, h, [0, 0.2, 0.4, 0.6, 0.8, 1.0]);
  const rounds = snap.rounds.filter((r) => r.val);
  const last = Math.max(snap.rounds_total || 1, ...snap.rounds.map((r) => r.round), 1);
  const x = (n) => x0 + (last <= 1 ? w / 2 : ((n - 1) / (last - 1)) * w);
  const y = (v) => y0 + h - v * h;
  svg(root, "text", { x: x0, y: y0 + h + 16 }, "round 1");
  svg(root, "text", { x: x0 + w, y: y0 + h + 16, "text-anchor": "end" }, `round ${last}`);
  for (const [key, cls] of [["auc", "auc"], ["accuracy", "acc"]]) {
    const pts = rounds.filter((r) => typeof r.val[key] === "number");
    if (pts.length > 1) {
      const d = pts.map((r, i) => `${i ? "L" : "M"}${x(r.round).toFixed(1)},${y(r.val[key]).toFixed(1)}`);
      svg(root, "path", { d: d.join(" "), class: cls, "data-series": key });
    }
    for (const r of pts) {
      const dot = svg(root, "circle", { cx: x(r.round), cy: y(r.val[key]), r: 3, class: `dot-${cls}`, "data-series": key });
      svg(dot, "title", {}, `round ${r.round}: ${key} ${fmt(r.val[key])}`);
    }
  }
}

function rocPath(curve, x, y) {
  return curve.fpr.map((f, i) => `${i ? "L" : "M"}${x(f).toFixed(1)},${y(curve.tpr[i]).toFixed(1)}`).join(" ");
}

function renderRoc() {
  const root = $("roc");
  clear(root);
  const [x0, y0, s] = [42, 8, 200];
  axes(root, x0, y0, s, s, [0, 0.5, 1.0]);
  const x = (v) => x0 + v * s;
  const y = (v) => y0 + s - v * s;
  svg(root, "line", { x1: x(0), y1: y(0), x2: x(1), y2: y(1), class: "chance" });
  svg(root, "text", { x: x0 + s / 2, y: y0 + s + 28, "text-anchor": "middle" }, "1 - specificity");
  svg(root, "text", { x: 10, y: y0 + s / 2, "text-anchor": "middle", transform: `rotate(-90 10 ${y0 + s / 2})` }, "sensitivity");
  const latest = snap.roc_latest;
  const best = snap.roc_best;
  if (best && latest && best.round !== latest.round) {
    svg(root, "path", { d: rocPath(best, x, y), class: "roc-best", "data-round": best.round });
  }
  const classes = latest && latest.classes ? latest.classes : [];
  classes.forEach((c, i) => {
    const key = `k${i % PALETTE_SIZE}`;  // style.css colours k0..k7
    const path = svg(root, "path", { d: rocPath(c, x, y), class: `roc-class ${key}`, "data-class": c.name });
    svg(path, "title", {}, `${c.name}: AUC ${fmt(c.auc)}`);
    svg(root, "text", { x: x0 + s - 2, y: y0 + s - 8 - 12 * (classes.length - 1 - i), "text-anchor": "end", class: `roc-key ${key}` }, `${c.name} ${fmt(c.auc)}`);
  });
  if (latest) {
    svg(root, "path", { d: rocPath(latest, x, y), class: "roc", "data-round": latest.round });
    let caption = classes.length
      ? `round ${latest.round}: macro AUC ${fmt(latest.auc)} (one-vs-rest, ${classes.length} classes; solid: micro-average)`
      : `round ${latest.round}: AUC ${fmt(latest.auc)}`;
    if (best && best.round !== latest.round) caption += ` · dashed: best, round ${best.round} (AUC ${fmt(best.auc)})`;
    $("roc-caption").textContent = caption;
  } else {
    $("roc-caption").textContent = "no evaluated round yet";
  }
}

function renderDropouts() {
  const root = $("dropouts");
  clear(root);
  const [x0, y0, w, h] = [34, 10, 330, 130];
  const rounds = snap.rounds;
  const most = Math.max(1, ...rounds.map((r) => r.dropped.length));
  svg(root, "line", { x1: x0, x2: x0 + w, y1: y0 + h, y2: y0 + h, class: "axis" });
  svg(root, "text", { x: x0 - 4, y: y0 + 4, "text-anchor": "end" }, String(most));
  svg(root, "text", { x: x0 - 4, y: y0 + h, "text-anchor": "end" }, "0");
  if (!rounds.length) return;
  const slot = w / rounds.length;
  rounds.forEach((r, i) => {
    const n = r.dropped.length;
    const bh = n ? (n / most) * h : 2;
    const bar = svg(root, "rect", {
      x: x0 + i * slot + slot * 0.15, y: y0 + h - bh, width: Math.max(1, slot * 0.7), height: bh,
      class: n ? "drop" : "nodrop", "data-round": r.round, "data-dropped": n,
    });
    svg(bar, "title", {}, `round ${r.round}: ${n} dropped${n ? " (" + r.dropped.join(", ") + ")" : ""}`);
    if (rounds.length <= 30) {
      svg(root, "text", { x: x0 + (i + 0.5) * slot, y: y0 + h + 14, "text-anchor": "middle" }, String(r.round));
    }
  });
}

function render() {
  renderHeader();
  renderEnvoys();
  renderRounds();
  renderCurves();
  renderRoc();
  renderDropouts();
  renderClock();
}

function accept(data) {
  snap = data;
  receivedAt = Date.now() / 1000;
  render();
}

const FINAL_STAGES = new Set(["finished", "failed"]);

function connection(state, text) {
  const pill = $("connection");
  pill.className = `pill ${state}`;
  pill.textContent = text;
}

function start() {
  fetch("/api/snapshot", { cache: "no-store" })
    .then((r) => (r.ok ? r.json() : Promise.reject(r.status)))
    .then((data) => { if (!snap) accept(data); })
    .catch(() => {});
  const source = new EventSource("/api/events");
  source.addEventListener("open", () => connection("live", "live"));
  source.addEventListener("snapshot", (e) => {
    const data = JSON.parse(e.data);
    accept(data);
    if (FINAL_STAGES.has(data.stage)) {
      // The director has said its last word and is going away: reconnecting would only
      // fill the console with refused connections while the page shows the final state.
      source.close();
      connection("ended", "ended");
    } else {
      connection("live", "live");
    }
  });
  source.addEventListener("error", () => connection("down", "reconnecting"));
  setInterval(renderClock, 1000);
}

document.addEventListener("DOMContentLoaded", start);
