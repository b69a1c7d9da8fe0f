"""Clients generated from /openapi.json drive a whole customer journey against a real server.

openapi-python-client and openapi-typescript (+ openapi-fetch) write the clients into a
temporary directory (tests/clients/generate.py, what `make clients` runs); tests/clients/
journey.py and journey.ts, which call nothing but the generated functions, are type-checked
against them (mypy --strict, tsc --strict) and run against `python -m server serve` with the
fake payment provider (its webhooks pointed at the server). A call the generated client cannot
express, or an answer it types wrongly, fails here: the fix goes into the document.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .clients import generate
from .conftest import ROOT, Services
from .paying import serving_with_provider
from .served import Served, wait_until

JOURNEYS = ROOT / "tests" / "clients"
RUN_TIMEOUT_S = 90


def node() -> str:
    """node, with tests/node's packages installed; in CI their absence fails."""
    path = shutil.which("node")
    missing = None
    if path is None:
        missing = "node is missing (apt-get install nodejs npm)"
    elif not (generate.NODE_TOOLS / "node_modules" / ".bin" / "tsc").exists():
        missing = "tests/node's packages are missing (npm ci --prefix tests/node)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing}: .ci/run and `make test` install them")
        pytest.skip(missing)
    assert path is not None
    return path


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> str:
    """stdout of a command that must exit 0; its output is in the failure message otherwise."""
    proc = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert proc.returncode == 0, (
        f"{args[:2]} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    )
    return proc.stdout


def webhooks_accepted(live: Served) -> None:
    """The payment's webhooks (authorized, captured) came back signed and were taken."""

    def hooks() -> list[int]:
        lines = live.access_lines()
        return [line["status"] for line in lines if line["route"] == "/v1/webhooks/payments"]

    wait_until("two webhooks taken", lambda: len(hooks()) >= 2)
    assert set(hooks()) == {200}, hooks()


@pytest.fixture(scope="module")
def document() -> bytes:
    """/openapi.json as create_app serves it (what `make clients` reads without --url)."""
    return generate.fetch_document()


@pytest.fixture(scope="module")
def spec(document: bytes, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate.write_document(tmp_path_factory.mktemp("clients"), document)


@pytest.fixture
def live(clean: Services, tmp_path: Path) -> Iterator[Served]:
    """A real server on this session's services, paying through the fake provider, which
    sends its webhooks back to the server (as a deployment is wired); access log on stdout."""
    with serving_with_provider(
        clean,
        tmp_path,
        AUTH_RATE_LIMIT_PER_MINUTE="100000",
        RATE_LIMIT_RATE="100000",
        RATE_LIMIT_BURST="100000",
    ) as served:
        yield served


def test_make_clients_reads_the_document_the_server_serves(live: Served, document: bytes) -> None:
    assert generate.fetch_document(live.url) == document  # make clients URL=...
    assert json.loads(document)["servers"] == [
        {"url": "/", "description": "The origin serving this document"}
    ]


@pytest.mark.parametrize("journey", ["journey.py", "journey.ts"])
def test_journeys_call_only_generated_code(journey: str) -> None:
    """No request is written by hand: no HTTP library, no fetch, no URL put together."""
    source = (JOURNEYS / journey).read_text()
    assert not re.search(r"\b(httpx|urllib|requests|aiohttp|http\.client)\b|\bfetch\(", source)
    if journey == "journey.py":
        assert "/v1/" not in source
        assert re.search(r"^from surge_client\.api\.orders import ", source, re.M)
    else:  # openapi-fetch's calls name the document's paths, checked against `paths` by tsc
        assert re.search(r'^import createClient from "openapi-fetch";$', source, re.M)
        assert re.search(r'^import type \{ paths \} from "\./schema\.js";$', source, re.M)


@pytest.fixture(scope="module")
def python_client(spec: Path) -> Path:
    python = generate.generate_python(spec.parent, spec)
    assert (python / "surge_client" / "api" / "orders" / "pay_order.py").exists()
    return python


@pytest.fixture(scope="module")
def typescript(spec: Path) -> Path:
    node()
    ts = generate.generate_typescript(spec.parent, spec)
    assert "export interface paths" in (ts / "schema.d.ts").read_text()
    return ts


def test_python_client_journey(live: Served, python_client: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(python_client), "MYPYPATH": str(python_client)}
    # the journey against the generated types (their own code is the generator's business)
    bin_dir = Path(sys.executable).parent
    run(
        bin_dir / "mypy",
        "--strict",
        "--follow-imports=silent",
        "--no-incremental",
        JOURNEYS / "journey.py",
        cwd=ROOT,
        env=env,
    )
    out = run(sys.executable, JOURNEYS / "journey.py", live.url, cwd=ROOT, env=env)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"python journey ok: users=3 pages=3 order=[0-9a-f-]{36} status=paid events=3", last
    ), out
    webhooks_accepted(live)


def test_typescript_types_leave_no_free_form_object_closed(typescript: Path) -> None:
    """openapi-typescript types an object schema with neither properties nor
    additionalProperties as Record<string, never>: nothing may be put in it or read from it.
    The document says `additionalProperties: true` wherever an object is free-form."""
    schema = (typescript / "schema.d.ts").read_text()
    closed = re.findall(r"^\s+(\S+): Record<string, never>", schema, re.M)
    assert closed == []


def test_typescript_client_journey(live: Served, typescript: Path) -> None:
    shutil.copy(JOURNEYS / "journey.ts", typescript)
    shutil.copy(JOURNEYS / "tsconfig.json", typescript)
    (typescript / "package.json").write_text('{"private": true, "type": "module"}\n')
    modules = typescript / "node_modules"
    if not modules.exists():
        modules.symlink_to(generate.NODE_TOOLS / "node_modules")
    run(modules / ".bin" / "tsc", "-p", typescript, cwd=typescript)
    out = run(node(), typescript / "build" / "journey.js", live.url, cwd=typescript)
    last = out.strip().splitlines()[-1]
    assert re.fullmatch(
        r"ts journey ok: users=3 pages=3 order=[0-9a-f-]{36} status=paid events=3", last
    ), out
    webhooks_accepted(live)
