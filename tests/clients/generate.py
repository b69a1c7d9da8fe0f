"""Typed clients from the OpenAPI document /openapi.json serves (`make clients`, and
tests/test_clients.py into a temporary directory):

    <out>/openapi.json            the document itself
    <out>/python/surge_client/    openapi-python-client's package (put <out>/python on sys.path)
    <out>/ts/schema.d.ts          openapi-typescript's `paths`, for openapi-fetch's createClient

Without --url the document is the one a server built by create_app answers at /openapi.json,
asked in process (no database, no socket): the same bytes, with no `PUBLIC_URL` to put in
`servers`. With --url it is fetched from that running server.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from aiohttp.test_utils import make_mocked_request

from server.app import create_app
from server.config import Config

ROOT = Path(__file__).resolve().parents[2]
NODE_TOOLS = ROOT / "tests" / "node"  # package.json, package-lock.json; `npm ci` there
PACKAGE = "surge_client"


async def _served_in_process() -> bytes:
    # Nothing in create_app does I/O; the database URL is never dialled.
    config = Config(database_url="postgresql://unused/unused", jwt_keys="k:" + "x" * 40)
    app = create_app(config)
    request = make_mocked_request("GET", "/openapi.json", app=app)
    match = await app.router.resolve(request)
    response = await match.handler(request)
    assert response.status == 200, response.status
    body = response.body
    assert isinstance(body, bytes)
    return body


def fetch_document(url: str | None = None) -> bytes:
    """/openapi.json of the server at `url`, or of create_app's when None."""
    if url is None:
        return asyncio.run(_served_in_process())
    with urllib.request.urlopen(url.rstrip("/") + "/openapi.json", timeout=10) as r:
        body: bytes = r.read()
    return body


def node_bin(name: str) -> Path:
    path = NODE_TOOLS / "node_modules" / ".bin" / name
    if not path.exists():
        raise SystemExit(f"{path} is missing: run `npm ci --prefix tests/node` (make clients does)")
    return path


def write_document(out: Path, document: bytes) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    spec = out / "openapi.json"
    spec.write_bytes(document)
    return spec


def generate_python(out: Path, spec: Path) -> Path:
    """openapi-python-client's package at <out>/python/surge_client; <out>/python goes on the
    path. A warning (an operation or schema it had to skip) fails: the document is fixed."""
    python = out / "python"
    shutil.rmtree(python, ignore_errors=True)
    python.mkdir(parents=True)
    bin_dir = Path(sys.executable).parent
    # It formats what it writes with ruff, looked up on PATH: the venv's.
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [
            bin_dir / "openapi-python-client",
            "generate",
            "--path",
            spec,
            "--output-path",
            python / PACKAGE,
            "--meta",
            "none",  # the package alone, named by its directory
            "--fail-on-warning",
        ],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    return python


def generate_typescript(out: Path, spec: Path) -> Path:
    """openapi-typescript's <out>/ts/schema.d.ts: `paths` for openapi-fetch's createClient."""
    ts = out / "ts"
    ts.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [node_bin("openapi-typescript"), spec, "--output", ts / "schema.d.ts"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return ts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a running server's origin (default: create_app's)")
    parser.add_argument("--out", type=Path, default=ROOT / "clients")
    args = parser.parse_args()
    spec = write_document(args.out, fetch_document(args.url))
    generate_python(args.out, spec)
    generate_typescript(args.out, spec)
    print(f"clients written under {args.out}: python/{PACKAGE}, ts/schema.d.ts")


if __name__ == "__main__":
    main()
