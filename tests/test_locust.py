"""Each locust scenario runs headless for a few seconds against a real server: zero failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from server.devservices import tcp_reachable
from server.runner import free_port

from .conftest import ROOT, Services, server_env


@pytest.fixture
def provider_url() -> Iterator[str]:
    """The fake payment provider as its own process, as a deployment would see a real one."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.fake_provider", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "PAYMENTS_API_KEY": "lt_key", "PAYMENTS_WEBHOOK_SECRET": "lt_secret"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while not tcp_reachable("127.0.0.1", port, timeout=0.2):
            assert proc.poll() is None and time.monotonic() < deadline, "fake provider died"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def server_url(clean: Services, provider_url: str) -> Iterator[str]:
    port = free_port()
    env = server_env(
        clean,
        port,
        ACCESS_LOG="false",
        PAYMENTS_URL=provider_url,
        PAYMENTS_API_KEY="lt_key",
        PAYMENTS_WEBHOOK_SECRET="lt_secret",
        # every simulated user signs up from 127.0.0.1
        AUTH_RATE_LIMIT_PER_MINUTE="100000",
        RATE_LIMIT_RATE="100000",
        RATE_LIMIT_BURST="100000",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(url + "/readyz", timeout=2):
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stderr:
            proc.stderr.close()


SCENARIO_CLASS = {"frontend": "FrontendUser", "admin": "AdminUser", "events": "EventClient"}
SCENARIO_ENDPOINTS = {
    "frontend": {"/v1/users", "/v1/users/{id}", "/v1/me", "/v1/orders", "/v1/orders/{id}/pay"},
    "admin": {"/v1/users [create]", "/v1/users?status"},
    "events": {"/v1/events"},
}


@pytest.mark.parametrize("scenario", sorted(SCENARIO_ENDPOINTS))
def test_scenario_runs_without_failures(server_url: str, scenario: str, tmp_path: Path) -> None:
    prefix = tmp_path / scenario
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust",
            "-f", str(ROOT / "locustfile.py"), SCENARIO_CLASS[scenario],
            "--headless", "--host", server_url, "--tags", scenario,
            "-u", "6", "-r", "6", "-t", "4s", "--stop-timeout", "5",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    with open(f"{prefix}_stats.csv") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    ran = {name for name, r in rows.items() if int(r["Request Count"]) > 0}
    assert ran & SCENARIO_ENDPOINTS[scenario], (sorted(ran), proc.stderr[-2000:])
    if scenario == "frontend":  # the shop journey ran too, and paid without failures
        assert {"/v1/orders", "/v1/orders/{id}/pay", "/v1/orders/{id}"} <= ran, sorted(ran)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_tag_alone_selects_its_scenarios(server_url: str, tmp_path: Path) -> None:
    """`--tags admin` with no class named: the classes without admin tasks are left out, not
    spawned to fail with "No tasks defined"."""
    prefix = tmp_path / "tagged"
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"),
            "--headless", "--host", server_url, "--tags", "admin",
            "-u", "4", "-r", "4", "-t", "3s", "--stop-timeout", "5",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert "No tasks defined" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(f"{prefix}_stats.csv") as f:
        ran = {r["Name"] for r in csv.DictReader(f) if int(r["Request Count"]) > 0}
    assert "/v1/users [create]" in ran, sorted(ran)  # the admin scenario ran
    assert not ran & (SCENARIO_ENDPOINTS["events"] | {"/v1/orders/{id}/pay"}), sorted(ran)
