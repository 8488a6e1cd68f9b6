/* vitatlas explorer front end: plain JavaScript, no build step, no external code.
 *
 * One file for the four pages (body[data-page] says which). Data comes from the JSON API when a server
 * runs (window.VITATLAS.mode == "live") or from the data/*.js files of a static export ("static"), which
 * call vitatlasData(key, object) when loaded: a <script> tag works from file://, fetch() does not.
 */
"use strict";

const CONFIG = window.VITATLAS || { mode: "live", live: false };
const STATIC = CONFIG.mode === "static";
const $ = (sel, root) => (root || document).querySelector(sel);
const params = new URLSearchParams(location.search);

/* ---------- small helpers ---------- */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (typeof v !== "number") return String(v);
  const d = digits === undefined ? 3 : digits;
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(1);
  return Number(v.toPrecision(d)).toString();
}
function pct(v) { return v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%"; }
function url(page, q) {
  const s = new URLSearchParams();
  for (const [k, v] of Object.entries(q || {})) if (v !== null && v !== undefined && v !== "") s.set(k, v);
  const qs = s.toString();
  return page + (qs ? "?" + qs : "");
}
function imageSrc(id) { return "images/" + id + ".png"; }
function showError(err) {
  const main = $("#main");
  main.prepend(el("p", { class: "error", id: "error", text: String(err.message || err) }));
}

/* ---------- data access: the live API or the exported files ---------- */
const staticData = {};
const staticWaiters = {};
window.vitatlasData = function (key, obj) {
  staticData[key] = obj;
  (staticWaiters[key] || []).forEach((w) => w.resolve(obj));
  delete staticWaiters[key];
};
function loadStatic(key) {
  if (key in staticData) return Promise.resolve(staticData[key]);
  return new Promise((resolve, reject) => {
    const first = !(key in staticWaiters);
    (staticWaiters[key] = staticWaiters[key] || []).push({ resolve, reject });
    if (!first) return;
    const s = el("script", { src: "data/" + key.replace(/[^A-Za-z0-9_.-]/g, "_") + ".js" });
    s.onerror = () => {
      (staticWaiters[key] || []).forEach((w) => w.reject(new Error("not in this export: " + key)));
      delete staticWaiters[key];
    };
    document.head.append(s);
  });
}
async function getJSON(path, q) {
  const res = await fetch(url("api/" + path, q));
  const body = await res.json().catch(() => ({ error: res.statusText }));
  if (!res.ok) throw new Error(body.error || res.statusText);
  return body;
}
const api = {
  meta: () => (STATIC ? loadStatic("meta") : getJSON("meta")),
  atoms: async (q) => (STATIC ? queryTable(await loadStatic("table-" + q.run), q) : getJSON("atoms", q)),
  atom: (run, id) => (STATIC ? loadStatic("atom-" + run + "-" + id) : getJSON("atoms/" + id, { run })),
  image: (run, id) => (STATIC ? loadStatic("image-" + run + "-" + id) : getJSON("images/" + id, { run })),
  compare: (a, b) => (STATIC ? loadStatic("compare") : getJSON("compare", { a, b })),
  intervene: async (body) => {
    const res = await fetch("api/intervene", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body) });
    const out = await res.json().catch(() => ({ error: res.statusText }));
    if (!res.ok) throw new Error(out.error || res.statusText);
    return out;
  },
};

/* The server's table semantics, for the static export (the whole table is in one file there). */
function queryTable(table, q) {
  let rows = table.rows;
  const needle = (q.q || "").toLowerCase().trim();
  if (needle) rows = rows.filter((r) => ("#" + r.id + " " + (r.label || "") + " " + (r.description || "")).toLowerCase().includes(needle) ||
                                        String(r.id) === needle);
  if (q.label) rows = rows.filter((r) => (r.label || "").toLowerCase() === q.label.toLowerCase());
  const bounds = [["min_frequency", "frequency", 1], ["max_frequency", "frequency", -1], ["min_kappa", "kappa", 1],
                  ["min_faithfulness", "faithfulness", 1], ["min_max_activation", "max_activation", 1]];
  for (const [name, col, sign] of bounds) {
    if (q[name] === undefined || q[name] === "") continue;
    const b = Number(q[name]);
    rows = rows.filter((r) => r[col] !== null && (sign > 0 ? r[col] >= b : r[col] <= b));
  }
  const desc = (q.sort || "id").startsWith("-");
  const key = (q.sort || "id").replace(/^-/, "");
  const has = (r) => r[key] !== null && r[key] !== undefined && r[key] !== "";
  const present = rows.filter(has), missing = rows.filter((r) => !has(r));
  const val = (r) => (typeof r[key] === "string" ? r[key].toLowerCase() : r[key]);
  present.sort((a, b) => (val(a) < val(b) ? (desc ? 1 : -1) : val(a) > val(b) ? (desc ? -1 : 1) : a.id - b.id));
  rows = present.concat(missing);
  const offset = Number(q.offset || 0), limit = Number(q.limit || 50);
  return { run: table.run, total: rows.length, offset, limit, rows: rows.slice(offset, offset + limit) };
}

