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

Needs valgrind and ab (Debian: valgrind, apache2-utils). Unauthenticated paths only. Instructions
understate a wall-clock gap: see docs/PERFORMANCE.md (sixth-session notes).
"""

from __future__ import annotations

import argparse
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
from pathlib import Path

from bench.common import ROOT
from bench.run import Server, make_servers, stop_server

_COLLECTED = re.compile(rb"Collected : ([\d,]+)")


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


def _ab(url: str, n: int) -> None:
    subprocess.run(
        ["ab", "-q", "-k", "-n", str(n), "-c", "16", url], check=True, capture_output=True
    )


def _control(pid: int, instrumentation: str, env: dict[str, str]) -> None:
    # valgrind names its control pipes after $HOST, which Surge's environment sets: the
    # controller must see the same value or it finds no pipe (and only says so on stderr).
    out = subprocess.run(
        ["callgrind_control", "-i", instrumentation, str(pid)], env=env, capture_output=True
    )
    if out.returncode != 0 or b"error" in out.stderr:
        raise SystemExit(f"callgrind_control failed: {out.stderr.decode(errors='replace')}")


def count(server: Server, path: str, n: int, warmup: int, extra: dict[str, str]) -> float:
    """Instructions per request of `path` on `server`."""
    with tempfile.TemporaryDirectory(prefix="surge-cg-") as tmp:
        log = Path(tmp) / "valgrind.log"
        env = {**os.environ, **server.env, **extra}
        argv = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/callgrind.out", *server.argv,
        ]  # fmt: skip
        with log.open("wb") as err:
            proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
        try:
            url = f"http://127.0.0.1:{server.port}{path}"
            _wait_up(proc, f"http://127.0.0.1:{server.port}/healthz", log)
            _ab(url, warmup)
            # valgrind runs the program in its own process: the pid is the server's
            _control(proc.pid, "on", env)
            _ab(url, n)
            _control(proc.pid, "off", env)
        finally:
            stop_server(proc)  # valgrind writes its count as the server exits
        found = _COLLECTED.search(log.read_bytes())
        if found is None:
            raise SystemExit(f"valgrind reported no count:\n{log.read_text()[-2000:]}")
        return int(found[1].replace(b",", b"")) / n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instructions", description=__doc__)
    parser.add_argument("--servers", default="surge,baseline")
    parser.add_argument("--path", default="/healthz")
    parser.add_argument("-n", type=int, default=5000, help="measured requests")
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--env", action="append", default=[], help="K=V for Surge, repeatable")
    args = parser.parse_args(argv)
    for tool in ("valgrind", "callgrind_control", "ab"):
        if shutil.which(tool) is None:
            print(f"bench.instructions: {tool} is missing (apt-get install valgrind apache2-utils)")
            return 2
    servers = make_servers(secrets.token_hex(20))
    extra = dict(kv.split("=", 1) for kv in args.env)
    figures: dict[str, float] = {}
    for name in args.servers.split(","):
        server = servers[name]
        figures[name] = count(
            server, args.path, args.n, args.warmup, extra if name == "surge" else {}
        )
        print(f"{name:10s} {figures[name]:10,.0f} instructions per GET {args.path}", flush=True)
    if "surge" in figures and "baseline" in figures:
        print(f"baseline / surge: {figures['baseline'] / figures['surge']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
