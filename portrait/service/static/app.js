// The portrait studio page: plain JS over the /v1 API (no build step, nothing from a CDN).
"use strict";
const $ = (sel) => document.querySelector(sel);
const ui = { token: localStorage.getItem("portraitToken") || "", identities: [], identity: null, template: null,
             templates: [], genJob: null, blobs: [] };

async function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (ui.token) headers.Authorization = "Bearer " + ui.token;
  const response = await fetch(path, Object.assign({}, options, { headers }));
  const isJson = (response.headers.get("content-type") || "").includes("json");
  const body = isJson ? await response.json() : await response.blob();
  if (!response.ok) {
    const err = new Error(isJson ? body.detail : response.statusText);
    err.status = response.status; err.body = body;
    if (response.status === 401) showLogin();
    throw err;
  }
  return body;
}

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
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

function showLogin() { $("#login").hidden = false; $("#whoami").textContent = "sign in with your access token"; }

// -- identities -------------------------------------------------------------------------------

async function loadIdentities() {
  ui.identities = await api("/v1/identities");
  const list = $("#identities");
  list.replaceChildren(...ui.identities.map((i) => el("li",
    { class: ui.identity && ui.identity.id === i.id ? "selected" : "", "data-id": i.id, onclick: () => select(i.id) },
    el("span", {}, i.name), el("span", { class: "badge " + i.state }, i.state))));
  if (!ui.identities.length) list.append(el("li", { class: "muted" }, "none yet"));
}

function renderReport(report, contactUrl) {
  const rows = report.photos.map((p) => el("tr", {},
    el("td", {}, p.path), el("td", { class: p.status }, p.status), el("td", {}, p.reason ? `${p.reason}${p.detail ? ": " + p.detail : ""}` : ""),
    el("td", {}, p.scores && p.scores.total != null ? p.scores.total.toFixed(2) : "")));
  $("#report tbody").replaceChildren(...rows);
  $("#report-summary").textContent = `Photo check: ${report.kept} kept, ${report.rejected} rejected`;
  if (contactUrl) blobUrl(contactUrl).then((u) => { $("#contact-sheet").src = u; }).catch(() => {});
  else $("#contact-sheet").removeAttribute("src");
}

async function select(id) {
  const identity = await api(`/v1/identities/${id}`);
  ui.identity = identity;
  $("#identity-panel").hidden = false; $("#empty-panel").hidden = true;
  $("#identity-title").textContent = identity.name;
  setState(identity.state);
  renderReport(identity.report, identity.contact_sheet);
  $("#gallery").replaceChildren(); $("#download").disabled = true;
  setBar("#train-bar", identity.state === "ready" ? 1 : 0, identity.state === "ready" ? "done" : "");
  $("#train-status").textContent = identity.state === "ready" ? trainedText(identity) : "";
  setBar("#generate-bar", 0, ""); $("#generate-status").textContent = "";
  if (identity.state === "training" && identity.train_job) watchTrain(identity.train_job);
  await loadIdentities();
}

function setState(state) {
  const badge = $("#identity-state");
  badge.textContent = state; badge.className = "badge " + state;
  $("#train-button").disabled = state === "ready" || state === "training";
  $("#generate-button").disabled = !(state === "ready" || state === "training");
}

function trainedText(identity) {
  const t = identity.trained || {};
  return t.lora && t.lora.length ? `trained: LoRA (${t.lora.join(", ")}), ${t.steps} steps` : "ready for the zero-shot backends";
}

