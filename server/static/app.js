// alignserve playground: one static page, no build step, no dependencies.
//
// Data flow: GET /v1/models and /v1/alignment/strategies (with the key the user typed as a
// bearer token) -> the form (one field per property of each strategy's own options schema, so
// a new strategy needs no page change) -> POST /v1/chat/completions with
// alignment.return_candidates -> the streamed answer, then the trace from the final
// `alignment` block. All text from the server goes through textContent (never innerHTML), and
// there is no inline script or style: the page runs under a strict Content-Security-Policy.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const KEY_STORE = "alignserve.playground.key";
const SVG_NS = "http://www.w3.org/2000/svg";
const SCORER_FIELDS = new Set(["reward", "cost", "value"]);
// Fields the form never shows: the page sets them itself.
const FIXED_FIELDS = new Set(["strategy", "return_candidates"]);
const state = { models: [], catalogue: null, results: {} };

// ---------------------------------------------------------------- small DOM helpers

function el(tag, props = {}, ...kids) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("data-")) node.setAttribute(k, v);
    else if (k in node) node[k] = v;
    else node.setAttribute(k, v);
  }
  for (const kid of kids.flat()) {
    if (kid !== null && kid !== undefined) node.append(kid);
  }
  return node;
}

function svg(tag, attrs = {}, ...kids) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  for (const kid of kids) node.append(kid);
  return node;
}

function fmt(v, digits = 4) {
  if (v === null || v === undefined) return "—";
  if (typeof v === "number") {
    if (!Number.isFinite(v)) return v > 0 ? "∞" : "−∞";
    return Number.isInteger(v) ? String(v) : v.toFixed(digits);
  }
  if (Array.isArray(v)) return `[${v.map((x) => fmt(x, digits)).join(", ")}]`;
  if (typeof v === "object") return JSON.stringify(v);
  return String(v);
}

function status(text, isError = false) {
  const s = $("#status");
  s.textContent = text;
  s.classList.toggle("bad", isError);
}

// ---------------------------------------------------------------- API calls

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("#key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) {
      const e = body.error;
      return e.param ? `${e.message} (param: ${e.param})` : e.message;
    }
  } catch (_) { /* not JSON: fall through */ }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

async function getJSON(path) {
  let resp;
  try {
    resp = await fetch(path, { headers: headers() });
  } catch (e) {
    throw new Error(`cannot reach the server: ${e.message}`);
  }
  if (!resp.ok) throw new Error(await errorMessage(resp));
  return resp.json();
}

async function load() {
  status("loading models and strategies…");
  try {
    const [models, catalogue] = await Promise.all(
      [getJSON("/v1/models"), getJSON("/v1/alignment/strategies")]);
    state.models = models.data;
    state.catalogue = catalogue;
  } catch (e) {
    status(e.message, true);
    return;
  }
  fillModels();
  for (const [side, fallback] of [["a", "best_of_n"], ["b", "speculative_rejection"]]) {
    const select = $(`#strategy-${side}`);
    select.replaceChildren(...state.catalogue.data.map(
      (s) => el("option", { value: s.name, text: s.name })));
    select.value = state.catalogue.data.some((s) => s.name === fallback) ? fallback
      : state.catalogue.data[0].name;
    buildOptions(side);
  }
  applyPreset();
  status(`${state.models.length} model(s), ${state.catalogue.data.length} strategies`);
  document.body.dataset.ready = "1";
  updateCode();
}

// ---------------------------------------------------------------- models and presets

function fillModels() {
  const select = $("#model");
  select.replaceChildren(...state.models.map((m) => el("option", {
    value: m.id, text: m.alignment ? `${m.id} (preset: ${m.alignment.strategy || "none"})`
      : m.parent ? `${m.id} (adapter of ${m.parent})` : m.id,
  })));
}

function currentModel() {
  return state.models.find((m) => m.id === $("#model").value);
}

// A preset's `alignment` is shown, and fills strategy A (the request then states it in full).
function applyPreset() {
  const m = currentModel();
  const info = $("#preset-info");
  info.hidden = !(m && m.alignment);
  if (!m || !m.alignment) return;
  info.textContent = `${m.description ? `${m.description}\n` : ""}preset alignment: ` +
    JSON.stringify(m.alignment, null, 1);
  const known = state.catalogue.data.some((s) => s.name === m.alignment.strategy);
  if (!known) return;
  $("#strategy-a").value = m.alignment.strategy;
  buildOptions("a");
  for (const input of document.querySelectorAll("#options-a [data-name]")) {
    const v = m.alignment[input.dataset.name];
    if (v === undefined || v === null) continue;
    if (input.type === "checkbox") input.checked = Boolean(v);
    else input.value = String(v);
  }
}

// ---------------------------------------------------------------- the options form

function strategyEntry(name) {
  return state.catalogue.data.find((s) => s.name === name);
}

// The one non-null variant of a property (anyOf [X, null]), and whether it may be null.
function variant(prop) {
  if (!prop.anyOf) return { base: prop, nullable: false, alt: null };
  const real = prop.anyOf.filter((p) => p.type !== "null");
  const alt = real.find((p) => p.const !== undefined) || null;
  const base = real.find((p) => p.const === undefined) || real[0];
  return { base, nullable: real.length < prop.anyOf.length, alt };
}

