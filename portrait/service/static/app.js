// The portrait studio page: plain JS over the /v1 API (no build step, nothing from a CDN).
//
// Two rules keep it from acting on the wrong thing:
// - The identity panel is drawn for one identity (its id and name are stored on the panel);
//   every action reads them from there at the moment it runs, names the identity on its
//   button and in its confirmation, and is checked again against the panel before it sends.
// - An upload that is refused creates nothing: the page shows only that upload's report, in
//   its own panel, with no identity's buttons; the identity shown before stays as it was.
// Every sentence a customer reads is written here, for the page; the server's codes (reasons,
// error kinds) are looked up in the tables below.
"use strict";
const $ = (sel) => document.querySelector(sel);
const ui = { token: localStorage.getItem("portraitToken") || "", me: null, identities: [], identity: null,
             template: null, templates: [], backends: [], presets: [], packages: [], genJob: null, blobs: [],
             results: { page: 1, pages: 1, job: null, selected: new Set() }, poller: null };

// -- words for the page ---------------------------------------------------------------------------

const PHOTO_WORDS = {
  unreadable: "We could not open this file as a photo.",
  too_large: "This file is too large.",
  too_small: "This photo is too small; use a larger one.",
  no_face: "We could not find a face in this photo.",
  face_too_small: "The face is too small in this photo; use a closer shot.",
  other_person: "This looks like someone else than the person in most of your photos.",
  duplicate: "This is the same picture as another one you uploaded.",
  blurry: "This photo is blurry.",
  bad_pose: "The head is turned too far from the camera.",
  bad_exposure: "This photo is too dark or too bright.",
  unsafe_name: "This file in the zip has an unsafe name; it was skipped.",
};
const KEEP_WORDS = {
  no_face: "no face", extra_faces: "more than one face", face_too_small: "face too small",
  face_too_large: "face cropped too close", below_gate: "not enough likeness", copy_paste: "a copy of an uploaded photo",
  blurry: "blurry face", bad_exposure: "face too dark or bright",
};
const PHASE_WORDS = { "reading photos": "Reading photo", "finding faces": "Looking for the face in photo",
                      "preparing images": "Preparing photo" };

function photoWords(row) {
  const words = PHOTO_WORDS[row.reason] || "This photo cannot be used.";
  // a duplicate names the twin as the customer named it
  return row.reason === "duplicate" && row.detail ? `${words} (${row.detail.replace(/^same picture as /, "same as ")})` : words;
}

function jobErrorWords(job) {
  switch (job.error_kind) {
    case "cancelled": return "Cancelled.";
    case "model_missing": return "A model this job needs is not installed on this server; the studio's operator can install it.";
    case "not_kept": return "No portrait passed every check within the tries allowed: " + (job.error || "").replace(/^.*?: kept/, "kept");
    case "bad_input": return "This job could not run: " + (job.error || "");
    default: return "Something went wrong on the server; the studio's operator can see what.";
  }
}

// What a job was asked to do and could not (the server's warnings), in the page's words.
function warningWords(warning) {
  if (warning.startsWith("face restoration was asked for and skipped"))
    return "Face restoration was asked for, but this server cannot run it; the portraits were made without it.";
  return warning;
}

async function showWarnings(jobId, what) {
  try {
    const results = await api(`/v1/jobs/${jobId}/results`);
    const words = (results.warnings || []).map(warningWords);
    if (words.length) $(`#${what}-status`).textContent += " · " + words.join(" ");
  } catch (_) { /* the job's own status already says what went wrong */ }
}

function keepWords(report) {
  const dropped = Object.entries(report.reasons || {}).map(([k, n]) => `${KEEP_WORDS[k] || k} (${n})`).join(", ");
  const head = `${report.kept} of ${report.wanted} kept, ${report.tried} tried`;
  return (report.complete ? head : `${head}: fewer than asked, the tries allowed ran out`) + (dropped ? ` · set aside: ${dropped}` : "");
}

// -- the API ---------------------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (ui.token) headers.Authorization = "Bearer " + ui.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const body = isJson ? await response.json() : await response.blob();
  if (!response.ok) {
    const err = new Error(isJson ? body.detail : response.statusText);
    err.status = response.status; err.body = body;
    if (response.status === 401) showLogin(ui.token ? "That access token was not accepted. Check it, or ask your studio for a new one." : "");
    throw err;
  }
  return body;
}

const post = (path, body) => api(path, { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });

async function blobUrl(path) {
  const url = URL.createObjectURL(await api(path));
  ui.blobs.push(url);
  return url;
}

