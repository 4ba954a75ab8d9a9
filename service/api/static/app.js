// The PRISM page: builds its form from the API's own schema, submits, follows the job, shows the
// result. Only this server is contacted; the API key stays in session storage and in headers.
const $ = (id) => document.getElementById(id);
// fields kept out of the advanced ones: the page's own, or left at their defaults (outputs: the page shows every file)
const TEXT_FIELDS = new Set(["image", "original_prompt", "edit_prompt", "findings", "edit", "webhook", "webhook_events", "outputs"]);
const PHASES = { decode: "Reading the image", encode: "Encoding", inversion: "DDIM inversion", null_text: "Null-text optimisation",
  offsets: "Direct-inversion offsets", editing: "Editing (prompt-to-prompt)", scoring: "Scoring (S_CLIP)" };
const TIMINGS = { ...PHASES, encode: "VAE encoding", decode: "VAE decoding" };
let info = null, defaults = {}, job = null, pollTimer = null, view = { scale: 1, x: 0, y: 0 };
const urls = [];

function headers() {
  const key = sessionStorage.getItem("prism-api-key");
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  return fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
}

function objectUrl(blob) { const url = URL.createObjectURL(blob); urls.push(url); return url; }

function showMessage(text, details = [], forFields = false) {
  const box = $("message");
  box.textContent = "";
  box.dataset.fields = String(forFields);
  if (!text) return;
  const p = document.createElement("p"); p.textContent = text; box.append(p);
  if (details.length) {
    const ul = document.createElement("ul");
    for (const d of details) { const li = document.createElement("li"); li.textContent = d; ul.append(li); }
    box.append(ul);
  }
}

// A refusal's errors belong to the fields they name (shown beside them, cleared when that field
// changes); the box under the buttons holds the summary and errors that name no field.
function fieldError(name, text) {
  const box = $(`error-${name}`);
  if (!box) return false;
  box.textContent = text; box.hidden = !text;
  const input = name === "image" ? $("drop") : document.querySelector(`[name="${name}"]`);
  if (input) input.setAttribute("aria-invalid", text ? "true" : "false");
  return true;
}

function clearFieldError(name) {
  fieldError(name, "");
  if ($("message").dataset.fields === "true" && !document.querySelector(".error:not([hidden])")) showMessage("");
}

function clearErrors() {
  for (const box of document.querySelectorAll(".error")) fieldError(box.id.slice("error-".length), "");
  showMessage("");
}

async function showError(response) {
  let general = [], placed = 0;
  try {
    const body = await response.json();
    for (const d of body.detail || []) {
      const parts = (d.loc || []).filter((part) => !["body", "path", "query", "header"].includes(part));
      const where = parts.join(".");
      if (fieldError(parts[0], d.msg)) placed += 1;
      else general.push(where ? `${where}: ${d.msg}` : d.msg);
    }
  } catch { general = [response.statusText]; }
  const retry = response.headers.get("Retry-After");
  const titles = { 401: "The API key is missing or wrong.", 413: "The upload is too large.", 415: "This file type is not accepted.",
    422: "Some fields need a change.", 429: "Too many submissions for this key.", 503: "The service is busy or unavailable." };
  let title = titles[response.status] || `The service answered ${response.status}.`;
  if (retry && (response.status === 429 || response.status === 503)) title += ` Try again in ${retry} s.`;
  showMessage(title, general, placed > 0 && general.length === 0);
  if ($("error-image").textContent) clearPreview();  // a refused image is not kept as the chosen one
}

function field(name, schema) {
  const wrap = document.createElement("div");
  const label = document.createElement("label");
  label.htmlFor = `opt-${name}`; label.textContent = name;
  let input;
  const type = schema.type || (schema.anyOf || []).map((s) => s.type).find((t) => t !== "null");
  if (schema.format === "binary") {
    input = document.createElement("input");
    input.type = "file"; input.accept = "image/png,image/jpeg";
  } else if (schema.enum) {
    input = document.createElement("select");
    for (const value of schema.enum) { const o = document.createElement("option"); o.value = o.textContent = value; input.append(o); }
    input.value = schema.default;
  } else {
    input = document.createElement("input");
    if (type === "integer" || type === "number") {
      input.type = "number";
      input.step = type === "integer" ? "1" : "any";
      for (const [key, attr] of [["minimum", "min"], ["maximum", "max"]]) if (key in schema) input[attr] = schema[key];
    } else input.type = "text";
    const value = schema.default;
    input.value = Array.isArray(value) ? value.join(",") : value ?? "";
  }
  input.id = `opt-${name}`; input.name = name;
  defaults[name] = input.value;
  const hint = document.createElement("p");
  hint.className = "hint"; hint.id = `hint-${name}`; hint.textContent = schema.description || "";
  input.setAttribute("aria-describedby", hint.id);
  const error = document.createElement("p");
  error.className = "error"; error.id = `error-${name}`; error.hidden = true;
  wrap.append(label, input, hint, error);
  return wrap;
}

