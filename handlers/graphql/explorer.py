"""GET /graphql: a small explorer page, hand-written and self-contained (no CDN, no other asset):
paste an access token, write a query, run it, read the schema beside it."""

from __future__ import annotations

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Surge GraphQL explorer</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;display:grid;grid-template-rows:auto 1fr;
height:100vh}
header{padding:.5rem 1rem;background:#222;color:#eee;display:flex;gap:1rem;align-items:center}
header input{flex:1;font-family:monospace}
main{display:grid;grid-template-columns:1fr 1fr 28rem;gap:.5rem;padding:.5rem;min-height:0}
section{display:flex;flex-direction:column;min-height:0}
textarea,pre{font-family:ui-monospace,monospace;font-size:13px;border:1px solid #ccc;
padding:.5rem;margin:0}
textarea{flex:1;resize:none}#vars{flex:0 0 6rem}
pre{flex:1;overflow:auto;background:#f7f7f7;white-space:pre-wrap}
button{font-size:1rem;padding:.3rem 1rem}.meta{color:#666;font-size:12px;margin:.2rem 0}
</style></head><body>
<header><strong>Surge GraphQL</strong>
<label for="token">Bearer</label>
<input id="token" placeholder="access token from POST /v1/auth/login" autocomplete="off">
<button id="run" title="Ctrl+Enter">Run</button></header>
<main>
<section><div class="meta">query</div>
<textarea id="query" spellcheck="false"></textarea>
<div class="meta">variables (JSON)</div>
<textarea id="vars" spellcheck="false">{"first": 10}</textarea></section>
<section><div class="meta" id="status">result</div><pre id="out"></pre></section>
<section><div class="meta">schema (<a href="/graphql/schema.graphql">SDL</a>)</div>
<pre id="sdl"></pre></section>
</main>
<script>
"use strict";
const $ = (id) => document.getElementById(id);
const EXAMPLE = `query Orders($first: Int) {
  orders(first: $first) {
    edges { cursor node { id status totalCents currency
      user { id username }
      items(first: 20) { quantity unitPriceCents product { sku name } } } }
    pageInfo { hasNextPage endCursor }
  }
}`;
$("token").value = sessionStorage.getItem("surge.token") || "";
$("query").value = localStorage.getItem("surge.query") || EXAMPLE;
async function run() {
  const token = $("token").value.trim();
  sessionStorage.setItem("surge.token", token);
  localStorage.setItem("surge.query", $("query").value);
  let variables = {};
  try { variables = JSON.parse($("vars").value || "{}"); }
  catch (e) { $("out").textContent = "variables: " + e.message; return; }
  const started = performance.now();
  const resp = await fetch("/graphql", {
    method: "POST",
    headers: {"Content-Type": "application/json", "Authorization": "Bearer " + token},
    body: JSON.stringify({query: $("query").value, variables}),
  });
  const text = await resp.text();
  const ms = (performance.now() - started).toFixed(1);
  const left = resp.headers.get("RateLimit-Remaining");
  $("status").textContent = `HTTP ${resp.status}, ${ms} ms` +
    (left === null ? "" : `, rate limit left: ${left}`);
  try { $("out").textContent = JSON.stringify(JSON.parse(text), null, 2); }
  catch (e) { $("out").textContent = text; }
}
$("run").addEventListener("click", run);
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); run(); }
});
fetch("/graphql/schema.graphql").then((r) => r.text()).then((t) => { $("sdl").textContent = t; });
</script></body></html>
"""