function field(name, prop) {
  const { base, alt } = variant(prop);
  const def = prop.default;
  const title = prop.description || "";
  const attrs = { "data-name": name, "data-default": JSON.stringify(def ?? null), title };
  let input;
  if (base.type === "boolean") {
    input = el("input", { type: "checkbox", checked: Boolean(def), ...attrs, "data-kind": "bool" });
  } else if (base.enum) {
    input = el("select", { ...attrs, "data-kind": "str" },
      ...base.enum.map((v) => el("option", { value: v, text: v })));
    input.value = def ?? base.enum[0];
  } else if ((base.type === "integer" || base.type === "number") && !alt) {
    const min = base.minimum ?? base.exclusiveMinimum;
    const max = base.maximum ?? base.exclusiveMaximum;
    input = el("input", {
      type: "number", step: base.type === "integer" ? "1" : "any", ...attrs,
      "data-kind": base.type === "integer" ? "int" : "num",
      value: def ?? "", placeholder: def === null ? "unset" : "",
      min: min ?? undefined, max: max ?? undefined,
    });
  } else {
    input = el("input", {
      type: "text", ...attrs, "data-kind": alt ? "num-or-str" : "str", value: def ?? "",
      placeholder: name === "reward" ? `server default (${state.catalogue.default_reward})`
        : alt ? `number or "${alt.const}"` : "unset",
    });
    if (SCORER_FIELDS.has(name)) input.setAttribute("list", "scorer-names");
  }
  return el("label", { class: "opt" }, el("span", { class: "name", text: name }), input);
}

function buildOptions(side) {
  const entry = strategyEntry($(`#strategy-${side}`).value);
  const box = $(`#options-${side}`);
  const panel = $(`#panel-${side}`);
  $(".doc", panel).textContent = entry.description;
  const common = Object.entries(state.catalogue.common.properties)
    .filter(([k]) => !FIXED_FIELDS.has(k))
    .filter(([k]) => k !== "value" || entry.takes_value);
  const own = Object.entries(entry.options.properties || {});
  box.replaceChildren(
    ...own.map(([k, p]) => field(k, p)).map((f) => { f.classList.add("own"); return f; }),
    ...common.map(([k, p]) => field(k, p)));
  if (!$("#scorer-names")) {
    document.body.append(el("datalist", { id: "scorer-names" },
      ...state.catalogue.scorers.map((s) => el("option", { value: s }))));
  }
}

// One field's value for the request; undefined: leave it out (empty, or the default unless
// `full`: on a preset the request's fields override the preset's, so a default must be sent).
function fieldValue(input, full) {
  const kind = input.dataset.kind;
  const def = JSON.parse(input.dataset.default);
  if (kind === "bool") return !full && input.checked === Boolean(def) ? undefined : input.checked;
  const raw = input.value.trim();
  if (raw === "") return undefined;
  let v = raw;
  if (kind === "int" || kind === "num" || kind === "num-or-str") {
    const num = Number(raw);
    if (!Number.isNaN(num)) v = num; // anything else goes as typed: the API names the field
  }
  if (!full && v === def && input.dataset.name !== "n") return undefined;
  return v;
}

function alignmentOf(side) {
  const out = { strategy: $(`#strategy-${side}`).value };
  const model = currentModel();
  const full = Boolean(model && model.alignment);
  for (const input of document.querySelectorAll(`#options-${side} [data-name]`)) {
    const v = fieldValue(input, full);
    if (v !== undefined) out[input.dataset.name] = v;
  }
  out.return_candidates = true;
  return out;
}

// ---------------------------------------------------------------- the chat and the request

function addMessage(role = "user", content = "") {
  const roleSel = el("select", { class: "role" },
    ...["system", "user", "assistant"].map((r) => el("option", { value: r, text: r })));
  roleSel.value = role;
  const text = el("textarea", { class: "content", rows: 2, value: content });
  const row = el("div", { class: "message" }, roleSel, text);
  const remove = el("button", { type: "button", class: "remove", text: "×", title: "remove" });
  remove.addEventListener("click", () => { row.remove(); updateCode(); });
  row.append(remove);
  $("#messages").append(row);
}

function messages() {
  return [...document.querySelectorAll("#messages .message")].map((row) => ({
    role: $(".role", row).value, content: $(".content", row).value,
  }));
}

function numberOr(id, fallback) {
  const raw = $(id).value.trim();
  if (raw === "") return fallback;
  const v = Number(raw);
  return Number.isNaN(v) ? raw : v;
}

function requestBody(side) {
  const body = { model: $("#model").value, messages: messages() };
  const maxTokens = numberOr("#max-tokens", undefined);
  if (maxTokens !== undefined) body.max_tokens = maxTokens;
  const temperature = numberOr("#temperature", undefined);
  if (temperature !== undefined) body.temperature = temperature;
  const seed = numberOr("#seed", undefined);
  if (seed !== undefined) body.seed = seed;
  if ($("#stream").checked) {
    body.stream = true;
    body.stream_options = { include_usage: true };
  }
  body.alignment = alignmentOf(side);
  return body;
}

