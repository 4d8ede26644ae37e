// The map page: embedding map (WebGL scatter), search, confusion matrix. Data from the app's JSON API.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
let info = null;
let points = null;
let mapBound = false;
let searched = null;  // the last search: { set, results }

async function getJSON(url) {
  const r = await fetch(url);
  if (!r.ok) throw new Error(await r.text());
  return r.json();
}

// Plotly draws legend entries, hover labels, titles and tick labels from its own "pseudo-HTML":
// <b>, <a href="https://...">, <span style> and entities. A class, city or split name is the store's
// text, so every such string is entity-escaped on the way in (Plotly shows the escaped text as the
// literal characters) and never spliced into a hovertemplate; '%' too: Plotly fills %{...} in
// legend names as well.
function plain(text) {
  return String(text).replace(/[&<>"'%]/g, (c) => "&#" + c.charCodeAt(0) + ";");
}

function fill(select, values, chosen) {
  select.innerHTML = "";
  for (const v of values) select.add(new Option(v, v, false, v === chosen));
}

function clipLink(id) {
  const a = document.createElement("a");
  a.href = "clip?" + new URLSearchParams({ id, set: $("set").value });
  a.textContent = id;
  return a;
}

function noLabel() {
  // the text of a clip without a label: numbered while a class is named so (data.py's unclaimed)
  const taken = new Set(info ? info.classes : []);
  let name = "(no label)";
  for (let n = 2; taken.has(name); n++) name = "(no label " + n + ")";
  return name;
}

function list(ol, items) {
  ol.innerHTML = "";
  for (const it of items) {
    const li = document.createElement("li");
    li.append(clipLink(it.clip_id));
    if (it.label !== undefined) li.append(" " + (it.label ?? noLabel()));
    if (it.score !== undefined) li.append(" " + it.score.toFixed(3));
    ol.append(li);
  }
}

const CODES = { uint16: Uint16Array, uint32: Uint32Array };

function decode(b64, Type) {
  // base64 little-endian array from the server -> typed array (positions float32, group codes
  // uint16, or uint32 past 65,536 groups: the server names it in group_dtype)
  if (!Type) throw new Error("the map's group codes come in a type this page cannot read");
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Type(bytes.buffer);
}

async function drawMap() {
  const t0 = performance.now();
  const set = $("set").value;
  const wire = await getJSON("api/points?" + new URLSearchParams({ set, colour: $("colour").value }));
  points = { ...wire, x: decode(wire.x, Float32Array), y: decode(wire.y, Float32Array), group: decode(wire.group, CODES[wire.group_dtype]),
             ids: typeof wire.ids === "string" ? wire.ids.split("\n") : wire.ids };
  const counts = new Array(points.groups.length).fill(0);
  for (const g of points.group) counts[g] += 1;
  const traces = points.groups.map((name, g) => ({ type: "scattergl", mode: "markers", name: plain(name) + " (" + counts[g] + ")",
    x: new Float32Array(counts[g]), y: new Float32Array(counts[g]), customdata: new Array(counts[g]), meta: plain(name),
    hovertemplate: "%{customdata}<extra>%{meta}</extra>", marker: { size: points.n > 20000 ? 3 : 6 } }));
  const filled = new Array(points.groups.length).fill(0);
  points.group.forEach((g, i) => {
    const t = traces[g], k = filled[g]++;
    t.x[k] = points.x[i]; t.y[k] = points.y[i]; t.customdata[k] = points.ids[i];
  });
  const layout = { margin: { l: 30, r: 10, t: 30, b: 30 }, dragmode: "zoom", hovermode: "closest", uirevision: set,
    title: { text: plain(set) + " (" + points.method + ", " + points.ids.length + " clips)", font: { size: 13 } } };
  await Plotly.react("map", traces, layout, { displaylogo: false, responsive: true });
  if (!mapBound) bindMap();
  await keepSearch(set);
  window.mapRenderMs = performance.now() - t0;
  document.body.dataset.map = set + "|" + $("colour").value;
}

function bindMap() {
  mapBound = true;
  const map = $("map");
  map.on("plotly_click", (ev) => {
    const id = ev.points[0].customdata;
    if (id) location.href = "clip?" + new URLSearchParams({ id, set: $("set").value });
  });
  map.on("plotly_selected", (ev) => {
    // each clip once: a search's ring is a point of its own trace over the clip's point
    const ids = ev ? [...new Set(ev.points.map((p) => p.customdata).filter((c) => c))] : [];
    list($("selection"), ids.map((clip_id) => ({ clip_id })));
  });
}

async function dropSearch() {
  // the last query's results and ring: gone before a new query answers (or fails), so a list is
  // never shown under a query it does not answer
  searched = null;
  list($("results"), []);
  delete $("results").dataset.kind;
  const map = $("map");
  const old = points && map.data ? map.data.findIndex((t) => t.name === "search") : -1;
  if (old >= 0) await Plotly.deleteTraces(map, old);
}

async function ring(results) {
  // the hits ringed on the map: a trace of their own, named "search"
  if (!points) return;  // no map drawn (its redraw failed): the list alone
  const where = new Map(points.ids.map((id, i) => [id, i]));
  const hits = results.map((r) => where.get(r.clip_id)).filter((i) => i !== undefined);
  await Plotly.addTraces($("map"), { type: "scattergl", mode: "markers", name: "search",
    x: hits.map((i) => points.x[i]), y: hits.map((i) => points.y[i]), customdata: hits.map((i) => points.ids[i]),
    marker: { size: 14, color: "rgba(0,0,0,0)", line: { width: 2, color: "black" } }, hovertemplate: "%{customdata}<extra>search</extra>" });
}

async function keepSearch(set) {
  // after a redraw of the map: the hits ringed again on the same set (another colouring); on
  // another set they are neighbours in the old one, so they go (before: the list stayed, unringed)
  if (!searched) return;
  if (searched.set === set) await ring(searched.results);
  else await dropSearch();
}

async function runSearch(ev) {
  ev.preventDefault();
  $("note").textContent = "";
  try {
    await dropSearch();
    const set = $("set").value;
    const found = await getJSON("api/search?" + new URLSearchParams({ set, q: $("search").value }));
    list($("results"), found.results);
    $("results").dataset.kind = found.kind;
    searched = { set, results: found.results };
    if (found.random_weights) $("note").textContent = "The text tower has random weights: these hits mean nothing.";
    await ring(found.results);
  } catch (err) {
    $("note").textContent = err.message;
  }
}

async function drawConfusion() {
  if (!$("source").value) return;
  const cm = await getJSON("api/confusion?" + new URLSearchParams({ source: $("source").value, split: $("split").value }));
  $("accuracy").textContent = cm.accuracy === null ? "no clip with a label in this split: no accuracy"
    : cm.n + " clips, accuracy " + (100 * cm.accuracy).toFixed(1) + "%";
  const shown = cm.classes.map(plain);  // tick labels and hover: the escaped names (see plain)
  const trace = { type: "heatmap", z: cm.counts, x: shown, y: shown, colorscale: [[0, "#f4f8fc"], [1, "#1f4e8c"]],
    text: cm.counts.map((r) => r.map(String)), texttemplate: "%{text}", hovertemplate: "true %{y}, predicted %{x}: %{z}<extra></extra>" };
  // category axes, always: Plotly guesses an axis type from the tick values, so classes named "1",
  // "10", "2" (or like dates) got a numeric axis, their cells placed by number and a click on one
  // listing no clips
  const layout = { margin: { l: 140, r: 10, t: 10, b: 120 }, xaxis: { type: "category", title: { text: "predicted" } },
    yaxis: { type: "category", title: { text: "true" }, autorange: "reversed" } };
  const div = $("confusion");
  await Plotly.react(div, [trace], layout, { displaylogo: false, responsive: true });
  div.removeAllListeners?.("plotly_click");
  div.on("plotly_click", (ev) => {
    const t = shown.indexOf(ev.points[0].y), p = shown.indexOf(ev.points[0].x);
    $("cell-name").textContent = "(true " + cm.classes[t] + ", predicted " + cm.classes[p] + ")";
    list($("cell-clips"), (cm.cells[t + "," + p] || []).map((clip_id) => ({ clip_id })));
  });
  document.body.dataset.confusion = $("source").value + "|" + $("split").value;
}

// A redraw asked by a menu that fails (a store deleted under the app: 503; an output that cannot be
// computed: 400) says why in the note and removes the picture it was to replace: before, the error
// went nowhere and the last map or matrix stayed under the new choice, as if it were its answer.
async function redraw(draw, clear) {
  $("note").textContent = "";
  try {
    await draw();
  } catch (err) {
    clear();
    $("note").textContent = err.message;
  }
}

function clearMap() {
  Plotly.purge($("map"));  // drops the plot's event handlers too: bound again on the next draw
  mapBound = false;
  points = null;
  delete document.body.dataset.map;
  list($("selection"), []);
  searched = null;  // its hits were ringed on the map that is gone
  list($("results"), []);
}

function clearConfusion() {
  Plotly.purge($("confusion"));
  $("accuracy").textContent = "";
  $("cell-name").textContent = "";
  list($("cell-clips"), []);
  delete document.body.dataset.confusion;
}

async function init() {
  info = await getJSON("api/info");
  $("store").textContent = info.store + " (" + info.n_clips + " clips)";
  const sets = Object.keys(info.feature_sets);
  fill($("set"), sets, params.get("set") || sets[0]);
  fill($("colour"), info.colours, params.get("colour") || "label");
  fill($("source"), info.outputs, info.outputs[0]);
  // the first matrix shown is on held-out clips where the store names some (TAU: fold1_evaluate),
  // not on the split the runs trained on (the last one alphabetically: fold1_train)
  const scored = info.splits.find((s) => /eval|test|val/i.test(s));
  fill($("split"), ["", ...info.splits], scored ?? info.splits[info.splits.length - 1]);
  $("set").onchange = $("colour").onchange = () => redraw(drawMap, clearMap);
  $("source").onchange = $("split").onchange = () => redraw(drawConfusion, clearConfusion);
  $("search-form").onsubmit = runSearch;
  if (!sets.length) $("note").textContent = "The store holds no embedding set with finished clips: there is no map to draw.";
  else await drawMap();
  if (info.outputs.length) await drawConfusion();
  else $("confusion").textContent = "No prediction run or fused output in this store.";
  document.body.dataset.ready = "1";
}

init().catch((err) => { $("note").textContent = err.message; });