function say(text, ok = false) {
  const box = $("#message");
  box.textContent = text; box.hidden = !text; box.className = ok ? "ok" : "";
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function showLogin(text) {
  $("#login").hidden = false; $("#sign-out").hidden = true;
  $("#whoami").textContent = text || "Sign in with the access token your studio gave you.";
  $("#whoami").className = text ? "warn" : "muted";
}

// -- identities ---------------------------------------------------------------------------------

async function loadIdentities() {
  ui.identities = await api("/v1/identities");
  const list = $("#identities");
  const current = ui.identity;  // the one last opened: it stays marked while an upload has the screen
  list.replaceChildren(...ui.identities.map((i) => el("li",
    { class: current && current.id === i.id ? "selected" : "", "data-id": i.id,
      onclick: () => select(i.id).catch((err) => say(err.message)) },
    el("span", {}, i.name), el("span", { class: "badge " + i.state }, i.state))));
  if (!ui.identities.length) list.append(el("li", { class: "muted" }, "none yet"));
}

// The identity the panel shows (null when the panel is hidden): what every action acts on.
function panelIdentity() {
  const panel = $("#identity-panel");
  if (panel.hidden || !panel.dataset.identity) return null;
  return { id: panel.dataset.identity, name: panel.dataset.name };
}

// An action's target, checked once more just before it is sent.
function target() {
  const who = panelIdentity();
  if (!who || !ui.identity || ui.identity.id !== who.id) throw new Error("Choose an identity first.");
  return who;
}

function renderReport(report, contactUrl) {
  const rows = report.photos.map((p) => {
    const img = el("img", { alt: "" });
    if (p.thumbnail) blobUrl(p.thumbnail).then((u) => { img.src = u; }).catch(() => {});
    return el("tr", { "data-reason": p.reason || "" }, el("td", {}, img), el("td", {}, p.path),
      el("td", { class: p.status }, p.status === "kept" ? "used" : "not used"),
      el("td", {}, p.status === "kept" ? "" : photoWords(p)));
  });
  $("#report tbody").replaceChildren(...rows);
  $("#report-summary").textContent = `Photo check: ${report.kept} used, ${report.rejected} not used`;
  if (contactUrl) blobUrl(contactUrl).then((u) => { $("#contact-sheet").src = u; $("#contact-sheet-link").href = u; }).catch(() => {});
  else $("#contact-sheet").removeAttribute("src");
}

async function select(id) {
  const identity = await api(`/v1/identities/${id}`);
  ui.identity = identity;
  localStorage.setItem("portraitIdentity", identity.id);
  const panel = $("#identity-panel");
  panel.dataset.identity = identity.id; panel.dataset.name = identity.name;
  panel.hidden = false; $("#empty-panel").hidden = true; $("#upload-panel").hidden = true;
  $("#identity-title").textContent = identity.name;
  for (const [sel, words] of [["#delete-identity", `Delete ${identity.name}…`], ["#train-button", `Train ${identity.name}`],
                              ["#shoot-button", `Start ${identity.name}'s shoot`], ["#generate-button", `Generate for ${identity.name}`]]) {
    $(sel).textContent = words;
  }
  setState(identity.state);
  renderReport(identity.report, identity.contact_sheet);
  $("#report-box").open = false;
  $("#gallery").replaceChildren(); $("#download").disabled = true; ui.genJob = null;
  setBar("#train-bar", identity.state === "ready" ? 1 : 0, identity.state === "ready" ? "done" : "");
  $("#train-status").textContent = identity.state === "ready" ? trainedText(identity) : "";
  for (const what of ["generate", "shoot"]) { setBar(`#${what}-bar`, 0, ""); $(`#${what}-status`).textContent = ""; }
  fillBackends();
  if (identity.state === "training" && identity.train_job) watchTrain(identity.train_job, identity.id);
  ui.results = { page: 1, pages: 1, job: null, selected: new Set() };
  await loadIdentities();
  await loadResults();
}

function setState(state) {
  const badge = $("#identity-state");
  badge.textContent = state; badge.className = "badge " + state;
  $("#train-button").disabled = state === "ready" || state === "training";
  const canMake = state === "ready" || state === "training";
  $("#generate-button").disabled = !canMake; $("#shoot-button").disabled = !canMake;
}

function hasLora(identity) { return !!(identity && identity.trained && identity.trained.lora && identity.trained.lora.length); }

function trainedText(identity) {
  const t = identity.trained || {};
  return hasLora(identity) ? `trained: LoRA (${t.lora.join(", ")}), ${t.steps} steps` : "ready for the zero-shot backends";
}

// -- uploads: each photo's progress, then its verdict -------------------------------------------

function photoItem(file) {
  const img = el("img", { alt: "" });
  if (file.type.startsWith("image/")) { const url = URL.createObjectURL(file); ui.blobs.push(url); img.src = url; }
  const status = el("span", { class: "status" }, "waiting to upload");
  const why = el("span", { class: "why" });
  const item = el("li", { "data-name": file.name }, img, el("b", {}, file.name), status, why);
  return { file, item, status, why };
}

function setPhoto(entry, state, text, why = "") {
  entry.item.className = state; entry.status.textContent = text; entry.why.textContent = why;
}

$("#upload").addEventListener("submit", (event) => {
  event.preventDefault();
  const name = $("#identity-name").value.trim();
  const files = [...$("#photos").files];
  if (!name || !files.length) return;
  const entries = files.map(photoItem);
  const byName = Object.fromEntries(entries.map((e) => [e.file.name, e]));
  // The upload has its own panel; the identity shown before is hidden, not changed.
  $("#identity-panel").hidden = true; $("#empty-panel").hidden = true;
  $("#upload-panel").hidden = false;
  $("#upload-title").textContent = `Checking ${files.length} photo${files.length > 1 ? "s" : ""} for ${name}`;
  $("#upload-summary").textContent = "Uploading…";
  $("#upload-photos").replaceChildren(...entries.map((e) => e.item));
  setBar("#upload-bar", 0, "");
  $("#upload-button").disabled = true; say("");
  const form = new FormData();
  form.append("name", name);
  for (const file of files) form.append("files", file, file.name);
  const xhr = new XMLHttpRequest();
  xhr.open("POST", "/v1/identities?stream=true");
  if (ui.token) xhr.setRequestHeader("Authorization", "Bearer " + ui.token);
  let seen = 0, received = [];
  xhr.upload.onprogress = (e) => {
    if (!e.lengthComputable) return;
    let before = 0;
    for (const entry of entries) {  // each photo is sent when the bytes before it and its own are
      const share = (e.loaded - before) / entry.file.size;
      if (share >= 1) setPhoto(entry, "sent", "uploaded, waiting for the check");
      else if (share > 0) setPhoto(entry, "sending", `uploading ${Math.round(share * 100)}%`);
      before += entry.file.size;
    }
    setBar("#upload-bar", 0.5 * e.loaded / e.total, "");
  };
  const handle = (event) => {
    if (event.event === "screened") {
      received = event.photos.filter((p) => p.status === "received").map((p) => p.name);
      for (const p of event.photos) {
        const entry = byName[p.name] || byName[p.name.split("::").pop()];
        if (!entry) continue;
        if (p.status === "rejected") setPhoto(entry, "rejected", "not used", PHOTO_WORDS[p.reason] || "");
        else setPhoto(entry, "checking", "received, checking…");
      }
      $("#upload-summary").textContent = "Checking the photos…";
    } else if (event.event === "checking") {
      const label = PHASE_WORDS[event.phase] || event.phase;
      $("#upload-summary").textContent = `${label} ${event.done} of ${event.total}…`;
      if (event.phase === "reading photos") {
        const entry = byName[received[event.done - 1]];
        if (entry) setPhoto(entry, "checking", "read, looking for the face…");
      }
      setBar("#upload-bar", 0.5 + 0.5 * event.done / Math.max(event.total, 1) * (event.phase === "preparing images" ? 1 : 0.8), "");
    } else if (event.event === "created" || event.event === "rejected") {
      const report = event.event === "created" ? event.identity.report : event.report;
      const usable = event.event === "created" ? "used" : "usable";  // a refused upload used nothing
      for (const row of report.photos) {
        const entry = byName[row.path] || byName[row.path.split("::").pop()];
        if (entry) setPhoto(entry, row.status, row.status === "kept" ? usable : "not used", row.status === "kept" ? "" : photoWords(row));
      }
      setBar("#upload-bar", 1, event.event === "created" ? "done" : "failed");
      if (event.event === "created") uploaded(event.identity);
      else refused(name, report);
    } else if (event.event === "error") {
      setBar("#upload-bar", 1, "failed");
      uploadFailed(name, event.status, event.detail);
    }
  };
  xhr.onprogress = () => {
    if (xhr.status !== 200) return;
    const lines = xhr.responseText.split("\n");
    for (; seen < lines.length - 1; seen++) if (lines[seen].trim()) handle(JSON.parse(lines[seen]));
  };
  xhr.onload = () => {
    $("#upload-button").disabled = false;
    if (xhr.status === 200) { xhr.onprogress(); const rest = xhr.responseText.split("\n")[seen]; if (rest && rest.trim()) handle(JSON.parse(rest)); return; }
    let detail = xhr.statusText;
    try { detail = JSON.parse(xhr.responseText).detail; } catch (_) { /* not JSON */ }
    if (xhr.status === 401) showLogin("That access token was not accepted. Check it, or ask your studio for a new one.");
    setBar("#upload-bar", 1, "failed");
    uploadFailed(name, xhr.status, detail);
  };
  xhr.onerror = () => { $("#upload-button").disabled = false; uploadFailed(name, 0, "the server could not be reached"); };
  xhr.send(form);
});

async function uploaded(identity) {
  say(`${identity.name}: ${identity.report.kept} photos used, ${identity.report.rejected} not used.`, true);
  $("#upload").reset();
  await select(identity.id);
}

function refused(name, report) {
  const need = ui.me ? ui.me.min_photos : null;
  $("#upload-title").textContent = `${name} was not created`;
  $("#upload-summary").textContent = `Only ${report.kept} of ${report.photos.length} photos can be used` +
    (need ? `; at least ${need} photos of the same person are needed.` : ".") +
    " Nothing was saved. Add more photos of the same person and upload again.";
  say("");
}

function uploadFailed(name, status, detail) {
  $("#upload-title").textContent = `${name} was not created`;
  const words = status === 409 ? `You already have an identity named ${name}; choose another name.`
    : status === 413 ? "These files are too large to upload at once; send fewer or smaller photos."
    : status === 429 ? `Your studio's limit is reached: ${detail}`
    : `The photos could not be checked: ${detail}`;
  $("#upload-summary").textContent = words;
  for (const item of document.querySelectorAll("#upload-photos li:not(.rejected):not(.kept)")) {
    item.className = "stopped"; item.querySelector(".status").textContent = "not checked";
  }
}

$("#upload-close").addEventListener("click", async () => {
  $("#upload-panel").hidden = true;
  // back to the identity that was shown before the upload, unchanged
  if (ui.identity && ui.identities.some((i) => i.id === ui.identity.id)) await select(ui.identity.id);
  else $("#empty-panel").hidden = false;
});

// -- delete ------------------------------------------------------------------------------------------

$("#delete-identity").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  if (!confirm(`Delete ${who.name}? Photos, crops, embeddings, LoRA and every portrait made from them are erased.`)) return;
  try {
    const gone = await api(`/v1/identities/${who.id}`, { method: "DELETE" });
    const removed = gone.removed || {};
    say(`${who.name} deleted (${removed.files ?? gone.files_removed} files, ${removed.jobs ?? gone.jobs_deleted} jobs).`, true);
    ui.identity = null; localStorage.removeItem("portraitIdentity");
    $("#identity-panel").hidden = true; $("#identity-panel").dataset.identity = ""; $("#empty-panel").hidden = false;
    await loadIdentities(); await loadQueue();
  } catch (err) { say(err.message); }
});

