"""python -m bench.profile: Surge under load, sampled by py-spy, for finding what to cut.

Starts Surge on the bench database pinned to CPU 0 with everything a production deployment has
on, drives one endpoint with wrk pinned to CPU 1, records py-spy samples of the server for the
measured part, and writes docs/profile-<endpoint>.svg (a flame graph) and prints the frames with
the most self time and the most inclusive time.

    python -m bench.profile                       # GET /v1/users/{id}, cache off
    python -m bench.profile --endpoint user --cache
    python -m bench.profile --endpoint healthz --seconds 15
"""

from __future__ import annotations

import argparse
import os
import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

from bench.common import DATABASE_URL, DOCS_DIR, REDIS_KEY_PREFIX, REDIS_URL, ROOT, WRK_DIR
from bench.run import write_targets

PORT = 8299
PY_SPY = str(Path(sys.executable).parent / "py-spy")
SCRIPTS = {
    "healthz": ("healthz.lua", []),
    "user": ("user.lua", ["bench/data/targets.tsv"]),
    "users_page": ("users_page.lua", ["bench/data/targets.tsv"]),
}


def summarize(raw: Path, top: int) -> str:
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        count = int(n)
        total += count
        frames = stack.split(";")
        self_time[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    out = [f"{total} samples", "", "self time:"]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in self_time.most_common(top)]
    out += ["", "inclusive time:"]
    out += [f"{100 * n / total:5.1f}%  {f}" for f, n in inclusive.most_common(top * 2)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--endpoint", choices=sorted(SCRIPTS), default="user")
    parser.add_argument("--cache", action="store_true", help="turn the user cache on")
    parser.add_argument("--seconds", type=int, default=12)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    secret = secrets.token_urlsafe(32)
    write_targets(secret)
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(PORT),
        "DATABASE_URL": DATABASE_URL,
        "REDIS_URL": REDIS_URL,
        "REDIS_KEY_PREFIX": REDIS_KEY_PREFIX,
        "JWT_KEYS": f"bench:{secret}",
        "RATE_LIMIT_RATE": "1000000000",
        "RATE_LIMIT_BURST": "1000000000",
        "USER_CACHE_TTL_S": "60" if args.cache else "0",
    }
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    name = args.endpoint + ("_cached" if args.cache else "")
    svg = DOCS_DIR / f"profile-{name}.svg"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/readyz", timeout=1):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("Surge did not start", file=sys.stderr)
                    return 1
                time.sleep(0.2)
        script, script_args = SCRIPTS[args.endpoint]
        # Two recordings back to back under one load: collapsed stacks for the summary, then
        # the flame graph.
        wrk = [
            "taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{2 * args.seconds + 3}s", "--latency",
            "-s", str(WRK_DIR / script), f"http://127.0.0.1:{PORT}", "--", *script_args,
        ]  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "profile.raw"
            load = subprocess.Popen(wrk, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            time.sleep(2)  # warm-up: connections open, statement caches filled
            for fmt, out in (("raw", raw), ("flamegraph", svg)):
                subprocess.run(
                    [PY_SPY, "record", "--pid", str(server.pid), "--rate", "250",
                     "--duration", str(args.seconds), "--format", fmt, "--output", str(out)],
                    check=True, capture_output=True,
                )  # fmt: skip
            output, _ = load.communicate()
            print(
                "\n".join(
                    ln for ln in output.splitlines() if "Requests/sec" in ln or "Latency" in ln
                )
            )
            print(summarize(raw, args.top))
    finally:
        server.terminate()
        server.wait(20)
    print(f"flame graph: {svg}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
