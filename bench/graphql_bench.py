"""python -m bench.graphql_bench: the 50-order GraphQL query against the REST calls that fetch
the same data, side by side in one run; and (`--libs`) graphql-core, ariadne and strawberry
executing that query in-process over the same in-memory rows.

HTTP mode: a database of its own (`surge_gqlbench`, created and migrated here), one tenant with
10 users, 20 products and 50 orders of 3 lines each, made through the REST API. Surge runs pinned
to CPU 0 (`taskset -c 0`, one process, everything on, rate limits at 10⁹, user cache on as
shipped); wrk runs pinned to CPU 1, 64 connections, alternating rounds:

  graphql    POST /graphql: orders(first: 50) with each order's user, items (first: 10) and
             their products: one request per page
  rest_set   the same data over REST: GET /v1/orders?limit=50, then GET /v1/users/{id} for each
             of the 10 users and GET /v1/products/{id} for each of the 20 products: 31 requests
             per page (wrk cycles through them; pages/s = requests/s / 31)
  rest_list  GET /v1/orders?limit=50 alone (orders with their lines, no users or products)

    python -m bench.graphql_bench [--rounds 3] [--seconds 10] [--libs] [--libs-only]

--libs needs the two libraries Surge did not pick, which are not in the lock:
`.venv/bin/pip install ariadne==1.1.1 strawberry-graphql==0.341.2` (uninstall them after).
Needs PostgreSQL at BENCH_DATABASE_URL (an admin database; default postgres on 127.0.0.1:5432),
Redis at BENCH_REDIS_URL, wrk and taskset. Figures: docs/PERFORMANCE.md (notes, GraphQL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from bench.common import ROOT

ADMIN_URL = os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
DB_NAME = "surge_gqlbench"
PORT = 18_731
ORDERS, USERS, PRODUCTS, LINES = 50, 10, 20, 3

QUERY = """query Page($first: Int) {
  orders(first: $first) {
    edges { cursor node {
      id status totalCents currency createdAt
      user { id username email }
      items(first: 10) { quantity unitPriceCents product { id sku name priceCents } }
    } }
    pageInfo { hasNextPage endCursor }
  }
}"""


def _db_url(name: str) -> str:
    parts = urlsplit(ADMIN_URL)
    return urlunsplit(parts._replace(path="/" + name))


def _call(method: str, path: str, body: Any = None, token: str | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{PORT}{path}", data=data, method=method)
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310
        return json.loads(resp.read() or b"null")


async def _fresh_database() -> None:
    con = await asyncpg.connect(ADMIN_URL)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
        await con.execute(f'CREATE DATABASE "{DB_NAME}"')
    finally:
        await con.close()


def _start_server(env: dict[str, str]) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    for _ in range(300):
        try:
            _call("GET", "/healthz")
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"surge did not start: {proc.stderr.read().decode() if proc.stderr else ''}")


def _seed() -> dict[str, Any]:
    password = "correct horse battery"
    owner = _call(
        "POST",
        "/v1/auth/signup",
        {"tenant_name": "bench", "email": "o@x.io", "username": "o", "password": password},
    )
    tenant, token = owner["tenant"]["id"], owner["access_token"]
    tokens = [token]
    for n in range(USERS - 1):
        email = f"u{n}@x.io"
        _call(
            "POST",
            "/v1/users",
            {"email": email, "username": f"u{n}", "password": password, "roles": ["member"]},
            token,
        )
        login = _call(
            "POST", "/v1/auth/login", {"tenant_id": tenant, "email": email, "password": password}
        )
        tokens.append(login["access_token"])
    products = [
        _call(
            "POST",
            "/v1/products",
            {
                "sku": f"sku-{n}",
                "name": f"Product {n}",
                "price_cents": 100 + n,
                "currency": "EUR",
                "stock": 1_000_000,
            },
            token,
        )["id"]
        for n in range(PRODUCTS)
    ]
    for n in range(ORDERS):
        lines = [
            {"product_id": products[(n + k * 7) % PRODUCTS], "quantity": 1 + k}
            for k in range(LINES)
        ]
        _call("POST", "/v1/orders", {"items": lines}, tokens[n % USERS])
    page = _call("GET", "/v1/orders?limit=50", token=token)
    users = sorted({o["user_id"] for o in page["items"]})
    prods = sorted({i["product_id"] for o in page["items"] for i in o["items"]})
    check = _call("POST", "/graphql", {"query": QUERY, "variables": {"first": 50}}, token)
    assert "errors" not in check, check
    edges = check["data"]["orders"]["edges"]
    assert [e["node"]["id"] for e in edges] == [o["id"] for o in page["items"]]
    return {"token": token, "users": users, "products": prods}


_WRK_DONE = """
done = function(summary, latency, requests)
  io.write(string.format("BENCH_JSON {\\"requests\\":%d,\\"duration_us\\":%d,"
    .. "\\"errors\\":%d,\\"p50_us\\":%d,\\"p99_us\\":%d}\\n",
    summary.requests, summary.duration,
    summary.errors.status + summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def _scripts(tmp: Path, seed: dict[str, Any]) -> dict[str, Path]:
    auth = f'["Authorization"] = "Bearer {seed["token"]}"'
    body = json.dumps({"query": QUERY, "variables": {"first": 50}})
    graphql = (
        f'wrk.method = "POST"\nwrk.body = [==[{body}]==]\n'
        f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers{auth}\n' + _WRK_DONE
    )
    paths = (
        ["/v1/orders?limit=50"]
        + [f"/v1/users/{u}" for u in seed["users"]]
        + [f"/v1/products/{p}" for p in seed["products"]]
    )
    rest_set = (
        "local paths = {" + ", ".join(f'"{p}"' for p in paths) + "}\nlocal i = 0\n"
        "request = function()\n  i = i % #paths + 1\n"
        f'  return wrk.format("GET", paths[i], {{{auth}}})\nend\n' + _WRK_DONE
    )
    rest_list = (
        f'wrk.headers["Authorization"] = "Bearer {seed["token"]}"\n'
        'wrk.path = "/v1/orders?limit=50"\n' + _WRK_DONE
    )
    out = {}
    for name, text in (("graphql", graphql), ("rest_set", rest_set), ("rest_list", rest_list)):
        out[name] = tmp / f"{name}.lua"
        out[name].write_text(text)
    out["_per_page"] = Path(str(len(paths)))
    return out


def _wrk(script: Path, seconds: int, path: str) -> dict[str, Any]:
    cmd = [
        "taskset", "-c", "1", "wrk", "-t", "1", "-c", "64", "-d", f"{seconds}s",
        "-s", str(script), f"http://127.0.0.1:{PORT}{path}",
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    m = re.search(r"BENCH_JSON (\{.*\})", out)
    assert m, out
    res: dict[str, Any] = json.loads(m[1])
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    return res


def http_bench(rounds: int, seconds: int) -> dict[str, Any]:
    asyncio.run(_fresh_database())
    env = {
        **os.environ,
        "DATABASE_URL": _db_url(DB_NAME),
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": f"surgegqlbench:{secrets.token_hex(3)}:",
        "PORT": str(PORT),
        "ACCESS_LOG": "false",
        "RATE_LIMIT_RATE": "1000000000",
        "RATE_LIMIT_BURST": "1000000000",
        "AUTH_RATE_LIMIT_PER_MINUTE": "1000000",
        "JWT_KEYS": "bench:" + secrets.token_hex(24),
        "PG_POOL_MAX": "16",
    }
    proc = _start_server(env)
    try:
        seed = _seed()
        with tempfile.TemporaryDirectory() as tmpdir:
            scripts = _scripts(Path(tmpdir), seed)
            per_page = int(str(scripts.pop("_per_page")))
            paths = {"graphql": "/graphql", "rest_set": "/", "rest_list": "/v1/orders?limit=50"}
            runs: dict[str, list[dict[str, Any]]] = {k: [] for k in paths}
            for name, script in scripts.items():  # warm-up: statement caches, JIT-free paths
                _wrk(script, 2, paths[name])
            for _ in range(rounds):
                for name, script in scripts.items():
                    runs[name].append(_wrk(script, seconds, paths[name]))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    summary: dict[str, Any] = {"per_page_rest_requests": per_page, "rounds": rounds}
    for name, results in runs.items():
        assert all(r["errors"] == 0 for r in results), (name, results)
        rps = statistics.median(r["rps"] for r in results)
        pages = rps / per_page if name == "rest_set" else rps
        summary[name] = {
            "requests_per_s": round(rps),
            "pages_per_s": round(pages, 1),
            "p50_ms": round(statistics.median(r["p50_us"] for r in results) / 1000, 2),
            "p99_ms": round(statistics.median(r["p99_us"] for r in results) / 1000, 2),
            "rounds_rps": [round(r["rps"]) for r in results],
        }
    summary["graphql_vs_rest_set_pages"] = round(
        summary["graphql"]["pages_per_s"] / summary["rest_set"]["pages_per_s"], 2
    )
    summary["graphql_vs_rest_list"] = round(
        summary["graphql"]["requests_per_s"] / summary["rest_list"]["requests_per_s"], 2
    )
    return summary


# -- libraries, in-process ---------------------------------------------------------------------


def _rows() -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    users = {
        f"u{n}": {"id": f"u{n}", "username": f"user{n}", "email": f"u{n}@x.io"}
        for n in range(USERS)
    }
    products = {
        f"p{n}": {"id": f"p{n}", "sku": f"sku-{n}", "name": f"P{n}", "priceCents": 100 + n}
        for n in range(PRODUCTS)
    }
    orders = [
        {
            "id": f"o{n}",
            "status": "pending",
            "totalCents": 1000,
            "currency": "EUR",
            "createdAt": "2026-11-21T10:00:00.123Z",
            "_user": f"u{n % USERS}",
            "_items": [
                {"quantity": 1 + k, "unitPriceCents": 100, "_product": f"p{(n + 7 * k) % 20}"}
                for k in range(LINES)
            ],
        }
        for n in range(ORDERS)
    ]
    return orders, users, products


def lib_bench(n: int) -> dict[str, float]:
    """Microseconds per execution of QUERY over the same in-memory rows, per library; each gets
    its own idiomatic path (graphql-core: a cached parsed document, as
    handlers/graphql/service.py)."""
    orders, users, products = _rows()

    def page(first: int) -> dict[str, Any]:
        return {
            "edges": [{"cursor": o["id"], "node": o} for o in orders[:first]],
            "pageInfo": {"hasNextPage": False, "endCursor": orders[first - 1]["id"]},
        }

    results: dict[str, float] = {}
    variables = {"first": 50}

    # graphql-core, the SDL Surge serves
    import graphql

    from handlers.graphql.schema import SDL

    schema = graphql.build_schema(SDL)

    async def orders_r(_r: Any, _i: Any, first: int = 50, **_: Any) -> Any:
        return page(first)

    async def user_r(o: Any, _i: Any) -> Any:
        return users[o["_user"]]

    async def items_r(o: Any, _i: Any, first: int | None = None) -> Any:
        return o["_items"][:first]

    async def product_r(i: Any, _i: Any) -> Any:
        return products[i["_product"]]

    for t, f, r in (
        ("Query", "orders", orders_r),
        ("Order", "user", user_r),
        ("Order", "items", items_r),
        ("OrderItem", "product", product_r),
    ):
        schema.type_map[t].fields[f].resolve = r  # type: ignore[attr-defined]
    document = graphql.parse(QUERY)
    assert not graphql.validate(schema, document)

    async def core() -> Any:
        return await graphql.execute(schema, document, variable_values=variables)  # type: ignore[misc]

    async def core_full() -> Any:
        doc = graphql.parse(QUERY)
        assert not graphql.validate(schema, doc)
        return await graphql.execute(schema, doc, variable_values=variables)  # type: ignore[misc]

    # ariadne: same SDL, its ObjectType bindings, its graphql() entry point
    import ariadne

    query_t, order_t, item_t = (
        ariadne.QueryType(),
        ariadne.ObjectType("Order"),
        ariadne.ObjectType("OrderItem"),
    )
    query_t.set_field("orders", orders_r)
    order_t.set_field("user", user_r)
    order_t.set_field("items", items_r)
    item_t.set_field("product", product_r)
    a_schema = ariadne.make_executable_schema(SDL, query_t, order_t, item_t)

    async def ariadne_full() -> Any:
        _ok, res = await ariadne.graphql(a_schema, {"query": QUERY, "variables": variables})
        return res

    # strawberry: the same types as classes (module level: strawberry resolves annotations there)
    from bench import graphql_bench_strawberry as sb

    s_schema = sb.schema(orders, users, products)

    async def strawberry_full() -> Any:
        res = await s_schema.execute(QUERY, variable_values=variables)
        assert not res.errors, res.errors
        return res

    async def timed(fn: Any) -> float:
        for _ in range(20):
            await fn()
        best = []
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(n):
                await fn()
            best.append((time.perf_counter() - t0) / n * 1e6)
        return min(best)

    async def main() -> None:
        res = await core()
        assert not res.errors and len(res.data["orders"]["edges"]) == 50, res.errors
        for name, fn in (
            ("graphql-core (cached document)", core),
            ("graphql-core (parse+validate each time)", core_full),
            ("ariadne graphql()", ariadne_full),
            ("strawberry Schema.execute()", strawberry_full),
        ):
            results[name] = round(await timed(fn), 1)

    asyncio.run(main())
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--libs", action="store_true", help="also time the three libraries")
    ap.add_argument("--libs-only", action="store_true")
    ap.add_argument("--lib-iterations", type=int, default=200)
    args = ap.parse_args()
    out: dict[str, Any] = {}
    if args.libs or args.libs_only:
        out["libraries_us_per_query"] = lib_bench(args.lib_iterations)
        print(json.dumps(out["libraries_us_per_query"], indent=2), flush=True)
    if not args.libs_only:
        out["http"] = http_bench(args.rounds, args.seconds)
        print(json.dumps(out["http"], indent=2))


if __name__ == "__main__":
    main()
