"""Each locust scenario runs headless for a few seconds against a real server: zero failures."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

SCENARIO_CLASS = {"frontend": "FrontendUser", "admin": "AdminUser", "events": "EventClient"}
SCENARIO_ENDPOINTS = {
    "frontend": {"/v1/users", "/v1/users/{id}", "/v1/me", "/v1/orders", "/v1/orders/{id}/pay"},
    "admin": {"/v1/users [create]", "/v1/users?status"},
    "events": {"/v1/events"},
}


def run_locust(
    server_url: str, prefix: Path, *selection: str, seconds: int = 4
) -> tuple[subprocess.CompletedProcess[str], dict[str, dict[str, str]]]:
    """A headless locust run of `selection` (classes, --tags ...) against `server_url`; its
    process and its stats rows by request name."""
    proc = subprocess.run(
        [
            sys.executable, "-m", "locust", "-f", str(ROOT / "locustfile.py"), *selection,
            "--headless", "--host", server_url,
            "-u", "6", "-r", "6", "-t", f"{seconds}s", "--stop-timeout", "5",
            "--csv", str(prefix), "--only-summary", "--loglevel", "WARNING",
        ],
        cwd=prefix.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    with open(f"{prefix}_stats.csv") as f:
        return proc, {r["Name"]: r for r in csv.DictReader(f)}


@pytest.mark.parametrize("scenario", sorted(SCENARIO_ENDPOINTS))
def test_scenario_runs_without_failures(server_url: str, scenario: str, tmp_path: Path) -> None:
    prefix = tmp_path / scenario
    proc, rows = run_locust(server_url, prefix, SCENARIO_CLASS[scenario], "--tags", scenario)
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    ran = {name for name, r in rows.items() if int(r["Request Count"]) > 0}
    assert ran & SCENARIO_ENDPOINTS[scenario], (sorted(ran), proc.stderr[-2000:])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_shop_journey_orders_and_pays(server_url: str, tmp_path: Path) -> None:
    """`FrontendUser --tags shop`: only the order-and-pay task, so each user reaches it right
    after its sign-up (among the frontend tasks it is drawn 3 times in 44: a few seconds on a
    busy machine could end before any user drew it)."""
    prefix = tmp_path / "shop"
    proc, rows = run_locust(server_url, prefix, "FrontendUser", "--tags", "shop", seconds=6)
    assert int(rows["Aggregated"]["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    ran = {name for name, r in rows.items() if int(r["Request Count"]) > 0}
    assert {"/v1/orders", "/v1/orders/{id}/pay", "/v1/orders/{id}"} <= ran, sorted(ran)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_tag_alone_selects_its_scenarios(server_url: str, tmp_path: Path) -> None:
    """`--tags admin` with no class named: the classes without admin tasks are left out, not
    spawned to fail with "No tasks defined"."""
    proc, rows = run_locust(server_url, tmp_path / "tagged", "--tags", "admin", seconds=3)
    assert "No tasks defined" not in proc.stderr, proc.stderr[-2000:]
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = {name for name, r in rows.items() if int(r["Request Count"]) > 0}
    assert "/v1/users [create]" in ran, sorted(ran)  # the admin scenario ran
    assert not ran & (SCENARIO_ENDPOINTS["events"] | {"/v1/orders/{id}/pay"}), sorted(ran)
    assert "/v1/users/{id} [flood]" not in ran, "the flood runs only when asked for"


def test_flood_runs_a_noisy_tenant_beside_frontend_users(server_url: str, tmp_path: Path) -> None:
    """`--tags flood`: three FloodUsers sharing one tenant (one signup between them) read
    user-by-id back to back beside three FrontendUsers (a signup each); nothing fails, and no
    other scenario's requests run."""
    prefix = tmp_path / "flood"
    proc, rows = run_locust(server_url, prefix, "--tags", "flood")
    assert int(rows["Aggregated"]["Failure Count"]) == 0, Path(f"{prefix}_failures.csv").read_text()
    ran = {name: int(r["Request Count"]) for name, r in rows.items() if int(r["Request Count"])}
    assert ran.get("/v1/users/{id} [flood]", 0) > 0, ran
    # 6 users: 3 flooding on one signup, 3 frontend users (each signs up; a slow argon2 on a
    # busy machine may leave one unfinished when the run stops): 6 signups without sharing.
    assert 2 <= ran["/v1/auth/signup"] <= 4, ran
    others = SCENARIO_ENDPOINTS["events"] | SCENARIO_ENDPOINTS["admin"] | {"/v1/orders"}
    assert not ran.keys() & others, sorted(ran)
    assert proc.returncode == 0, proc.stderr[-2000:]