async function buildForm() {
  const [infoResponse, specResponse] = await Promise.all([fetch("/service-info"), fetch("/openapi.json")]);
  info = await infoResponse.json();
  const spec = await specResponse.json();
  $("key-fieldset").hidden = !info.auth;
  $("api-key").value = sessionStorage.getItem("prism-api-key") || "";
  const properties = spec.components.schemas.CounterfactualForm.properties;
  for (const [name, schema] of Object.entries(properties)) if (!TEXT_FIELDS.has(name)) $("advanced-fields").append(field(name, schema));
  for (const condition of info.conditions) {
    const row = document.createElement("tr");
    const id = condition.toLowerCase().replace(/\W+/g, "-");
    row.innerHTML = `<th scope="row"></th><td><select id="f-${id}"></select></td><td><select id="e-${id}"></select></td>`;
    row.querySelector("th").textContent = condition;
    const current = row.querySelector(`#f-${id}`), edit = row.querySelector(`#e-${id}`);
    current.setAttribute("aria-label", `${condition} in the image`);
    edit.setAttribute("aria-label", `${condition}: edit to`);
    for (const [v, t] of [["", "blank"], ["1", "present (1)"], ["0", "absent (0)"], ["-1", "uncertain (−1)"]]) current.add(new Option(t, v));
    for (const [v, t] of [["", "no change"], ["1", "present (1)"], ["0", "absent (0)"]]) edit.add(new Option(t, v));
    current.dataset.condition = edit.dataset.condition = condition;
    $("findings-rows").append(row);
  }
}

function labels(prefix) {
  const out = {};
  for (const select of document.querySelectorAll(`#findings-rows select[id^="${prefix}-"]`))
    if (select.value !== "") out[select.dataset.condition] = Number(select.value);
  return out;
}

function clearPreview() {
  chosen = null;
  $("preview-figure").hidden = true;
  $("preview").removeAttribute("src");
  delete $("preview").dataset.ready;
  $("image").value = "";
}

async function choose(file) {
  if (!file) return;
  clearPreview();
  clearFieldError("image");
  $("preview-figure").hidden = false;
  $("preview-caption").textContent = `${file.name} (${Math.round(file.size / 1024)} KiB)`;
  const head = new Uint8Array(await file.slice(128, 132).arrayBuffer());
  const dicom = String.fromCharCode(...head) === "DICM";
  let blob = file;
  if (dicom) {
    const body = new FormData(); body.append("image", file);
    const response = await api("/preview", { method: "POST", body });
    if (!response.ok) { clearPreview(); await showError(response); return; }
    blob = await response.blob();
    $("preview-caption").textContent += " — DICOM, shown as the model will see it";
  }
  $("preview").src = objectUrl(blob);
  $("preview").dataset.ready = "true";
  chosen = { file, display: blob };
}
let chosen = null;

