"""Instructions per request, counted by callgrind: a figure this noisy machine cannot blur.

Wall-clock A/B runs here swing by more than a few per cent between rounds, so a change worth 2 %
cannot be seen in them. callgrind counts the instructions the server executes (user space only,
not the kernel's share), repeatable within ~0.5 % for the same code whatever else the machine
does. Each server starts under `valgrind --tool=callgrind --instr-atstart=no` with the same
environment as in `bench.run`; after a warm-up, instrumentation is switched on for exactly the
measured requests (ApacheBench, keep-alive, 16 connections), then off again. The count includes
everything the process did meanwhile (its background tasks too), divided by the requests.

    .venv/bin/python -m bench.instructions                       # surge and baseline, /healthz
    .venv/bin/python -m bench.instructions --servers surge --env ACCESS_LOG=false
    .venv/bin/python -m bench.instructions --servers surge --path user          # GET /v1/users/{id}
    .venv/bin/python -m bench.instructions --servers surge --path user --refuse # ... answered 503

`--path user`: a sampled user (bench/data/ids.json, from `python -m bench.seed`) with a bearer
token, cache off (USER_CACHE_TTL_S=0), as bench.run's "user" endpoint. `--refuse`: the same
request answered 503 by the shed layer, every one of the measured requests: the `users` table is
locked (a transaction of this tool's, in the bench database), HOLD requests take every slot
(MAX_IN_FLIGHT, CONCURRENCY_MIN and _INITIAL = HOLD) and wait on the lock, and with
QUEUE_DEADLINE_MS=0 every further request is refused as it reaches the shed layer (adaptive:
too late for any wait, at once; the fixed gate: after its zero timeout fires). The lock is let go
after the count. Needs valgrind and ab (Debian: valgrind, apache2-utils). Instructions
understate a wall-clock gap: see docs/PERFORMANCE.md (sixth-session notes).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from threading import Event, Thread

import asyncpg

from bench.common import IDS_FILE, ROOT
from bench.run import Server, make_servers, stop_server

# Slots held (and the limit) while refusals are counted: few, so few requests hang meanwhile.
HOLD = 2

_EVENTS = re.compile(rb"Events +: ([\w ]+)")


def _wait_up(proc: subprocess.Popen[bytes], url: str, log: Path, limit_s: float = 300) -> None:
    deadline = time.monotonic() + limit_s  # a Python start under valgrind takes tens of seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited while starting:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 (http:// we built)
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer from {url} within {limit_s:.0f} s")


def _ab(url: str, n: int, headers: dict[str, str], refused: bool | None = False) -> None:
    """`n` requests, 16 at a time, kept alive; `refused`: every answer is a non-2xx (True),
    none is (False), not checked (None)."""
    head = [arg for k, v in headers.items() for arg in ("-H", f"{k}: {v}")]
    out = subprocess.run(
        ["ab", "-q", "-k", "-n", str(n), "-c", "16", *head, url], check=True, capture_output=True
    )
    # the answers as expected, or the count is of something else: all 2xx, or all non-2xx (a
    # few odd ones are let by, said: on a loaded machine a request under valgrind can outlast
    # a timeout)
    non2xx = re.search(rb"Non-2xx responses: +(\d+)", out.stdout)
    got = int(non2xx[1]) if non2xx else 0
    odd = 0 if refused is None else n - got if refused else got
    if odd > n // 100:
        raise SystemExit(f"ab: {got} of {n} answers not 2xx, expected {n if refused else 0}")
    if odd:
        print(f"bench.instructions: {odd} of {n} answers were not as expected", flush=True)


def user_request(secret: str) -> tuple[str, dict[str, str]]:
    """GET /v1/users/{id} of the first sampled user, and its bearer token (JWT_KEYS
    bench:secret)."""
    from server.tokens import TokenService

    if not IDS_FILE.exists():
        raise SystemExit(f"{IDS_FILE} is missing: run `python -m bench.seed` first")
    tenant, user = json.loads(IDS_FILE.read_text())["pairs"][0]
    tokens = TokenService([("bench", secret.encode())], "surge", "surge-api", 3600)
    token = tokens.issue(uuid.UUID(user), uuid.UUID(tenant), ["member"])
    return f"/v1/users/{user}", {"Authorization": f"Bearer {token}"}


@contextmanager
def users_locked(dsn: str) -> Iterator[None]:
    """The users table locked by a transaction of its own (its own thread and event loop)
    until the block ends: a read of a user waits, holding its slot."""
    locked, release = Event(), Event()
    failed: list[BaseException] = []

    async def hold() -> None:
        con = await asyncpg.connect(dsn)
        try:
            async with con.transaction():
                await con.execute("LOCK TABLE users IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait)
        finally:
            await con.close()

    def run() -> None:
        try:
            asyncio.run(hold())
        except BaseException as exc:
            failed.append(exc)
            locked.set()

    thread = Thread(target=run, daemon=True)
    thread.start()
    locked.wait()
    if failed:
        raise SystemExit(f"cannot lock users: {failed[0]}")
    try:
        yield
    finally:
        release.set()
        thread.join()


def _held(url: str, headers: dict[str, str], count: int) -> list[Thread]:
    """`count` requests sent, each in a thread of its own, that wait on the lock (answered
    once it goes)."""

    def one() -> None:
        req = urllib.request.Request(url, headers=headers)  # noqa: S310 (an http:// we built)
        try:
            with urllib.request.urlopen(req, timeout=900) as resp:  # noqa: S310
                resp.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass  # the server stopped first: nothing to wait for

    threads = [Thread(target=one, daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _in_flight(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as resp:
        m = re.search(rb"^surge_concurrency_in_flight (\S+)$", resp.read(), re.M)
    return float(m[1]) if m else -1.0


def _control(pid: int, action: str, env: dict[str, str]) -> None:
    # valgrind names its control pipes after $HOST, which Surge's environment sets: the
    # controller must see the same value or it finds no pipe (and only says so on stderr).
    out = subprocess.run(
        ["callgrind_control", *(["-d"] if action == "dump" else ["-i", action]), str(pid)],
        env=env,
        capture_output=True,
    )
    if out.returncode != 0 or b"error" in out.stderr:
        raise SystemExit(f"callgrind_control failed: {out.stderr.decode(errors='replace')}")


def count(
    server: Server,
    path: str,
    n: int,
    warmup: int,
    extra: dict[str, str],
    cache_sim: bool = False,
    keep: Path | None = None,
    idle_s: float = 5.0,
    headers: dict[str, str] | None = None,
    refuse: bool = False,
) -> dict[str, float]:
    """Events per request of `path` on `server`: Ir (instructions), and with cache_sim the
    simulated cache misses too (I1mr, D1mr, D1mw: first level; ILmr, DLmr, DLmw: last level).

    Under valgrind ab gets a few hundred requests a second, so what the server does on its own
    (timers, pollers) would be charged to each request far more than at full speed. The first
    idle_s seconds are counted with no requests, and that rate times the measured window is
    taken off; "bg" is what was taken off, per request."""
    with tempfile.TemporaryDirectory(prefix="surge-cg-") as tmp:
        log = Path(tmp) / "valgrind.log"
        env = {**os.environ, **server.env, **extra}
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/callgrind.out",
            f"--cache-sim={'yes' if cache_sim else 'no'}",
            *server.argv,
        ]  # fmt: skip
        with log.open("wb") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            url = f"http://127.0.0.1:{server.port}{path}"
            headers = headers or {}
            held: list[Thread] = []
            _wait_up(proc, f"http://127.0.0.1:{server.port}/healthz", log)
            _ab(url, warmup, headers, refused=None if refuse else False)
            with users_locked(env["DATABASE_URL"]) if refuse else contextlib.nullcontext():
                if refuse:
                    held = _held(url, headers, HOLD)
                    deadline = time.monotonic() + 120
                    while _in_flight(server.port) < HOLD:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"the {HOLD} held requests never took their slots")
                        time.sleep(0.5)
                # valgrind runs the program in its own process: the pid is the server's
                _control(proc.pid, "on", env)
                idle_from = time.monotonic()
                time.sleep(idle_s)
                _control(proc.pid, "dump", env)  # the idle part, in its own file; zeroed
                started = time.monotonic()
                idle_s = started - idle_from  # the windows as the control commands bounded them
                _ab(url, n, headers, refused=refuse)
                _control(proc.pid, "off", env)
                elapsed = time.monotonic() - started
            if refuse:
                for thread in held:  # answered now that the lock is gone
                    thread.join(timeout=60)
        finally:
            stop_server(proc)  # valgrind writes its count as the server exits
        if keep is not None:  # for callgrind_annotate: the counts by C function
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(Path(tmp) / "callgrind.out", keep / f"callgrind.{server.name}.out")
        names = _EVENTS.search(log.read_bytes())
        if names is None:
            raise SystemExit(f"valgrind reported no count:\n{log.read_text()[-2000:]}")
        events = names[1].decode().split()
        # valgrind's own "Collected" line sums every part: the measured one is the last dump,
        # written at exit (the idle part went to callgrind.out.1, and a dump zeroes the counts)
        totals = _totals(Path(tmp) / "callgrind.out", len(events))
        idle = _totals(next(Path(tmp).glob("callgrind.out.*")), len(events))
        scale = elapsed / idle_s
        figures = {
            name: (total - scale * quiet) / n
            for name, total, quiet in zip(events, totals, idle, strict=True)
        }
        figures["bg"] = scale * idle[0] / n
        figures["raw"] = totals[0] / n
        return figures


def _totals(dump: Path, events: int) -> list[int]:
    """The event totals of one callgrind dump file (trailing zeros are left out there). Its
    "totals:" line, not "summary:": in the last part of a dumped run that one is garbage
    (2**64 minus a little)."""
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            values = [int(v) for v in line.split()[1:]]
            return values + [0] * (events - len(values))
    raise SystemExit(f"no totals in {dump}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--servers", default="surge,baseline")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("-n", type=int, default=5000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument(
        "--idle", type=float, default=5.0, help="seconds counted without requests (background)"
    )
    parser.add_argument("--env", action="append", default=[], help="K=V for Surge, repeatable")
    parser.add_argument(
        "--cache-sim", action="store_true", help="also count simulated cache misses (slower)"
    )
    parser.add_argument(
        "--keep", type=Path, help="copy each server's callgrind.out into this directory"
    )
    parser.add_argument(
        "--refuse",
        action="store_true",
        help="count requests the shed layer refuses (503), with --path user (see above)",
    )
    args = parser.parse_args(argv)
    if args.refuse and args.path != "user":
        parser.error("--refuse needs --path user (a request that waits on the database)")
    if args.path == "user" and args.servers != "surge":
        parser.error("--path user: --servers surge (the token is Surge's)")
    for tool in ("valgrind", "callgrind_control", "ab"):
        if shutil.which(tool) is None:
            print(f"bench.instructions: {tool} is missing (apt-get install valgrind apache2-utils)")
            return 2
    secret = secrets.token_hex(20)
    servers = make_servers(secret)
    path, headers = (args.path, {}) if args.path != "user" else user_request(secret)
    preset = {"USER_CACHE_TTL_S": "0"} if args.path == "user" else {}
    if args.refuse:
        held = str(HOLD)
        preset |= {
            "MAX_IN_FLIGHT": held, "CONCURRENCY_MIN": held, "CONCURRENCY_INITIAL": held,
            "QUEUE_DEADLINE_MS": "0", "PG_COMMAND_TIMEOUT_S": "900",
        }  # fmt: skip
    extra = preset | dict(kv.split("=", 1) for kv in args.env)
    figures: dict[str, dict[str, float]] = {}
    for name in args.servers.split(","):
        server = servers[name]
        figures[name] = events = count(
            server,
            path,
            args.n,
            args.warmup,
            extra if name == "surge" else {},
            cache_sim=args.cache_sim,
            keep=args.keep,
            idle_s=args.idle,
            headers=headers,
            refuse=args.refuse,
        )
        what = f"{'refused ' if args.refuse else ''}GET {args.path}"
        print(f"{name:10s} {events['Ir']:10,.0f} instructions per {what}", flush=True)
        print(
            f"{'':10s} ({events['raw']:,.0f} counted, {events['bg']:,.0f} of them background work"
            " at the idle rate: that estimate varies by a few hundred between runs, the count by"
            " ~0.1 %: compare counts for A/B)"
        )
        if "D1mr" in events:
            accesses = f"Dr {events['Dr']:,.0f}  Dw {events['Dw']:,.0f}"
            misses = "  ".join(f"{k} {events[k]:,.1f}" for k in events if k[-2:] in ("mr", "mw"))
            print(f"{'':10s} data reads/writes: {accesses}; cache misses: {misses}", flush=True)
    if "surge" in figures and "baseline" in figures:
        print(f"baseline / surge: {figures['baseline']['Ir'] / figures['surge']['Ir']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