// -- jobs and progress --------------------------------------------------------------------------------

function setBar(sel, fraction, cls) {
  const bar = $(sel);
  bar.style.width = `${Math.round(fraction * 100)}%`; bar.className = "bar " + (cls || "");
}

function progressText(job) {
  const p = job.progress;
  const steps = p.total ? ` ${p.step}/${p.total}` : "";
  const eta = p.eta_seconds != null && job.state !== "done" ? ` · about ${Math.ceil(p.eta_seconds)} s left` : "";
  return `${job.state}${p.phase && p.phase !== job.state ? " · " + p.phase : ""}${steps}${eta}`;
}

const SETTLED = ["done", "failed", "cancelled"];

// Follow a job; `owner` is the identity it was started for: its bars update only while that
// identity is the one on screen.
function watch(jobId, owner, what, onEnd) {
  const tick = async () => {
    let job;
    try { job = await api(`/v1/jobs/${jobId}`); } catch (err) { return; }
    const mine = panelIdentity() && panelIdentity().id === owner;
    const settled = SETTLED.includes(job.state);
    if (mine) {
      setBar(`#${what}-bar`, settled ? 1 : job.progress.fraction, settled ? job.state : "");
      $(`#${what}-status`).textContent = job.state === "failed" || job.state === "cancelled" ? jobErrorWords(job) : progressText(job);
    }
    if (settled) { onEnd(job, mine); loadQueue(); } else setTimeout(tick, 400);
  };
  tick();
}