/* ---------- shared page parts ---------- */
let META = null;
function runOf() {
  const names = META.runs.map((r) => r.name);
  const r = params.get("run");
  return r && names.includes(r) ? r : names[0];
}
function nav(run) {
  const h = $("#nav");
  h.innerHTML = "";
  h.append(el("span", { class: "brand" }, "vitatlas explorer"),
           el("a", { href: url("index.html", { run }) }, "atoms"));
  if (META.runs.length > 1) h.append(el("a", { href: url("compare.html", {}) }, "compare runs"));
  h.append(el("span", { class: "spacer" }));
  if (META.runs.length > 1) {
    const sel = el("select", { id: "run-select", onchange: (e) => { params.set("run", e.target.value); location.search = params.toString(); } },
                   META.runs.map((r) => el("option", { value: r.name, selected: r.name === run }, r.name + " (" + r.learner + ")")));
    h.append(el("label", {}, "run ", sel));
  } else {
    h.append(el("span", { class: "pill" }, run + " · " + META.runs[0].learner));
  }
  const s = META.store;
  h.append(el("span", { class: "muted small" }, (s.model || "?") + " · layer " + s.layer + " · " + s.tokens + " · " + s.n_images + " images"));
}

/* Heatmap overlay: values (P,) on a (h, w) grid drawn over an image of the canvas' size. */
function drawHeat(canvas, values, grid, scale, rgb) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!values || !grid) return;
  const [gh, gw] = grid, cw = canvas.width / gw, ch = canvas.height / gh;
  const top = scale || Math.max(1e-12, ...values.map(Math.abs));
  const [r, g, b] = rgb || [255, 60, 0];
  values.forEach((v, p) => {
    const a = Math.min(1, Math.abs(v) / top) * 0.6;
    if (a <= 0.01) return;
    ctx.fillStyle = `rgba(${r},${g},${b},${a})`;
    ctx.fillRect((p % gw) * cw, Math.floor(p / gw) * ch, cw, ch);
  });
}
function histogramSVG(hist, width, height) {
  const counts = (hist && hist.counts) || [];
  const edges = (hist && hist.edges) || [];
  const svgNS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(svgNS, "svg");
  svg.setAttribute("width", width); svg.setAttribute("height", height + 18);
  const top = Math.max(1, ...counts);
  const bw = width / Math.max(1, counts.length);
  counts.forEach((c, i) => {
    const h = c > 0 ? Math.max(1, (Math.log1p(c) / Math.log1p(top)) * height) : 0;
    const r = document.createElementNS(svgNS, "rect");
    r.setAttribute("x", i * bw + 1); r.setAttribute("y", height - h); r.setAttribute("width", Math.max(1, bw - 2));
    r.setAttribute("height", h); r.setAttribute("fill", "#2563c9");
    const t = document.createElementNS(svgNS, "title");
    t.textContent = `${fmt(edges[i])} – ${fmt(edges[i + 1])}: ${c}`;
    r.append(t); svg.append(r);
  });
  for (const [x, v, anchor] of [[0, edges[0], "start"], [width, edges[edges.length - 1], "end"]]) {
    const t = document.createElementNS(svgNS, "text");
    t.setAttribute("x", x); t.setAttribute("y", height + 14); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor); t.textContent = fmt(v); svg.append(t);
  }
  return svg;
}