async function submit(event) {
  event.preventDefault();
  sessionStorage.setItem("prism-api-key", $("api-key").value);
  const byPrompts = document.querySelector('input[name="mode"]:checked').value === "prompts";
  const missing = [];
  if (!chosen && !$("error-image").textContent) missing.push(["image", "Choose an image first."]);
  if (byPrompts && !$("original_prompt").value.trim()) missing.push(["original_prompt", "Required: describe what the image shows."]);
  if (byPrompts && !$("edit_prompt").value.trim()) missing.push(["edit_prompt", "Required: describe what the counterfactual should show."]);
  if (!chosen || missing.length) {
    for (const [name, text] of missing) fieldError(name, text);
    showMessage("Some fields need a change.", [], true);
    (chosen ? $(missing[0][0]) : $("drop")).focus();
    return;
  }
  clearErrors();
  const body = new FormData();
  body.append("image", chosen.file, chosen.file.name);
  if (!byPrompts) {
    body.append("findings", JSON.stringify(labels("f")));
    body.append("edit", JSON.stringify(labels("e")));
  } else {
    body.append("original_prompt", $("original_prompt").value);
    body.append("edit_prompt", $("edit_prompt").value);
  }
  for (const input of $("advanced-fields").querySelectorAll("input, select")) {
    if (input.type === "file") { if (input.files.length) body.append(input.name, input.files[0], input.files[0].name); }
    else if (input.value !== defaults[input.name]) body.append(input.name, input.value);
  }
  $("submit").disabled = true;
  const response = await api("/counterfactual", { method: "POST", body });
  if (response.status !== 202) { $("submit").disabled = false; await showError(response); return; }
  job = await response.json();
  const every = 1000 * Number(response.headers.get("Retry-After") || 2);
  $("results").hidden = true;
  $("progress-section").hidden = false;
  $("cancel").disabled = false;
  follow(every);
}

async function follow(every) {
  const response = await api(`/jobs/${job.id}`);
  if (!response.ok) { await showError(response); pollTimer = setTimeout(() => follow(every), every); return; }
  const status = await response.json();
  const { phase, step, total } = status.progress;
  $("progress").max = Math.max(total, 1); $("progress").value = step;
  $("progress-text").textContent = `${status.status}${phase ? ` — ${PHASES[phase] || phase}, step ${step} of ${total}` : ""}`;
  if (["succeeded", "failed", "canceled"].includes(status.status)) {
    $("submit").disabled = false; $("cancel").disabled = true;
    if (status.status === "succeeded") await showResult(status);
    else if (status.status === "failed") showMessage(`The job failed: ${status.error.message}`, [`code: ${status.error.code}`]);
    else showMessage("The job was canceled.");
    return;
  }
  pollTimer = setTimeout(() => follow(every), every);
}

async function cancel() {
  if (!job) return;
  const response = await api(`/jobs/${job.id}/cancel`, { method: "POST" });
  if (!response.ok && response.status !== 409) await showError(response);
}

async function file(status, name) {
  const response = await api(status.result.files[name]);
  if (!response.ok) throw new Error(`${name}: ${response.status}`);
  return response.blob();
}

function loadImage(img, url) {
  return new Promise((resolve) => { img.onload = () => resolve(img); img.src = url; });
}

async function showResult(status) {
  const r = status.result;
  const [counterfactual, difference] = await Promise.all([file(status, "counterfactual.png"), file(status, "difference.png")]);
  const input = objectUrl(chosen.display), cf = objectUrl(counterfactual), diff = objectUrl(difference);
  await Promise.all([
    loadImage($("input-img"), input), loadImage($("counterfactual-img"), cf), loadImage($("difference-img"), diff),
    loadImage($("compare-before"), input), loadImage($("compare-after"), cf),
    loadImage($("overlay-base"), input), loadImage($("overlay-diff"), diff),
  ]);
  $("score-value").textContent = r.s_clip.toFixed(3);
  $("score-verdict").textContent = r.passed ? `passes (≥ ${r.s_clip_threshold})` : `below PRISM's threshold of ${r.s_clip_threshold}`;
  $("score-verdict").className = r.passed ? "pass" : "fail";
  $("candidates").textContent = "";
  for (const c of r.candidates) {
    const row = $("candidates").insertRow();
    row.insertCell().textContent = c.self_replace_steps;
    row.insertCell().textContent = c.s_clip.toFixed(3);
    row.insertCell().textContent = c.self_replace_steps === r.chosen_self_replace ? "yes" : "";
  }
  $("timings").textContent = "";
  for (const [phase, seconds] of Object.entries(r.timings)) {
    const row = $("timings").insertRow();
    row.insertCell().textContent = TIMINGS[phase] || phase;
    row.insertCell().textContent = seconds.toFixed(2);
  }
  $("files").textContent = "";
  for (const name of Object.keys(r.files)) {
    const li = document.createElement("li"); const a = document.createElement("a");
    a.href = "#"; a.textContent = name;
    a.addEventListener("click", async (e) => {
      e.preventDefault();
      const link = document.createElement("a"); link.href = objectUrl(await file(status, name)); link.download = name; link.click();
    });
    li.append(a); $("files").append(li);
  }
  $("results").hidden = false;
  $("results").dataset.job = status.id;
  fit();
}

