// /docs: Swagger UI (served by Surge under /docs/, see handlers/swagger_ui.py) over this
// server's /openapi.json. The page's Content-Security-Policy allows this origin only, so every
// setting below that would reach elsewhere is turned off.
"use strict";

window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis],
  // No top bar: its box loads any document by URL, which this page has no use for.
  layout: "BaseLayout",
  // The validator badge is an image from another origin.
  validatorUrl: null,
  // Links to one operation: /docs#/users/getUser
  deepLinking: true,
  filter: true,
  displayRequestDuration: true,
  requestSnippetsEnabled: true,
  // The token lives in this page's memory only: not in localStorage, where any script of this
  // origin could read it after the tab is closed.
  persistAuthorization: false,
  defaultModelsExpandDepth: 0,
});