/* ---------- page: atom table ---------- */
const COLUMNS = [
  ["id", "atom", true], [null, "top image", false], ["label", "class label", true], ["kappa", "κ", true],
  ["faithfulness", "faithfulness", true], ["frequency", "frequency", true], ["max_activation", "max act.", true],
  ["description", "description", true], ["score", "score", true], ["match_cosine", "match (cos)", true],
];
async function pageAtoms() {
  const run = runOf();
  nav(run);
  const info = META.runs.find((r) => r.name === run);
  const state = { run, sort: params.get("sort") || "id", q: params.get("q") || "", label: params.get("label") || "",
                  min_frequency: params.get("min_frequency") || "", min_kappa: params.get("min_kappa") || "",
                  min_faithfulness: params.get("min_faithfulness") || "", offset: Number(params.get("offset") || 0),
                  limit: Number(params.get("limit") || 50) };
  const main = $("#main");
  main.innerHTML = "";
  const search = el("input", { id: "search", type: "search", placeholder: "search labels, descriptions, #id", value: state.q, size: 32 });
  const label = el("select", { id: "label-filter" }, el("option", { value: "" }, "any label"),
                   (info.labels || []).map((l) => el("option", { value: l, selected: l === state.label }, l)));
  const minFreq = el("input", { id: "min-frequency", type: "number", step: "any", min: 0, value: state.min_frequency });
  const minKappa = el("input", { id: "min-kappa", type: "number", step: "any", value: state.min_kappa });
  const minFaith = el("input", { id: "min-faithfulness", type: "number", step: "any", value: state.min_faithfulness });
  const total = el("span", { id: "total", class: "muted" });
  const head = el("tr", {}, COLUMNS.filter(([k]) => k !== "match_cosine" || info.other).map(([key, title, sortable]) =>
    el("th", { "data-sort": key, class: sortable ? "sortable" : null, onclick: sortable ? () => { toggleSort(key); } : null }, title)));
  const body = el("tbody", { id: "atom-rows" });
  const prev = el("button", { id: "prev", onclick: () => { state.offset = Math.max(0, state.offset - state.limit); refresh(); } }, "‹ previous");
  const next = el("button", { id: "next", onclick: () => { state.offset += state.limit; refresh(); } }, "next ›");
  const where = el("span", { id: "page-info", class: "muted" });
  main.append(el("h1", {}, "Atoms of ", el("span", { id: "run-name" }, run), el("span", { class: "muted" }, " · " + info.learner + ", " + info.n_atoms + " atoms")),
              el("div", { class: "controls" }, search, label, el("label", {}, "freq ≥ ", minFreq), el("label", {}, "κ ≥ ", minKappa),
                 el("label", {}, "faithfulness ≥ ", minFaith), total),
              el("table", { id: "atom-table" }, el("thead", {}, head), body),
              el("div", { class: "pager" }, prev, where, next));
  let timer = null;
  const onFilter = () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      Object.assign(state, { q: search.value, label: label.value, min_frequency: minFreq.value, min_kappa: minKappa.value,
                             min_faithfulness: minFaith.value, offset: 0 });
      refresh();
    }, 200);
  };
  [search, minFreq, minKappa, minFaith].forEach((i) => i.addEventListener("input", onFilter));
  label.addEventListener("change", onFilter);
  function toggleSort(key) {
    const cur = state.sort.replace(/^-/, "");
    const numericDefaultDesc = !["id", "label", "description"].includes(key);
    state.sort = cur === key ? (state.sort.startsWith("-") ? key : "-" + key) : (numericDefaultDesc ? "-" + key : key);
    state.offset = 0;
    refresh();
  }
  async function refresh() {
    const q = {};
    for (const [k, v] of Object.entries(state)) if (v !== "" && v !== null) q[k] = v;
    history.replaceState(null, "", url("index.html", q));
    let page;
    try { page = await api.atoms(q); } catch (e) { total.textContent = ""; showError(e); return; }
    const err = $("#error"); if (err) err.remove();
    total.textContent = page.total + " atoms";
    where.textContent = page.total ? `${page.offset + 1}–${Math.min(page.total, page.offset + page.rows.length)} of ${page.total}` : "none";
    prev.disabled = page.offset === 0;
    next.disabled = page.offset + page.rows.length >= page.total;
    for (const th of head.children) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.sort === state.sort.replace(/^-/, "")) th.classList.add(state.sort.startsWith("-") ? "sorted-desc" : "sorted-asc");
    }
    body.innerHTML = "";
    for (const r of page.rows) {
      const link = url("atom.html", { run, id: r.id });
      const cells = [
        el("td", { class: "num" }, el("a", { href: link, class: "atom-link" }, "#" + r.id)),
        el("td", {}, r.top_image === null || r.top_image === undefined ? "" :
           el("a", { href: link }, el("img", { class: "thumb", loading: "lazy", alt: "", src: imageSrc(r.top_image) }))),
        el("td", {}, r.label || ""), el("td", { class: "num" }, fmt(r.kappa)), el("td", { class: "num" }, fmt(r.faithfulness)),
        el("td", { class: "num" }, fmt(r.frequency)), el("td", { class: "num" }, fmt(r.max_activation)),
        el("td", {}, r.description || ""), el("td", { class: "num" }, fmt(r.score)),
      ];
      if (info.other) cells.push(el("td", {}, r.match === undefined ? "" :
        el("a", { href: url("atom.html", { run: info.other, id: r.match }) }, info.other + " #" + r.match), " ", el("span", { class: "muted" }, fmt(r.match_cosine))));
      body.append(el("tr", { "data-atom": r.id }, cells));
    }
  }
  await refresh();
}