function watchTrain(jobId, owner) {
  setState("training");
  watch(jobId, owner, "train", async (job, mine) => {
    if (mine) {
      const identity = await api(`/v1/identities/${owner}`);
      ui.identity = identity; setState(identity.state); fillBackends();
      if (job.state === "done") $("#train-status").textContent = "done · " + trainedText(identity);
    }
    loadIdentities();
  });
}

$("#train-button").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  const zeroShot = document.querySelector("input[name=train-mode]:checked").value === "zero-shot";
  const steps = parseInt($("#train-steps").value, 10);
  try {
    const job = await post("/v1/jobs/train", { identity: who.id, zero_shot: zeroShot, steps: Number.isFinite(steps) ? steps : null });
    say(""); watchTrain(job.id, who.id); loadQueue();
  } catch (err) { say(err.message); }
});

// -- what this server runs: backends and their options (from /v1/backends and /v1/presets) ----------

function serverFamily() {
  const preset = ui.presets.find((p) => p.name === (ui.me && ui.me.preset));
  return preset ? preset.family : (ui.me && ui.me.family);
}

// The backends this server's preset runs that take a prompt, and that this identity can use.
function usableBackends(identity, photo = false) {
  const family = serverFamily();
  return ui.backends.filter((b) => b.families.includes(family) && b.photo_template === photo
                                   && (!b.needs_lora || hasLora(identity)));
}

function fillBackends() {
  const select = $("#backend");
  const keep = select.dataset.chosen;  // what the operator picked, if anything; else the server's default
  const usable = usableBackends(ui.identity);
  select.replaceChildren(...usable.map((b) => el("option", { value: b.name, title: b.help }, b.name)));
  const preferred = usable.find((b) => b.name === keep) || usable.find((b) => ui.me && b.name === ui.me.default_backend) || usable[0];
  if (preferred) select.value = preferred.name;
  renderOptions();
  for (const card of document.querySelectorAll(".template")) {
    const photo = card.dataset.kind === "photo";
    const ok = photo ? usableBackends(ui.identity, true).length > 0 : usable.length > 0;
    card.classList.toggle("unavailable", !ok);
    card.title = ok ? card.dataset.about : "Not available for this identity on this server (it needs a trained LoRA or another model family).";
  }
}

// One control per option a tenant may set (not the operator's, not an uploaded image), from the
// backend's JSON schema: numbers with their bounds, switches, choices.
function renderOptions() {
  const spec = ui.backends.find((b) => b.name === $("#backend").value);
  const box = $("#backend-options");
  box.replaceChildren();
  $("#backend-help").textContent = spec ? `${spec.name}: ${spec.help}` : "No backend runs here for this identity.";
  if (!spec) return;
  for (const [key, prop] of Object.entries(spec.options.properties || {})) {
    if (prop.tenant === false || prop.tenant === "asset") continue;
    let input = null;
    if (prop.enum) {
      input = el("select", {}, ...prop.enum.map((v) => el("option", { value: v, selected: v === prop.default }, v)));
    } else if (prop.type === "integer" || prop.type === "number") {
      input = el("input", { type: "number", min: prop.minimum ?? prop.exclusiveMinimum, max: prop.maximum ?? prop.exclusiveMaximum,
                            step: prop.type === "integer" ? 1 : "any", value: prop.default ?? "" });
    } else if (prop.type === "boolean") {
      input = el("input", { type: "checkbox", checked: !!prop.default });
    } else continue;  // lists and mappings (regions, finish) are not page controls
    input.dataset.option = key; input.dataset.kind = prop.type || "string";
    input.addEventListener("change", () => { input.dataset.touched = "1"; });
    box.append(el("label", { title: prop.description || "" }, key.replace(/_/g, " "), input));
  }
}

