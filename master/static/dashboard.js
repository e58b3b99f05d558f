// kilnproxy dashboard: polls the status server every second and draws its own SVG charts.
"use strict";

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777"];
const SVG = "http://www.w3.org/2000/svg";
const WINDOW_SECONDS = 3600;
const FETCH_TIMEOUT_MS = 5000;  // a master that does not answer is said, not waited for
const UNREACHABLE = "status server unreachable: ";
const series = {};  // worker index -> samples {t, rss, heap, sessions, tasks}
let lastSample = 0;
let refreshed = Promise.resolve();  // the last refresh asked for: the next one waits for it

function el(tag, attrs, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, value);
  if (text !== undefined) node.textContent = text;
  return node;
}

function mib(bytes) { return (bytes / 1048576).toFixed(1) + " MiB"; }
function size(bytes) {
  if (bytes < 1024) return bytes + " B";
  if (bytes < 1048576) return (bytes / 1024).toFixed(1) + " KiB";
  return mib(bytes);
}

// One chart: lines of [t, value] points, a time axis for the window, the max value labelled.
function chart(svg, lines, format) {
  svg.replaceChildren();
  const width = 640, height = 220, left = 56, bottom = 20, top = 8;
  const points = lines.flatMap(line => line.points);
  const now = Date.now() / 1000;
  // A loop, not Math.min(...points): an hour of samples of 18 workers is more arguments than a
  // call may take (RangeError), and the charts would stop.
  let first = now - 60, highest = 1;
  for (const [t, v] of points) {
    if (t < first) first = t;
    if (v > highest) highest = v;
  }
  const t0 = Math.max(now - WINDOW_SECONDS, first);
  const vmax = highest * 1.1;
  const x = t => left + (width - left - 4) * (t - t0) / Math.max(1, now - t0);
  const y = v => height - bottom - (height - bottom - top) * v / vmax;
  svg.append(el("svg:line", {class: "axis", x1: left, y1: y(0), x2: width, y2: y(0)}));
  svg.append(el("svg:line", {class: "axis", x1: left, y1: top, x2: left, y2: y(0)}));
  svg.append(el("svg:text", {x: 4, y: top + 10}, format(vmax)));
  svg.append(el("svg:text", {x: 4, y: y(0)}, format(0)));
  svg.append(el("svg:text", {x: left, y: height - 4}, "-" + Math.round((now - t0) / 60) + " min"));
  svg.append(el("svg:text", {x: width - 30, y: height - 4}, "now"));
  for (const line of lines) {
    if (line.points.length === 0) continue;
    const coordinates = line.points.map(([t, v]) => x(t).toFixed(1) + "," + y(v).toFixed(1)).join(" ");
    const attrs = {points: coordinates, stroke: line.color};
    if (line.dashed) attrs["stroke-dasharray"] = "5 4";
    svg.append(el("svg:polyline", attrs));
  }
}

function drawCharts() {
  const memory = [], sessions = [], legend = document.getElementById("legend");
  legend.replaceChildren();
  Object.keys(series).sort((a, b) => a - b).forEach((index, i) => {
    const color = COLORS[i % COLORS.length], samples = series[index];
    memory.push({color, points: samples.map(s => [s.t, s.rss])});
    memory.push({color, dashed: true, points: samples.map(s => [s.t, s.heap])});
    sessions.push({color, points: samples.map(s => [s.t, s.sessions])});
    const latest = samples[samples.length - 1];
    const entry = el("span");
    entry.append(el("i", {style: "background:" + color}),
                 "worker " + index + (latest ? ": " + mib(latest.rss) + ", " + latest.sessions + " sessions" : ""));
    legend.append(entry);
  });
  chart(document.getElementById("memory-chart"), memory, mib);
  chart(document.getElementById("sessions-chart"), sessions, v => String(Math.round(v)));
}

async function endSession(session) {
  const response = await fetch("/connections/" + session, {method: "DELETE"});
  document.getElementById("status").textContent =
    response.ok ? "ended session " + session : "could not end " + session + ": " + (await response.text());
  await refresh();
}

function drawConnections(rows) {
  const body = document.querySelector("#connections tbody");
  body.replaceChildren();
  for (const row of rows) {
    const tr = el("tr", {"data-session": row.session});
    const cells = [
      [row.session, "session"], [row.worker], [row.remote_addr],
      [(row.account || "-") + "/" + (row.user || "-")], [row.key_name || "-"],
      [[row.verb, row.repo].filter(Boolean).join(" ") || "-"], [row.backend || "-"],
      [Math.round(row.duration) + " s"], [size(row.bytes_in)], [size(row.bytes_out)],
    ];
    for (const [text, cls] of cells) tr.append(el("td", cls ? {class: cls} : {}, String(text)));
    const button = el("button", {type: "button", title: "end this session"}, "end session");
    button.addEventListener("click", () => endSession(row.session));
    const cell = el("td");
    cell.append(button);
    tr.append(cell);
    body.append(tr);
  }
  document.getElementById("sessions").textContent = String(rows.length);
}

async function json(path) {
  const response = await fetch(path, {signal: AbortSignal.timeout(FETCH_TIMEOUT_MS)});
  if (!response.ok) throw new Error(path + ": " + response.status + " " + (await response.text()).trim());
  return response.json();
}

// One after the other: two asking for the same `since` would both add the samples after it.
// Each loads anew: an ended session's must not take what was loaded before it ended.
function refresh() {
  const next = refreshed.then(load);
  refreshed = next.catch(() => {});
  return next;
}

async function load() {
  const [info, memory, rows] = await Promise.all([
    json("/info"), json("/debug/memory?since=" + lastSample), json("/connections"),
  ]);
  document.getElementById("version").textContent = info.version;
  document.getElementById("uptime").textContent = info.uptime;
  document.getElementById("workers").textContent = String(info.workers);
  const cutoff = Date.now() / 1000 - WINDOW_SECONDS;
  for (const [index, samples] of Object.entries(memory.workers)) {
    series[index] = (series[index] || []).concat(samples);
    for (const sample of samples) lastSample = Math.max(lastSample, sample.t);
  }
  for (const index of Object.keys(series)) {  // a slot gone (TTOU) leaves the legend in an hour
    series[index] = series[index].filter(s => s.t >= cutoff);
    if (series[index].length === 0) delete series[index];
  }
  drawCharts();
  drawConnections(rows);
}

async function tick() {
  const status = document.getElementById("status");
  try {
    await refresh();
    document.body.dataset.updated = String(Date.now());
    if (status.textContent.startsWith(UNREACHABLE)) status.textContent = "";  // it is back
  } catch (error) {
    status.textContent = UNREACHABLE + error;
  }
  setTimeout(tick, 1000);
}

tick();
