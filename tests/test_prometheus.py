"""The alert rules and the dashboard against real Prometheus tools (Debian's `prometheus`).

promtool checks the config and the rules and runs their unit tests; then a real Surge process
and a real Prometheus scraping it every second: the target is up, the core metrics are there,
every rule evaluates without error, and every dashboard query runs without error (an empty
answer is fine for a metric whose feature has not landed yet; an error is not).
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from server import metrics
from server.runner import free_port

from .conftest import ROOT, Services, server_env
from .json_logs import assert_json_log
from .test_deploy import DASHBOARD, DEPLOY, RULE_TESTS, RULES, dashboard_panels, load_yaml, missing

PROMETHEUS_DIR = DEPLOY / "prometheus"
# Metrics a freshly started Surge exports before any particular request path has run.
CORE_METRICS = {
    "surge_http_requests_total",
    "surge_http_request_duration_seconds_bucket",
    "surge_http_requests_in_flight",
    "surge_shed_total",
    "surge_ratelimit_fallback_total",
    "surge_db_pool_timeouts_total",
    "surge_db_pool_size",
    "surge_db_pool_idle",
    "surge_db_pool_max",
    "surge_db_pool_in_use",
    "surge_db_pool_waiting",
    "surge_auth_failures_total",
}
# Grafana's variables as the dashboard opens by default.
VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$instance": ".*",
    "$job": "surge",
}


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(name, "apt-get install prometheus")
    return path


def run(*args: str) -> None:
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_checks_the_config_and_the_rules() -> None:
    promtool = tool("promtool")
    run(promtool, "check", "config", str(PROMETHEUS_DIR / "prometheus.yml"))
    run(promtool, "check", "rules", *map(str, sorted(RULES.parent.glob("*.yml"))))


def test_promtool_unit_tests_of_the_alerts() -> None:
    run(tool("promtool"), "test", "rules", *map(str, sorted(RULE_TESTS.parent.glob("*.yml"))))


# ---------------------------------------------------------------- live


def _get(url: str, timeout: float = 5) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def _status(request: str | urllib.request.Request) -> int:
    """The response's status, the connection closed either way. An HTTPError is the response
    and holds its socket open until closed: kept anywhere (a pytest.raises ExceptionInfo in a
    fixture's frame is a reference cycle) it leaks that socket until a full collection."""
    try:
        with urllib.request.urlopen(request, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code


def _wait(what: str, check: Any, timeout: float, proc: subprocess.Popen[bytes], log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError):
            pass
        if proc.poll() is not None:
            pytest.fail(f"{what}: the process exited\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout} s\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def _wait_for(check: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.2)
    return result


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def serving(clean: Services, tmp_path: Path, **overrides: str) -> Iterator[str]:
    """A real `python -m server serve` on a free port, with a read pool (on the same database)
    besides the primary; yields host:port."""
    port = free_port()
    env = server_env(clean, port, ACCESS_LOG="false", DATABASE_READ_URL=clean.dsn, **overrides)
    log = tmp_path / f"surge-{port}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        _wait("surge ready", lambda: _get(base + "/readyz")["status"] == "ready", 30, proc, log)
        # traffic, so requests, latency and auth-failure series exist
        for path in ("/healthz", "/v1/me", "/v1/users", "/nope"):
            _status(base + path)
        refresh = urllib.request.Request(
            base + "/v1/auth/refresh",
            data=b'{"refresh_token": "not-a-token"}',
            headers={"Content-Type": "application/json"},
        )
        assert _status(refresh) == 401
        yield f"127.0.0.1:{port}"
    finally:
        _stop(proc)
    assert_json_log(log.read_text(errors="replace"), str(log))


@pytest.fixture
def surge(clean: Services, tmp_path: Path) -> Iterator[str]:
    with serving(clean, tmp_path) as address:
        yield address


POOLS = ("primary", "replica", "events")
# Labelled counters export each known label value at 0 before anything happened (the fixture's
# traffic moves only a login-free refresh and the request counters).
ZERO_SERIES = [
    *(
        f'surge_auth_failures_total{{reason="{r}"}}'
        for r in ("login", "revoked", *metrics.TOKEN_FAILURES)
    ),
    *(f'surge_events_refused_total{{reason="{r}"}}' for r in ("full", "error", "closing")),
    'surge_ratelimit_refused_total{limit="general"}',
    'surge_connections_dropped_total{reason="header_timeout"}',
    'surge_payments_webhooks_total{result="bad_signature"}',
    'surge_payments_sagas_total{result="payment_failed"}',
    'surge_payments_calls_total{op="authorize",outcome="unreachable"}',
    'surge_revocation_errors_total{source="sweep"}',
    'surge_event_partitions_total{action="dropped"}',
    "surge_partition_upkeep_errors_total",
    'surge_stream_consumed_total{consumer="analytics",result="applied"}',
    *(f'surge_db_connections_closed_total{{pool="{p}",reason="lost"}}' for p in POOLS),
]


def _samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value, labels in the exposition's own order."""
    found = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, _, value = line.rpartition(" ")
            found[series] = float(value)
    return found


def test_every_label_value_in_the_code_is_a_series_from_the_start() -> None:
    """Each string literal passed to `metrics.X.labels(...)` in server/ and handlers/ is a
    series of X in a fresh exposition, before anything happened."""
    text = generate_latest(metrics.REGISTRY).decode()
    checked = 0
    for package in ("server", "handlers"):
        for path in (ROOT / package).rglob("*.py"):
            source = path.read_text()
            for var, args in re.findall(r"metrics\.([A-Z_]+)\.labels\(([^)]*)\)", source):
                family = getattr(metrics, var).describe()[0].name
                for value in re.findall(r'"([^"]*)"', args):
                    series = re.compile(rf'^{family}_total\{{[^}}]*="{re.escape(value)}"', re.M)
                    assert series.search(text), f"{path.name}: {var} {value!r} is not zeroed"
                    checked += 1
    assert checked > 30


@pytest.mark.parametrize("workers", ["1", "2"])
def test_metrics_pass_promtool_and_start_at_zero(
    clean: Services, tmp_path: Path, workers: str
) -> None:
    """/metrics of a real server, one process and a supervisor of two (multiprocess mode):
    `promtool check metrics` has nothing to say, every known label value is a series from the
    start, and the pool gauges cover each pool."""
    promtool = tool("promtool")
    with serving(clean, tmp_path, WORKERS=workers) as address:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as r:
                text: str = r.read().decode()
            # multiprocess: the pool gauges are published by each worker within a second
            return text if 'surge_db_pool_max{pool="events"}' in text else ""

        text = _wait_for(scrape, 10)
    checked = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, "")
    samples = _samples(text)
    for series in ZERO_SERIES:
        assert samples.get(series) == 0, f"{series}: {samples.get(series)}"
    for pool in POOLS:
        assert samples[f'surge_db_pool_max{{pool="{pool}"}}'] > 0, pool
    assert samples['surge_auth_failures_total{reason="refresh"}'] == 1  # the fixture's refresh


@pytest.fixture
def prometheus(surge: str, tmp_path: Path) -> Iterator[str]:
    """A real Prometheus scraping `surge` every second with the shipped config and rules;
    yields its base URL."""
    binary = tool("prometheus")
    config = load_yaml(PROMETHEUS_DIR / "prometheus.yml")
    config["global"] |= {
        "scrape_interval": "1s",
        "scrape_timeout": "1s",
        "evaluation_interval": "1s",
    }
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [surge]}]
    # the shipped rules, evaluated every second instead of every 15-30 s
    rules = load_yaml(RULES)
    for group in rules["groups"]:
        group["interval"] = "1s"
    (tmp_path / "rules.yml").write_text(json.dumps(rules))  # JSON is YAML
    config["rule_files"] = [str(tmp_path / "rules.yml")]
    (tmp_path / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            cwd=tmp_path,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait("prometheus ready", lambda: _status(base + "/-/ready") == 200, 30, proc, log)
        # up, then enough samples for rate() over the scrape history
        query = urllib.parse.quote('count_over_time(up{job="surge"}[1m]) >= 3 and up == 1')

        def scraped() -> Any:
            return _get(f"{base}/api/v1/query?query={query}")["data"]["result"]

        _wait("surge scraped", scraped, 30, proc, log)
        yield base
    finally:
        _stop(proc)


def _query(base: str, expr: str, *, instant: bool) -> dict[str, Any]:
    if instant:
        url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    else:
        now = time.time()
        params = {"query": expr, "start": now - 60, "end": now, "step": 2}
        url = f"{base}/api/v1/query_range?" + urllib.parse.urlencode(params)
    try:
        answer: dict[str, Any] = _get(url)
    except urllib.error.HTTPError as exc:
        with exc:
            answer = json.loads(exc.read())
    return answer


def _substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    return expr


def test_prometheus_scrapes_surge_and_every_rule_and_panel_evaluates(prometheus: str) -> None:
    base = prometheus
    targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
    assert [(t["labels"]["job"], t["health"]) for t in targets] == [("surge", "up")]

    names = _query(base, 'group by (__name__) ({job="surge"})', instant=True)
    present = {r["metric"]["__name__"] for r in names["data"]["result"]}
    assert present >= CORE_METRICS, f"missing: {CORE_METRICS - present}"

    # every rule loaded and evaluated without error (rules run every second here)
    def rules_evaluated() -> list[dict[str, Any]]:
        groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
        found = [r for g in groups for r in g["rules"]]
        return found if all(r["lastEvaluation"] > "2000" for r in found) else []

    deadline = time.monotonic() + 15
    while not (evaluated := rules_evaluated()):
        assert time.monotonic() < deadline, "the rules were not evaluated"
        time.sleep(0.3)
    shipped = [r for g in load_yaml(RULES)["groups"] for r in g["rules"]]
    assert len(evaluated) == len(shipped)
    broken = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
    assert not broken
    firing = {a["labels"]["alertname"] for a in _get(f"{base}/api/v1/alerts")["data"]["alerts"]}
    assert not firing & {"SurgeInstanceDown", "SurgeAllInstancesDown"}

    # every dashboard query, as Grafana would send it
    errors = []
    answers = {}
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = _substitute(target["expr"])
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            answer = _query(base, expr, instant=bool(target.get("instant")))
            if answer["status"] != "success":
                errors.append((panel["title"], expr, answer.get("error")))
            answers[panel["title"]] = answer
    assert not errors
    # and the panels over metrics that exist now show data
    for title in ("Instances up", "Request rate by route", "p99 by route", "Pool connections"):
        assert answers[title]["data"]["result"], f"{title}: no data"

    # the dashboard's variables find the job and the instance
    for variable in json.loads(DASHBOARD.read_text())["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = _substitute(variable["query"]["query"])
        match, label = query.removeprefix("label_values(").removesuffix(")").rsplit(", ", 1)
        url = f"{base}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": match})
        values = _get(url)["data"]
        expected = "surge" if label == "job" else prometheus_target(targets)
        assert expected in values, (variable["name"], values)


def prometheus_target(targets: list[dict[str, Any]]) -> str:
    (target,) = targets
    instance: str = target["labels"]["instance"]
    return instance