/* ---------- page: one atom ---------- */
function tile(run, image, value, heat, grid, showHeat) {
  const img = el("img", { src: imageSrc(image), alt: "image " + image, class: "top-img" });
  const canvas = el("canvas", { width: 128, height: 128, class: "heat" });
  const frame = el("div", { class: "frame" }, img, canvas);
  canvas._values = heat;
  if (showHeat) drawHeat(canvas, heat, grid, canvas._scale);
  return el("div", { class: "tile top-image" }, el("a", { href: url("image.html", { run, id: image }) }, frame),
            el("div", {}, "image " + image + " · " + fmt(value)));
}
async function pageAtom() {
  const run = runOf();
  nav(run);
  const info = META.runs.find((r) => r.name === run);
  const id = Number(params.get("id") || 0);
  const data = await api.atom(run, id);
  const card = data.card;
  const main = $("#main");
  main.innerHTML = "";
  const grid = data.patch_grid;
  const heatToggle = el("input", { type: "checkbox", id: "heat-toggle", checked: true });
  const tiles = el("div", { class: "tiles", id: "top-images" });
  // a static export stores heatmaps as integer percent of heatmaps_scale
  const unpack = (maps, scale) => (maps && scale ? maps.map((m) => m.map((q) => (q * scale) / 100)) : maps);
  const heats = unpack(data.heatmaps, data.heatmaps_scale) || [];
  const negHeats = unpack(data.negative_heatmaps, data.negative_heatmaps_scale);
  const scale = Math.max(1e-12, ...heats.flat().map(Math.abs));
  (card.top_images || []).forEach((t, j) => {
    const tl = tile(run, t.image, t.value, heats[j], grid, true);
    tl.querySelector("canvas")._scale = scale;
    drawHeat(tl.querySelector("canvas"), heats[j], grid, scale);
    tiles.append(tl);
  });
  heatToggle.addEventListener("change", () => {
    for (const c of tiles.querySelectorAll("canvas")) {
      if (heatToggle.checked) drawHeat(c, c._values, grid, scale); else c.getContext("2d").clearRect(0, 0, c.width, c.height);
    }
  });
  const label = data.label || {};
  const stats = el("dl", { class: "stats", id: "atom-stats" },
    el("dt", {}, "frequency"), el("dd", {}, fmt(card.frequency, 4)),
    el("dt", {}, "mean activation (firing)"), el("dd", {}, fmt(card.mean_activation)),
    el("dt", {}, "max activation"), el("dd", {}, fmt(card.max_activation)),
    el("dt", {}, "class label"), el("dd", {}, label.label ? `${label.label} (precision ${fmt(label.precision)}, κ ${fmt(label.kappa)}, faithfulness ${fmt(label.faithfulness)})` : "none"));
  const descs = el("table", { id: "descriptions" }, el("thead", {}, el("tr", {}, ["kind", "description", "score", "faithfulness", "specificity"].map((h) => el("th", {}, h)))),
    el("tbody", {}, (card.descriptions || []).map((d) => el("tr", {}, el("td", {}, d.kind), el("td", {}, d.text),
      el("td", { class: "num" }, fmt(d.score)), el("td", { class: "num" }, fmt(d.faithfulness)), el("td", { class: "num" }, fmt(d.specificity))))));
  const nearest = el("ul", { class: "atomlist", id: "nearest" }, (card.nearest_atoms || []).map((n) =>
    el("li", {}, el("a", { href: url("atom.html", { run, id: n.atom }) }, "#" + n.atom), el("span", { class: "val" }, "cos " + fmt(n.cosine)))));
  const crops = el("div", { class: "crops", id: "patch-crops" });
  for (const p of (card.top_patches || []).slice(0, 24)) {
    if (!grid || p.patch === null || p.patch === undefined) continue;
    const [gh, gw] = grid, size = 64;
    const crop = el("a", { href: url("image.html", { run, id: p.image, patch: p.patch }), class: "crop",
                           title: `image ${p.image}, patch ${p.patch}: ${fmt(p.value)}` });
    crop.style.backgroundImage = `url(${imageSrc(p.image)})`;
    crop.style.backgroundSize = `${gw * size}px ${gh * size}px`;
    crop.style.backgroundPosition = `-${(p.patch % gw) * size}px -${Math.floor(p.patch / gw) * size}px`;
    crops.append(el("figure", {}, crop, el("figcaption", {}, fmt(p.value))));
  }
  const prevNext = el("span", { class: "small" },
    id > 0 ? el("a", { href: url("atom.html", { run, id: id - 1 }), id: "prev-atom" }, "‹ #" + (id - 1)) : "", " ",
    id + 1 < data.n_atoms ? el("a", { href: url("atom.html", { run, id: id + 1 }), id: "next-atom" }, "#" + (id + 1) + " ›") : "");
  main.append(el("h1", { id: "atom-title" }, `Atom #${id} `, el("span", { class: "muted" }, "of " + run + (label.label ? " · " + label.label : "")), " ", prevNext));
  const left = el("div", { style: "flex: 2 1 600px" },
    el("div", { class: "panel" }, el("h2", {}, "Top images ", el("label", { class: "small muted" }, heatToggle, " heatmaps")), tiles,
       el("p", { class: "legend" }, "Overlay: the atom's activation on each patch, as a fraction of its largest value over these images. Click an image to open it.")),
    data.negative_heatmaps && card.negative ? el("div", { class: "panel" }, el("h2", {}, "Negative side (most negative codes)"),
      el("div", { class: "tiles" }, (card.negative.top_images || []).map((t, j) => tile(run, t.image, t.value, negHeats[j], grid, true)))) : "",
    el("div", { class: "panel" }, el("h2", {}, "Top patches"), crops.children.length ? crops : el("p", { class: "muted" }, "no patch data (a CLS or embedding store)")),
    (data.files && data.files.card) ? el("div", { class: "panel" }, el("h2", {}, "Card"), el("img", { src: `cards/${run}/${data.files.card}`, alt: "atom card", style: "max-width:100%" }),
      data.files.patches ? el("img", { src: `cards/${run}/${data.files.patches}`, alt: "patch card", style: "max-width:100%" }) : "") : "");
  const right = el("div", { style: "flex: 1 1 320px" },
    el("div", { class: "panel" }, el("h2", {}, "Statistics"), stats),
    el("div", { class: "panel hist" }, el("h2", {}, "Activation histogram"), histogramSVG(card.histogram, 300, 90),
       el("p", { class: "legend" }, "Counts (log scale) of the atom's non-zero codes per bin.")),
    el("div", { class: "panel" }, el("h2", {}, "Descriptions"), (card.descriptions || []).length ? descs : el("p", { class: "muted" }, "none")),
    data.match ? el("div", { class: "panel", id: "match" }, el("h2", {}, "Best match in " + data.match.run),
      el("p", {}, el("a", { href: url("atom.html", { run: data.match.run, id: data.match.atom }), id: "match-link" }, data.match.run + " #" + data.match.atom),
         " · cosine ", el("b", { id: "match-cosine" }, fmt(data.match.cosine)), data.match.label ? " · " + data.match.label : ""),
      el("div", { class: "tiles" }, data.match.top_images.slice(0, 4).map((im) => el("img", { src: imageSrc(im), width: 64, height: 64, alt: "" })))) : "",
    el("div", { class: "panel" }, el("h2", {}, "Nearest atoms (decoder cosine)"), nearest));
  main.append(el("div", { class: "row" }, left, right));
}

