"""python -m bench.report [results.json]: docs/PERFORMANCE.md and its charts from a bench run.

bench/run.py calls this after a clean run; run it by hand to re-render an older result (the
newest in bench/results/ by default). Text between `<!-- notes:start -->` and
`<!-- notes:end -->` in the existing docs/PERFORMANCE.md is kept: that is where what moved
which number is written down by hand.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

# Files only, no display (CI machines have none); chosen before pyplot is imported.
matplotlib.use("Agg")

import matplotlib.pyplot as plt

from bench.common import DOCS_DIR, RESULTS_DIR, ROOT

REPORT = DOCS_DIR / "PERFORMANCE.md"
THROUGHPUT_PNG = DOCS_DIR / "bench-throughput.png"
LATENCY_PNG = DOCS_DIR / "bench-latency.png"
SERVER_ORDER = ("surge", "baseline", "baseline_noreset", "fastapi", "go")
COLOURS = {
    "surge": "#d9480f",
    "baseline": "#1c7ed6",
    "baseline_noreset": "#74c0fc",
    "fastapi": "#2f9e44",
    "go": "#868e96",
}
# Rounds where other work on the machine took more than this share of a core are flagged.
SUSPECT_OTHER_LOAD = 0.15
_NOTES = re.compile(r"<!-- notes:start -->.*?<!-- notes:end -->", re.S)
_DEFAULT_NOTES = (
    "<!-- notes:start -->\n"
    "_Kept across regenerations: record here what changed and which number it moved._\n"
    "<!-- notes:end -->"
)
# bench/overload.py writes this block; a regeneration keeps it as it is.
_OVERLOAD = re.compile(r"<!-- overload:start -->.*?<!-- overload:end -->", re.S)


def _servers(results: Mapping[str, Any]) -> list[str]:
    present = {r["server"] for r in results["rounds"]}
    return [s for s in SERVER_ORDER if s in present] + sorted(present - set(SERVER_ORDER))


def _endpoint_titles(results: Mapping[str, Any]) -> dict[str, str]:
    return {e["name"]: e["title"] for e in results["endpoints"]}


def throughput_chart(results: Mapping[str, Any], path: Path) -> None:
    med = results["medians"]
    titles = _endpoint_titles(results)
    endpoints = [e for e in titles if e in med]
    servers = _servers(results)
    width = 0.8 / max(len(servers), 1)
    fig, ax = plt.subplots(figsize=(10, 4.8), dpi=110)
    for i, srv in enumerate(servers):
        xs, ys, lo, hi = [], [], [], []
        for j, ep in enumerate(endpoints):
            m = med[ep].get(srv)
            if m is None:
                continue
            xs.append(j + (i - (len(servers) - 1) / 2) * width)
            ys.append(m["rps"])
            lo.append(m["rps"] - m["rps_min"])
            hi.append(m["rps_max"] - m["rps"])
        bars = ax.bar(xs, ys, width, label=srv, color=COLOURS.get(srv), yerr=[lo, hi], capsize=2)
        ax.bar_label(bars, labels=[f"{y / 1000:.1f}k" for y in ys], fontsize=7, padding=2)
    ax.set_yscale("log")
    ax.set_ylabel("requests/s (median of rounds, log scale)\nwhiskers: min–max of rounds")
    ax.set_xticks(range(len(endpoints)), [titles[e] for e in endpoints], fontsize=8)
    ax.set_title("Throughput per endpoint, one server process on one core")
    ax.legend(fontsize=8)
    ax.grid(axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latency_chart(results: Mapping[str, Any], path: Path) -> None:
    med = results["medians"]
    titles = _endpoint_titles(results)
    endpoints = [e for e in titles if e in med]
    servers = _servers(results)
    points = [("p50", "p50_ms"), ("p75", "p75_ms"), ("p90", "p90_ms"), ("p99", "p99_ms")]
    points.append(("p99.9", "p999_ms"))
    cols = min(len(endpoints), 3) or 1
    rows = (len(endpoints) + cols - 1) // cols or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), dpi=110, squeeze=False)
    for k, ep in enumerate(endpoints):
        ax = axes[k // cols][k % cols]
        for srv in servers:
            m = med[ep].get(srv)
            if m is None:
                continue
            ax.plot(
                [p for p, _ in points],
                [m.get(f) for _, f in points],
                marker="o",
                label=srv,
                color=COLOURS.get(srv),
            )
        ax.axhline(25, color="grey", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_title(titles[ep], fontsize=9)
        ax.set_ylabel("ms (log)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    for k in range(len(endpoints), rows * cols):
        axes[k // cols][k % cols].set_visible(False)
    fig.suptitle("Latency percentiles at 64 connections (wrk; dashed: the 25 ms p99 budget)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _num(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}"


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value * 100:.0f} %"


def _ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}×"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


def render(
    results: Mapping[str, Any], results_path: Path, notes: str, overload: str | None = None
) -> str:
    med = results["medians"]
    titles = _endpoint_titles(results)
    servers = _servers(results)
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# Performance",
        "",
        "<!-- Generated by `python -m bench.run` (bench/report.py): edit the notes section only;",
        "     everything else is rewritten from the results file on every run. -->",
        "",
        f"Run of {results['started_at']} (`{results['command']}`), raw figures in "
        f"[`{results_path.relative_to(ROOT)}`](../{results_path.relative_to(ROOT)}).",
    ]
    if s["quick"]:
        lines += [
            "",
            "> **Quick run** (1 round, short warm-up and measurement): a smoke test, not a "
            "result to quote. `make bench` runs the full method.",
        ]
    busy = s.get("busy_before_run") or 0
    if busy > SUSPECT_OTHER_LOAD:
        lines += [
            "",
            f"> **Busy machine**: {busy:.0%} of a core was in use by other work when the run "
            "started; figures are lower and more scattered than on a quiet machine.",
        ]
    lines += ["", "## Budgets", ""]
    budget_rows = []
    for b in results["budgets"]:
        unit = b["unit"]
        value = b["value"]
        if value is None:
            shown = "not measured"
        elif unit == "×":
            shown = f"{value:.3f}×"  # three places, so 0.797 is not shown as a "missed 0.80"
        else:
            shown = f"{_num(value, 0 if unit == 'events/s' else 1)} {unit}"
        met = {True: "met", False: "**missed**", None: "–"}[b["met"]]
        budget_rows.append([b["budget"], shown, met])
    lines += _table(["budget", "measured (Surge, median)", ""], budget_rows)

    lines += ["", "## Medians per endpoint and server", ""]
    rows = []
    for ep, title in titles.items():
        for srv in servers:
            x = med.get(ep, {}).get(srv)
            if x is None:
                continue
            rps = f"{_num(x['rps'], 0)} ({_num(x['rps_min'], 0)}–{_num(x['rps_max'], 0)})"
            if "events_per_s" in x:
                rps += f"<br>{_num(x['events_per_s'], 0)} events/s"
            rows.append(
                [
                    title,
                    srv,
                    rps,
                    _num(x.get("p50_ms"), 2),
                    _num(x.get("p99_ms"), 2),
                    _num(x.get("mean_little_ms"), 2),
                    _num(x.get("cpu_us_per_req"), 0),
                    _num(x.get("db_cpu_us_per_req"), 0),
                    _pct(x.get("cpu_busy")),
                    _pct(x.get("wrk_cpu_busy")),
                    _pct(x.get("other_load")),
                    _num(x.get("rss_max_mb"), 1),
                ]
            )
    lines += _table(
        [
            "endpoint",
            "server",
            "requests/s (min–max)",
            "p50 ms",
            "p99 ms",
            "mean ms (64/rps)",
            "server CPU µs/req",
            "PostgreSQL + Redis CPU µs/req",
            "server busy",
            "wrk busy",
            "other load",
            "peak RSS MB",
        ],
        rows,
    )
    suspect = [
        f"{r['endpoint']}/{r['server']} round {r['round']}"
        for r in results["rounds"]
        if (r.get("other_load") or 0) > SUSPECT_OTHER_LOAD
    ]
    if suspect:
        lines += [
            "",
            f"> **Contended rounds**: other work on the machine used more than "
            f"{SUSPECT_OTHER_LOAD:.0%} of a core in: "
            + ", ".join(suspect)
            + ". Re-run on a quiet machine before quoting these.",
        ]
    lines += ["", "## Ratios (Surge's median throughput over the other server's)", ""]
    ratio_rows = []
    with_go = any(r.get("surge/go") is not None for r in results["ratios"].values())
    for ep, title in titles.items():
        r = results["ratios"].get(ep, {})
        note = ""
        for e in results["endpoints"]:
            if e["name"] == ep and e.get("compare_with"):
                note = f" (vs their {titles.get(e['compare_with'], e['compare_with'])})"
        row = [title + note, _ratio(r.get("surge/baseline")), _ratio(r.get("surge/fastapi"))]
        ratio_rows.append(row + ([_ratio(r.get("surge/go"))] if with_go else []))
    header = ["endpoint", "Surge / baseline", "Surge / FastAPI"]
    lines += _table(header + (["Surge / Go"] if with_go else []), ratio_rows)
    if results["skipped"]:
        lines += ["", "Not measured:", ""]
        lines += [f"- {x['endpoint']} on {x['server']}: {x['reason']}" for x in results["skipped"]]

    lines += [
        "",
        "## Charts",
        "",
        f"![Throughput per endpoint and server]({THROUGHPUT_PNG.name})",
        "",
        f"![Latency percentiles per endpoint]({LATENCY_PNG.name})",
        "",
        "## Servers",
        "",
    ]
    lines += [f"- **{name}**: {v['title']}" for name, v in results["servers"].items()]
    hit_ratios = ", ".join(
        f"`{r['endpoint']}` round {r['round']} {r['cache_hit_ratio']:.1%}"
        for r in results["rounds"]
        if r.get("cache_hit_ratio") is not None
    )
    ver = ", ".join(f"`{v['endpoint']}/{v['server']}` {v['ok']}/{v['requests']}" for v in
                    results["verification"])  # fmt: skip
    lines += [
        "",
        "## Method",
        "",
        f"- Each server is one process pinned to CPU {s['server_cpu']} (`taskset`); wrk runs "
        f"pinned to CPU {s['client_cpu']} with {s['wrk_threads']} thread and "
        f"{s['connections']} keep-alive connections. PostgreSQL and Redis are not pinned.",
        f"- Per endpoint: {s['rounds']} round(s) in alternating order (A B C A B C ...), each "
        f"starting the server afresh, {s['warmup_s']} s warm-up, then {s['duration_s']} s "
        "measured. Tables show the median of the rounds.",
        f"- Data: {s['dataset']['tenants']} tenants × {s['dataset']['users_per_tenant']:,} users "
        f"loaded by `python -m bench.seed`; each request picks one of {s['users_sampled']:,} "
        "sampled users at random with a valid token for that user's tenant. Every server gets "
        "the same request bytes: `Authorization: Bearer` (Surge takes the tenant from the token) "
        "and `X-Tenant` (the baseline, FastAPI and Go take it from there).",
        f"- Database pool: {s['pool_size']} connections in every server.",
        "- Surge runs as production would: JWT auth, rate limiting (limits set high enough not "
        "to refuse), metrics, JSON access log (to /dev/null), shedding. Cache on/off is "
        "`USER_CACHE_TTL_S=60/0`; Surge's Redis keys are deleted before every start. With the "
        "cache on, every sampled user is requested once before the warm-up (the cache's steady "
        "state is what is measured, not its filling); the hit ratio of the measured runs, from "
        f"Surge's own `surge_user_cache_total`: {hit_ratios or 'not recorded'}.",
        "- p50/p99 are wrk's (wrk 4 corrects for coordinated omission). The mean from Little's "
        "law (connections / throughput) cross-checks them. Server CPU µs/request is user + "
        "system time from `/proc/<pid>/stat` over the measured run divided by requests; "
        "PostgreSQL + Redis CPU is the same for the postmaster and its helpers, the backends "
        "connected to the bench database and redis-server (what the round trips cost on the "
        'other side). "server busy" is the server\'s CPU time over wall time (near 100 %: its '
        'core is the limit); "wrk busy" likewise for wrk; "other load" is the busy time of both '
        "cores (`/proc/stat`) that none of these account for: other jobs on this shared "
        "machine, in cores. RSS is `VmRSS` sampled every 100 ms during the measured run.",
        "- Correctness: before the first warm-up of each server and endpoint a separate client "
        f"(aiohttp, pinned to CPU {s['client_cpu']}, {s['connections']} connections, "
        f"{s['verify_s']:.0f} s) checks every answer: the id and tenant in the body are the ones "
        "asked for, the shape and timestamps are the contract's. Any mismatch or unexpected "
        f"status fails the run. This run: {ver or 'none'}.",
        "- Caveat: Surge caches verified tokens (10,000 entries); with the default sample of "
        "10,000 users nearly every request after warm-up is a cache hit, as it is for clients "
        "that reuse their token. The machine is shared: expect ±15 % between identical runs.",
        "",
        "## Machine",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores; {m['memory_gb']} GB RAM; Linux {m['kernel']}",
        f"- Python {m['python']}; PostgreSQL {m['postgresql']}; Redis {m['redis']}; {m['wrk']}",
        "- "
        + ", ".join(f"{k} {v}" for k, v in m["packages"].items() if v)
        + f"; uvicorn HTTP parser: {m['uvicorn_http']}",
        "",
        "## Reproduce",
        "",
        "```sh",
        "python -m bench.seed        # once: 100 tenants x 1,000 users into surge_bench",
        f"{results['command']}",
        "```",
        "",
        *(["## Overload", "", overload, ""] if overload else []),
        "## Notes",
        "",
        notes,
        "",
    ]
    return "\n".join(lines)


def generate(results: Mapping[str, Any], results_path: Path) -> list[Path]:
    DOCS_DIR.mkdir(parents=True, exist_ok=True)
    throughput_chart(results, THROUGHPUT_PNG)
    latency_chart(results, LATENCY_PNG)
    notes, overload = _DEFAULT_NOTES, None
    if REPORT.exists():
        text = REPORT.read_text(encoding="utf-8")
        found = _NOTES.search(text)
        if found:
            notes = found.group(0)
        kept = _OVERLOAD.search(text)
        overload = kept.group(0) if kept else None
    REPORT.write_text(render(results, results_path, notes, overload), encoding="utf-8")
    return [REPORT, THROUGHPUT_PNG, LATENCY_PNG]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        path = Path(argv[0]).resolve()
    else:
        found = sorted(RESULTS_DIR.glob("*.json"))
        if not found:
            print("no results in bench/results/: run `python -m bench.run` first", file=sys.stderr)
            return 2
        path = found[-1]
    results = json.loads(path.read_text())
    for written in generate(results, path):
        print(written.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
