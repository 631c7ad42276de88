// The approval page. Everything a requester wrote is put on the page as text
// (textContent), never as markup.
"use strict";

const json = { "Content-Type": "application/json" };

async function api(method, path, body) {
  const init = { method, headers: json, credentials: "same-origin", cache: "no-store" };
  if (body !== undefined) init.body = JSON.stringify(body);
  const resp = await fetch(path, init);
  let value = null;
  try { value = await resp.json(); } catch (_) { value = { error: "unreadable answer" }; }
  return { status: resp.status, value };
}

// Control, format (zero-width, bidirectional, tags), filler and variation-selector
// characters could hide or reorder what an operator reads before approving: they are
// shown as escapes, the same set the CLI's printable() escapes.
function visible(text) {
  return String(text).replace(
    /[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u2028-\u202e\u2060-\u206f\u3164\ufe00-\ufe0e\ufeff\uffa0\ufff9-\ufffb\u{e0000}-\u{e007f}\u{e0100}-\u{e01ef}]/gu,
    (c) => `\\u{${c.codePointAt(0).toString(16)}}`,
  );
}

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = visible(text);
  if (cls) e.className = cls;
  return e;
}

function status(text) {
  document.getElementById("status").textContent = text;
}

function row(dl, name, value, cls) {
  dl.append(el("dt", name), el("dd", value, cls));
}

function diffBlock(diff) {
  const pre = el("pre", undefined, "diff");
  pre.setAttribute("data-testid", "diff");
  for (const line of diff.split("\n")) {
    const cls = line.startsWith("+") ? "add" : line.startsWith("-") ? "del" : "ctx";
    pre.append(el("span", line, cls));
  }
  return pre;
}

async function decide(id, approve, hash, article) {
  const verb = approve ? "approve" : "reject";
  for (const b of article.querySelectorAll("button")) b.disabled = true;
  const r = await api("POST", `/api/v1/changes/${encodeURIComponent(id)}/${verb}`, { hash });
  const out = article.querySelector(".outcome");
  if (r.value && r.value.outcome === "applied") {
    out.textContent = `Applied: version ${r.value.version} is in force.`;
  } else if (r.value && r.value.outcome === "rejected") {
    out.textContent = "Rejected.";
  } else {
    const why = (r.value && (r.value.why || r.value.error)) || `HTTP ${r.status}`;
    out.textContent = `Not ${approve ? "approved" : "rejected"}: ${why}`;
    for (const b of article.querySelectorAll("button")) b.disabled = false;
  }
}

async function showChange(summary) {
  const r = await api("GET", `/api/v1/changes/${encodeURIComponent(summary.id)}`);
  if (r.status !== 200) {
    status(`Change ${summary.id} could not be read: ${r.value.error || r.status}`);
    return;
  }
  const d = r.value.detail;
  const article = el("article");
  article.setAttribute("data-change", d.summary.id);
  article.append(el("h2", `Change request ${d.summary.id}`));
  const dl = el("dl");
  row(dl, "Requested by", d.summary.requester);
  row(dl, "Reason", d.reason || "(none given)");
  row(dl, "Risk", d.summary.risk.toFixed(2), d.summary.risk >= 0.5 ? "risk-high" : "");
  row(dl, "Operations", d.operations.map((o) => `${o.what} (${o.weight})`).join("; "));
  row(dl, "From version", String(d.base_version));
  row(dl, "Expires", new Date(d.summary.expires_at * 1000).toISOString());
  row(dl, "SHA-256", d.after_hash);
  article.append(dl, diffBlock(r.value.diff));
  const approve = el("button", "Approve", "approve");
  const reject = el("button", "Reject", "reject");
  approve.addEventListener("click", () => decide(d.summary.id, true, d.after_hash, article));
  reject.addEventListener("click", () => decide(d.summary.id, false, d.after_hash, article));
  article.append(approve, reject, el("p", "", "outcome"));
  document.getElementById("changes").append(article);
}

async function load() {
  const health = await api("GET", "/api/v1/health");
  if (health.status !== 200) {
    document.getElementById("who").textContent = health.value.error || `HTTP ${health.status}`;
    return;
  }
  const h = health.value;
  document.getElementById("who").textContent =
    `You are ${h.you}. Version ${h.version} is in force; ${h.sessions} sessions.`;
  const list = await api("GET", "/api/v1/changes");
  if (list.status !== 200) {
    status(list.value.error || `HTTP ${list.status}`);
    return;
  }
  document.getElementById("none").hidden = list.value.length !== 0;
  for (const c of list.value) await showChange(c);
}

load().catch((e) => status(`The page could not load: ${e}`));
