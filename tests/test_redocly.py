"""The served /openapi.json passes Redocly CLI's lint with no error and no warning: the
recommended-strict rules and the ones tests/node/redocly.yaml adds (examples valid against their
schemas, every tag declared and described, every operation with an operationId, a 4xx answer
and a summary, servers, license, no unused component, no unresolved $ref).

Redocly CLI is the npm package pinned in tests/node/package-lock.json; `make test` installs it
(`npm ci --prefix tests/node`) and .ci/run installs Node.js from Debian's packages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

from server.app import create_app
from server.config import Config

from .conftest import ROOT

NODE_TOOLS = ROOT / "tests" / "node"
REDOCLY = NODE_TOOLS / "node_modules" / ".bin" / "redocly"


def redocly() -> Path:
    if shutil.which("node") is None:
        missing = "node (Debian's nodejs: .ci/run installs it)"
    elif not REDOCLY.exists():
        missing = "Redocly CLI (make node: npm ci --prefix tests/node)"
    else:
        return REDOCLY
    if os.environ.get("CI"):
        pytest.fail(f"{missing} is missing")
    pytest.skip(f"{missing} is not installed")


def _problems(report: dict[str, Any]) -> str:
    return "\n".join(
        f"{p['severity']} {p['ruleId']}: {p['message']} at "
        + ", ".join(loc.get("pointer", "?") for loc in p.get("location", []))
        for p in report["problems"]
    )


async def test_served_document_lints_clean(
    aiohttp_client: Any, config: Config, tmp_path: Path
) -> None:
    tool = redocly()
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/openapi.json")
    assert resp.status == 200
    document = tmp_path / "openapi.json"
    document.write_bytes(await resp.read())
    proc = await asyncio.create_subprocess_exec(
        str(tool), "lint", "--format=json", f"--config={NODE_TOOLS / 'redocly.yaml'}",
        str(document),
        cwd=tmp_path,
        # offline: no usage report, no check for a newer version
        env={**os.environ, "REDOCLY_TELEMETRY": "off", "REDOCLY_SUPPRESS_UPDATE_NOTICE": "true"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    try:
        report = json.loads(out)
    except ValueError:
        pytest.fail(f"redocly exited {proc.returncode} without a report:\n{out!r}\n{err.decode()}")
    totals = report["totals"]
    assert (totals["errors"], totals["warnings"]) == (0, 0), _problems(report)
    assert totals["ignored"] == 0  # no .redocly.lint-ignore.yaml hides anything
    assert proc.returncode == 0, err.decode()
