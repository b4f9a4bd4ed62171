"""A self-contained HTML page for an inspection: inline CSS, JavaScript and SVG, nothing fetched.

The page embeds the JSON report (see report.py) and, for the heatmaps, every head's full retrieval
matrix quantised to one byte per entry (base64). Its script draws:

- a strip of the input tokens; hovering a token previews, clicking it selects, its retrievals;
- for the chosen layer, one card per head: the entries the query retrieved (weight, contribution, the
  tokens around the entry and the token that followed it) and the persistent slots that answered;
- per-head heatmaps of the retrieval matrix (row = query position, column = stored entry);
- a grid of every head's leak (retention) and key scale, drawn here as inline SVG.
"""

from __future__ import annotations

import base64
import html
import json
from typing import Any

import torch

from memory_mosaics.inspect.retrieval import Inspection


def heatmap_payload(inspection: Inspection) -> dict[str, Any]:
    """Each head's (T, T) weights as base64 bytes, byte = round(255 * sqrt(weight)) for contrast."""
    layers = []
    for layer in inspection.layers:
        quantised = torch.round(255 * layer.context.weights.clamp(0, 1).sqrt()).to(torch.uint8)
        layers.append([base64.b64encode(head.contiguous().numpy().tobytes()).decode() for head in quantised])
    return {"scale": "sqrt", "length": len(inspection.ids), "layers": layers}