function chosenOptions() {
  const out = {};
  for (const input of document.querySelectorAll("#backend-options [data-option]")) {
    if (!input.dataset.touched) continue;  // only what the operator changed; defaults stay the backend's
    const kind = input.dataset.kind;
    out[input.dataset.option] = kind === "boolean" ? input.checked : kind === "integer" ? parseInt(input.value, 10)
      : kind === "number" ? parseFloat(input.value) : input.value;
  }
  return out;
}

const num = (sel, parse = parseInt) => { const v = parse($(sel).value, 10); return Number.isFinite(v) ? v : null; };

// The advanced fold's settings, as request fields.
function advanced(body) {
  body.seed = num("#seed") ?? 0;
  for (const [key, sel, parse] of [["steps", "#steps", parseInt], ["guidance", "#guidance", parseFloat],
                                   ["upscale_factor", "#upscale-factor", parseFloat]]) {
    const v = num(sel, parse); if (v !== null) body[key] = v;
  }
  const w = num("#width"), h = num("#height");
  if (w !== null && h !== null) body.size = [w, h];
  const finish = {};
  for (const stage of ["fuse", "retouch", "upscale"]) if (!$(`#finish-${stage}`).checked) finish[stage] = false;
  if ($("#finish-restore").checked) finish.restore = true;
  if (Object.keys(finish).length) body.finish = finish;
  const options = chosenOptions();
  if (Object.keys(options).length) body.options = options;
  if ($("#backend").value) body.backend = $("#backend").value;
  return body;
}

function keepFields(body, keep) {
  if (keep) { body.keep = keep; const a = num("#attempts"); if (a !== null) body.attempts = a; }
  else body.count = num("#count") || 1;
  return body;
}

// -- a shoot ------------------------------------------------------------------------------------------

async function loadPackages() {
  ui.packages = await api("/v1/packages");
  $("#package").replaceChildren(...ui.packages.map((p) => el("option", { value: p.name }, p.title)));
  renderPackage();
}

function renderPackage() {
  const pack = ui.packages.find((p) => p.name === $("#package").value);
  const box = $("#package-choices");
  box.replaceChildren();
  if (!pack) return;
  $("#package-about").textContent = pack.description;
  for (const [dim, entries] of [["backdrops", pack.backdrops], ["outfits", pack.outfits], ["poses", pack.poses]]) {
    if (!entries.length) continue;
    box.append(el("fieldset", { id: `choose-${dim}` }, el("legend", {}, dim),
      ...entries.map((e, i) => el("label", { class: "choice" },
        el("span", {}, el("input", { type: "checkbox", value: e.name, "data-dim": dim, checked: i === 0, onchange: planShoot }),
           ` ${e.title || e.name}`)))));
  }
  planShoot();
}

function chosen(dim) { return [...document.querySelectorAll(`#package-choices input[data-dim=${dim}]:checked`)].map((i) => i.value); }

function planShoot() {
  const pack = ui.packages.find((p) => p.name === $("#package").value);
  if (!pack) return;
  const dims = ["backdrops", "outfits"].concat(pack.poses.length ? ["poses"] : []);
  const cells = dims.reduce((n, d) => n * chosen(d).length, 1);
  const keep = num("#keep") || 0;
  $("#shoot-plan").textContent = cells ? `${cells} combination${cells > 1 ? "s" : ""} × ${keep} portrait${keep === 1 ? "" : "s"} = ${cells * keep} portraits`
                                        : "Choose at least one of each.";
  $("#shoot-button").disabled = !cells || !keep || !(ui.identity && ["ready", "training"].includes(ui.identity.state));
}

$("#package").addEventListener("change", renderPackage);
$("#keep").addEventListener("input", planShoot);

$("#shoot-button").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  const pack = $("#package").value;
  const body = advanced({ identity: who.id, package: pack, backdrops: chosen("backdrops"), outfits: chosen("outfits") });
  if (ui.packages.find((p) => p.name === pack).poses.length) body.poses = chosen("poses");
  keepFields(body, num("#keep"));
  try {
    const job = await post("/v1/jobs/shoot", body);
    say(""); loadQueue();
    watch(job.id, who.id, "shoot", (done, mine) => { if (mine) { showJob(done.id); showWarnings(done.id, "shoot"); } });
  } catch (err) { say(err.message); }
});

// -- single portraits -----------------------------------------------------------------------------------

async function loadTemplates() {
  ui.templates = await api("/v1/templates");
  const box = $("#templates");
  box.replaceChildren(...ui.templates.map((t) => {
    const img = el("img", { alt: t.title });
    blobUrl(t.preview).then((u) => { img.src = u; }).catch(() => {});
    return el("div", { class: "template", "data-name": t.name, "data-kind": t.kind, "data-about": t.description || t.title,
                       title: t.description || t.title, onclick: () => pickTemplate(t.name) }, img, el("div", {}, t.title));
  }));
  pickTemplate(ui.templates.length ? ui.templates[0].name : null);
}

function pickTemplate(name) {
  ui.template = name;
  for (const card of document.querySelectorAll(".template")) card.classList.toggle("selected", card.dataset.name === name);
}

$("#backend").addEventListener("change", () => { $("#backend").dataset.chosen = $("#backend").value; renderOptions(); });

