"""A real `python -m server serve` subprocess for tests that need the whole network path (raw
sockets, the process's own log lines): started on a free port, ready when /readyz answers 200,
stopped with SIGTERM (SIGKILL if it does not stop), and then every line it wrote must be a JSON log
line (tests/json_logs.py)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.runner import free_port

from .conftest import ROOT, Services, server_env
from .json_logs import assert_json_log


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    stdout: Path  # the access log
    stderr: Path  # the application log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def check_log(self) -> None:
        """Every line the process wrote, on stdout and stderr, is a JSON log line."""
        for path in (self.stdout, self.stderr):
            assert_json_log(path.read_text(errors="replace"), str(path))

    def log_lines(self) -> list[str]:
        return self.stderr.read_text().splitlines()

    def access_lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.stdout.read_text().splitlines() if line]

    def connect(self, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
        sock = socket.socket()
        sock.settimeout(timeout)
        sock.bind((source, 0))
        sock.connect(("127.0.0.1", self.port))
        return sock


def start_process(services: Services, port: int, out: Path, **env: str) -> subprocess.Popen[bytes]:
    with (out / "stdout").open("wb") as stdout, (out / "stderr").open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "server", "serve"],
            cwd=ROOT,
            env=server_env(services, port, **env),
            stdout=stdout,
            stderr=stderr,
        )


def wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/readyz", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "the server did not become ready"
        time.sleep(0.05)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def served(
    services: Services, out: Path, ready_timeout: float = 30, **env: str
) -> Iterator[Served]:
    """A server with `env` over the test defaults; stdout and stderr go to files under `out`."""
    port = free_port()
    proc = start_process(services, port, out, **env)
    inst = Served(proc, port, out / "stdout", out / "stderr")
    try:
        wait_ready(proc, inst.url, inst.stderr, ready_timeout)
        yield inst
    finally:
        stop_process(proc)
    # only after a test that passed: its own failure says more than its log's
    inst.check_log()


def recv_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (the socket's timeout bounds
    each wait)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def wait_until(what: str, check: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.05)
