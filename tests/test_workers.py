"""`serve --workers 2`: a supervisor and two real worker processes sharing one port.

One instance per module on a fresh database (so the migrations it applies can be counted), then,
in order: requests on new connections reach both workers and /metrics on any connection
reports the instance's total; a token signed by one worker verifies on the other; a worker
killed with SIGKILL is replaced while requests keep succeeding; SIGTERM drains everything.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from server.config import Config, ConfigError
from server.runner import free_port

from .conftest import ROOT, Services, _create_database, _drop_database, server_env, with_database
from .json_logs import assert_json_log

GRACE_S = 3


@dataclass
class Instance:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    metrics_dir: Path


def children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.add(int(entry))
    return found


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=5) as r:  # a new connection every time
        return r.status, r.read()


def healthz_total(text: str) -> float:
    m = re.search(
        r'^surge_http_requests_total\{method="GET",route="/healthz",status="200"\} (\S+)$',
        text,
        re.M,
    )
    return float(m.group(1)) if m else 0.0


def wait_for(what: str, check: object, inst: Instance, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert inst.proc.poll() is None, f"{what}: exited\n{inst.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, (
            f"{what}: not within {timeout} s\n{inst.log.read_text()[-3000:]}"
        )
        time.sleep(0.1)


def ready(url: str) -> bool:
    try:
        return get(url + "/readyz")[0] == 200
    except OSError:
        return False


@pytest.fixture(scope="module")
def instance(services: Services, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Instance]:
    orphan = Path(tempfile.gettempdir()) / "surge-metrics-999999999-x"  # a dead supervisor's
    orphan.mkdir(exist_ok=True)
    name = f"surge_workers_{os.getpid()}"
    asyncio.run(_create_database(services.admin_dsn, name))
    dsn = with_database(services.admin_dsn, name)
    port = free_port()
    log = tmp_path_factory.mktemp("workers") / "surge.log"
    # No JWT_KEYS: the supervisor must hand every worker the same random key.
    env = server_env(services, port, DATABASE_URL=dsn, WORKERS="2", JWT_KEYS="", ACCESS_LOG="false")
    env["SHUTDOWN_GRACE_S"] = str(GRACE_S)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server", "serve"], cwd=ROOT, env=env, stdout=out, stderr=out
        )
    inst = Instance(proc, f"http://127.0.0.1:{port}", log, Path())
    try:
        wait_for("two workers serving", lambda: log.read_text().count("serving on") == 2, inst)
        assert ready(inst.url)
        assert len(children(proc.pid)) == 2
        inst.metrics_dir = Path(environ(min(children(proc.pid)))["PROMETHEUS_MULTIPROC_DIR"])
        yield inst
        # the supervisor's and the workers' lines, a killed worker's included
        assert_json_log(log.read_text(errors="replace"), str(log))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        asyncio.run(_drop_database(services.admin_dsn, name))


def test_a_killed_supervisors_metrics_directory_is_removed(instance: Instance) -> None:
    assert not (Path(tempfile.gettempdir()) / "surge-metrics-999999999-x").exists()
    assert instance.metrics_dir.name.startswith(f"surge-metrics-{instance.proc.pid}-")


def test_migrations_run_once_in_the_supervisor(instance: Instance) -> None:
    log = instance.log.read_text()
    assert log.count("applied migration 0001_init.sql") == 1
    for pid in children(instance.proc.pid):
        env = environ(pid)
        assert env["MIGRATE_ON_START"] == "false"
        assert env["WORKERS"] == "1"


def test_metrics_on_any_worker_report_the_whole_instance(instance: Instance) -> None:
    for _ in range(120):
        assert get(instance.url + "/healthz")[0] == 200
    # Both workers served some of them: read each worker's own counter file alone.
    per_worker = []
    for pid in children(instance.proc.pid):
        alone = instance.log.parent / f"only-{pid}"
        alone.mkdir()
        shutil.copy(instance.metrics_dir / f"counter_{pid}.db", alone)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(alone))
        per_worker.append(healthz_total(generate_latest(registry).decode()))
    assert sum(per_worker) == 120  # the readiness polls went to /readyz
    assert all(n > 0 for n in per_worker), per_worker
    # Every scrape, whichever worker answers it, reports the total.
    for _ in range(6):
        status, body = get(instance.url + "/metrics")
        assert status == 200
        text = body.decode()
        assert healthz_total(text) == 120
        assert re.search(r"^surge_db_pool_max\{pool=\"primary\"\} (\S+)$", text, re.M)


def signup(instance: Instance, tenant_name: str, username: str) -> dict[str, Any]:
    body = json.dumps(
        {
            "tenant_name": tenant_name,
            "email": f"{username}@example.com",
            "username": username,
            "password": "correct horse battery",
        }
    ).encode()
    req = urllib.request.Request(
        instance.url + "/v1/auth/signup", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 201
        signed: dict[str, Any] = json.loads(r.read())
    return signed


def test_a_token_from_one_worker_verifies_on_the_other(instance: Instance) -> None:
    signed = signup(instance, "Workers", "ann")
    for _ in range(12):  # new connections: both workers answer some
        req = urllib.request.Request(
            f"{instance.url}/v1/users/{signed['user']['id']}",
            headers={"Authorization": f"Bearer {signed['access_token']}"},
        )
        with urllib.request.urlopen(req, timeout=5) as r:
            assert r.status == 200
            assert json.loads(r.read())["email"] == "ann@example.com"


def in_flight(url: str) -> float:
    text = get(url + "/metrics")[1].decode()
    m = re.search(r"^surge_http_requests_in_flight (\S+)$", text, re.M)
    assert m is not None, text
    return float(m.group(1))


def test_an_open_stream_is_in_flight_on_every_workers_metrics(instance: Instance) -> None:
    """Workers publish their in-flight count every second (not per request): a request held
    open shows up within that, whichever worker answers the scrape, and leaves when it ends."""
    token = signup(instance, "Streams", "bo")["access_token"]
    assert in_flight(instance.url) == 0
    stream = urllib.request.urlopen(
        urllib.request.Request(
            instance.url + "/v1/analytics/live", headers={"Authorization": f"Bearer {token}"}
        ),
        timeout=10,
    )
    try:
        assert stream.status == 200
        assert stream.readline() == b"retry: 2000\n"  # the handler is running
        # scrapes on new connections: both workers answer some, each with the instance's figure
        wait_for("the stream counted", lambda: in_flight(instance.url) == 1, instance, 5)
        assert [in_flight(instance.url) for _ in range(6)] == [1] * 6
    finally:
        stream.close()
    wait_for("the stream no longer counted", lambda: in_flight(instance.url) == 0, instance, 5)


def test_a_killed_worker_is_replaced_and_requests_keep_succeeding(instance: Instance) -> None:
    before = children(instance.proc.pid)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    # Connections the kernel queued on the victim's listener in the instant before it died are
    # reset (SO_REUSEPORT; net.ipv4.tcp_migrate_req=1 moves them, docs/DEPLOY.md). Once it is
    # gone, and while its replacement is still starting, the other worker answers everything.
    wait_for("the victim reaped", lambda: not Path(f"/proc/{victim}").exists(), instance)
    statuses = [get(instance.url + "/healthz")[0] for _ in range(50)]
    assert statuses == [200] * 50
    wait_for(
        "a replacement worker",
        lambda: len(now := children(instance.proc.pid)) == 2 and victim not in now,
        instance,
    )
    replacement = (children(instance.proc.pid) - before).pop()
    assert f"(pid {victim}) exited with signal 9: restarting" in instance.log.read_text()
    wait_for(
        "the replacement serving",
        lambda: instance.log.read_text().count("serving on") == 3,
        instance,
    )
    # The dead worker's counts stay in the instance's total; its live gauges are gone.
    text = get(instance.url + "/metrics")[1].decode()
    assert healthz_total(text) == 170
    assert not list(instance.metrics_dir.glob(f"gauge_livesum_{victim}.db"))
    assert replacement in children(instance.proc.pid)


def test_sigterm_drains_every_worker_and_exits_0(instance: Instance) -> None:
    workers = children(instance.proc.pid)
    assert len(workers) == 2
    started = time.monotonic()
    instance.proc.send_signal(signal.SIGTERM)
    assert instance.proc.wait(timeout=GRACE_S + 5) == 0, instance.log.read_text()[-3000:]
    assert time.monotonic() - started < GRACE_S + 5
    log = instance.log.read_text()
    assert log.count('"msg":"stopped"') >= 2  # each worker's own clean stop
    assert "did not stop in time" not in log
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists()
    assert not instance.metrics_dir.exists()


@pytest.mark.parametrize(
    ("url", "problem"),
    [("unix:///srv/surge/redis.sock", None), ("unix://", "the URL names no socket path")],
)
def test_workers_accept_the_embedded_redis_socket_url(url: str, problem: str | None) -> None:
    """The supervisor hands embedded Redis to its workers as REDIS_URL=unix://<socket>."""
    if problem is None:
        assert Config.from_env({"REDIS_URL": url}).redis_url == url
    else:
        with pytest.raises(ConfigError, match=problem):
            Config.from_env({"REDIS_URL": url})
