"""The evidence report's static page: HTML shell, stylesheet and script, written next to its data file.

The script builds every element with createElement/textContent from `window.P2R_REPORT` (data.js),
never innerHTML, so any string in a results folder is shown as text. The CSP forbids every network
source; images load lazily, so the first screen does not fetch every thumbnail.
"""

from __future__ import annotations

CSP = (
    "default-src 'none'; script-src 'self' file:; style-src 'self' file:; img-src 'self' file: data:; "
    "connect-src 'none'; form-action 'none'; base-uri 'none'; object-src 'none'"
)

HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>P2R evidence report</title>
<link rel="stylesheet" href="report.css">
</head>
<body>
<header><h1>P2R evidence report</h1><p id="meta"></p></header>
<section id="problems"></section>
<section><h2>Summary</h2><div id="summary"></div></section>
<section><h2>Flips</h2><div id="flips"></div></section>
<section id="filters"><h2>Samples</h2>
<label>Task <select id="f-task"></select></label>
<label>Run <select id="f-run"></select></label>
<label>Category <select id="f-cat"></select></label>
<label>Result <select id="f-ok"><option value="">any</option><option value="right">right</option>
<option value="wrong">wrong</option></select></label>
<label>Boxes <select id="f-boxes"><option value="">any</option><option value="none">no perceiver</option>
<option value="0">0</option><option value="1">1</option><option value="2">2</option><option value="3+">3+</option></select></label>
<label>Error <select id="f-err"><option value="">any</option><option value="yes">with error</option>
<option value="no">without</option></select></label>
<label><input type="checkbox" id="f-flip"> flipped only</label>
<label>Search <input type="search" id="f-q" placeholder="question text"></label>
<span id="count"></span>
</section>
<main id="cards"></main>
<script src="data.js"></script>
<script src="report.js"></script>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 0 16px 40px; color: #1b1b1b; background: #f6f6f4; }
header h1 { margin: 12px 0 0; font-size: 22px; }
#meta { color: #555; margin: 2px 0 8px; }
h2 { font-size: 17px; margin: 18px 0 6px; }
table { border-collapse: collapse; background: #fff; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: right; }
th { background: #eee; } td.l, th.l { text-align: left; }
tr.published td { color: #6a4c00; background: #fff9e8; font-style: italic; }
.warn { color: #8a1c00; background: #fff0ec; border: 1px solid #f3c3b5; padding: 4px 8px; margin: 4px 0; }
#filters label { margin-right: 12px; white-space: nowrap; }
#count { font-weight: 600; }
#cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 12px; margin-top: 10px; }
.card { background: #fff; border: 1px solid #ddd; border-left: 5px solid #bbb; padding: 8px 10px; min-width: 0; }
/* Off-screen cards are neither laid out nor painted: 2,000 of them open as fast as 20. */
.card { content-visibility: auto; contain-intrinsic-size: auto 360px auto 640px; }
.card.right { border-left-color: #2f9e44; } .card.wrong { border-left-color: #d9480f; }
.card.flipped { box-shadow: 0 0 0 2px #f59f00; }
.head { display: flex; flex-wrap: wrap; gap: 6px; align-items: baseline; font-size: 12px; color: #555; }
.tag { border-radius: 3px; padding: 0 5px; background: #eee; color: #333; }
.tag.right { background: #d3f9d8; } .tag.wrong { background: #ffe3d8; } .tag.flip { background: #ffec99; }
.tag.err { background: #ffc9c9; color: #800; }
.q { white-space: pre-wrap; margin: 6px 0; unicode-bidi: plaintext; }
.ans { margin: 4px 0; } .ans b { font-weight: 600; }
.thumb { position: relative; overflow: hidden; max-width: 100%; background: #ddd; }
.thumb img { display: block; width: 100%; height: 100%; }
.box { position: absolute; box-sizing: border-box; pointer-events: none; }
.box span { position: absolute; left: 0; top: 0; font-size: 10px; line-height: 1.2; padding: 0 3px;
  color: #fff; background: rgba(0,0,0,.65); white-space: nowrap; max-width: 200px; overflow: hidden; }
.box.dropped { border: 2px dashed #888; background: rgba(128,128,128,.15); }
.box.duplicate span { background: #b35c00; }
.crops { display: flex; gap: 4px; flex-wrap: wrap; margin-top: 4px; }
.crops img { border: 1px solid #ccc; }
.note { color: #8a5a00; font-size: 12px; margin: 4px 0; }
details { margin-top: 4px; } summary { cursor: pointer; color: #334; }
pre { white-space: pre-wrap; word-break: break-word; background: #f3f3f3; padding: 4px; margin: 2px 0;
  font-size: 12px; max-height: 320px; overflow: auto; unicode-bidi: plaintext; }
"""

JS = r"""
"use strict";
(function () {
  const t0 = performance.now();
  const D = window.P2R_REPORT;
  const $ = (id) => document.getElementById(id);
  function el(tag, cls, text) {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined && text !== null) e.textContent = String(text);
    return e;
  }
  function fmt(v, digits) { return v === null || v === undefined ? "-" : Number(v).toFixed(digits); }
  const DIGITS = { boxes: 2, output_tokens: 1, seconds_per_sample: 3, errors: 0, no_evidence: 1 };

  function problems() {
    const box = $("problems");
    for (const p of D.problems) box.appendChild(el("div", "warn", p));
    for (const r of D.runs) for (const p of r.problems) box.appendChild(el("div", "warn", r.label + ": " + p));
  }

  function summary() {
    const host = $("summary");
    for (const task of D.tasks) {
      const rows = D.summary.filter((s) => s.task === task.name);
      const cols = ["overall"].concat(task.categories, ["boxes", "no_evidence", "errors", "output_tokens",
        "seconds_per_sample", "samples"]);
      const table = el("table"); table.dataset.task = task.name;
      const cap = el("caption", null, task.name); cap.style.textAlign = "left"; table.appendChild(cap);
      const hr = el("tr"); hr.appendChild(el("th", "l", "run"));
      for (const c of cols) hr.appendChild(el("th", null, c === "no_evidence" ? "no evidence %" : c));
      table.appendChild(hr);
      for (const s of rows) {
        const tr = el("tr", "run-row"); tr.dataset.run = String(s.run);
        tr.appendChild(el("td", "l", D.runs[s.run].label));
        for (const c of cols) {
          const v = c === "samples" ? s.samples : c === "no_evidence" ? s.no_evidence : s.metrics[c];
          const td = el("td", null, fmt(v, c === "samples" ? 0 : (DIGITS[c] === undefined ? 1 : DIGITS[c])));
          td.dataset.metric = c;
          if (v !== null && v !== undefined) { td.dataset.value = String(v); td.title = String(v); }
          tr.appendChild(td);
        }
        table.appendChild(tr);
        if (s.check) tr.appendChild(el("td", "l warn", s.check));
      }
      for (const p of D.published.filter((x) => x.task === task.name)) {
        const tr = el("tr", "published"); tr.appendChild(el("td", "l", p.model + " (published)"));
        for (const c of cols) tr.appendChild(el("td", null, fmt(p.values[c], 1)));
        table.appendChild(tr);
      }
      host.appendChild(table);
    }
  }

  function flips() {
    const host = $("flips");
    if (!D.flips.length) { host.appendChild(el("p", null, "One run only: give two or more runs to see flips.")); return; }
    const table = el("table"); table.id = "flip-table";
    const hr = el("tr");
    for (const h of ["baseline", "run", "flipped", "wrong → right", "right → wrong", "per category (→right / →wrong)"])
      hr.appendChild(el("th", "l", h));
    table.appendChild(hr);
    for (const f of D.flips) {
      const tr = el("tr"); tr.dataset.other = String(f.other);
      tr.appendChild(el("td", "l", D.runs[f.base].label)); tr.appendChild(el("td", "l", D.runs[f.other].label));
      const n = el("td", "flip-count", f.gained + f.lost); n.dataset.value = String(f.gained + f.lost); tr.appendChild(n);
      tr.appendChild(el("td", null, f.gained)); tr.appendChild(el("td", null, f.lost));
      tr.appendChild(el("td", "l", Object.entries(f.categories).map(([c, g]) => c + " +" + g[0] + "/−" + g[1]).join(", ")));
      table.appendChild(tr);
    }
    host.appendChild(table);
  }

  function options(select, values) {
    select.appendChild(el("option", null, "any")).value = "";
    for (const [v, label] of values) select.appendChild(el("option", null, label)).value = v;
  }

  function card(s, i) {
    const c = el("article", "card " + (s.ok === true ? "right" : s.ok === false ? "wrong" : "unknown") + (s.flip ? " flipped" : ""));
    c.dataset.i = String(i); c.dataset.run = String(s.run); c.dataset.task = s.task; c.dataset.doc = String(s.doc);
    const head = el("div", "head");
    head.appendChild(el("span", "tag", D.runs[s.run].label));
    head.appendChild(el("span", "tag", s.task + " #" + s.doc));
    if (s.cat) head.appendChild(el("span", "tag", s.cat));
    head.appendChild(el("span", "tag " + (s.ok === true ? "right" : s.ok === false ? "wrong" : ""),
      s.ok === true ? "right" : s.ok === false ? "wrong" : "not scored"));
    if (s.flip) head.appendChild(el("span", "tag flip", s.flip));
    if (s.boxes !== null) head.appendChild(el("span", "tag", s.boxes + " box" + (s.boxes === 1 ? "" : "es")));
    if (s.err) head.appendChild(el("span", "tag err", "error"));
    c.appendChild(head);
    c.appendChild(el("div", "q", s.q));
    const ans = el("div", "ans");
    ans.appendChild(el("b", null, "truth: ")); ans.appendChild(document.createTextNode(s.target + "   "));
    ans.appendChild(el("b", null, "prediction: ")); ans.appendChild(el("span", "pred", s.pred));
    c.appendChild(ans);
    if (s.err) c.appendChild(el("div", "warn", s.err));
    if (s.img) {
      const th = el("div", "thumb");
      th.style.width = s.w + "px"; th.style.aspectRatio = s.w + " / " + s.h;
      const img = el("img"); img.loading = "lazy"; img.decoding = "async"; img.width = s.w; img.height = s.h;
      img.alt = "sample image with evidence boxes"; img.src = s.img; th.appendChild(img);
      for (const o of s.ov) {
        const b = el("div", "box " + o[5]);
        b.style.left = o[0] / 10 + "%"; b.style.top = o[1] / 10 + "%";
        b.style.width = (o[2] - o[0]) / 10 + "%"; b.style.height = (o[3] - o[1]) / 10 + "%";
        b.dataset.box = JSON.stringify(o.slice(0, 4));
        const tag = el("span", null, (o[5] === "valid" ? "" : o[5] + ": ") + o[4]);
        if (o[5] === "valid") tag.style.borderLeft = "4px solid " + o[6];
        b.appendChild(tag); th.appendChild(b);
      }
      c.appendChild(th);
      if (s.crops.length) {
        const cr = el("div", "crops");
        for (const k of s.crops) {
          const im = el("img"); im.loading = "lazy"; im.width = k.w; im.height = k.h; im.alt = "crop"; im.src = k.src;
          cr.appendChild(im);
        }
        c.appendChild(cr);
      }
    }
    if (s.note) c.appendChild(el("div", "note", s.note));
    for (const d of s.dropped) c.appendChild(el("div", "note", "dropped box (not drawn): " + d));
    if (s.perceiver !== null) {
      const d = el("details"); d.appendChild(el("summary", null, "perceiver output")); d.appendChild(el("pre", null, s.perceiver));
      c.appendChild(d);
    }
    const m = /^([\s\S]*?)<think>([\s\S]*?)<\/think>([\s\S]*)$/.exec(s.reply);
    const reply = el("div", "reply");
    if (m) {
      const d = el("details"); d.appendChild(el("summary", null, "think")); d.appendChild(el("pre", null, m[2]));
      reply.appendChild(d);
      reply.appendChild(el("pre", null, (m[1] + m[3]).trim()));
    } else reply.appendChild(el("pre", null, s.reply));
    c.appendChild(reply);
    if (s.tokens !== null || s.secs !== null)
      c.appendChild(el("div", "head", "output tokens " + fmt(s.tokens, 0) + " · " + fmt(s.secs, 3) + " s"));
    return c;
  }

  // Cards are built in chunks: the first screen shows at once, the rest follow between frames.
  // `data-ready` is set once every card exists; until then filters apply to each chunk as it lands.
  const FIRST = 60, CHUNK = 300, cards = [];
  function matches(s) {
    const task = $("f-task").value, run = $("f-run").value, cat = $("f-cat").value, ok = $("f-ok").value;
    const bx = $("f-boxes").value, er = $("f-err").value, flip = $("f-flip").checked;
    const q = $("f-q").value.trim().toLowerCase(), nb = s.boxes;
    return (!task || s.task === task) && (!run || String(s.run) === run) && (!cat || s.cat === cat) &&
      (!ok || (ok === "right" ? s.ok === true : s.ok === false)) && (!flip || !!s.flip) &&
      (!er || (er === "yes" ? !!s.err : !s.err)) &&
      (!bx || (bx === "none" ? nb === null : bx === "3+" ? nb !== null && nb >= 3 : nb === Number(bx))) &&
      (!q || s.q.toLowerCase().includes(q));
  }
  function apply() {
    let shown = 0;
    cards.forEach((c, i) => { c.hidden = !matches(D.samples[i]); if (!c.hidden) shown++; });
    $("count").textContent = shown + " of " + D.samples.length + " cards" +
      (cards.length < D.samples.length ? " (" + cards.length + " built so far)" : "");
  }
  function build(start, end) {
    const frag = document.createDocumentFragment();
    for (let i = start; i < end; i++) {
      const c = card(D.samples[i], i);
      c.hidden = !matches(D.samples[i]);
      cards.push(frag.appendChild(c));
    }
    $("cards").appendChild(frag);
  }
  function rest(start) {
    if (start >= D.samples.length) {
      apply();
      document.body.dataset.renderMs = String(Math.round(performance.now() - t0));
      document.body.dataset.ready = "1";
      return;
    }
    build(start, Math.min(start + CHUNK, D.samples.length));
    apply();
    setTimeout(() => rest(start + CHUNK), 0);
  }

  $("meta").textContent = D.runs.length + " run(s), " + D.samples.length + " samples; baseline for flips: " +
    (D.runs.length ? D.runs[D.baseline].label : "-") + ". Generated " + D.generated + ".";
  problems(); summary(); flips();
  options($("f-task"), D.tasks.map((t) => [t.name, t.name]));
  options($("f-run"), D.runs.map((r, i) => [String(i), r.label]));
  options($("f-cat"), [...new Set(D.samples.map((s) => s.cat).filter(Boolean))].map((c) => [c, c]));
  for (const id of ["f-task", "f-run", "f-cat", "f-ok", "f-boxes", "f-err", "f-flip", "f-q"])
    $(id).addEventListener(id === "f-q" ? "input" : "change", apply);
  build(0, Math.min(FIRST, D.samples.length));
  apply();
  // the first frame with the first cards, in ms since navigation start: when the page can be seen and used
  requestAnimationFrame(() => setTimeout(() => {
    document.body.dataset.paintMs = String(Math.round(performance.now()));
    rest(FIRST);
  }));
})();
"""