/* ---------- page: one image, its patches, and the live intervention ---------- */
async function pageImage() {
  const run = runOf();
  nav(run);
  const id = Number(params.get("id") || 0);
  const data = await api.image(run, id);
  const grid = data.patch_grid;
  const main = $("#main");
  main.innerHTML = "";
  const SIDE = 448;
  const img = el("img", { src: imageSrc(id), alt: "image " + id, id: "the-image" });
  const heat = el("canvas", { width: SIDE, height: SIDE, id: "heat-layer", style: "pointer-events:none" });
  const sel = el("canvas", { width: SIDE, height: SIDE, id: "patch-grid" });
  const box = el("div", { class: "imagebox" }, img, heat, sel);
  const list = el("ul", { class: "atomlist", id: "active-atoms" });
  const listTitle = el("h2", { id: "active-title" }, "Atoms of the whole image");
  const selected = new Set(params.get("patch") !== null ? [Number(params.get("patch"))] : []);
  const tokenOf = {};
  for (const t of data.tokens) if (t.patch !== null) tokenOf[t.patch] = t;
  const labelOf = (a) => (data.atom_labels || {})[String(a)];

  function drawSelection() {
    const ctx = sel.getContext("2d");
    ctx.clearRect(0, 0, SIDE, SIDE);
    if (!grid) return;
    const [gh, gw] = grid, cw = SIDE / gw, ch = SIDE / gh;
    ctx.strokeStyle = "rgba(255,255,255,0.25)";
    for (let i = 1; i < gw; i++) { ctx.beginPath(); ctx.moveTo(i * cw, 0); ctx.lineTo(i * cw, SIDE); ctx.stroke(); }
    for (let j = 1; j < gh; j++) { ctx.beginPath(); ctx.moveTo(0, j * ch); ctx.lineTo(SIDE, j * ch); ctx.stroke(); }
    ctx.strokeStyle = "#ffd400"; ctx.lineWidth = 2;
    for (const p of selected) ctx.strokeRect((p % gw) * cw + 1, Math.floor(p / gw) * ch + 1, cw - 2, ch - 2);
    ctx.lineWidth = 1;
  }
  function renderList() {
    list.innerHTML = "";
    let entries;
    if (selected.size && grid) {
      const best = new Map();
      for (const p of selected) for (const [a, v] of (tokenOf[p] || { atoms: [] }).atoms) {
        if (!best.has(a) || Math.abs(v) > Math.abs(best.get(a))) best.set(a, v);
      }
      entries = [...best.entries()].sort((x, y) => Math.abs(y[1]) - Math.abs(x[1]));
      listTitle.textContent = `Atoms active at ${selected.size} selected patch${selected.size > 1 ? "es" : ""}`;
    } else {
      entries = data.top_atoms;
      listTitle.textContent = "Atoms of the whole image (largest value over its tokens)";
    }
    if (!entries.length) list.append(el("li", { class: "muted" }, "no active atoms"));
    for (const [a, v] of entries.slice(0, 40)) {
      list.append(el("li", { "data-atom": a }, el("a", { href: url("atom.html", { run, id: a }), class: "atom-link" }, "#" + a),
        el("span", { class: "muted small" }, labelOf(a) || ""),
        CONFIG.live && !STATIC ? el("button", { class: "small add-edit", onclick: () => addEdit(a) }, "edit") : "",
        el("span", { class: "val" }, fmt(v))));
    }
  }
  // click selects one patch, shift/ctrl-click toggles, drag selects a rectangle
  let dragStart = null;
  const cellAt = (ev) => {
    const r = sel.getBoundingClientRect();
    const [gh, gw] = grid;
    const x = Math.min(gw - 1, Math.max(0, Math.floor(((ev.clientX - r.left) / r.width) * gw)));
    const y = Math.min(gh - 1, Math.max(0, Math.floor(((ev.clientY - r.top) / r.height) * gh)));
    return [x, y];
  };
  if (grid) {
    sel.addEventListener("mousedown", (ev) => { dragStart = { cell: cellAt(ev), add: ev.shiftKey || ev.ctrlKey || ev.metaKey }; });
    window.addEventListener("mouseup", (ev) => {
      if (!dragStart) return;
      const [x0, y0] = dragStart.cell, [x1, y1] = cellAt(ev);
      const gw = grid[1];
      if (!dragStart.add) selected.clear();
      if (x0 === x1 && y0 === y1 && dragStart.add && selected.has(y0 * gw + x0)) selected.delete(y0 * gw + x0);
      else for (let y = Math.min(y0, y1); y <= Math.max(y0, y1); y++) for (let x = Math.min(x0, x1); x <= Math.max(x0, x1); x++) selected.add(y * gw + x);
      dragStart = null;
      drawSelection(); renderList(); scheduleEdit();
    });
  }
  const clear = el("button", { id: "clear-selection", onclick: () => { selected.clear(); drawSelection(); renderList(); scheduleEdit(); } }, "clear selection");
  const left = el("div", { class: "panel" }, box,
    el("p", { class: "legend" }, grid ? "Click a patch, drag over several, shift-click to add. " : "This store has no patch grid. ",
       data.label ? "Class: " + data.label + ". " : "", clear));

  /* live intervention */
  const edits = new Map(); // atom -> {value, ablate}
  const editsBox = el("div", { id: "edits" });
  const prediction = el("div", { id: "prediction", class: "muted" }, CONFIG.live && !STATIC ? "move a slider to edit the model" : "");
  const details = el("div", { id: "intervention-details" });
  const onlySel = el("input", { type: "checkbox", id: "only-selected", checked: true });
  const heatChoice = el("select", { id: "heat-choice" }, el("option", { value: "token" }, "final-token change (cosine distance)"),
                        el("option", { value: "code" }, "code change at the layer"), el("option", { value: "none" }, "no overlay"));
  let lastResult = null;
  function addEdit(a) {
    if (edits.has(a)) return;
    const maxAct = (data.max_activations || {})[String(a)];
    const e = { value: 0, ablate: false };
    edits.set(a, e);
    const out = el("span", { class: "num small" }, "0 ×");
    const slider = el("input", { type: "range", min: -10, max: 10, step: 0.1, value: 0, class: "slider", "data-atom": a,
      oninput: (ev) => { e.value = Number(ev.target.value); e.active = true; out.textContent = fmt(e.value, 3) + " ×"; scheduleEdit(); } });
    const abl = el("label", { class: "small" }, el("input", { type: "checkbox", class: "ablate", "data-atom": a,
      onchange: (ev) => { e.ablate = ev.target.checked; e.active = true; scheduleEdit(); } }), " ablate");
    const row = el("div", { class: "edit", "data-atom": a }, el("a", { href: url("atom.html", { run, id: a }) }, "#" + a + (labelOf(a) ? " " + labelOf(a) : "")),
      slider, out, abl, el("button", { class: "small", title: "remove", onclick: () => { edits.delete(a); row.remove(); scheduleEdit(); } }, "×"));
    row.title = maxAct ? `slider: value × the atom's max observed activation (${fmt(maxAct)})` : "";
    editsBox.append(row);
  }
  let editTimer = null, inflight = 0;
  function scheduleEdit() { clearTimeout(editTimer); editTimer = setTimeout(sendEdit, 120); }
  async function sendEdit() {
    const list = [...edits.entries()].filter(([, e]) => e.active).map(([a, e]) => (e.ablate ? { atom: a, op: "ablate" } : { atom: a, value: e.value }));
    if (!CONFIG.live || STATIC || !list.length) return;
    const body = { run, image: id, edits: list };
    if (onlySel.checked && selected.size) body.patches = [...selected];
    const ticket = ++inflight;
    prediction.classList.add("muted");
    try {
      const res = await api.intervene(body);
      if (ticket !== inflight) return; // a newer request is on its way
      lastResult = res;
      showResult(res);
    } catch (err) {
      if (ticket !== inflight) return;
      prediction.classList.remove("muted");
      prediction.textContent = "intervention failed: " + err.message;
      prediction.classList.add("error");
    }
  }
  function showResult(res) {
    prediction.classList.remove("muted", "error");
    details.innerHTML = "";
    const p = res.prediction;
    if (p && p.task === "classification") {
      prediction.textContent = `before: ${p.before.class} ${pct(p.before.probability)} → after: ${p.after.class} ${pct(p.after.probability)}`;
      details.append(el("div", { class: "bars", id: "class-bars" }, el("b", {}, "class"), el("b", {}, "before"), el("b", {}, "after"),
        p.classes.map((c) => [el("span", {}, c.class),
          el("div", {}, el("div", { class: "bar", style: `width:${(100 * c.before).toFixed(1)}%` }), el("span", { class: "small muted" }, pct(c.before))),
          el("div", {}, el("div", { class: "bar after", style: `width:${(100 * c.after).toFixed(1)}%` }), el("span", { class: "small muted" }, pct(c.after)))])));
    } else if (p && p.task === "segmentation") {
      prediction.textContent = `segmentation: ${p.changed_patches} of ${p.n_patches} patches change class (mostly ${p.before.class} → ${p.after.class})`;
      details.append(segMaps(p));
    } else {
      const tc = res.token_change;
      prediction.textContent = `largest final-token change: cosine distance ${fmt(tc.max)}` + (tc.cls !== null ? ` · CLS ${fmt(tc.cls)}` : "");
    }
    const cc = res.code_change;
    details.append(el("p", { class: "small muted" }, `layer ${res.layer}: ${cc.edited_tokens} tokens edited; answered in ${fmt(res.seconds, 2)} s. Codes that changed most: `,
      cc.atoms.map((a) => el("span", {}, el("a", { href: url("atom.html", { run, id: a.atom }) }, "#" + a.atom), " (" + fmt(a.total_change) + ") "))));
    drawOverlay();
  }
  function segMaps(p) {
    const palette = (c) => `hsl(${(c * 137) % 360},65%,55%)`;
    const wrap = el("div", { class: "row" });
    for (const [title, map] of [["before", p.before_map], ["after", p.after_map]]) {
      const c = el("canvas", { width: 160, height: 160, class: "seg-" + title });
      const ctx = c.getContext("2d");
      const [gh, gw] = grid;
      map.forEach((k, i) => { ctx.fillStyle = palette(k); ctx.fillRect((i % gw) * 160 / gw, Math.floor(i / gw) * 160 / gh, 160 / gw + 0.5, 160 / gh + 0.5); });
      wrap.append(el("figure", { style: "margin:0" }, c, el("figcaption", { class: "small" }, title)));
    }
    const used = [...new Set(p.before_map.concat(p.after_map))];
    wrap.append(el("div", { class: "small" }, used.map((k) => el("div", {}, el("span", { style: `display:inline-block;width:10px;height:10px;background:${palette(k)}` }), " " + p.class_names[k]))));
    return wrap;
  }
  function drawOverlay() {
    const ctx = heat.getContext("2d");
    ctx.clearRect(0, 0, SIDE, SIDE);
    if (!lastResult || !grid || heatChoice.value === "none") return;
    const values = heatChoice.value === "code" ? lastResult.code_change.patches : lastResult.token_change.patches;
    drawHeat(heat, values, grid, null, heatChoice.value === "code" ? [0, 120, 255] : [255, 60, 0]);
  }
  heatChoice.addEventListener("change", drawOverlay);
  onlySel.addEventListener("change", scheduleEdit);
  const byId = el("input", { type: "number", min: 0, id: "add-atom-id", placeholder: "atom id", style: "width:7em" });
  const live = CONFIG.live && !STATIC;
  const right = el("div", { style: "flex: 1 1 480px" },
    el("div", { class: "panel", id: "intervention" }, el("h2", {}, "Intervention"),
      live ? [el("div", { class: "controls" }, byId, el("button", { id: "add-atom", onclick: () => { const a = Number(byId.value); if (byId.value !== "" && Number.isInteger(a)) addEdit(a); } }, "add atom"),
                el("label", {}, onlySel, " edit only the selected patches (else every token of the store's kind)"), el("label", {}, "overlay ", heatChoice)),
              el("p", { class: "legend" }, "Each slider clamps an atom to −10…+10 × its max observed activation at the edited tokens; the error term is kept."),
              editsBox, prediction, details]
           : el("p", { class: "muted" }, STATIC ? "This is a static export: live intervention needs the running explorer (vitatlas explore ... --model M)."
                                                : "Start the explorer with --model (and --probe) to edit atoms live.")));
  main.append(el("h1", {}, `Image ${id} `, el("span", { class: "muted" }, data.label ? "· " + data.label : "")),
              el("div", { class: "row" }, el("div", { style: "flex: 0 1 480px" }, left, el("div", { class: "panel" }, listTitle, list)), right));
  drawSelection();
  renderList();
}