function applyView() {
  for (const img of document.querySelectorAll(".viewport img"))
    img.style.transform = `translate(${view.x}px, ${view.y}px) scale(${view.scale})`;
}

function fit() {
  const viewport = document.querySelector(".viewport"), img = $("input-img");
  if (!img.naturalWidth) return;
  view.scale = Math.min(viewport.clientWidth / img.naturalWidth, viewport.clientHeight / img.naturalHeight);
  view.x = (viewport.clientWidth - img.naturalWidth * view.scale) / 2; view.y = 0;
  applyView();
}

function zoom(factor, cx, cy) {
  view.x = cx - (cx - view.x) * factor; view.y = cy - (cy - view.y) * factor; view.scale *= factor;
  applyView();
}

function wireViewports() {
  for (const viewport of document.querySelectorAll(".viewport")) {
    viewport.addEventListener("wheel", (e) => {
      e.preventDefault();
      const box = viewport.getBoundingClientRect();
      zoom(e.deltaY < 0 ? 1.2 : 1 / 1.2, e.clientX - box.left, e.clientY - box.top);
    }, { passive: false });
    let drag = null;
    viewport.addEventListener("pointerdown", (e) => { drag = { x: e.clientX - view.x, y: e.clientY - view.y }; viewport.setPointerCapture(e.pointerId); });
    viewport.addEventListener("pointermove", (e) => { if (drag) { view.x = e.clientX - drag.x; view.y = e.clientY - drag.y; applyView(); } });
    viewport.addEventListener("pointerup", () => { drag = null; });
    viewport.addEventListener("keydown", (e) => {
      const step = { ArrowLeft: [40, 0], ArrowRight: [-40, 0], ArrowUp: [0, 40], ArrowDown: [0, -40] }[e.key];
      if (step) { e.preventDefault(); view.x += step[0]; view.y += step[1]; applyView(); }
      if (e.key === "+" || e.key === "=") zoom(1.2, viewport.clientWidth / 2, viewport.clientHeight / 2);
      if (e.key === "-") zoom(1 / 1.2, viewport.clientWidth / 2, viewport.clientHeight / 2);
    });
  }
  const centre = () => { const v = document.querySelector(".viewport"); return [v.clientWidth / 2, v.clientHeight / 2]; };
  $("zoom-in").addEventListener("click", () => zoom(1.25, ...centre()));
  $("zoom-out").addEventListener("click", () => zoom(0.8, ...centre()));
  $("zoom-reset").addEventListener("click", fit);
}

function wire() {
  const drop = $("drop"), picker = $("image");
  drop.addEventListener("click", () => picker.click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); picker.click(); } });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); choose(e.dataTransfer.files[0]); });
  picker.addEventListener("change", () => choose(picker.files[0]));
  for (const radio of document.querySelectorAll('input[name="mode"]'))
    radio.addEventListener("change", () => {
      const f = radio.value === "findings" && radio.checked;
      if (radio.checked) { $("findings").hidden = !f; $("prompts").hidden = f; }
      for (const name of ["original_prompt", "edit_prompt", "findings", "edit"]) clearFieldError(name);
    });
  for (const kind of ["input", "change"])  // also for the advanced fields, built later from the schema
    $("job-form").addEventListener(kind, (e) => { if (e.target.name) clearFieldError(e.target.name); });
  $("findings-rows").addEventListener("change", () => { clearFieldError("findings"); clearFieldError("edit"); });
  $("job-form").addEventListener("submit", submit);
  $("cancel").addEventListener("click", cancel);
  $("compare-slider").addEventListener("input", (e) => { $("compare-after").style.clipPath = `inset(0 ${100 - e.target.value}% 0 0)`; });
  $("overlay-opacity").addEventListener("input", (e) => { $("overlay-diff").style.opacity = e.target.value / 100; });
  $("compare-after").style.clipPath = "inset(0 50% 0 0)";
  $("overlay-diff").style.opacity = 0.5;
  wireViewports();
}

wire();
buildForm().then(() => { document.body.dataset.ready = "true"; });
