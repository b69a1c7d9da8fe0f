"""/docs in a real browser: Debian's headless Chromium, driven over the Chrome DevTools Protocol
(its websocket, through aiohttp's client), opens Swagger UI on a running Surge, authorizes with
a real access token in the Authorize box, runs GET /v1/me with "Try it out" and sees the 200 in
the rendered response. The page logs nothing and the browser reports no Content-Security-Policy
violation along the way; without JavaScript the page still lists every operation."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import html
import itertools
import json
import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from handlers import SPEC, swagger_ui
from server.app import create_app
from server.config import Config

from .conftest import configured
from .helpers import signup

CHROMIUM = "/usr/bin/chromium"
# Every wait for the page is bounded by this: a page that never gets there fails the test.
PAGE_TIMEOUT_S = 30.0


def chromium() -> str:
    path = CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing (apt-get install chromium): .ci/run installs it")
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    return path


def chromium_args(profile: Path) -> list[str]:
    return [
        "--headless",
        "--no-sandbox",  # tests run as root
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]


# Injected before any script of the page runs (and, being the browser's, exempt from its CSP):
# every Content-Security-Policy violation the page meets is kept for the test to read.
WATCH_CSP = """
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(e.violatedDirective + " " + e.blockedURI);
});
"""


class Page:
    """One tab of a headless Chromium, driven over the DevTools protocol. `problems` collects
    what the page would show in its console: errors and warnings, uncaught exceptions, and
    the browser's own entries (a refused load, a CSP violation)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, shots: Path) -> None:
        self.ws = ws
        self.shots = shots  # where a failed wait leaves its screenshot and the page's HTML
        self.session_id: str | None = None
        self.problems: list[str] = []
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                break
            data = json.loads(msg.data)
            if "id" in data:
                future = self._waiting.pop(data["id"], None)
                if future is not None and not future.done():
                    future.set_result(data)
            else:
                self._event(data["method"], data.get("params", {}))
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ConnectionError("the browser closed the connection"))

    def _event(self, method: str, params: dict[str, Any]) -> None:
        if method == "Runtime.consoleAPICalled" and params["type"] in (
            "error",
            "warning",
            "assert",
        ):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.problems.append(f"console.{params['type']}: {args}")
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            self.problems.append(
                f"exception: {details.get('exception', details).get('description')}"
            )
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            entry = params["entry"]
            self.problems.append(f"{entry['source']}: {entry['text']} {entry.get('url', '')}")

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[msg_id] = future
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params}
        if self.session_id is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session_id
        await self.ws.send_str(json.dumps(msg))
        answer = await asyncio.wait_for(future, PAGE_TIMEOUT_S)
        assert "error" not in answer, (method, answer["error"])
        result: dict[str, Any] = answer["result"]
        return result

    async def open(self, url: str) -> None:
        target = await self.send("Target.createTarget", url="about:blank")
        attached = await self.send(
            "Target.attachToTarget", targetId=target["targetId"], flatten=True
        )
        self.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await self.send(f"{domain}.enable")
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=WATCH_CSP)
        await self.send("Page.navigate", url=url)

    async def js(self, expression: str) -> Any:
        """The value of `expression` in the page (awaited when it is a promise)."""
        answer = await self.send(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        assert "exceptionDetails" not in answer, answer["exceptionDetails"]
        return answer["result"].get("value")

    async def until(self, expression: str, what: str) -> Any:
        """The first truthy value of `expression`, polled until PAGE_TIMEOUT_S has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PAGE_TIMEOUT_S
        while True:
            value = await self.js(expression)
            if value:
                return value
            if loop.time() > deadline:
                shot = await self.send("Page.captureScreenshot", format="png")
                (self.shots / "failed.png").write_bytes(base64.b64decode(shot["data"]))
                dom = await self.js("document.documentElement.outerHTML")
                (self.shots / "failed.html").write_text(dom)
                raise AssertionError(f"the page never showed {what}: see {self.shots}/failed.*")
            await asyncio.sleep(0.1)

    async def type_text(self, text: str) -> None:
        """`text` typed into the focused element, as a keyboard would (React sees the input)."""
        await self.send("Input.insertText", text=text)

    async def close(self) -> None:
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


@contextlib.asynccontextmanager
async def browser(profile: Path) -> AsyncIterator[Page]:
    proc = await asyncio.create_subprocess_exec(
        chromium(),
        *chromium_args(profile),
        "--remote-debugging-port=0",
        "--remote-debugging-address=127.0.0.1",
        "about:blank",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        url = await asyncio.wait_for(_devtools_url(proc.stderr), PAGE_TIMEOUT_S)
        async with (
            aiohttp.ClientSession() as session,
            session.ws_connect(url, max_msg_size=0) as ws,
        ):
            page = Page(ws, profile.parent)
            try:
                yield page
            finally:
                await page.close()
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _devtools_url(stderr: asyncio.StreamReader) -> str:
    """The browser's websocket address, from the line Chromium prints once it listens."""
    seen = []
    while line := await stderr.readline():
        text = line.decode(errors="replace")
        found = re.search(r"DevTools listening on (ws://\S+)", text)
        if found:
            return found.group(1)
        seen.append(text)
    raise AssertionError("chromium exited before it listened:\n" + "".join(seen)[-3000:])


# The operation block of METHOD PATH in Swagger UI's page.
BLOCK = """[...document.querySelectorAll(".opblock.opblock-{method}")].find(
  (b) => b.querySelector(".opblock-summary-path")?.dataset.path === "{path}")"""


async def test_try_it_out_runs_get_me_with_the_token_from_the_authorize_box(
    aiohttp_client: Any, config: Config, tmp_path: Path
) -> None:
    server = TestServer(create_app(config))
    client: TestClient = await aiohttp_client(server)
    owner = await signup(client)

    async with browser(tmp_path / "profile") as page:
        await page.open(str(server.make_url("/docs")))
        # Swagger UI has loaded /openapi.json and drawn every operation.
        operations = sum(len(ops) for ops in SPEC["paths"].values())
        drawn = await page.until(
            f"document.querySelectorAll('.opblock').length === {operations} &&"
            " document.querySelectorAll('.opblock').length",
            "every operation",
        )
        assert drawn == operations

        # Authorize: the bearer scheme's box, filled in as a person would.
        await page.js("document.querySelector('.auth-wrapper .btn.authorize').click()")
        await page.until("!!document.querySelector('.modal-ux input')", "the Authorize dialog")
        await page.js("document.querySelector('.modal-ux input').focus()")
        await page.type_text(owner.access_token)
        await page.js("document.querySelector('.modal-ux .auth-btn-wrapper .authorize').click()")
        await page.until(
            "[...document.querySelectorAll('.modal-ux h6')]"
            ".some((h) => h.textContent === 'Authorized')",
            "the token taken",
        )
        await page.js("document.querySelector('.modal-ux .btn-done').click()")

        # GET /v1/me: open it, "Try it out", "Execute".
        me = BLOCK.format(method="get", path="/v1/me")
        await page.js(f"{me}.querySelector('.opblock-summary-control').click()")
        await page.until(f"!!{me}.querySelector('.try-out__btn')", "Try it out")
        await page.js(f"{me}.querySelector('.try-out__btn').click()")
        await page.until(f"!!{me}.querySelector('.execute')", "Execute")
        await page.js(f"{me}.querySelector('.execute').click()")
        status = await page.until(
            f"{me}.querySelector('.live-responses-table .response .response-col_status')"
            "?.textContent.trim()",
            "the response",
        )
        assert status == "200"
        body = await page.js(
            f"{me}.querySelector('.live-responses-table .response-col_description pre').textContent"
        )
        user = json.loads(body)
        assert (user["id"], user["email"]) == (owner.id, owner.email)
        # The request Swagger UI shows is the one it sent: with the token from the box.
        curl = await page.js(f"{me}.querySelector('.curl-command').textContent")
        assert f"Authorization: Bearer {owner.access_token}" in curl

        # A request body is offered as an example, to edit and send: POST /v1/users.
        create = BLOCK.format(method="post", path="/v1/users")
        await page.js(f"{create}.querySelector('.opblock-summary-control').click()")
        example = await page.until(
            f"{create}.querySelector('.opblock-section-request-body .body-param__example,"
            " .opblock-section-request-body pre')?.textContent",
            "the request body's example",
        )
        assert {"email", "username", "password"} <= set(json.loads(example))

        violations = await page.js("window.__violations")
        problems = page.problems
    assert violations == []
    assert problems == []


async def test_without_javascript_the_page_lists_every_operation(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/docs")
    assert resp.status == 200
    page = await resp.text()
    noscript = re.search(r"<noscript>(.*)</noscript>", page, re.S)
    assert noscript is not None
    rows = re.findall(r"<tr><td><code>(\w+)</code></td><td><code>([^<]+)</code>", noscript[1])
    operations = [(m.upper(), p) for p, ops in SPEC["paths"].items() for m in ops]
    assert sorted((m, html.unescape(p)) for m, p in rows) == sorted(operations)


async def test_the_page_loads_nothing_from_elsewhere(aiohttp_client: Any, config: Config) -> None:
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/docs")
    assert resp.status == 200
    csp = dict(d.strip().split(" ", 1) for d in resp.headers["Content-Security-Policy"].split(";"))
    assert csp["default-src"] == "'none'"
    assert re.fullmatch(r"'self' 'sha256-[A-Za-z0-9+/]+=*'", csp["script-src"])
    assert re.fullmatch(r"'self' 'sha256-[A-Za-z0-9+/]+=*'", csp["style-src"])
    assert csp["connect-src"] == "'self'"
    assert csp["img-src"] == "'self' data:"
    assert csp["frame-ancestors"] == "'none'" and csp["base-uri"] == "'none'"
    assert "unsafe" not in resp.headers["Content-Security-Policy"]
    page = await resp.text()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    # The two files it loads are Surge's, named for their version, with their digests.
    loaded = re.findall(r"""(?:src|href)='(/docs/[^']+)' integrity='sha384-""", page)
    assert loaded == [f"/docs/{swagger_ui.STYLESHEET}", f"/docs/{swagger_ui.SCRIPT}"]


async def test_public_url_is_the_only_other_origin_the_page_may_call(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(
        create_app(configured(config, public_url="https://api.example.com/base"))
    )
    resp = await client.get("/docs")
    csp = resp.headers["Content-Security-Policy"]
    assert "connect-src 'self' https://api.example.com;" in csp


async def test_the_files_are_served_cacheable_and_compressed(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(config))
    for name, (file, ctype) in swagger_ui.ASSETS.items():
        original = (swagger_ui.DIRECTORY / file).read_bytes()
        plain = await client.get(f"/docs/{name}", headers={"Accept-Encoding": "identity"})
        assert plain.status == 200
        assert plain.content_type == ctype
        assert plain.headers["Cache-Control"] == "public, max-age=31536000, immutable"
        assert plain.headers["Vary"] == "Accept-Encoding"
        assert "Content-Encoding" not in plain.headers
        assert await plain.read() == original
        packed = await client.get(
            f"/docs/{name}", headers={"Accept-Encoding": "gzip, br"}, auto_decompress=False
        )
        assert packed.status == 200 and packed.headers["Content-Encoding"] == "gzip"
        assert gzip.decompress(await packed.read()) == original
        refused = await client.get(
            f"/docs/{name}", headers={"Accept-Encoding": "gzip;q=0"}, auto_decompress=False
        )
        assert "Content-Encoding" not in refused.headers
    missing = await client.get("/docs/swagger-ui-bundle.js")  # unversioned: no such file
    assert missing.status == 404
    assert missing.content_type == "application/problem+json"


async def test_enable_docs_false_turns_the_document_and_the_page_off(
    aiohttp_client: Any, config: Config
) -> None:
    client = await aiohttp_client(create_app(configured(config, enable_docs=False)))
    for path in ("/openapi.json", "/docs", f"/docs/{swagger_ui.SCRIPT}"):
        resp = await client.get(path)
        assert resp.status == 404, path
        assert resp.content_type == "application/problem+json"
    assert (await client.get("/healthz")).status == 200
