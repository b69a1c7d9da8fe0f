// /docs: the API reference, rendered in the browser from /openapi.json. No dependencies and
// nothing loaded from elsewhere (the page's Content-Security-Policy allows this origin only).
"use strict";

(function () {
  const app = document.getElementById("app");

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key.startsWith("data-")) node.setAttribute(key, value);
      else node[key] = value;
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function refName(schema) {
    const ref = schema && schema.$ref;
    return ref ? ref.split("/").pop() : null;
  }

  function schemaLink(schema) {
    const name = refName(schema);
    if (name) return el("a", { href: "#schema-" + name }, name);
    return el("code", {}, schema ? JSON.stringify(schema) : "");
  }

  function parameters(op) {
    const params = op.parameters || [];
    if (!params.length) return null;
    const rows = params.map((p) =>
      el("tr", {},
        el("td", {}, el("code", {}, p.name)),
        el("td", {}, p.in),
        el("td", {}, p.required ? "yes" : "no"),
        el("td", {}, el("code", {}, JSON.stringify(p.schema || {}))),
        el("td", {}, p.description || ""))
    );
    return el("table", { class: "params" },
      el("tr", {}, ...["name", "in", "required", "schema", "description"].map((h) => el("th", {}, h))),
      ...rows);
  }

  function body(op) {
    const content = op.requestBody && op.requestBody.content;
    if (!content) return null;
    const json = content["application/json"];
    return el("p", { class: "body" }, "Request body: ", schemaLink(json && json.schema));
  }

  function responses(op) {
    const items = Object.entries(op.responses || {}).sort().map(([code, r]) => {
      const content = r.content || {};
      const media = Object.keys(content)[0];
      return el("li", { "data-status": code },
        el("code", { class: "status s" + code[0] }, code), " ", r.description || "",
        media ? el("span", { class: "media" }, " (", media, ": ", schemaLink(content[media].schema), ")") : null);
    });
    return el("ul", { class: "responses" }, ...items);
  }

  function operation(path, method, op) {
    const auth = op.security && op.security.length ? "Bearer token" : "no authentication";
    return el("details", { class: "op", "data-method": method.toUpperCase(), "data-path": path },
      el("summary", {},
        el("span", { class: "method m-" + method }, method.toUpperCase()), " ",
        el("code", { class: "path" }, path), " ",
        el("span", { class: "summary" }, op.summary || "")),
      op.description ? el("p", {}, op.description) : null,
      el("p", { class: "auth" }, auth),
      parameters(op), body(op), responses(op));
  }

  function render(spec) {
    const groups = new Map();
    let count = 0;
    for (const [path, ops] of Object.entries(spec.paths)) {
      for (const [method, op] of Object.entries(ops)) {
        const tag = (op.tags && op.tags[0]) || "ops";
        if (!groups.has(tag)) groups.set(tag, []);
        groups.get(tag).push(operation(path, method, op));
        count += 1;
      }
    }
    const filter = el("input", { type: "search", id: "filter", placeholder: "Filter: method, path or words" });
    const sections = [...groups].map(([tag, ops]) =>
      el("section", { class: "tag", "data-tag": tag }, el("h2", {}, tag), ...ops));
    filter.addEventListener("input", () => {
      const words = filter.value.toLowerCase().split(/\s+/).filter(Boolean);
      for (const op of app.querySelectorAll("details.op")) {
        const text = op.querySelector("summary").textContent.toLowerCase();
        op.hidden = !words.every((w) => text.includes(w));
      }
    });
    const schemas = Object.entries((spec.components || {}).schemas || {}).map(([name, schema]) =>
      el("div", { class: "schema", id: "schema-" + name },
        el("h3", {}, name), el("pre", {}, JSON.stringify(schema, null, 2))));
    app.replaceChildren(
      el("h1", {}, spec.info.title + " " + spec.info.version),
      el("p", {}, spec.info.description || ""),
      el("p", {}, "Machine-readable: ", el("a", { href: "/openapi.json" }, "/openapi.json")),
      filter,
      el("div", { id: "endpoints", "data-operations": String(count) }, ...sections),
      el("h2", {}, "Schemas"),
      ...schemas);
    document.title = spec.info.title + " reference";
    app.dataset.state = "ready";
  }

  function fail(message) {
    app.dataset.state = "error";
    app.replaceChildren(el("p", { class: "error" }, "Could not load /openapi.json: " + message));
  }

  fetch("/openapi.json", { headers: { Accept: "application/json" } })
    .then((resp) => {
      if (!resp.ok) throw new Error("HTTP " + resp.status);
      return resp.json();
    })
    .then(render)
    .catch((err) => fail(String(err && err.message ? err.message : err)));
})();
