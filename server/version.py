"""Surge's version: pyproject.toml's `version`, the one place it is written."""

from __future__ import annotations

import importlib.metadata
import tomllib
from functools import cache
from pathlib import Path

_PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


@cache
def version() -> str:
    """The checkout's pyproject.toml when the code runs from one (so a stale install in the
    same venv cannot speak for it), else the installed distribution's metadata."""
    if _PYPROJECT.is_file():
        with _PYPROJECT.open("rb") as f:
            project = tomllib.load(f).get("project", {})
        if project.get("name") == "surge":
            return str(project["version"])
    return importlib.metadata.version("surge")
