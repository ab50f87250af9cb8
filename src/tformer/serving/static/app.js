// tformer's page: streams the answer from POST v1/completions (Server-Sent Events: the text
// grows token by token; beam search, which cannot stream, goes to POST v1/generate), then
// calls POST v1/attention with the answer as target and draws its cross-attention on a canvas.
// Plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
let maps = null; // the last /v1/attention answer

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function failure(status, data, statusText) {
  const error = data && data.error ? data.error : { message: statusText };
  const err = new Error(error.message || ("HTTP " + status));
  err.status = status;
  return err;
}

async function api(path, body) {
  const init = body === undefined ? { headers: headers() }
    : { method: "POST", headers: headers(), body: JSON.stringify(body) };
  const response = await fetch(path, init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw failure(response.status, data, response.statusText);
  return data;
}

// POST v1/completions with stream: true; onText(text so far) at every chunk. Resolves to
// { text, usage, finish } once the server sends data: [DONE].
async function streamCompletion(body, onText) {
  const response = await fetch("v1/completions", {
    method: "POST", headers: headers(), body: JSON.stringify(Object.assign({}, body, {
      stream: true, stream_options: { include_usage: true } })),
  });
  if (!response.ok) {
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    throw failure(response.status, data, response.statusText);
  }
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "", text = "", usage = null, finish = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) { // one event: "data: ..." lines, a blank line
      const lines = buffer.slice(0, end).split("\n");
      buffer = buffer.slice(end + 2);
      for (const line of lines) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw failure(500, chunk, "error");
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices) {
          text += choice.text;
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        onText(text);
      }
    }
  }
  return { text, usage, finish };
}

function setState(state, message) {
  document.body.dataset.state = state;
  $("status").textContent = message || "";
  $("generate").disabled = state === "busy";
}

function options() {
  const number = (id) => Number($(id).value);
  const opts = {
    num_beams: Math.max(1, Math.round(number("num-beams"))),
    max_new_tokens: Math.max(1, Math.round(number("max-new-tokens"))),
    do_sample: $("do-sample").checked,
  };
  if (opts.do_sample) {
    opts.temperature = number("temperature");
    opts.top_k = Math.max(0, Math.round(number("top-k")));
    opts.top_p = number("top-p");
  }
  return opts;
}

async function loadModelInfo() {
  try {
    const info = await api("v1/model");
    const params = info.parameters ? (info.parameters / 1e6).toFixed(1) + "M parameters, " : "";
    $("model-info").textContent = `${info.model_type || info.engine}, ${params}` +
      `${info.device || ""} · ${info.path}`;
    const limits = info.limits;
    $("num-beams").max = limits.max_beams;
    $("max-new-tokens").max = limits.max_new_tokens_cap;
    $("max-new-tokens").value = Math.min(Number($("max-new-tokens").value), limits.max_new_tokens_cap);
    $("text").maxLength = limits.max_input_chars;
  } catch (err) {
    $("model-info").textContent = err.status === 401
      ? "This server needs an API key: enter it below." : "Model information unavailable: " + err.message;
  }
}

async function run(event) {
  event.preventDefault();
  const text = $("text").value;
  if (!text.trim()) { setState("error", "Type a text first."); return; }
  setState("busy", "Generating…");
  $("output").textContent = "";
  $("meta").textContent = "";
  clearHeatmap();
  const opts = options();
  const started = performance.now();
  let output;
  try {
    if (opts.num_beams === 1) { // streamed: the text grows as the model decodes it
      const body = { prompt: text, max_tokens: opts.max_new_tokens, temperature: 0 };
      if (opts.do_sample) Object.assign(body, { temperature: opts.temperature, top_k: opts.top_k, top_p: opts.top_p });
      const answer = await streamCompletion(body, (sofar) => { $("output").textContent = sofar; });
      output = answer.text;
      $("meta").textContent = `${answer.usage.prompt_tokens} input tokens, ` +
        `${answer.usage.completion_tokens} output tokens, ${(performance.now() - started).toFixed(0)} ms ` +
        `(streamed; finish: ${answer.finish})`;
    } else {
      const answer = await api("v1/generate", Object.assign({ inputs: [text] }, opts));
      output = answer.outputs[0];
      const outTokens = answer.output_tokens ? answer.output_tokens[0] : "?";
      $("meta").textContent = `${answer.input_tokens[0]} input tokens, ${outTokens} output tokens, ` +
        `${answer.timing.total_ms.toFixed(0)} ms (batch of ${answer.batch_inputs})`;
    }
  } catch (err) {
    setState("error", err.message);
    return;
  }
  $("output").textContent = output;
  setState("busy", "Drawing attention…");
  try {
    maps = await api("v1/attention", {
      input: text, target: output, include: ["cross", "copy"],
      max_new_tokens: opts.max_new_tokens,
    });
  } catch (err) {
    setState(err.status === 501 ? "done" : "error",
      err.status === 501 ? "No attention maps for this model: " + err.message : err.message);
    return;
  }
  fillSelectors();
  draw();
  setState("done", "Done.");
}

