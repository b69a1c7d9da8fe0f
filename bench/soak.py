"""python -m bench.soak: does Surge's memory stay flat under sustained load?

Starts Surge pinned to CPU 0 (as bench.run does), drives one endpoint with wrk pinned to CPU 1
for a warm-up and then SECONDS more, sampling the server's RSS every 0.5 s. The budget (issue 4):
RSS ≤ 100 MB, and growth over the measured part ≤ 5 %, comparing the median of the first and of
the last five seconds (medians, so one allocation burst at a sample does not decide it).

    python -m bench.soak                       # 60 s on GET /v1/users/{id}, cache on
    python -m bench.soak --endpoint user --seconds 120

Measured here: see docs/PERFORMANCE.md ("Memory over time").
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import threading
import time
from typing import Any

from bench.run import (
    ENDPOINTS,
    RESULTS_DIR,
    BenchError,
    make_servers,
    process_tree,
    rss_mb,
    run_wrk,
    start_server,
    stop_server,
    write_targets,
)

SAMPLE_S = 0.5
WINDOW_S = 5.0
MAX_GROWTH = 0.05
MAX_RSS_MB = 100.0


def soak(endpoint_name: str, seconds: int, warmup_s: int) -> dict[str, Any]:
    secret = secrets.token_urlsafe(30)
    write_targets(secret)
    server = make_servers(secret)["surge"]
    endpoint = {e.name: e for e in ENDPOINTS}[endpoint_name]
    proc = start_server(server, endpoint, f"soak-{endpoint_name}.log")
    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def sample() -> None:
        start = time.monotonic()
        while not stop.is_set():
            mb = rss_mb(process_tree(proc.pid))
            if mb > 0:  # 0: /proc read while no process of the tree was readable; not a size
                samples.append((time.monotonic() - start, mb))
            stop.wait(SAMPLE_S)

    try:
        run_wrk(endpoint, server.port, warmup_s)
        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        wrk = run_wrk(endpoint, server.port, seconds)
        stop.set()
        thread.join()
    finally:
        stop_server(proc)
    if not samples:
        raise SystemExit(f"soak: no RSS sample of the server (pid {proc.pid}) was readable")
    first = [mb for t, mb in samples if t <= WINDOW_S]
    last = [mb for t, mb in samples if t >= samples[-1][0] - WINDOW_S]
    start_mb, end_mb = statistics.median(first), statistics.median(last)
    growth = (end_mb - start_mb) / start_mb
    duration = wrk["duration_us"] / 1e6
    return {
        "endpoint": endpoint_name,
        "seconds": seconds,
        "warmup_s": warmup_s,
        "requests": wrk["requests"],
        "rps": round(wrk["requests"] / duration, 1) if duration else 0.0,
        "errors": wrk["errors"],
        "rss_start_mb": round(start_mb, 1),
        "rss_end_mb": round(end_mb, 1),
        "rss_peak_mb": round(max(mb for _, mb in samples), 1),
        "growth": round(growth, 4),
        "met": growth <= MAX_GROWTH and max(mb for _, mb in samples) <= MAX_RSS_MB,
        "samples": [(round(t, 1), round(mb, 1)) for t, mb in samples],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__)
    parser.add_argument("--endpoint", default="user_cached", choices=[e.name for e in ENDPOINTS])
    parser.add_argument("--seconds", type=int, default=60)
    # The bounded per-user caches (verified tokens, rate-limit buckets) fill while wrk's 10,000
    # users are first seen: about 20 s at a few thousand requests/s. That is warm-up, not a leak.
    parser.add_argument("--warmup", type=int, default=20)
    args = parser.parse_args(argv)
    try:
        result = soak(args.endpoint, args.seconds, args.warmup)
    except BenchError as exc:
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(
        f"soak {result['endpoint']}: {result['seconds']} s, {result['rps']:,.0f} rps, "
        f"RSS {result['rss_start_mb']} -> {result['rss_end_mb']} MB "
        f"({result['growth']:+.1%}), peak {result['rss_peak_mb']} MB: "
        f"{'met' if result['met'] else 'MISSED'} (≤ {MAX_GROWTH:.0%} growth, ≤ {MAX_RSS_MB:.0f} MB)"
    )
    print(f"soak: {path}")
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