$("#upload").addEventListener("submit", async (event) => {
  event.preventDefault();
  const form = new FormData();
  form.append("name", $("#identity-name").value.trim());
  for (const file of $("#photos").files) form.append("files", file, file.name);
  $("#upload-button").disabled = true; say("Checking photos…", true);
  try {
    const identity = await api("/v1/identities", { method: "POST", body: form });
    say(`${identity.name}: ${identity.report.kept} photos kept, ${identity.report.rejected} rejected.`, true);
    $("#upload").reset();
    await select(identity.id);
  } catch (err) {
    say(err.message);
    if (err.body && err.body.report) {
      $("#identity-panel").hidden = false; $("#empty-panel").hidden = true;
      $("#identity-title").textContent = "not created"; renderReport(err.body.report, null);
    }
  } finally { $("#upload-button").disabled = false; }
});

$("#delete-identity").addEventListener("click", async () => {
  if (!ui.identity || !confirm(`Delete ${ui.identity.name}? Photos, crops, embeddings, LoRA and every image made from it are erased.`)) return;
  try {
    const gone = await api(`/v1/identities/${ui.identity.id}`, { method: "DELETE" });
    say(`${ui.identity.name} deleted (${gone.files_removed} files, ${gone.jobs_deleted} jobs).`, true);
    ui.identity = null; $("#identity-panel").hidden = true; $("#empty-panel").hidden = false;
    await loadIdentities(); await loadQueue();
  } catch (err) { say(err.message); }
});

// -- jobs and progress ----------------------------------------------------------------------

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

function watch(jobId, barSel, textSel, onEnd) {
  const tick = async () => {
    let job;
    try { job = await api(`/v1/jobs/${jobId}`); } catch (err) { $(textSel).textContent = err.message; return; }
    const settled = job.state === "done" || job.state === "failed" || job.state === "cancelled";
    setBar(barSel, settled ? 1 : job.progress.fraction, settled ? job.state : "");
    $(textSel).textContent = job.state === "failed" ? `failed (${job.error_kind}): ${job.error}` : progressText(job);
    if (job.state === "cancelled") $(textSel).textContent = "cancelled";
    if (settled) { onEnd(job); loadQueue(); } else setTimeout(tick, 400);
  };
  tick();
}

function watchTrain(jobId) {
  setState("training");
  watch(jobId, "#train-bar", "#train-status", async (job) => {
    if (ui.identity) {
      const identity = await api(`/v1/identities/${ui.identity.id}`);
      ui.identity = identity; setState(identity.state);
      if (job.state === "done") $("#train-status").textContent = "done · " + trainedText(identity);
    }
    loadIdentities();
  });
}

$("#train-button").addEventListener("click", async () => {
  const zeroShot = document.querySelector("input[name=train-mode]:checked").value === "zero-shot";
  const steps = parseInt($("#train-steps").value, 10);
  try {
    const job = await api("/v1/jobs/train", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ identity: ui.identity.id, zero_shot: zeroShot, steps: Number.isFinite(steps) ? steps : null }) });
    say(""); watchTrain(job.id); loadQueue();
  } catch (err) { say(err.message); }
});

async function loadTemplates() {
  ui.templates = await api("/v1/templates");
  const box = $("#templates");
  box.replaceChildren(...ui.templates.map((t) => {
    const img = el("img", { alt: t.title });
    blobUrl(t.preview).then((u) => { img.src = u; }).catch(() => {});
    return el("div", { class: "template", "data-name": t.name, title: t.description || t.title,
                       onclick: () => pickTemplate(t.name) }, img, el("div", {}, t.title));
  }));
  pickTemplate(ui.templates.length ? ui.templates[0].name : null);
}

function pickTemplate(name) {
  ui.template = name;
  for (const card of document.querySelectorAll(".template")) card.classList.toggle("selected", card.dataset.name === name);
}