$("#generate-button").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  const prompt = $("#prompt").value.trim();
  const body = advanced({ identity: who.id });
  if (prompt) body.prompt = prompt; else body.template = ui.template;
  const chosenTemplate = ui.templates.find((t) => t.name === ui.template);
  if (!prompt && chosenTemplate && chosenTemplate.kind === "photo") {
    const photo = usableBackends(ui.identity, true)[0];
    if (photo) body.backend = photo.name; else delete body.backend;
  }
  keepFields(body, $("#generate-keep").checked ? (num("#count") || 1) : null);
  try {
    const job = await post("/v1/jobs/generate", body);
    ui.genJob = job.id; say(""); $("#gallery").replaceChildren(); $("#download").disabled = true;
    watch(job.id, who.id, "generate", (done, mine) => {
      if (mine) { showGallery(done.id); loadResults(); showWarnings(done.id, "generate"); }
    });
    loadQueue();
  } catch (err) { say(err.message); }
});

function likeness(item) {
  if (item.similarity == null || item.faces === 0) return el("span", { class: "gate-fail" }, "no face found");
  return el("span", { class: item.passed_gate ? "gate-pass" : "gate-fail",
                      title: "Likeness: how close the face is to the person's photos, measured by a face recognizer the generator did not use. The check passes above the recognizer's same-person threshold." },
    item.passed_gate ? `passed the likeness check (${item.similarity.toFixed(2)})` : `below the likeness check (${item.similarity.toFixed(2)})`);
}

async function showGallery(jobId) {
  const results = await api(`/v1/jobs/${jobId}/results`);
  const shots = results.images.map((image) => {
    const img = el("img", { alt: `rank ${image.rank}` });
    blobUrl(image.url).then((u) => { img.src = u; }).catch(() => {});
    return el("figure", { class: "shot", "data-rank": image.rank }, img,
      el("figcaption", {}, el("b", {}, `#${image.rank} `), likeness(image),
        el("div", { class: "muted" }, `${image.backend} · ${image.cell || image.template || "prompt"} · seed ${image.seed}`)));
  });
  $("#gallery").replaceChildren(...shots);
  $("#download").disabled = !results.images.length;
  ui.genJob = jobId;
}

$("#download").addEventListener("click", async () => {
  try { download(await blobUrl(`/v1/jobs/${ui.genJob}/zip`), `portrait-${ui.genJob}.zip`); } catch (err) { say(err.message); }
});

function download(url, name) {
  const a = el("a", { href: url, download: name });
  document.body.append(a); a.click(); a.remove();
}

// -- the results history of the identity on screen ---------------------------------------------------------

async function loadResults() {
  const who = panelIdentity();
  if (!who) return;
  const r = ui.results;
  const query = new URLSearchParams({ page: r.page, per_page: 24 });
  if (r.job) query.set("job", r.job);
  if ($("#results-starred").checked) query.set("starred", "true");
  let page;
  try { page = await api(`/v1/identities/${who.id}/results?${query}`); } catch (err) { say(err.message); return; }
  if (!panelIdentity() || panelIdentity().id !== who.id) return;  // another identity was opened meanwhile
  r.pages = page.pages;
  $("#results-title").textContent = `${who.name}'s portraits`;
  $("#results-scope").textContent = r.job ? `job ${r.job}` : `${page.total} in all jobs`;
  $("#results-all").hidden = !r.job;
  $("#results-page").textContent = `page ${page.page} of ${page.pages}`;
  $("#results-prev").disabled = page.page <= 1; $("#results-next").disabled = page.page >= page.pages;
  const box = $("#results");
  box.replaceChildren();
  if (!page.results.length) box.append(el("p", { class: "muted" }, r.job ? "This job has no portraits (yet)." : "No portraits yet."));
  const reports = Object.fromEntries(page.runs.map((run) => [`${run.job}/${run.cell || ""}`, run.keep]));
  let jobBox = null, cellBox = null, lastJob = null, lastCell = null;
  for (const row of page.results) {
    if (row.job !== lastJob) {
      const job = page.jobs[row.job] || {};
      const when = job.created ? new Date(job.created * 1000).toLocaleString() : "";
      const what = job.kind === "shoot" ? `shoot ${job.params.package || ""}` : (job.kind || "job");
      jobBox = el("section", { class: "job-results", "data-job": row.job }, el("h4", {}, `${what} · ${when} · ${row.job}`));
      box.append(jobBox); lastJob = row.job; lastCell = null;
    }
    const cellKey = row.cell || row.template || "prompt";
    if (cellKey !== lastCell) {
      const keep = reports[`${row.job}/${row.cell || ""}`];
      cellBox = el("div", { class: "gallery" });
      const job = page.jobs[row.job] || {};
      const title = job.kind === "edit" ? `Edited: “${(job.params || {}).prompt || ""}”` : cellTitle(row);
      jobBox.append(el("div", { class: "cell", "data-cell": cellKey }, el("h5", { title: cellKey }, title,
        keep ? el("span", { class: "muted" }, ` · ${keepWords(keep)}`) : null), cellBox));
      lastCell = cellKey;
    }
    cellBox.append(resultFigure(who, row));
  }
  updateSelection();
}

// A shoot cell's name as the package titles it ("Grey studio · Navy suit"); else the template.
function cellTitle(row) {
  if (!row.cell) return row.template || "prompt";
  const pack = ui.packages.find((p) => p.name === row.template);
  if (!pack) return row.cell;
  const [b, o, p] = row.cell.split("/");
  const title = (list, name) => ((list || []).find((e) => e.name === name) || {}).title || name;
  return [title(pack.backdrops, b), title(pack.outfits, o)].concat(p ? [title(pack.poses, p)] : []).join(" · ");
}