def _script_json(payload: Any) -> str:
    """JSON safe inside a <script> element: no '<', '>' or '&' can end it or open a comment."""
    text = json.dumps(payload, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _ramp(value: float) -> str:
    """0 -> pale yellow, 1 -> dark blue (a short viridis-like ramp, so no colour library is needed)."""
    stops = [(253, 231, 37), (94, 201, 98), (33, 145, 140), (59, 82, 139), (68, 1, 84)]
    value = min(max(value, 0.0), 1.0) * (len(stops) - 1)
    low = min(int(value), len(stops) - 2)
    frac = value - low
    rgb = [round(a + (b - a) * frac) for a, b in zip(stops[low], stops[low + 1], strict=True)]
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def parameter_svg(report: dict[str, Any], kind: str, field: str, label: str, top: float | None = None) -> str:
    """A layers x heads grid of one head parameter, as an inline SVG with a tooltip per cell."""
    rows = [layer[kind] for layer in report["heads"] if layer[kind] is not None]
    if not rows:
        return ""
    values = [[head[field] for head in row] for row in rows]
    finite = [v for row in values for v in row if v is not None]
    high = top if top is not None else max(finite, default=1.0) or 1.0
    cell_w, cell_h, left, head_h = 52, 22, 58, 18
    width, height = left + cell_w * len(rows[0]), head_h + cell_h * len(rows)
    parts = [f'<svg class="params" width="{width}" height="{height + 4}" role="img" aria-label="{html.escape(label)}">']
    for h in range(len(rows[0])):
        parts.append(f'<text x="{left + cell_w * h + cell_w / 2}" y="12" class="axis">head {h}</text>')
    for layer, row in enumerate(values):
        y = head_h + cell_h * layer
        parts.append(f'<text x="4" y="{y + 15}" class="axis row-label">layer {layer}</text>')
        for h, value in enumerate(row):
            x = left + cell_w * h
            shade = 1.0 if value is None else value / high
            shown = "inf" if value is None else f"{value:.3g}"
            head = rows[layer][h]
            tooltip = ", ".join(f"{k} {v if v is not None else 'inf'}" for k, v in head.items() if k != "head")
            ink = "#fff" if shade > 0.55 else "#111"
            parts.append(
                f"<g><title>layer {layer} head {h}: {html.escape(tooltip)}</title>"
                f'<rect x="{x}" y="{y}" width="{cell_w - 2}" height="{cell_h - 2}" fill="{_ramp(shade)}"/>'
                f'<text x="{x + cell_w / 2 - 1}" y="{y + 15}" fill="{ink}">{shown}</text></g>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _parameter_section(report: dict[str, Any]) -> str:
    grids = [
        ("context", "retention", "context memory: retention exp(-beta) per step", 1.0),
        ("context", "key_scale", "context memory: key scale s (bandwidth 1/s)", None),
        ("persistent", "retention", "persistent memory: retention exp(-beta) per step", 1.0),
        ("persistent", "key_scale", "persistent memory: key scale s^2", None),
    ]
    blocks = []
    for kind, field, label, top in grids:
        svg = parameter_svg(report, kind, field, label, top)
        if svg:
            blocks.append(f"<figure><figcaption>{html.escape(label)}</figcaption>{svg}</figure>")
    return "".join(blocks)


def render_html(report: dict[str, Any], heatmaps: dict[str, Any] | None) -> str:
    """The page as one string; `heatmaps` from `heatmap_payload` (None leaves the heatmaps out)."""
    config = report.get("config", {})
    facts = [
        ("checkpoint", report.get("checkpoint", "?")),
        ("tokenizer", report.get("tokenizer") or "none (token ids shown)"),
        ("tokens", len(report["tokens"])),
        ("layers x heads", f"{config.get('n_layer', '?')} x {config.get('n_head', '?')}"),
        ("n_embd", config.get("n_embd", "?")),
        ("persistent slots", "none" if config.get("attn_only") else config.get("pmem_size", "?")),
        ("value shift", report["shift"]),
        ("rebuilt vs model output (max abs error)", f"{report['check']['max_abs_error']:.2e}"),
    ]
    fact_html = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in facts)
    title = f"mosaic inspect: {report.get('checkpoint', '')}"
    return PAGE.format(
        title=html.escape(title),
        facts=fact_html,
        params=_parameter_section(report),
        css=CSS,
        script=SCRIPT,
        report_json=_script_json(report),
        heatmap_json=_script_json(heatmaps),
    )


PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style>
</head>
<body>
<header><h1>Memory Mosaic inspector</h1><dl class="facts">{facts}</dl></header>
<section>
<h2>Tokens</h2>
<p class="hint">Hover a token to preview what each memory retrieved when predicting the next token;
click to keep it selected. Highlight: the selected position's retrieval weights (mean over the layer's
heads; hover a head's card for that head alone).</p>
<div id="strip" class="strip"></div>
</section>
<section>
<div id="layers" class="layers"></div>
<div id="details"></div>
</section>
<section>
<h2>Retrieval heatmaps</h2>
<p class="hint">Row = query position t, column = stored entry s (s &le; t &minus; shift); colour =
sqrt(weight), grey where the query may not read. Click a row to select that position.</p>
<div id="heatmaps" class="heatmaps"></div>
</section>
<section>
<h2>Learned leak and bandwidth</h2>
<p class="hint">Retention exp(&minus;&beta;) is the share of the key&apos;s leaky average kept at each step
(half-life ln 2 / &beta; steps); the key scale sets the kernel bandwidth. Hover a cell for all values.</p>
<div class="param-grids">{params}</div>
</section>
<script type="application/json" id="mosaic-report">{report_json}</script>
<script type="application/json" id="mosaic-heatmaps">{heatmap_json}</script>
<script>{script}</script>
</body>
</html>
"""

CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1em 2em; color: #111; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; } h2 { font-size: 1.1em; margin: 1.2em 0 .3em; }
.facts { display: grid; grid-template-columns: max-content auto; gap: 0 1em; margin: 0; }
.facts dt { color: #555; } .facts dd { margin: 0; font-family: monospace; }
.hint { color: #555; font-size: 12px; margin: .2em 0 .5em; }
.strip { font-family: monospace; line-height: 2; border: 1px solid #ccc; padding: .5em; background: #fff; }
.tok { display: inline-block; white-space: pre; padding: 0 1px; margin: 0 1px; border-radius: 3px;
  cursor: pointer; border-bottom: 2px solid transparent; }
.tok.shown { outline: 2px solid #e4572e; } .tok.pinned { border-bottom-color: #e4572e; }
.layers button { margin: .6em .3em .6em 0; padding: .2em .7em; border: 1px solid #999;
  background: #fff; border-radius: 3px; cursor: pointer; }
.layers button.active { background: #3b528b; color: #fff; border-color: #3b528b; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(330px, 1fr)); gap: .6em; }
.head-card { background: #fff; border: 1px solid #ccc; border-radius: 4px; padding: .4em .6em; }
.head-card h4 { margin: 0 0 .2em; font-size: 13px; } .head-card .meta { color: #555; font-size: 11px; }
.head-card table { border-collapse: collapse; width: 100%; font-size: 12px; }
.head-card td { padding: 1px 4px; vertical-align: middle; }
.bar { height: 8px; background: #3b528b; min-width: 1px; }
.barcell { width: 60px; } .num { text-align: right; font-family: monospace; }
.snippet { font-family: monospace; white-space: pre; } .snippet b { background: #fde725; }
.snippet .next { color: #21918c; } .empty { color: #777; font-style: italic; }
.predict { font-family: monospace; }
.heatmaps { display: flex; flex-wrap: wrap; gap: .8em; }
.heatmaps figure { margin: 0; } .heatmaps figcaption { font-size: 12px; color: #555; }
.hm { position: relative; display: inline-block; border: 1px solid #999; cursor: crosshair; }
.hm canvas { display: block; image-rendering: pixelated; }
.hm .marker { position: absolute; left: 0; right: 0; height: 0; border-top: 1px solid #e4572e;
  pointer-events: none; }
.param-grids { display: flex; flex-wrap: wrap; gap: 1.2em; }
.param-grids figure { margin: 0; } .param-grids figcaption { font-size: 12px; color: #555; }
svg.params text { font: 10px monospace; text-anchor: middle; } svg.params text.axis { fill: #555; }
svg.params text.row-label { text-anchor: start; }
"""

SCRIPT = r"""
"use strict";
const R = JSON.parse(document.getElementById("mosaic-report").textContent);
const HM = JSON.parse(document.getElementById("mosaic-heatmaps").textContent);
const T = R.tokens.length, L = R.heads.length, H = R.heads[0].context.length, SHIFT = R.shift;
let layer = 0, pinned = T - 1, shown = T - 1, focusHead = null;

function decode(b64) {
  const raw = atob(b64), out = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) out[i] = raw.charCodeAt(i);
  return out;
}
const heat = HM ? HM.layers.map(heads => heads.map(decode)) : null;

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}
function fmt(x, digits) {
  if (x === null || x === undefined) return "inf";
  return Number(x).toFixed(digits === undefined ? 3 : digits);
}
function fmtProb(p) {
  if (p === null) return "?";
  return p > 0 && p < 0.001 ? Number(p).toExponential(1) : Number(p).toFixed(3);
}
function visible(text) { return text.replace(/\n/g, "\u21b5").replace(/\t/g, "\u21e5"); }

const strip = document.getElementById("strip");
const tokenNodes = R.tokens.map(tok => {
  const node = el("span", "tok", visible(tok.text));
  node.dataset.position = tok.position;
  const p = R.predictions[tok.position].next_prob;
  node.title = "position " + tok.position + ", id " + tok.id +
    (p === null ? "" : ", p(next token) " + fmtProb(p));
  node.addEventListener("mouseenter", () => render(tok.position));
  node.addEventListener("mouseleave", () => render(pinned));
  node.addEventListener("click", () => { pinned = tok.position; render(pinned); });
  strip.appendChild(node);
  if (tok.text.includes("\n")) strip.appendChild(document.createElement("br"));
  return node;
});

const layerBar = document.getElementById("layers");
for (let l = 0; l < L; l++) {
  const button = el("button", "", "layer " + l);
  button.dataset.layer = l;
  button.addEventListener("click", () => { layer = l; drawHeatmaps(); render(pinned); });
  layerBar.appendChild(button);
}

function highlightStrip() {
  const weights = new Float64Array(T);
  const heads = R.retrievals[shown][layer].context;
  heads.forEach(head => {
    if (focusHead !== null && head.head !== focusHead) return;
    head.entries.forEach(e => { weights[e.position] += e.weight / (focusHead === null ? H : 1); });
  });
  tokenNodes.forEach((node, t) => {
    const alpha = 0.6 * Math.min(1, 0.1 + 0.9 * Math.sqrt(weights[t]));
    node.style.background = weights[t] > 0 ? "rgba(59, 82, 139, " + alpha + ")" : "";
    node.classList.toggle("shown", t === shown);
    node.classList.toggle("pinned", t === pinned);
  });
}

function snippet(s) {
  const box = el("span", "snippet");
  for (let i = Math.max(0, s - 3); i <= s; i++) {
    const text = visible(R.tokens[i].text);
    box.appendChild(i === s ? el("b", "", text) : document.createTextNode(text));
  }
  if (s + SHIFT < T) box.appendChild(el("span", "next", " \u2192 " + visible(R.tokens[s + SHIFT].text)));
  return box;
}

function row(cells) {
  const tr = el("tr");
  cells.forEach(cell => tr.appendChild(cell));
  return tr;
}
function cell(content, cls) {
  const td = el("td", cls || "");
  if (typeof content === "string") td.textContent = content; else td.appendChild(content);
  return td;
}
function weightBar(weight) {
  const bar = el("div", "bar");
  bar.style.width = Math.round(100 * weight) + "%";
  return bar;
}

function headCard(kind, head, params, extra) {
  const card = el("div", "head-card " + kind);
  card.dataset.head = head.head;
  card.appendChild(el("h4", "", kind + " head " + head.head));
  card.appendChild(el("div", "meta", "decay \u03b2 " + fmt(params.decay) +
    " \u00b7 retention " + fmt(params.retention) + " \u00b7 half-life " + fmt(params.half_life, 1) +
    " \u00b7 key scale " + fmt(params.key_scale) + extra));
  return card;
}

function contextCard(head, params) {
  const card = headCard("context", head, params, "");
  if (!head.entries.length) {
    card.appendChild(el("p", "empty", "nothing stored yet: position " + shown + " < shift " + SHIFT));
  } else {
    card.appendChild(el("div", "meta", "look-back " + fmt(head.lookback, 1) + " steps \u00b7 spread over " +
      fmt(head.effective_entries, 1) + " entries \u00b7 output norm " + fmt(head.output_norm)));
    const table = el("table");
    table.appendChild(row([cell("weight"), cell(""), cell("contrib."), cell("s"),
      cell("tokens \u2192 what followed")]));
    head.entries.forEach(e => {
      const tr = row([cell(weightBar(e.weight), "barcell"), cell(fmt(e.weight), "num"),
        cell(fmt(e.contribution), "num"), cell(String(e.position), "num"), cell(snippet(e.position))]);
      tr.className = "entry";
      tr.dataset.position = e.position;
      table.appendChild(tr);
    });
    card.appendChild(table);
  }
  card.addEventListener("mouseenter", () => { focusHead = head.head; highlightStrip(); });
  card.addEventListener("mouseleave", () => { focusHead = null; highlightStrip(); });
  return card;
}

function persistentCard(head, params) {
  const card = headCard("persistent", head, params, " \u00b7 output norm " + fmt(head.output_norm));
  const table = el("table");
  table.appendChild(row([cell("weight"), cell(""), cell("contrib."), cell("table"), cell("slot")]));
  head.slots.forEach(s => {
    const tr = row([cell(weightBar(s.weight), "barcell"), cell(fmt(s.weight), "num"),
      cell(fmt(s.contribution), "num"), cell(String(s.table), "num"), cell(String(s.slot), "num")]);
    tr.className = "slot";
    table.appendChild(tr);
  });
  card.appendChild(table);
  return card;
}

function renderDetails() {
  const box = document.getElementById("details");
  box.replaceChildren();
  box.dataset.position = shown;
  box.dataset.layer = layer;
  const tok = R.tokens[shown], pred = R.predictions[shown];
  box.appendChild(el("h3", "", "Position " + shown + ": \u201c" + visible(tok.text) + "\u201d (id " +
    tok.id + "), layer " + layer));
  const guesses = pred.top.map(p => "\u201c" + visible(p.text) + "\u201d " + fmtProb(p.prob)).join("   ");
  box.appendChild(el("p", "predict", "model predicts: " + guesses));
  if (pred.next_id !== null) {
    const actual = visible(R.tokens[shown + 1].text);
    const p = fmtProb(pred.next_prob);
    box.appendChild(el("p", "predict", "actual next: \u201c" + actual + "\u201d p = " + p));
  }
  const here = R.retrievals[shown][layer];
  box.appendChild(el("h4", "", "Context memory: stored entries retrieved"));
  const cards = el("div", "cards context-cards");
  here.context.forEach(head => cards.appendChild(contextCard(head, R.heads[layer].context[head.head])));
  box.appendChild(cards);
  if (here.persistent) {
    box.appendChild(el("h4", "", "Persistent memory: slots that answered"));
    const slots = el("div", "cards persistent-cards");
    here.persistent.forEach(head => {
      slots.appendChild(persistentCard(head, R.heads[layer].persistent[head.head]));
    });
    box.appendChild(slots);
  }
}

const markers = [];
function drawHeatmaps() {
  const box = document.getElementById("heatmaps");
  box.replaceChildren();
  markers.length = 0;
  if (!heat) { box.appendChild(el("p", "empty", "heatmaps were left out of this page")); return; }
  const size = Math.max(120, Math.min(300, 2 * T));
  heat[layer].forEach((bytes, h) => {
    const figure = el("figure"), wrap = el("div", "hm"), canvas = el("canvas");
    canvas.width = T; canvas.height = T;
    canvas.style.width = size + "px"; canvas.style.height = size + "px";
    const image = canvas.getContext("2d").createImageData(T, T);
    for (let i = 0; i < T * T; i++) {
      const v = bytes[i] / 255, readable = i % T <= Math.floor(i / T) - SHIFT;
      image.data[4 * i] = readable ? Math.round(255 - 196 * v) : 221;
      image.data[4 * i + 1] = readable ? Math.round(255 - 173 * v) : 221;
      image.data[4 * i + 2] = readable ? Math.round(255 - 116 * v) : 221;
      image.data[4 * i + 3] = 255;
    }
    canvas.getContext("2d").putImageData(image, 0, 0);
    canvas.addEventListener("click", ev => {
      const t = Math.min(T - 1, Math.max(0, Math.floor(ev.offsetY / canvas.clientHeight * T)));
      pinned = t; render(pinned);
    });
    const marker = el("div", "marker");
    wrap.appendChild(canvas); wrap.appendChild(marker);
    markers.push(marker);
    figure.appendChild(el("figcaption", "", "layer " + layer + ", head " + h));
    figure.appendChild(wrap);
    box.appendChild(figure);
  });
}

function render(t) {
  shown = t;
  layerBar.querySelectorAll("button").forEach(button => {
    button.classList.toggle("active", Number(button.dataset.layer) === layer);
  });
  renderDetails();
  highlightStrip();
  markers.forEach(m => {
    const canvas = m.parentNode.querySelector("canvas");
    m.style.top = ((shown + 0.5) / T * canvas.clientHeight) + "px";
  });
}

drawHeatmaps();
render(pinned);
"""