function sides() {
  return $("#compare").checked ? ["a", "b"] : ["a"];
}

// ---------------------------------------------------------------- copy as curl / Python

const { curlOf, pythonOf } = window.AlignSnippets;

function updateCode() {
  if (!state.catalogue) return;
  $("#code").textContent = sides().map((s) => curlOf(requestBody(s))).join("\n\n");
}

async function copy(kind) {
  const text = sides().map((s) => (kind === "curl" ? curlOf : pythonOf)(requestBody(s)))
    .join("\n\n");
  $("#code").textContent = text;
  $("#code-box").open = true;
  try {
    await navigator.clipboard.writeText(text);
    $("#copied").textContent = `copied as ${kind}`;
  } catch (_) {
    $("#copied").textContent = "select the request below to copy it";
  }
}

// ---------------------------------------------------------------- running a request

async function readStream(resp, answer) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  const out = { content: "", alignment: null, usage: null, error: null, firstToken: null };
  const t0 = performance.now();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data || data === "[DONE]") continue;
      const obj = JSON.parse(data);
      if (obj.error) {
        out.error = obj.error.message;
        continue;
      }
      if (obj.usage) out.usage = obj.usage;
      if (obj.alignment) out.alignment = obj.alignment;
      for (const choice of obj.choices || []) {
        const piece = choice.delta && choice.delta.content;
        if (piece) {
          if (out.firstToken === null) out.firstToken = (performance.now() - t0) / 1000;
          out.content += piece;
          answer.textContent = out.content;
        }
        if (choice.alignment && choice.index === 0) out.alignment = choice.alignment;
      }
    }
  }
  return out;
}

function showError(panel, message) {
  panel.append(el("p", { class: "error", role: "alert", text: message }));
  panel.dataset.state = "error";
}

async function runSide(side) {
  const panel = $(`#result-${side}`);
  const body = requestBody(side);
  panel.hidden = false;
  panel.dataset.state = "running";
  panel.dataset.request = JSON.stringify(body);
  const answer = el("div", { class: "answer" });
  panel.replaceChildren(
    el("h2", {}, el("span", { class: "tag", text: side.toUpperCase() }),
      ` ${body.alignment.strategy}`),
    answer);
  delete state.results[side];
  const t0 = performance.now();
  let resp;
  try {
    resp = await fetch("/v1/chat/completions",
      { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) {
    showError(panel, `cannot reach the server: ${e.message}`);
    return;
  }
  if (!resp.ok) {
    showError(panel, await errorMessage(resp));
    return;
  }
  let res;
  if (body.stream) {
    res = await readStream(resp, answer);
  } else {
    const j = await resp.json();
    const choice = j.choices[0];
    res = { content: choice.message.content, alignment: choice.alignment || j.alignment,
      usage: j.usage, error: null, firstToken: null };
    answer.textContent = res.content;
  }
  res.elapsed = (performance.now() - t0) / 1000;
  if (res.error) {
    showError(panel, res.error);
    return;
  }
  state.results[side] = { body, res };
  window.AlignTrace.render(panel, body, res);
  panel.dataset.state = "done";
}

async function run() {
  const button = $("#run");
  button.disabled = true;
  $("#compare-box").hidden = true;
  for (const side of ["a", "b"]) $(`#result-${side}`).hidden = true;
  try {
    // One after the other: both run on the same engine, so their times compare fairly.
    for (const side of sides()) await runSide(side);
    if (sides().length === 2) window.AlignTrace.compare(state.results);
  } finally {
    button.disabled = false;
  }
}

// ---------------------------------------------------------------- wiring

function init() {
  const key = $("#key");
  key.value = sessionStorage.getItem(KEY_STORE) || "";
  key.addEventListener("change", () => { sessionStorage.setItem(KEY_STORE, key.value); load(); });
  $("#reload").addEventListener("click", load);
  $("#model").addEventListener("change", () => { applyPreset(); updateCode(); });
  for (const side of ["a", "b"]) {
    $(`#strategy-${side}`).addEventListener("change", () => { buildOptions(side); updateCode(); });
  }
  $("#compare").addEventListener("change", () => {
    $("#panel-b").hidden = !$("#compare").checked;
    updateCode();
  });
  $(".setup").addEventListener("input", updateCode);
  $("#add-message").addEventListener("click", () => addMessage());
  $("#run").addEventListener("click", run);
  $("#copy-curl").addEventListener("click", () => copy("curl"));
  $("#copy-python").addEventListener("click", () => copy("python"));
  document.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run();
  });
  addMessage("user", "Give me three tips for sleeping better.");
  load();
}

// The schema default of a strategy's option (the trace rebuilds decision points from them).
function optionDefault(strategy, name) {
  const entry = state.catalogue && strategyEntry(strategy);
  const prop = entry && entry.options.properties && entry.options.properties[name];
  return prop ? prop.default : undefined;
}

window.AlignPage = { el, svg, fmt, optionDefault };
document.addEventListener("DOMContentLoaded", init);
