// The evidence report's script: builds every element with createElement/textContent from
// `window.P2R_REPORT` (data.js), never innerHTML, so any string in a results folder is shown as text.
// index.html's Content-Security-Policy forbids every network source; images load lazily, so the first
// screen does not fetch every thumbnail.
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