$("#generate-button").addEventListener("click", async () => {
  const prompt = $("#prompt").value.trim();
  const body = { identity: ui.identity.id, count: parseInt($("#count").value, 10) || 1, seed: parseInt($("#seed").value, 10) || 0 };
  if (prompt) body.prompt = prompt; else body.template = ui.template;
  if ($("#backend").value) body.backend = $("#backend").value;
  try {
    const job = await api("/v1/jobs/generate", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    ui.genJob = job.id; say(""); $("#gallery").replaceChildren(); $("#download").disabled = true;
    watch(job.id, "#generate-bar", "#generate-status", (done) => showResults(done.id));
    loadQueue();
  } catch (err) { say(err.message); }
});

async function showResults(jobId) {
  const results = await api(`/v1/jobs/${jobId}/results`);
  const shots = results.images.map((image) => {
    const img = el("img", { alt: `rank ${image.rank}` });
    blobUrl(image.url).then((u) => { img.src = u; }).catch(() => {});
    const sim = image.similarity == null ? "no face found" : `similarity ${image.similarity.toFixed(3)}`;
    return el("figure", { class: "shot", "data-rank": image.rank }, img,
      el("figcaption", {}, el("b", {}, `#${image.rank}`), ` ${sim} · `,
        el("span", { class: image.passed_gate ? "gate-pass" : "gate-fail" }, image.passed_gate ? "passed gate" : "below gate"),
        el("div", { class: "muted" }, `${image.backend} · ${image.template || "prompt"} · seed ${image.seed}`)));
  });
  $("#gallery").replaceChildren(...shots);
  $("#download").disabled = !results.images.length;
  ui.genJob = jobId;
}

$("#download").addEventListener("click", async () => {
  try {
    const url = await blobUrl(`/v1/jobs/${ui.genJob}/zip`);
    const a = el("a", { href: url, download: `portrait-${ui.genJob}.zip` });
    document.body.append(a); a.click(); a.remove();
  } catch (err) { say(err.message); }
});

// -- the queue ---------------------------------------------------------------------------------
// GET /v1/jobs comes in pages ({jobs, next}); the table shows the newest page and "Older jobs"
// appends the next. Each row has Cancel (queued or running) or Retry (failed or cancelled).

const queue = { older: [], next: null };

function jobRow(job, names) {
  const actions = el("td", { class: "actions" });
  if (job.state === "queued" || job.state === "running") {
    actions.append(el("button", { class: "cancel", "data-job": job.id, onclick: () => jobAction(job.id, "cancel") }, "Cancel"));
  } else if (job.state === "failed" || job.state === "cancelled") {
    actions.append(el("button", { class: "retry", "data-job": job.id, onclick: () => jobAction(job.id, "retry") }, "Retry"));
  }
  return el("tr", { "data-job": job.id },
    el("td", {}, job.id), el("td", {}, job.kind), el("td", {}, job.identities.map((i) => names[i] || i).join(", ")),
    el("td", {}, el("span", { class: "badge state-" + job.state }, job.state)),
    el("td", {}, `${Math.round(job.progress.fraction * 100)}%`),
    el("td", {}, new Date(job.created * 1000).toLocaleTimeString()), actions);
}

async function jobAction(jobId, action) {
  try {
    const job = action === "cancel"
      ? await api(`/v1/jobs/${jobId}`, { method: "DELETE" })
      : await api(`/v1/jobs/${jobId}/retry`, { method: "POST" });
    const what = action === "retry" ? "queued again"
      : job.state === "running" ? "cancelled; the running image stops at its next step" : "cancelled";
    say(`job ${jobId}: ${what}`, true);
    if (action === "retry" && ui.genJob === jobId) watch(jobId, "#generate-bar", "#generate-status", (done) => showResults(done.id));
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

// -- start --------------------------------------------------------------------------------------

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  ui.token = $("#token").value.trim(); localStorage.setItem("portraitToken", ui.token);
  start();
});

async function start() {
  try {
    const me = await api("/v1/me");
    $("#login").hidden = true;
    $("#whoami").textContent = me.auth ? `tenant ${me.tenant}` : "local studio";
    await loadIdentities(); await loadTemplates(); await loadQueue();
    setInterval(() => { loadQueue().catch(() => {}); }, 2000);
  } catch (err) { if (err.status !== 401) say(err.message); }
}
start();
