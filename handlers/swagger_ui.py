"""The Swagger UI files behind /docs: they come from the swagger-ui-bundle-v2 wheel (pinned in
pyproject.toml, so `pip install` brings them) and Surge serves them itself under /docs/{asset}.
The page therefore works offline and loads nothing from another origin.

Each served name carries the Swagger UI version: a new version is a new URL, so a browser may
keep a file as long as it likes (`immutable`) and never sees a stale one.
"""

from __future__ import annotations

from pathlib import Path

from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

# The wheel's directory is named for the Swagger UI it holds: vendor/swagger-ui-5.31.0.
DIRECTORY = Path(str(swagger_ui_path))
VERSION = DIRECTORY.name.removeprefix("swagger-ui-")
STYLESHEET = f"swagger-ui-{VERSION}.css"
SCRIPT = f"swagger-ui-bundle-{VERSION}.js"
# served name -> (file in the wheel, Content-Type)
ASSETS: dict[str, tuple[str, str]] = {
    STYLESHEET: ("swagger-ui.css", "text/css"),
    SCRIPT: ("swagger-ui-bundle.js", "text/javascript"),
}
