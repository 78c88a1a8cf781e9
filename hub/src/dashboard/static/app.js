// kmm-fleet hub dashboard: a fleet overview and a page per ManagedClusterModule, kept live
// by the server-sent change stream. No framework, no build step. Every value from the API is
// written with textContent, never as HTML.
"use strict";

const TOKEN_KEY = "kmm-fleet.token";
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  stream: null,
  loading: false,
  again: false,
  revision: null,
};

// ---- DOM helpers -----------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function table(headers, rows, attrs) {
  return el("table", attrs, el("thead", {}, el("tr", {}, headers.map((h) => el("th", { text: h })))), el("tbody", {}, rows));
}

function badge(text, kind) {
  return el("span", { class: "badge " + (kind || text || "").toString().toLowerCase(), text: text });
}

function condition(conditions, type) {
  return (conditions || []).find((c) => c.type === type);
}

function conditionBadges(conditions) {
  return (conditions || []).map((c) =>
    el("span", { class: "cond " + (c.status === "True" ? "true" : "false"), title: (c.reason || "") + ": " + (c.message || "") },
      c.type + (c.status === "True" ? "" : "=" + c.status)));
}

function shortDigest(d) {
  return d ? d.replace(/^sha256:/, "").slice(0, 12) : "";
}

// A bar of the selected clusters: available, applied, degraded, rest.
function progress(counts) {
  const total = Math.max(counts.selected, counts.desired, 1);
  const pct = (n) => (100 * Math.max(0, n)) / total + "%";
  const available = Math.min(counts.available, total);
  const degraded = Math.min(counts.degraded, total - available);
  const applied = Math.max(0, Math.min(counts.applied - available - degraded, total - available - degraded));
  const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": String(total), "aria-valuenow": String(available),
    title: `${counts.available} available, ${counts.applied} applied, ${counts.degraded} degraded of ${counts.selected} selected` });
  for (const [cls, n] of [["available", available], ["applied", applied], ["degraded", degraded]]) {
    const seg = el("div", { class: "seg " + cls });
    seg.style.width = pct(n);
    bar.append(seg);
  }
  return bar;
}

// ---- API -------------------------------------------------------------------------------

class HttpError extends Error {
  constructor(status, body) {
    super((body && body.reason) || "HTTP " + status);
    this.status = status;
  }
}

async function api(path, method) {
  const resp = await fetch("api/v1/" + path, { method: method || "GET", headers: { Authorization: "Bearer " + state.token }, cache: "no-store" });
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  if (!resp.ok) throw new HttpError(resp.status, body);
  return body;
}

// What names clusters needs `list managedclusters` too: without it, null (the view says so).
async function inventory(path) {
  try {
    return await api(path);
  } catch (e) {
    if (e instanceof HttpError && e.status === 403) return null;
    throw e;
  }
}

const NO_INVENTORY = "Hidden: your user may not list managedclusters.cluster.open-cluster-management.io.";

// ---- sign-in ---------------------------------------------------------------------------

function showLogin(message) {
  stopStream();
  $("view").hidden = true;
  $("view").replaceChildren();
  $("signout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
  $("token").focus();
}

function signOut(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  showLogin(message);
}

$("login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  const token = $("token").value.trim();
  if (!token) return;
  state.token = token;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token").value = "";
  start();
});
$("signout").addEventListener("click", () => signOut(""));

// ---- live stream -----------------------------------------------------------------------

function setLive(on) {
  $("live").textContent = on ? "live" : "reconnecting";
  $("live").className = "live " + (on ? "on" : "off");
}

// The stream is opened with a single-use ticket (EventSource cannot send the token in a
// header, and a token never goes into a URL); every (re)connection gets a new one.
async function startStream() {
  stopStream();
  let ticket;
  try {
    ticket = (await api("stream/tickets", "POST")).ticket;
  } catch (e) {
    setLive(false);
    if (e instanceof HttpError && (e.status === 401 || e.status === 403)) return signOut(e.message);
    if (state.token) setTimeout(startStream, 5000);
    return;
  }
  if (!state.token) return;
  const es = new EventSource("api/v1/stream?ticket=" + encodeURIComponent(ticket));
  es.addEventListener("open", () => setLive(true));
  es.addEventListener("change", (e) => {
    let revision = null;
    try { revision = JSON.parse(e.data).revision; } catch (_) { /* ignore */ }
    if (revision !== state.revision) {
      state.revision = revision;
      refresh();
    }
  });
  es.addEventListener("error", () => {
    setLive(false);
    // A ticket is good for one connection: instead of EventSource's own retry with the spent
    // ticket, check the token (expired?) and reconnect with a new ticket.
    es.close();
    if (state.stream === es) {
      state.stream = null;
      refresh().then(() => { if (state.token) setTimeout(startStream, 2000); });
    }
  });
  state.stream = es;
}

function stopStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  setLive(false);
}

// ---- views -----------------------------------------------------------------------------

