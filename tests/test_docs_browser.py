"""/docs in a real browser: Debian's headless Chromium loads the page from a running Surge, its
script fetches /openapi.json and lists every operation, and the browser logs nothing (a script
error or a Content-Security-Policy refusal would show up as a console message)."""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from handlers import SPEC
from server.app import create_app
from server.config import Config

CHROMIUM = "/usr/bin/chromium"


def chromium() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (apt-get install chromium): .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


async def dump_dom(url: str, profile: Path) -> tuple[str, str]:
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        "--headless",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--enable-logging=stderr",  # console messages come out as ":CONSOLE:" lines
        "--v=0",
        # Let the page's fetch() finish before the DOM is dumped.
        "--virtual-time-budget=10000",
        "--dump-dom",
        url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode()[-3000:]
    return out.decode(), err.decode(errors="replace")


async def test_docs_page_lists_every_endpoint_in_chromium(
    aiohttp_server: Any, config: Config, tmp_path: Path
) -> None:
    server = await aiohttp_server(create_app(config))
    dom, log = await dump_dom(str(server.make_url("/docs")), tmp_path / "profile")

    console = [line for line in log.splitlines() if ":CONSOLE" in line]
    assert console == []
    assert re.search(r'<main id="app" data-state="ready">', dom), dom[:2000]
    operations = [(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops]
    assert f'data-operations="{len(operations)}"' in dom
    # Elements only the script makes: one <details> per operation of /openapi.json.
    rendered = re.findall(r'<details class="op" data-method="(\w+)" data-path="([^"]+)"', dom)
    assert sorted((m, html.unescape(p)) for m, p in rendered) == sorted(operations)
    assert ("GET", "/v1/users/{user_id}") in rendered
    assert 'id="schema-User"' in dom
    assert 'id="filter"' in dom


async def test_docs_page_loads_nothing_from_elsewhere(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/docs")
    assert resp.status == 200
    csp = resp.headers["Content-Security-Policy"]
    assert csp.startswith("default-src 'none'; script-src 'sha256-")
    assert "connect-src 'self'" in csp
    assert "http" not in csp
    page = await resp.text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert "<script>" in page and 'fetch("/openapi.json"' in page
