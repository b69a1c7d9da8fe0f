"""python -m bench.verify: check under load that every response belongs to its request.

uvloop once handed responses to the wrong connection under load; wrk counts statuses only, so
this client asks for random users over many concurrent keep-alive connections and checks each
body against the request that produced it (the user id, the tenant, the shape). It prints one
JSON object; bench/run.py runs it pinned to the client CPU and fails the run on any problem.

/healthz answers are identical for every request, so crossed ones cannot be told apart there:
for that endpoint this checks status and body only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.common import USER_FIELDS

_TS = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")
_USER_KEYS = frozenset(USER_FIELDS)
_MAX_EXAMPLES = 5


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    mismatches: int = 0
    shape_errors: int = 0
    transport_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def fail(self, kind: str, detail: str) -> None:
        if kind == "mismatch":
            self.mismatches += 1
        elif kind == "shape":
            self.shape_errors += 1
        else:
            self.transport_errors += 1
        if len(self.examples) < _MAX_EXAMPLES:
            self.examples.append(f"{kind}: {detail}"[:400])


def _user_problem(body: Any, tenant_id: str, user_id: str | None) -> tuple[str, str] | None:
    if type(body) is not dict:
        return ("shape", f"not an object: {body!r}")
    if user_id is not None and body.get("id") != user_id:
        return ("mismatch", f"asked for {user_id}, got {body.get('id')}")
    if body.get("tenant_id") != tenant_id:
        return ("mismatch", f"tenant {tenant_id} asked, got {body.get('tenant_id')}")
    if body.keys() != _USER_KEYS:
        return ("shape", f"keys {sorted(body)}")
    if not (_TS.match(str(body["created_at"])) and _TS.match(str(body["updated_at"]))):
        return ("shape", f"timestamps {body['created_at']!r}, {body['updated_at']!r}")
    return None


def check(kind: str, target: list[str], status: int, body: Any) -> tuple[str, str] | None:
    """None when the answer is the one this request should get, else (kind, detail)."""
    if kind == "healthz":
        return None if body == {"status": "ok"} else ("shape", f"body {body!r}")
    if kind == "user":
        return _user_problem(body, target[0], target[1])
    if kind == "page":
        if type(body) is not dict or body.keys() != {"items", "next_cursor"}:
            return ("shape", f"page {str(body)[:200]}")
        items = body["items"]
        if type(items) is not list or len(items) != 50:
            return ("shape", f"{len(items) if type(items) is list else items!r} items, not 50")
        if type(body["next_cursor"]) is not str:
            return ("shape", f"next_cursor {body['next_cursor']!r} with more users left")
        for item in items:
            problem = _user_problem(item, target[0], None)
            if problem is not None:
                return problem
        return None
    if kind == "events":
        return None if body == {"accepted": 100} else ("mismatch", f"body {body!r}")
    raise ValueError(f"unknown check {kind!r}")


async def _worker(
    session: aiohttp.ClientSession,
    base: str,
    kind: str,
    method: str,
    path: str,
    targets: list[list[str]],
    expect: int,
    deadline: float,
    tally: Tally,
    rng: random.Random,
    each: Iterator[list[str]] | None = None,
) -> None:
    while time.monotonic() < deadline:
        if each is None:
            target = rng.choice(targets)
        else:
            target = next(each, None)
            if target is None:
                return
        tenant_id = target[0]
        if kind == "events":
            token, data = target[1], target[2].encode()
        else:
            token, data = target[2], None
        url = base + path.replace("{id}", target[1])
        headers = {"Authorization": f"Bearer {token}", "X-Tenant": tenant_id}
        if data is not None:
            headers["Content-Type"] = "application/json"
        tally.requests += 1
        try:
            async with session.request(method, url, headers=headers, data=data) as resp:
                raw = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            tally.fail("transport", repr(exc))
            continue
        tally.statuses[status] += 1
        if status != expect:
            if len(tally.examples) < _MAX_EXAMPLES:
                tally.examples.append(f"status {status}: {raw[:300]!r}")
            continue
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            tally.fail("shape", f"not JSON: {raw[:200]!r}")
            continue
        problem = check(kind, target, status, body)
        if problem is None:
            tally.ok += 1
        else:
            tally.fail(*problem)


async def run(
    base: str,
    kind: str,
    method: str,
    path: str,
    targets: list[list[str]],
    expect: int,
    seconds: float,
    concurrency: int,
    each: bool = False,
) -> Tally:
    """`each`: every target exactly once (in order, `seconds` at most), instead of random ones
    until `seconds` have passed."""
    tally = Tally()
    order = iter(targets) if each else None
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=10)
    deadline = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(
            *(
                _worker(
                    session,
                    base,
                    kind,
                    method,
                    path,
                    targets,
                    expect,
                    deadline,
                    tally,
                    random.Random(i),
                    order,
                )
                for i in range(concurrency)
            )
        )
    return tally


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__)
    parser.add_argument("--url", required=True, help="base URL, e.g. http://127.0.0.1:8201")
    parser.add_argument("--check", required=True, choices=("healthz", "user", "page", "events"))
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", required=True, help="'{id}' is replaced by the user id")
    parser.add_argument("--expect", type=int, default=200, help="the success status")
    parser.add_argument("--targets", type=Path, required=True, help="targets.json from bench.run")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--each", action="store_true", help="every target once (a cache's priming), then stop"
    )
    args = parser.parse_args(argv)
    data = json.loads(args.targets.read_text())
    targets = data["events"] if args.check == "events" else data["users"]
    tally = uvloop.run(
        run(
            args.url,
            args.check,
            args.method,
            args.path,
            targets,
            args.expect,
            args.seconds,
            args.concurrency,
            args.each,
        )
    )
    print(
        json.dumps(
            {
                "requests": tally.requests,
                "ok": tally.ok,
                "mismatches": tally.mismatches,
                "shape_errors": tally.shape_errors,
                "transport_errors": tally.transport_errors,
                "statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
                "examples": tally.examples,
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
