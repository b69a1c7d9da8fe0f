"""`surge demo` (`make demo`) against a live server: what it prints is a login that works, and
behind it a tenant worth looking at (three users, products, orders, events)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

from server.runner import free_port

from .conftest import ROOT, Services
from .paying import serving_with_provider
from .served import served


def run_demo(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server", "demo", "--url", url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def login_line(stdout: str) -> str:
    """The printed curl command (it spans two lines, joined by a backslash)."""
    match = re.search(r"^  (curl -s .*\\\n\s+-d .*)$", stdout, re.MULTILINE)
    assert match, stdout
    return match.group(1)


def get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read())


def test_demo_prints_a_login_that_opens_a_filled_tenant(services: Services, tmp_path: Path) -> None:
    with serving_with_provider(services, tmp_path) as server:
        proc = run_demo(server.url)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = proc.stdout
        assert "owner@example.com" in out and "admin@example.com" in out, out
        assert "member@example.com" in out, out

        # the printed curl line, run as printed, logs in
        curl = subprocess.run(["bash", "-c", login_line(out)], capture_output=True, text=True)
        assert curl.returncode == 0, curl.stderr
        token = json.loads(curl.stdout)["access_token"]

        users = get(f"{server.url}/v1/users", token)["items"]
        assert sorted(u["username"] for u in users) == ["admin", "member", "owner"]
        roles = {u["username"]: u["roles"] for u in users}
        assert "owner" in roles["owner"] and "admin" in roles["admin"]
        assert roles["member"] == ["member"]
        assert len(get(f"{server.url}/v1/products", token)["items"]) >= 3
        orders = get(f"{server.url}/v1/orders", token)["items"]
        assert sorted(o["status"] for o in orders) == ["cancelled", "paid", "pending"]

        counted = 0
        for name in (
            "page_view",
            "product_view",
            "add_to_cart",
            "checkout.started",
            "checkout.paid",
        ):
            days = get(f"{server.url}/v1/analytics/counts?name={name}&bucket=1d", token)
            counted += sum(b["count"] for b in days["buckets"])
        assert counted == 400, counted  # every event the demo sent, over the last hour

        # a second run is another tenant, not a clash with the first
        again = run_demo(server.url)
        assert again.returncode == 0, again.stderr
        assert login_line(again.stdout) != login_line(out)


def test_demo_without_a_payment_provider_leaves_the_order_pending(
    services: Services, tmp_path: Path
) -> None:
    with served(services, tmp_path) as server:  # DATABASE_URL set, no PAYMENTS_URL: no provider
        proc = run_demo(server.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 orders (cancelled, pending, pending)" in proc.stdout, proc.stdout
    assert "PAYMENTS_URL" in proc.stdout


def test_demo_says_to_start_the_server_when_none_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    proc = run_demo(url)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "make run" in lines[0] and url in lines[0], proc.stderr