function fillSelectors() {
  const fill = (select, labels, chosen) => {
    select.replaceChildren(...labels.map((label, i) => new Option(label, String(i))));
    select.value = String(chosen);
  };
  const layers = maps.cross.length, heads = layers ? maps.cross[0].length : 0; // (L, H, T, S)
  fill($("layer"), Array.from({ length: layers }, (_, i) => "layer " + (i + 1)), layers - 1);
  if (maps.copy_attention) $("layer").add(new Option("copy attention", "copy")); // (T, S), one head
  fill($("head"), ["mean of heads", ...Array.from({ length: heads }, (_, i) => "head " + (i + 1))], 0);
}

function matrix() {
  const copy = $("layer").value === "copy";
  $("head").disabled = copy;
  if (copy) return maps.copy_attention;
  const layer = maps.cross[Number($("layer").value)]; // (H, T, S)
  const head = Number($("head").value);
  if (head > 0) return layer[head - 1];
  return layer[0].map((row, t) => row.map((_, s) =>
    layer.reduce((sum, h) => sum + h[t][s], 0) / layer.length));
}

function clearHeatmap() {
  const canvas = $("heatmap");
  canvas.width = 0;
  canvas.height = 0;
  canvas.dataset.cells = "0";
  canvas.dataset.copyColumn = "0";
}

function label(token) {
  const shown = token.replace(/^[\u2581\u0120]/, "·");
  return shown.length > 14 ? shown.slice(0, 13) + "…" : shown;
}

function draw() {
  if (!maps || !maps.cross || !maps.cross.length) return;
  const m = matrix();
  const rows = m.length, cols = rows ? m[0].length : 0;
  const canvas = $("heatmap"), ctx = canvas.getContext("2d");
  const cell = 22, font = "12px system-ui, sans-serif";
  ctx.font = font;
  const width = (tokens) => Math.max(0, ...tokens.map((t) => ctx.measureText(label(t)).width));
  const left = Math.ceil(width(maps.target_tokens)) + 10;
  const pGen = maps.p_gen || null; // with copy attention: one more column, P(copy) = 1 − p_gen
  const top = Math.ceil(Math.max(width(maps.source_tokens), pGen ? ctx.measureText("P(copy)").width : 0)) + 10;
  const extra = pGen ? cell + 8 : 0;
  canvas.width = left + cols * cell + extra + 2;
  canvas.height = top + rows * cell + 2;
  ctx.font = font; // resizing a canvas resets its context
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const peak = Math.max(1e-9, ...m.flat());
  for (let t = 0; t < rows; t++) {
    for (let s = 0; s < cols; s++) {
      const v = m[t][s] / peak; // 0 white .. 1 dark blue
      ctx.fillStyle = `rgb(${Math.round(255 - 224 * v)}, ${Math.round(255 - 177 * v)}, ${Math.round(255 - 102 * v)})`;
      ctx.fillRect(left + s * cell, top + t * cell, cell - 1, cell - 1);
    }
    if (pGen) { // 0 white .. 1 dark orange, on its own scale: a probability
      const v = 1 - pGen[t];
      ctx.fillStyle = `rgb(${Math.round(255 - 38 * v)}, ${Math.round(255 - 160 * v)}, ${Math.round(255 - 240 * v)})`;
      ctx.fillRect(left + cols * cell + 8, top + t * cell, cell - 1, cell - 1);
    }
  }
  ctx.fillStyle = "#1b1b1b";
  ctx.textBaseline = "middle";
  ctx.textAlign = "right";
  maps.target_tokens.slice(0, rows).forEach((tok, t) => ctx.fillText(label(tok), left - 5, top + t * cell + cell / 2));
  maps.source_tokens.slice(0, cols).forEach((tok, s) => {
    ctx.save();
    ctx.translate(left + s * cell + cell / 2, top - 5);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(label(tok), 0, 0);
    ctx.restore();
  });
  if (pGen) {
    ctx.save();
    ctx.translate(left + cols * cell + 8 + cell / 2, top - 5);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText("P(copy)", 0, 0);
    ctx.restore();
  }
  canvas.dataset.cells = String(rows * cols);
  canvas.dataset.copyColumn = pGen ? "1" : "0";
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", run);
  $("layer").addEventListener("change", draw);
  $("head").addEventListener("change", draw);
  $("api-key").addEventListener("change", loadModelInfo);
  loadModelInfo();
});