function route() {
  const m = location.hash.match(/^#\/mcm\/([^/]+)$/);
  return m ? { mcm: decodeURIComponent(m[1]) } : {};
}

// Refetch the current view; calls made while one runs are merged into one more.
async function refresh() {
  if (!state.token) return showLogin("");
  if (state.loading) { state.again = true; return; }
  state.loading = true;
  try {
    do {
      state.again = false;
      const r = route();
      const node = r.mcm ? await mcmView(r.mcm) : await overview();
      $("login").hidden = true;
      $("signout").hidden = false;
      $("view").replaceChildren(node);
      $("view").hidden = false;
      $("view").dataset.revision = String(state.revision);
    } while (state.again);
  } catch (e) {
    if (e instanceof HttpError && e.status === 401) return signOut(e.message);
    if (e instanceof HttpError && e.status === 403) return signOut(e.message);
    $("view").replaceChildren(el("p", { class: "error", role: "alert", text: "Cannot load: " + e.message }));
    $("view").hidden = false;
  } finally {
    state.loading = false;
  }
}

async function overview() {
  const [mcms, clusters, events] = await Promise.all([api("managedclustermodules"), inventory("clusters"), inventory("events?limit=15")]);
  $("crumbs").replaceChildren();
  const mcmRows = mcms.items.map((m) => {
    const ready = condition(m.conditions, "Ready");
    const c = m.counts;
    return el("tr", { "data-mcm": m.name },
      el("td", {}, el("a", { href: "#/mcm/" + encodeURIComponent(m.name), text: m.name })),
      el("td", { class: "wide" }, progress(c)),
      el("td", { class: "num", text: `${c.available}/${c.selected}` }),
      el("td", { class: "num", text: `${c.applied}/${c.desired}` }),
      el("td", { class: "num", text: String(c.degraded) }),
      el("td", {}, ready ? badge(ready.status === "True" ? "Ready" : ready.reason, ready.status === "True" ? "ready" : "notready") : badge("Unknown")),
      el("td", { text: `${m.images.ready}/${m.images.total} ready` + (m.images.failed ? `, ${m.images.failed} failed` : "") + (m.images.missing ? `, ${m.images.missing} missing` : "") }));
  });
  const clusterRows = (clusters ? clusters.items : []).map((c) => el("tr", { "data-cluster": c.name },
    el("td", { text: c.name }),
    el("td", { class: "labels", text: Object.entries(c.labels).map(([k, v]) => `${k}=${v}`).join(", ") }),
    el("td", { text: c.kernelClaim ? c.kernels.join(", ") : "(no kernel claim yet)" }),
    el("td", {}, c.managedClusterModules.map((n) => el("a", { class: "chip", href: "#/mcm/" + encodeURIComponent(n), text: n })))));
  return el("div", { id: "overview" },
    el("h1", { text: "ManagedClusterModules" }),
    mcms.items.length ? table(["Name", "Rollout", "Available", "Applied", "Degraded", "Ready", "Images"], mcmRows, { id: "mcms" }) : el("p", { class: "muted", text: "None." }),
    el("h1", { text: "Clusters" }),
    !clusters ? el("p", { class: "muted", id: "no-inventory", text: NO_INVENTORY })
      : clusters.items.length ? table(["Name", "Labels", "Kernels", "Selected by"], clusterRows, { id: "clusters" }) : el("p", { class: "muted", text: "None." }),
    events ? eventsBlock(events.items) : null);
}

function eventsBlock(items) {
  return el("div", {},
    el("h2", { text: "Recent events" }),
    items.length ? table(["Time", "Object", "Reason", "Message"], items.map((e) => el("tr", { class: e.type === "Warning" ? "warning" : "" },
      el("td", { class: "time", text: e.time.replace("T", " ").replace(/\..*$/, "") }),
      el("td", { text: e.name }),
      el("td", {}, badge(e.reason, e.type === "Warning" ? "degraded" : "normal")),
      el("td", { text: e.message })))) : el("p", { class: "muted", text: "None yet." }));
}

async function mcmView(name) {
  let m;
  try {
    m = await api("managedclustermodules/" + encodeURIComponent(name));
  } catch (e) {
    if (e instanceof HttpError && e.status === 404) {
      $("crumbs").replaceChildren(" / ", name);
      return el("p", { class: "error", text: `ManagedClusterModule ${name} does not exist (any more).` });
    }
    if (e instanceof HttpError && e.status === 403) {
      $("crumbs").replaceChildren(" / ", name);
      return el("p", { class: "muted", id: "no-inventory", text: "The per-cluster rollout is " + NO_INVENTORY.charAt(0).toLowerCase() + NO_INVENTORY.slice(1) });
    }
    throw e;
  }
  const events = await api("events?limit=10&name=" + encodeURIComponent(name));
  $("crumbs").replaceChildren(" / ", el("span", { text: name }));
  const c = m.counts;
  const rows = [];
  for (const cl of m.clusters) {
    const w = cl.work;
    const ml = w && w.feedback.moduleLoader;
    const nodes = ml ? `${ml.available ?? "?"}/${ml.desired ?? "?"}` + (ml.nodesMatching != null ? ` (${ml.nodesMatching} matching)` : "") : "";
    const span = Math.max(1, cl.kernels.length);
    const head = [
      el("td", { rowspan: span, class: "cluster" }, cl.name, cl.selected ? null : el("div", { class: "muted", text: "no longer selected" })),
      el("td", { rowspan: span }, badge(cl.phase), cl.rolloutState ? el("div", { class: "rollout-state" }, badge(cl.rolloutState)) : null),
      el("td", { rowspan: span }, w ? conditionBadges(w.conditions) : el("span", { class: "muted", text: "no ManifestWork" })),
      el("td", { rowspan: span, class: "num nodes", text: nodes }),
    ];
    const tail = el("td", { rowspan: span, class: "problem", text: cl.problem ? `${cl.problem.reason}: ${cl.problem.message}` : (cl.unmappedKernels.length ? "unmapped: " + cl.unmappedKernels.join(", ") : "") });
    if (!cl.kernels.length) {
      rows.push(el("tr", { "data-cluster": cl.name, "data-phase": cl.phase, "data-rollout": cl.rolloutState || "" }, head, el("td", { colspan: 3, class: "muted", text: m.reconciled ? "no kernels" : "not reconciled yet" }), tail));
      continue;
    }
    cl.kernels.forEach((k, i) => {
      const cells = [
        el("td", { class: "kernel", text: k.kernel }),
        el("td", {}, badge(k.state), k.reason ? el("div", { class: "muted", text: k.reason }) : null),
        el("td", { class: "digest", title: k.pinnedImage || k.image, text: k.digest ? shortDigest(k.digest) : "—" }),
      ];
      rows.push(i === 0
        ? el("tr", { "data-cluster": cl.name, "data-phase": cl.phase, "data-rollout": cl.rolloutState || "" }, head, cells, tail)
        : el("tr", { "data-cluster-kernel": cl.name }, cells));
    });
  }
  const plan = m.imagePlan.map((i) => el("tr", { "data-image": i.image },
    el("td", { class: "image", text: i.image }),
    el("td", {}, badge(i.state)),
    el("td", { class: "digest", title: i.digest || "", text: shortDigest(i.digest) || "—" }),
    el("td", { class: "num", text: String(i.clusters) }),
    el("td", { text: i.reason || "" })));
  return el("div", { id: "mcm", "data-name": m.name },
    el("h1", { text: m.name }),
    el("p", {}, conditionBadges(m.conditions)),
    m.lastError ? el("p", { class: "error", text: m.lastError }) : null,
    el("div", { class: "summary" }, progress(c),
      el("span", { text: `${c.available} available · ${c.applied} applied · ${c.degraded} degraded · ${c.desired} ManifestWorks · ${c.selected} selected` })),
    m.rollout ? rolloutBlock(m.rollout) : null,
    el("p", { class: "muted", text: `selector: ${Object.entries(m.selector).map(([k, v]) => `${k}=${v}`).join(", ") || "(all clusters)"} · spoke namespace: ${m.spokeNamespace}` }),
    el("h2", { text: "Clusters" }),
    rows.length ? table(["Cluster", "Phase", "ManifestWork", "Nodes available/desired", "Kernel", "Image", "Digest", "Problem"], rows, { id: "rollout" }) : el("p", { class: "muted", text: "No cluster selected." }),
    el("h2", { text: "Image plan" }),
    plan.length ? table(["Image", "State", "Digest", "Clusters", "Reason"], plan, { id: "images" }) : el("p", { class: "muted", text: "No images yet." }),
    eventsBlock(events.items));
}

/// The progressive rollout of one MCM (`status.rollout`).
function rolloutBlock(r) {
  const group = r.currentGroup ? ` · group ${r.currentGroup}` : "";
  return el("div", { id: "rollout-status", "data-phase": r.phase },
    el("p", {}, badge(r.phase),
      el("span", { text: ` ${r.strategy} rollout of revision ${r.revision}: ${r.updated} updated · ${r.inProgress} in progress · ${r.failed} failed · ${r.pending} pending of ${r.total} · wave ${r.wave}${group}` })),
    r.haltReason ? el("p", { class: "error", text: "Halted: " + r.haltReason + ` (resume: kubectl annotate mcm <name> hub.kmm.sigs.x-k8s.io/rollout-resume=now)` }) : null,
    r.failedClusters && r.failedClusters.length ? el("p", { class: "muted", text: "failed: " + r.failedClusters.join(", ") + (r.failedClustersOmitted ? ` and ${r.failedClustersOmitted} more` : "") }) : null);
}

// ---- start -----------------------------------------------------------------------------

function start() {
  if (!state.token) return showLogin("");
  refresh().then(() => { if (state.token) startStream(); });
}

window.addEventListener("hashchange", refresh);
start();
