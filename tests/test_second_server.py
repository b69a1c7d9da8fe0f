"""A second server on an address already served refuses to start (issue 18, defect 11): one line
on stderr naming the address, a non-zero exit, and the first server untouched. SO_REUSEPORT,
which lets one supervisor's workers share the port, must not let a stranger share it too."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from server.runner import free_port

from .conftest import ROOT, Services, server_env
from .json_logs import assert_json_log
from .served import start_process, stop_process, wait_ready


def second(services: Services, port: int, workers: int) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=server_env(services, port, HOST="127.0.0.1", WORKERS=str(workers)),
        capture_output=True,
        timeout=60,
    )


def refused_line(port: int) -> str:
    return f"surge: cannot serve 127.0.0.1:{port}: another process is already listening there"


@pytest.mark.parametrize("first_workers", [1, 2])
def test_a_second_server_on_a_served_port_refuses_to_start(
    services: Services, tmp_path: Path, first_workers: int
) -> None:
    port = free_port()
    first = start_process(services, port, tmp_path, HOST="127.0.0.1", WORKERS=str(first_workers))
    try:
        wait_ready(first, f"http://127.0.0.1:{port}", tmp_path / "stderr")
        for workers in (1, 2):
            result = second(services, port, workers)
            assert result.returncode == 1, result.stderr.decode()[-3000:]
            assert result.stderr.decode().splitlines() == [refused_line(port)]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as r:
            assert r.status == 200
        assert first.poll() is None
    finally:
        stop_process(first)
    for name in ("stdout", "stderr"):  # the first server's, which went on serving
        assert_json_log((tmp_path / name).read_text(errors="replace"), name)


def test_a_port_another_program_shares_by_reuseport_is_refused(services: Services) -> None:
    port = free_port()
    with socket.socket() as other:  # not Surge, but willing to share the port
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", port))
        other.listen()
        result = second(services, port, 2)
    assert result.returncode == 1, result.stderr.decode()[-3000:]
    assert result.stderr.decode().splitlines() == [refused_line(port)]