function resultFigure(who, row) {
  const img = el("img", { alt: `${row.cell || row.template || "portrait"} seed ${row.seed}` });
  if (row.present) blobUrl(row.url).then((u) => { img.src = u; }).catch(() => {});
  const star = el("button", { class: "star" + (row.starred ? " on" : ""), title: row.starred ? "Unstar" : "Star",
                               "aria-pressed": row.starred ? "true" : "false" }, row.starred ? "★" : "☆");
  star.addEventListener("click", async () => {
    try {
      await post(`/v1/identities/${who.id}/results/star`, { ids: [row.id], starred: !row.starred });
      row.starred = !row.starred;
      star.textContent = row.starred ? "★" : "☆"; star.classList.toggle("on", row.starred);
      star.setAttribute("aria-pressed", row.starred ? "true" : "false");
    } catch (err) { say(err.message); }
  });
  const pick = el("input", { type: "checkbox", class: "pick", "data-id": row.id, checked: ui.results.selected.has(row.id) });
  pick.addEventListener("change", () => {
    if (pick.checked) ui.results.selected.add(row.id); else ui.results.selected.delete(row.id);
    updateSelection();
  });
  // An edit (background, outfit, light) of this portrait, where this server has an edit model.
  const edit = ui.me && ui.me.edit_backend && row.present
    ? el("button", { class: "quiet edit", title: `Edit this portrait of ${who.name}` }, "Edit") : null;
  if (edit) edit.addEventListener("click", () => openEdit(who, row, img));
  return el("figure", { class: "shot", "data-id": row.id }, img,
    el("figcaption", {}, el("div", { class: "row" }, pick, star, el("span", {}, `seed ${row.seed}`), edit), likeness(row),
      el("div", { class: "muted" }, `${row.backend}${row.rank ? " · #" + row.rank : ""}`)));
}

// -- an edit of one portrait -----------------------------------------------------------------------
// The box remembers whose portrait it edits (its identity and result id); the button reads them
// from there when it runs, so it never edits a portrait of another identity.

function openEdit(who, row, img) {
  const box = $("#edit-box");
  box.dataset.identity = who.id; box.dataset.name = who.name; box.dataset.result = row.id;
  $("#edit-title").textContent = `Edit this portrait of ${who.name}`;
  $("#edit-source").src = img.src || "";
  $("#edit-prompt").value = ""; $("#edit-references").value = "";
  $("#edit-status").textContent = "Say what to change; the face is kept and checked against your photos.";
  setBar("#edit-bar", 0, "");
  box.hidden = false; $("#edit-prompt").focus();
  box.scrollIntoView({ block: "nearest" });
}

$("#edit-close").addEventListener("click", () => { $("#edit-box").hidden = true; });

$("#edit-button").addEventListener("click", async () => {
  const box = $("#edit-box");
  const who = panelIdentity();
  if (!who || who.id !== box.dataset.identity) { say("Open the portrait to edit again: another identity is on screen."); box.hidden = true; return; }
  const prompt = $("#edit-prompt").value.trim();
  if (!prompt) { say("Say what to change, for example \"a sunny beach behind her\"."); return; }
  const files = [...$("#edit-references").files];
  if (files.length > 3) { say("Choose at most 3 pictures to take from."); return; }
  try {
    const references = [];
    for (const file of files) {
      const form = new FormData(); form.append("file", file);
      $("#edit-status").textContent = `Sending ${file.name}…`;
      references.push((await api("/v1/assets", { method: "POST", body: form })).id);
    }
    const job = await post("/v1/jobs/edit", { identity: who.id, result: box.dataset.result, prompt, references });
    say(""); loadQueue();
    watch(job.id, who.id, "edit", (done, mine) => {
      if (!mine) return;
      if (done.state === "done") $("#edit-status").textContent = `Done: the edit of ${who.name}'s portrait is first in the results below.`;
      ui.results = { page: 1, pages: 1, job: done.id, selected: new Set() };
      loadResults(); showWarnings(done.id, "edit");
    });
  } catch (err) { $("#edit-status").textContent = ""; say(err.message); }
});

function updateSelection() {
  const n = ui.results.selected.size;
  $("#download-selected").disabled = !n; $("#delete-selected").disabled = !n;
  $("#download-selected").textContent = n ? `Download ${n} selected (zip)` : "Download selected (zip)";
  $("#delete-selected").textContent = n ? `Delete ${n} selected` : "Delete selected";
}

$("#results-prev").addEventListener("click", () => { ui.results.page -= 1; loadResults(); });
$("#results-next").addEventListener("click", () => { ui.results.page += 1; loadResults(); });
$("#results-all").addEventListener("click", () => { ui.results.job = null; ui.results.page = 1; loadResults(); });
$("#results-starred").addEventListener("change", () => { ui.results.page = 1; loadResults(); });

$("#download-selected").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  const ids = [...ui.results.selected];
  try {
    const blob = await api(`/v1/identities/${who.id}/results/zip`, { method: "POST", headers: { "Content-Type": "application/json" },
                                                                     body: JSON.stringify({ ids }) });
    const url = URL.createObjectURL(blob); ui.blobs.push(url);
    download(url, `${who.name}-portraits.zip`);
    say(`${ids.length} portrait${ids.length > 1 ? "s" : ""} of ${who.name} downloaded.`, true);
  } catch (err) { say(err.message); }
});

