"""The interactive attention view: one self-contained HTML page (inline CSS and JavaScript, the
maps as inline JSON; nothing is fetched, so it opens offline from a file).

Choose the kind (cross, encoder self, decoder self, and copy attention for a model that has
it; a decoder-only model's causal self-attention alone), the layer and the head, or the mean
over layers or heads; hovering a cell shows the query token, the key token and the weight
(and, with copy attention, P(copy) = 1 − p_gen of the query token). A decoder-only model's map
has a white line after the prompt's last token, on both axes. The same viewer is embedded in
the run report (:mod:`tformer.visualization.report`), once per example: :func:`viewer_fragment`
gives the markup of one viewer, :data:`VIEWER_CSS` and :data:`VIEWER_JS` are included once per
page.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

from tformer.visualization.attention import AttentionMaps

VIEWER_CSS = """
.tf-viewer { font-family: "DejaVu Sans", "WenQuanYi Zen Hei", "Noto Sans CJK SC", sans-serif;
  margin: 0.5em 0 1.5em; }
.tf-viewer .tf-controls { display: flex; gap: 1em; flex-wrap: wrap; align-items: center;
  margin-bottom: 0.4em; font-size: 14px; }
.tf-viewer .tf-hover { font-family: monospace; min-height: 1.3em; font-size: 14px;
  color: #222; margin-bottom: 0.3em; }
.tf-viewer canvas { border: 1px solid #ccc; max-width: 100%; }
.tf-viewer .tf-note { color: #555; font-size: 13px; margin-bottom: 0.4em; }
"""

# Drawn on a canvas: thousands of cells stay fast, and the page needs no library.
VIEWER_JS = r"""
(function () {
  "use strict";
  // viridis, 9 stops (matplotlib's colour map, as in the PNG heatmaps)
  var STOPS = [[68,1,84],[71,44,122],[59,81,139],[44,113,142],[33,144,141],[39,173,129],
               [92,200,99],[170,220,50],[253,231,37]];
  function colour(v) {
    v = Math.max(0, Math.min(1, v)) * (STOPS.length - 1);
    var i = Math.min(Math.floor(v), STOPS.length - 2), f = v - i, a = STOPS[i], b = STOPS[i + 1];
    return "rgb(" + [0, 1, 2].map(function (k) { return Math.round(a[k] + f * (b[k] - a[k])); })
      .join(",") + ")";
  }
  var AXES = {cross: ["target_tokens", "source_tokens"], encoder: ["source_tokens", "source_tokens"],
              decoder: ["target_tokens", "decoder_input_tokens"],
              copy: ["target_tokens", "source_tokens"]};
  var NAMES = {cross: "cross-attention (target predicted × source)",
               encoder: "encoder self-attention (source × source)",
               decoder: "decoder self-attention (predicted × read)",
               copy: "copy attention (target predicted × source)",
               causal: "causal self-attention (token read × token read)"};
  function mean(mats) {
    var out = mats[0].map(function (row) { return row.map(function () { return 0; }); });
    mats.forEach(function (m) { m.forEach(function (row, i) { row.forEach(function (v, j) {
      out[i][j] += v / mats.length; }); }); });
    return out;
  }
  function option(select, value, text) {
    var o = document.createElement("option"); o.value = value; o.textContent = text;
    select.appendChild(o);
  }
  function labels(data, key) {
    var list = data[key];
    return (list && list.length) ? list : data.target_tokens;
  }
  function init(root) {
    var data = JSON.parse(root.querySelector("script.tf-data").textContent);
    var kind = root.querySelector(".tf-kind"), layer = root.querySelector(".tf-layer"),
        head = root.querySelector(".tf-head"), stretch = root.querySelector(".tf-stretch"),
        canvas = root.querySelector("canvas"),
        hover = root.querySelector(".tf-hover"), ctx = canvas.getContext("2d");
    if (data.copy_attention) data.copy = [[data.copy_attention]];  // one layer, one head
    var causal = data.family === "causal";  // one kind, "decoder", over prompt + continuation
    ["cross", "encoder", "decoder", "copy"].forEach(function (k) {
      if (data[k] && data[k].length) option(kind, k, NAMES[causal ? "causal" : k]); });
    var view = null;
    function fillLayers() {
      var k = kind.value, n = data[k].length, h = data[k][0].length;
      layer.innerHTML = ""; head.innerHTML = "";
      for (var i = 0; i < n; i++) option(layer, i, "layer " + (i + 1));
      option(layer, "mean", "mean of layers");
      for (var j = 0; j < h; j++) option(head, j, "head " + (j + 1));
      option(head, "mean", "mean of heads");
      layer.value = String(n - 1); head.value = "mean";
    }
    function matrix() {
      var k = kind.value, layers = layer.value === "mean" ? data[k] : [data[k][+layer.value]];
      var heads = [];
      layers.forEach(function (l) {
        if (head.value === "mean") heads = heads.concat(l); else heads.push(l[+head.value]);
      });
      return mean(heads);
    }
    function draw() {
      var k = kind.value, m = matrix(), rows = labels(data, AXES[k][0]),
          cols = labels(data, AXES[k][1]);
      var top = 1;  // colour scale: 0 to 1, or 0 to this map's largest weight
      if (stretch.checked) {
        top = 0;
        m.forEach(function (row) { row.forEach(function (v) { top = Math.max(top, v); }); });
        top = top || 1;
      }
      var cell = Math.max(6, Math.min(28, Math.floor(640 / Math.max(rows.length, cols.length))));
      var margin = 110, ratio = window.devicePixelRatio || 1;
      var w = margin + cell * cols.length + 10, h = margin + cell * rows.length + 10;
      canvas.width = w * ratio; canvas.height = h * ratio;
      canvas.style.width = w + "px"; canvas.style.height = h + "px";
      ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
      ctx.fillStyle = "#fff"; ctx.fillRect(0, 0, w, h);
      m.forEach(function (row, i) { row.forEach(function (v, j) {
        ctx.fillStyle = colour(v / top);
        ctx.fillRect(margin + j * cell, margin + i * cell, cell, cell); }); });
      ctx.fillStyle = "#222";
      ctx.font = Math.min(13, Math.max(8, cell - 4)) +
        'px "DejaVu Sans", "WenQuanYi Zen Hei", sans-serif';
      ctx.textBaseline = "middle"; ctx.textAlign = "right";
      rows.forEach(function (t, i) { ctx.fillText(t, margin - 4, margin + (i + 0.5) * cell); });
      cols.forEach(function (t, j) {
        ctx.save(); ctx.translate(margin + (j + 0.5) * cell, margin - 4); ctx.rotate(-Math.PI / 2);
        ctx.textAlign = "left"; ctx.fillText(t, 0, 0); ctx.restore(); });
      var p = data.prompt_length;  // decoder-only: where the prompt ends
      if (causal && p > 0 && p < rows.length) {
        ctx.strokeStyle = "#fff"; ctx.lineWidth = 1.5; ctx.beginPath();
        var edge = margin + p * cell;
        ctx.moveTo(edge, margin); ctx.lineTo(edge, margin + rows.length * cell);
        ctx.moveTo(margin, edge); ctx.lineTo(margin + cols.length * cell, edge);
        ctx.stroke();
      }
      view = {m: m, rows: rows, cols: cols, cell: cell, margin: margin};
      hover.textContent = "hover a cell: query token → key token: weight";
    }
    canvas.addEventListener("mousemove", function (e) {
      if (!view) return;
      var r = canvas.getBoundingClientRect(), scale = parseFloat(canvas.style.width) / r.width;
      var j = Math.floor(((e.clientX - r.left) * scale - view.margin) / view.cell),
          i = Math.floor(((e.clientY - r.top) * scale - view.margin) / view.cell);
      if (i < 0 || j < 0 || i >= view.rows.length || j >= view.cols.length) return;
      hover.textContent = view.rows[i] + " (" + (i + 1) + ") → " + view.cols[j] + " (" + (j + 1) +
        "): " + view.m[i][j].toFixed(4) + (data.p_gen && kind.value !== "encoder"
          ? "; P(copy) of " + view.rows[i] + ": " + (1 - data.p_gen[i]).toFixed(4) : "");
    });
    kind.addEventListener("change", function () { fillLayers(); draw(); });
    layer.addEventListener("change", draw);
    head.addEventListener("change", draw);
    stretch.addEventListener("change", draw);
    fillLayers(); draw();
  }
  function initAll() {
    Array.prototype.forEach.call(document.querySelectorAll(".tf-viewer"), function (root) {
      if (!root.dataset.ready) { root.dataset.ready = "1"; init(root); }
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", initAll);
  else initAll();
})();
"""


def viewer_fragment(maps: AttentionMaps, caption: str = "") -> str:
    """The markup of one viewer of ``maps`` (needs :data:`VIEWER_CSS` and :data:`VIEWER_JS`
    once on the page)."""
    data = _script_json(maps.to_json())
    note = f'<div class="tf-note">{html.escape(caption)}</div>' if caption else ""
    return (
        '<div class="tf-viewer">' + note +
        '<div class="tf-controls"><label>kind <select class="tf-kind"></select></label>'
        '<label>layer <select class="tf-layer"></select></label>'
        '<label>head <select class="tf-head"></select></label>'
        '<label><input type="checkbox" class="tf-stretch"> colours up to this map\'s '
        'largest weight (else 0 to 1)</label></div>'
        '<div class="tf-hover"></div><canvas></canvas>'
        f'<script type="application/json" class="tf-data">{data}</script></div>'
    )


def attention_page(maps: AttentionMaps, title: str = "tformer attention") -> str:
    """A whole self-contained HTML page with one viewer of ``maps``."""
    if maps.family == "causal":
        caption = (f"text: {' '.join(maps.target_tokens)} | rows and columns: the token read at "
                   f"that position (a row predicts the next token); the first "
                   f"{maps.prompt_length} tokens are the prompt")
    else:
        caption = (f"source: {' '.join(maps.source_tokens)} | rows of cross and decoder maps: "
                   "the target token predicted at that position; columns of decoder maps: the "
                   "token read there")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>body {{ margin: 1.5em; }}{VIEWER_CSS}</style>"
        f"</head><body><h1 style=\"font-family: sans-serif\">{html.escape(title)}</h1>"
        f"{viewer_fragment(maps, caption)}<script>{VIEWER_JS}</script></body></html>\n"
    )


def write_attention_html(maps: AttentionMaps, path: Path | str,
                         title: str = "tformer attention") -> Path:
    """Write :func:`attention_page` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(attention_page(maps, title), encoding="utf-8")
    return path


def _script_json(value) -> str:
    """JSON safe inside a <script> element: "</" (as in a "</script>" token) and "<!--" are
    escaped, which JSON reads back unchanged."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("</", "<\\/").replace("<!--", "<\\u0021--")