/* ---------- page: compare two runs ---------- */
async function pageCompare() {
  const run = runOf();
  nav(run);
  const main = $("#main");
  if (META.runs.length < 2) { main.innerHTML = ""; main.append(el("p", {}, "The compare page needs two runs.")); return; }
  const data = await api.compare(params.get("a") || undefined, params.get("b") || undefined);
  main.innerHTML = "";
  const keys = [...new Set(Object.values(data.metrics).flatMap((m) => Object.keys(m)))];
  const metrics = el("table", { id: "metrics" }, el("thead", {}, el("tr", {}, el("th", {}, "metric"), el("th", {}, data.a), el("th", {}, data.b))),
    el("tbody", {}, keys.map((k) => el("tr", {}, el("td", {}, k), el("td", { class: "num" }, fmt(data.metrics[data.a][k], 4)), el("td", { class: "num" }, fmt(data.metrics[data.b][k], 4))))));
  const behaviour = data.matching && data.matching.kind === "behaviour";
  const scoreOf = (p) => (behaviour ? p.score : p.cosine);
  const pairs = el("table", { id: "pairs" }, el("thead", {}, el("tr", {}, [behaviour ? "|r|" : "cosine", data.a, "label / description", data.b, "label / description", "mutual", ...(behaviour ? ["shared"] : [])].map((h) => el("th", {}, h)))),
    el("tbody", {}, data.pairs.map((p) => el("tr", {}, el("td", { class: "num" }, scoreOf(p) == null ? "untested" : fmt(scoreOf(p))),
      el("td", {}, el("a", { href: url("atom.html", { run: data.a, id: p.a }) }, "#" + p.a)), el("td", {}, [...new Set([p.a_label, p.a_description].filter(Boolean))].join(" · ")),
      el("td", {}, p.b == null ? "" : el("a", { href: url("atom.html", { run: data.b, id: p.b }) }, "#" + p.b)), el("td", {}, [...new Set([p.b_label, p.b_description].filter(Boolean))].join(" · ")),
      el("td", {}, p.mutual ? "yes" : ""), ...(behaviour ? [el("td", {}, p.shared ? "yes" : "")] : [])))));
  const how = data.matching
    ? el("p", { id: "matching", class: "legend" }, `Matching: ${behaviour ? "by behaviour" : "by decoder cosine"} — ${data.matching.score}, because ${data.matching.why}.` +
        (behaviour ? ` Shared = above the ${fmt(data.null_threshold, 3)} threshold of a null with ${data.b}'s images shuffled: ${fmt(100 * data.shared_fraction_a, 1)}% of ${data.a}, ${fmt(100 * data.shared_fraction_b, 1)}% of ${data.b}.` : ""))
    : "";
  const histTitle = behaviour ? `best |r| of each ${data.a} atom in ${data.b} (null: shuffled images, below)` : `|cosine| of each ${data.a} atom's best ${data.b} match`;
  const hists = [histogramSVG(behaviour ? data.score_histogram : data.cosine_histogram, 300, 90), ...(behaviour ? [histogramSVG(data.null_histogram, 300, 60)] : [])];
  main.append(el("h1", {}, `Compare ${data.a} and ${data.b}`), how,
    el("div", { class: "row" }, el("div", { class: "panel", style: "flex:1 1 420px" }, el("h2", {}, "Metrics"), metrics,
        el("p", { class: "legend" }, `Reconstruction metrics on a fixed sample of store rows; dead fraction and label statistics from the atom cards (whole store). ${data.mutual_matches} atoms of ${data.a} are mutual best matches.`)),
      el("div", { class: "panel hist", style: "flex:1 1 320px" }, el("h2", {}, histTitle), ...hists)),
    el("div", { class: "panel" }, el("h2", {}, "Matched atoms (most similar first)"), pairs));
}

/* ---------- boot ---------- */
(async function boot() {
  try {
    META = await api.meta();
    const page = document.body.dataset.page;
    await ({ atoms: pageAtoms, atom: pageAtom, image: pageImage, compare: pageCompare }[page] || pageAtoms)();
    document.body.dataset.ready = "1";
  } catch (err) {
    const l = $("#loading"); if (l) l.remove();
    showError(err);
    document.body.dataset.ready = "error";
  }
})();