$("#delete-selected").addEventListener("click", async () => {
  let who;
  try { who = target(); } catch (err) { say(err.message); return; }
  const ids = [...ui.results.selected];
  if (!confirm(`Delete ${ids.length} portrait${ids.length > 1 ? "s" : ""} of ${who.name}? They cannot be brought back.`)) return;
  try {
    const receipt = await post(`/v1/identities/${who.id}/results/delete`, { ids });
    ui.results.selected.clear();
    say(`${receipt.results.length} portrait${receipt.results.length > 1 ? "s" : ""} of ${who.name} deleted.`, true);
    await loadResults();
  } catch (err) { say(err.message); }
});

// Open one job's portraits: its identity's panel, the history narrowed to the job.
async function showJob(jobId) {
  const job = await api(`/v1/jobs/${jobId}`);
  const owner = job.identities[0];
  if (!owner) return;
  if (!panelIdentity() || panelIdentity().id !== owner) await select(owner);
  ui.results = { page: 1, pages: 1, job: jobId, selected: new Set() };
  if (job.kind === "train") { ui.results.job = null; }
  await loadResults();
  if (job.state === "failed" || job.state === "cancelled") say(`${job.kind} job ${job.id}: ${jobErrorWords(job)}`);
  $("#results").scrollIntoView({ block: "nearest" });
}

// -- the queue ---------------------------------------------------------------------------------------------
// GET /v1/jobs comes in pages ({jobs, next}); the table shows the newest page and "Older jobs"
// appends the next. Each row has Cancel (queued or running) or Retry (failed or cancelled); a
// click on the row opens its portraits; a failed job says why, in the page's words.

const queue = { older: [], next: null };

function jobRow(job, names) {
  const actions = el("td", { class: "actions" });
  if (job.state === "queued" || job.state === "running") {
    actions.append(el("button", { class: "cancel", "data-job": job.id, onclick: (e) => { e.stopPropagation(); jobAction(job.id, "cancel"); } }, "Cancel"));
  } else if (job.state === "failed" || job.state === "cancelled") {
    actions.append(el("button", { class: "retry", "data-job": job.id, onclick: (e) => { e.stopPropagation(); jobAction(job.id, "retry"); } }, "Retry"));
  }
  const state = el("td", {}, el("span", { class: "badge state-" + job.state }, job.state));
  if (job.state === "failed") state.append(el("div", { class: "why" }, jobErrorWords(job)));
  return el("tr", { "data-job": job.id, class: "clickable", onclick: () => showJob(job.id).catch((err) => say(err.message)) },
    el("td", {}, job.id), el("td", {}, job.kind), el("td", {}, job.identities.map((i) => names[i] || i).join(", ")), state,
    el("td", {}, `${Math.round(job.progress.fraction * 100)}%`),
    el("td", {}, new Date(job.created * 1000).toLocaleTimeString()), actions);
}

async function jobAction(jobId, action) {
  try {
    const job = action === "cancel" ? await api(`/v1/jobs/${jobId}`, { method: "DELETE" }) : await api(`/v1/jobs/${jobId}/retry`, { method: "POST" });
    const what = action === "retry" ? "queued again"
      : job.state === "running" ? "cancelled; the running image stops at its next step" : "cancelled";
    say(`job ${jobId}: ${what}`, true);
    const owner = job.identities[0];
    if (action === "retry" && ui.genJob === jobId) watch(jobId, owner, "generate", (done, mine) => { if (mine) showGallery(done.id); });
  } catch (err) { say(err.message); }
  await loadQueue();
}

async function loadQueue() {
  const page = await api("/v1/jobs?limit=20");
  const names = Object.fromEntries(ui.identities.map((i) => [i.id, i.name]));
  const seen = new Set(page.jobs.map((j) => j.id));
  queue.older = queue.older.filter((j) => !seen.has(j.id));
  if (!queue.older.length) queue.next = page.next;
  $("#queue tbody").replaceChildren(...[...page.jobs, ...queue.older].map((job) => jobRow(job, names)));
  $("#queue-more").hidden = !queue.next;
}

$("#queue-more").addEventListener("click", async () => {
  if (!queue.next) return;
  try {
    const page = await api(`/v1/jobs?limit=20&after=${encodeURIComponent(queue.next)}`);
    queue.older.push(...page.jobs); queue.next = page.next;
    await loadQueue();
  } catch (err) { say(err.message); }
});

// -- start ---------------------------------------------------------------------------------------------------

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  ui.token = $("#token").value.trim(); localStorage.setItem("portraitToken", ui.token);
  start();
});

$("#sign-out").addEventListener("click", () => {
  localStorage.removeItem("portraitToken"); localStorage.removeItem("portraitIdentity"); location.reload();
});

async function start() {
  try {
    ui.me = await api("/v1/me");
  } catch (err) { if (err.status !== 401) say(err.message); return; }
  $("#login").hidden = true; $("#sign-out").hidden = !ui.me.auth;
  $("#whoami").className = "muted";
  $("#whoami").textContent = ui.me.auth ? `signed in: ${ui.me.tenant}` : "local studio";
  $("#photo-advice").textContent = `At least ${ui.me.min_photos} photos of one person: different days, light and angles work best.`;
  $("#empty-text").textContent = `Upload at least ${ui.me.min_photos} photos of one person to start: different days, light and angles work best.`;
  [ui.backends, ui.presets] = await Promise.all([api("/v1/backends"), api("/v1/presets")]);
  await loadIdentities(); await loadTemplates(); await loadPackages(); await loadQueue();
  const last = localStorage.getItem("portraitIdentity");
  if (last && ui.identities.some((i) => i.id === last)) await select(last);
  if (!ui.poller) ui.poller = setInterval(() => { loadQueue().catch(() => {}); }, 2000);
}
start();
