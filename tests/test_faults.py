"""Fault injection against real processes: Surge, PostgreSQL, a private Redis, the fake provider.

One rig per module: a private redis-server (so it can be killed without touching anyone else's),
the fake provider with its books journaled to a file (so it can be killed and still tell what it
charged), and `python -m server serve` on this session's database. Each scenario runs a load of
clients creating and paying orders, injects one fault, and asserts what issue #18 asks of every
fault:

- every write answered 2xx is in the database;
- no order captured twice, and every settled order agrees with the provider's ledger;
- no 5xx other than 503 with Retry-After, and no connection reset by a live server;
- the time from the fault's end to the next success is bounded (RECOVERY_S; RESTART_S when the
  server itself was killed and a new process has to start); it is printed.

Each scenario prints one `[faults]` line of figures (`pytest -s` shows them).
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import asyncpg
import orjson
import pytest

from server.runner import free_port

from .conftest import Services, _truncate, server_env
from .faults import (
    PROVIDER_KEY,
    PROVIDER_SECRET,
    UNSETTLED_STEPS,
    Books,
    Load,
    Proc,
    Shop,
    http_status,
    open_shop,
    provider_proc,
    redis_proc,
    run_load_while,
    server_proc,
    summary,
    wait_listening,
    wait_until,
)
from .json_logs import not_json_log

RECOVERY_S = 10.0  # a fault's end to the next success
RESTART_S = 20.0  # a SIGKILLed server's replacement started and answering (imports, pools)
SETTLE_S = 40.0  # every saga of a scenario ends within this after its load stops
BODY_READ_TIMEOUT_S = 1.0
MAX_IN_FLIGHT = 32
SLOW_CONNECTIONS = 40  # more than MAX_IN_FLIGHT: today they hold every slot


@dataclass
class Rig:
    services: Services
    redis: Proc
    redis_port: int
    provider: Proc
    provider_port: int
    server: Proc
    port: int
    books: Books
    shop: Shop

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start_server(self) -> None:
        self.server.start()
        wait_until(
            "surge answering /healthz",
            lambda: http_status(self.base + "/healthz") == 200,
            30,
            self.server,
        )

    def start_redis(self) -> None:
        self.redis.start()
        wait_listening(self.redis, self.redis_port)

    def start_provider(self) -> None:
        self.provider.start()
        wait_listening(self.provider, self.provider_port)

    def ensure_up(self) -> None:
        """A scenario that failed half-way may have left a process dead: start it again."""
        for proc, start in (
            (self.redis, self.start_redis),
            (self.provider, self.start_provider),
            (self.server, self.start_server),
        ):
            if proc.popen is None or proc.popen.poll() is not None:
                start()
        set_provider_faults(self, [])


def set_provider_faults(rig: Rig, rules: list[dict[str, object]]) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{rig.provider_port}/_admin/faults",
        data=orjson.dumps({"rules": rules}),
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def scrape(rig: Rig) -> dict[str, float]:
    """The server's /metrics samples (its `_created` timestamps left out)."""
    with urllib.request.urlopen(rig.base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            if not name.split("{")[0].endswith("_created"):
                samples[name] = float(value)
    return samples


def changed(before: dict[str, float], after: dict[str, float], *families: str) -> dict[str, float]:
    """What these counter families gained during a scenario (gauges: their value after)."""
    out = {}
    for name, value in after.items():
        if name.startswith(families):
            gained = value - before.get(name, 0.0)
            if gained:
                out[name] = gained
    return out


def server_side_5xx(gained: dict[str, float]) -> list[str]:
    """5xx the server counted (clients that hung up, webhook deliveries) other than 503."""
    return [
        f"{name} +{value:.0f}"
        for name, value in gained.items()
        if name.startswith("surge_http_requests_total")
        and re.search(r'status="5\d\d"', name)
        and 'status="503"' not in name
    ]


def finish(
    rig: Rig, problems: list[str], before: dict[str, float], log_from: int, *families: str
) -> None:
    """Print what the server counted and logged during the scenario; fail on any problem."""
    gained = changed(before, scrape(rig), "surge_http_requests_total", *families)
    print("[faults] metrics gained:", gained)
    logged = rig.server.log_lines(log_from)
    print("[faults] log:", log_digest(logged))
    bad = server_side_5xx(gained)
    if bad:
        problems.append(f"the server counted 5xx other than 503: {bad}")
    # JSON throughout, faults or not (the "--- start" markers are the rig's own)
    text = "\n".join(line for line in logged if not line.startswith("--- start "))
    if not_json := not_json_log(text):
        problems.append(f"{len(not_json)} log lines are not JSON: {not_json[:10]}")
    assert not problems, "\n".join(problems)


def log_digest(lines: list[str]) -> dict[str, int]:
    """WARNING and ERROR log lines by their message, numbers and ids blurred."""
    found: dict[str, int] = {}
    for line in lines:
        if '"level":"warning"' in line or '"level":"error"' in line or "Error" in line:
            key = re.sub(r"[0-9a-f]{8}-[0-9a-f-]{27}|\d+(\.\d+)?", "N", line)[:160]
            found[key] = found.get(key, 0) + 1
    return found


@pytest.fixture(scope="module")
def rig(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    asyncio.run(_truncate(services.dsn))  # no saga left by another test for this rig to resume
    workdir: Path = tmp_path_factory.mktemp("faults")
    redis_port, provider_port, port = free_port(), free_port(), free_port()
    redis = redis_proc(redis_port, workdir)
    provider = provider_proc(
        provider_port, f"http://127.0.0.1:{port}/v1/webhooks/payments", workdir
    )
    env = server_env(
        services,
        port,
        REDIS_URL=f"redis://127.0.0.1:{redis_port}/0",
        PAYMENTS_URL=f"http://127.0.0.1:{provider_port}",
        PAYMENTS_API_KEY=PROVIDER_KEY,
        PAYMENTS_WEBHOOK_SECRET=PROVIDER_SECRET,
        PAYMENTS_TIMEOUT_S="1",
        PAYMENTS_RETRIES="2",
        PAYMENTS_BACKOFF_MS="20",
        PAYMENTS_BREAKER_RESET_S="0.5",
        PAYMENTS_SAGA_LEASE_S="2",  # a killed process's sagas are resumed within seconds
        PAYMENTS_SAGA_ATTEMPTS="8",
        MIGRATE_ON_START="false",
        ACCESS_LOG="false",
        SHUTDOWN_GRACE_S="1",
        RATE_LIMIT_RATE="100000",
        RATE_LIMIT_BURST="100000",
        AUTH_RATE_LIMIT_PER_MINUTE="1000000",
        MAX_IN_FLIGHT=str(MAX_IN_FLIGHT),
        BODY_READ_TIMEOUT_S=str(BODY_READ_TIMEOUT_S),
        HEADER_TIMEOUT_S="2",
    )
    server = server_proc(env, workdir)
    books = Books(services.dsn, f"http://127.0.0.1:{provider_port}")
    placeholder = Shop("", {}, "", "")
    the_rig = Rig(
        services, redis, redis_port, provider, provider_port, server, port, books, placeholder
    )
    try:
        the_rig.start_redis()
        the_rig.start_provider()
        the_rig.start_server()
        the_rig.shop = asyncio.run(open_shop(the_rig.base))
        print(f"[faults] logs in {workdir}")
        yield the_rig
    finally:
        print("[faults]", server.stop(), "/", provider.stop())
        redis.kill()


async def invariants(
    rig: Rig, load: Load, *, settle: bool = True, resets_allowed: bool = False
) -> list[str]:
    """What every fault must leave true; each broken one is a line of the failure message."""
    problems = []
    missing = await rig.books.missing_writes(load)
    for what, ids in missing.items():
        if ids:
            problems.append(f"{len(ids)} {what} answered 2xx are not in the database: {ids[:5]}")
    bad = load.bad_5xx()
    if bad:
        statuses = sorted({(s.status, s.retry_after) for s in bad}, key=str)
        problems.append(
            f"{len(bad)} 5xx other than 503 with Retry-After (status, Retry-After): "
            f"{statuses}; first: {bad[0].op} {bad[0].detail!r}"
        )
    resets = load.connection_errors()
    if resets and not resets_allowed:
        problems.append(f"{len(resets)} connection errors; first: {resets[0].detail}")
    if settle and load.paying:
        try:
            final = await rig.books.settled(load.paying, SETTLE_S)
        except AssertionError as exc:
            problems.append(str(exc))
        else:
            ledger = await rig.books.ledger_disagreements(rig.shop.tenant_id, final)
            for what, items in ledger.items():
                if items:
                    problems.append(f"{len(items)} orders {what}: {items[:3]}")
    return problems


def recovered(problems: list[str], name: str, seconds: float | None) -> None:
    if seconds is None or seconds > RECOVERY_S:
        problems.append(f"{name}: no success within {RECOVERY_S} s of the fault's end ({seconds})")


async def terminate_backends(admin_dsn: str, database: str) -> int:
    con = await asyncpg.connect(admin_dsn)
    try:
        killed: int = await con.fetchval(
            "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()) t",
            database,
        )
        return killed
    finally:
        await con.close()


def test_postgres_backends_terminated_under_load(rig: Rig) -> None:
    rig.ensure_up()
    database = rig.services.dsn.rsplit("/", 1)[1]
    log_from = rig.server.log_size()
    before = scrape(rig)

    async def scenario() -> list[str]:
        load = Load(rig.shop, clients=4)
        ends: list[float] = []
        killed: list[int] = []

        async def fault() -> None:
            await asyncio.sleep(1.5)
            for _ in range(3):
                killed.append(await terminate_backends(rig.services.admin_dsn, database))
                ends.append(time.monotonic())
                await asyncio.sleep(1.5)

        await run_load_while(load, fault)
        problems = await invariants(rig, load)
        recoveries = [load.recovery_s(end) for end in ends]
        worst = max((r for r in recoveries if r is not None), default=None)
        summary(
            "postgres backends terminated",
            load,
            terminated=killed,
            orders=len(load.created),
            paid=len(load.paying),
            worst_recovery_s=worst if worst is not None else -1.0,
        )
        for end, r in zip(ends, recoveries, strict=True):
            recovered(problems, f"termination at +{end - ends[0]:.1f} s", r)
        return problems

    problems = asyncio.run(scenario())
    finish(rig, problems, before, log_from, "surge_db_pool_timeouts_total")


def test_redis_stopped_and_restarted_under_load(rig: Rig) -> None:
    rig.ensure_up()
    log_from = rig.server.log_size()
    before = scrape(rig)

    async def scenario() -> list[str]:
        load = Load(rig.shop, clients=4)
        marks: dict[str, float] = {}
        readyz: list[tuple[int, bytes]] = []
        back_ok: list[float] = []

        async def ready(s: aiohttp.ClientSession) -> tuple[int, bytes]:
            async with s.get(rig.base + "/readyz") as r:
                return r.status, await r.read()

        async def fault() -> None:
            await asyncio.sleep(1.5)
            rig.redis.kill()
            marks["down"] = time.monotonic()
            async with aiohttp.ClientSession() as s:
                await asyncio.sleep(1.0)
                readyz.append(await ready(s))
                await asyncio.sleep(1.0)
                readyz.append(await ready(s))
                await asyncio.to_thread(rig.start_redis)
                marks["up"] = time.monotonic()
                deadline = marks["up"] + RECOVERY_S
                while time.monotonic() < deadline:
                    _status, body = await ready(s)
                    if orjson.loads(body)["checks"]["redis"] == "ok":
                        back_ok.append(time.monotonic() - marks["up"])
                        break
                    await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)

        await run_load_while(load, fault)
        problems = await invariants(rig, load)
        during = load.failures_between(marks["down"], marks["up"])
        summary(
            "redis killed and restarted",
            load,
            failures_while_down=during,
            recovery_s=load.recovery_s(marks["up"]) or -1.0,
            readyz_redis_ok_again_s=back_ok[0] if back_ok else -1.0,
        )
        print("[faults] /readyz while Redis was down:", readyz)
        want = (200, {"status": "ready", "checks": {"postgres": "ok", "redis": "degraded"}})
        for status, body in readyz:
            if (status, orjson.loads(body)) != want:
                problems.append(
                    f"/readyz while Redis is down: {status} {body.decode()}, want {want}"
                )
        if not back_ok:
            problems.append(f"/readyz did not see Redis again within {RECOVERY_S} s")
        relayed = await rig.books.outbox_relayed(RECOVERY_S)
        print(f"[faults] outbox relayed again {relayed:.2f} s after the load stopped")
        if relayed < 0:
            problems.append(f"outbox rows still not relayed {RECOVERY_S} s after the load stopped")
        recovered(problems, "Redis restart", load.recovery_s(marks["up"]))
        return problems

    problems = asyncio.run(scenario())
    finish(rig, problems, before, log_from, "surge_outbox", "surge_ratelimit_fallback")


def test_provider_killed_and_restarted_under_pay_load(rig: Rig) -> None:
    rig.ensure_up()
    log_from = rig.server.log_size()
    before = scrape(rig)

    async def scenario() -> list[str]:
        load = Load(rig.shop, clients=4)
        marks: dict[str, float] = {}

        async def fault() -> None:
            await asyncio.sleep(1.5)
            rig.provider.kill()
            marks["down"] = time.monotonic()
            await asyncio.sleep(2.0)
            await asyncio.to_thread(rig.start_provider)
            marks["up"] = time.monotonic()
            await asyncio.sleep(2.0)

        await run_load_while(load, fault)
        problems = await invariants(rig, load)
        final = await rig.books.states(load.paying)
        outcomes: dict[str, int] = {}
        for status, _step in final.values():
            outcomes[status] = outcomes.get(status, 0) + 1
        summary(
            "provider killed and restarted",
            load,
            pays_accepted=len(load.paying),
            outcomes=outcomes,
            pay_recovery_s=load.recovery_s(marks["up"], "pay") or -1.0,
        )
        recovered(problems, "provider restart", load.recovery_s(marks["up"], "pay"))
        return problems

    problems = asyncio.run(scenario())
    finish(rig, problems, before, log_from, "surge_payments_sagas", "surge_payments_calls")


def test_server_killed_mid_saga(rig: Rig) -> None:
    rig.ensure_up()
    log_from = rig.server.log_size()
    # Slow captures keep sagas mid-way when the process dies.
    set_provider_faults(rig, [{"op": "capture", "mode": "slow", "delay_ms": 400}])

    async def in_flight() -> int:
        states = await rig.books.states(load.paying)
        return sum(1 for _status, step in states.values() if step in UNSETTLED_STEPS)

    load = Load(rig.shop, clients=6)

    async def scenario() -> list[str]:
        marks: dict[str, float] = {}
        mid_saga: list[int] = []

        async def fault() -> None:
            deadline = time.monotonic() + 15
            while len(load.paying) < 30:
                assert time.monotonic() < deadline, f"only {len(load.paying)} pays answered"
                await asyncio.sleep(0.05)
            rig.server.kill()
            marks["killed"] = time.monotonic()
            mid_saga.append(await in_flight())
            await asyncio.to_thread(set_provider_faults, rig, [])
            await asyncio.to_thread(rig.start_server)
            marks["up"] = time.monotonic()
            await asyncio.sleep(1.5)

        await run_load_while(load, fault)
        problems = await invariants(rig, load, resets_allowed=True)
        settled_s = time.monotonic() - marks["up"]
        summary(
            "server SIGKILLed mid-saga",
            load,
            sagas_in_flight_at_kill=mid_saga[0],
            pays_accepted=len(load.paying),
            kill_to_first_2xx_s=load.recovery_s(marks["killed"]) or -1.0,
            restart_to_all_settled_s=settled_s,
        )
        if mid_saga[0] == 0:
            problems.append(
                "no saga was mid-way when the server was killed: the test proves nothing"
            )
        took = load.recovery_s(marks["killed"])
        if took is None or took > RESTART_S:
            problems.append(f"no success within {RESTART_S} s of the server's SIGKILL ({took})")
        return problems

    problems = asyncio.run(scenario())
    finish(rig, problems, {}, log_from, "surge_payments_sagas", "surge_payments_calls")


async def trickle(port: int, stop: asyncio.Event) -> tuple[int | None, float]:
    """A request head promising 10000 bytes of body, then one byte every 0.2 s, from another
    client address (127.0.0.2) than the honest clients'. (status answered or None, seconds
    until the server answered or closed, or the attack ended)."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
    head = (
        "POST /v1/auth/login HTTP/1.1\r\nHost: surge\r\nContent-Type: application/json\r\n"
        "Content-Length: 10000\r\n\r\n{"
    )
    try:
        writer.write(head.encode())
        await writer.drain()
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(reader.readline(), 0.2)
            except TimeoutError:
                writer.write(b" ")
                await writer.drain()
                continue
            if not line:
                return None, time.monotonic() - started  # closed without an answer
            return int(line.split()[1]), time.monotonic() - started
        return None, time.monotonic() - started
    except (ConnectionError, OSError):
        return None, time.monotonic() - started
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()


def test_slow_bodies_do_not_starve_other_clients(rig: Rig) -> None:
    rig.ensure_up()
    log_from = rig.server.log_size()
    before = scrape(rig)

    async def scenario() -> list[str]:
        load = Load(rig.shop, clients=2, pay=False)
        marks: dict[str, float] = {}
        attack: list[tuple[int | None, float]] = []

        async def fault() -> None:
            await asyncio.sleep(1.0)
            stop = asyncio.Event()
            marks["start"] = time.monotonic()
            tasks = [asyncio.create_task(trickle(rig.port, stop)) for _ in range(SLOW_CONNECTIONS)]
            await asyncio.sleep(4 * BODY_READ_TIMEOUT_S)
            stop.set()
            attack.extend(await asyncio.gather(*tasks))
            marks["end"] = time.monotonic()
            await asyncio.sleep(1.0)

        await run_load_while(load, fault)
        problems = await invariants(rig, load, settle=False)
        during = [s for s in load.seen if marks["start"] + 0.5 <= s.started < marks["end"]]
        refused = [s for s in during if not s.ok]
        answers: dict[str, int] = {}
        for status, _ in attack:
            answers[str(status)] = answers.get(str(status), 0) + 1
        summary(
            "slow bodies",
            load,
            slow_connections=SLOW_CONNECTIONS,
            slow_answers=answers,
            slowest_answer_s=max(t for _, t in attack),
            honest_during=len(during),
            honest_refused_during=len(refused),
            recovery_s=load.recovery_s(marks["end"]) or -1.0,
        )
        if refused:
            problems.append(
                f"{len(refused)} of {len(during)} honest requests refused during the slow-body"
                f" attack (statuses {sorted({s.status for s in refused}, key=str)})"
            )
        if not during:
            problems.append("no honest request completed during the slow-body attack")
        late = [
            (status, round(t, 2))
            for status, t in attack
            if status not in (408, 503) or t > BODY_READ_TIMEOUT_S + 2
        ]
        if late:
            problems.append(
                f"{len(late)} of {SLOW_CONNECTIONS} slow bodies not answered 408 (or shed with"
                f" 503) within BODY_READ_TIMEOUT_S + 2 s (status, seconds): {late[:5]}"
            )
        recovered(problems, "slow-body attack", load.recovery_s(marks["end"]))
        return problems

    problems = asyncio.run(scenario())
    finish(rig, problems, before, log_from, "surge_shed_total")
