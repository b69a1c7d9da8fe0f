"""The real process: `python -m server serve` starts, serves, and stops cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request

from server.runner import free_port

from .conftest import ROOT, Services, server_env
from .json_logs import assert_json_log


def test_serve_then_sigterm_exits_cleanly(clean: Services) -> None:
    port = free_port()
    env = server_env(clean, port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "serve"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the server did not become ready"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    assert_json_log(out.decode(), "stdout")
    assert_json_log(err.decode(), "stderr")
    assert b'"route":"/readyz","path":"/readyz","status":200' in out  # the access log line
    assert b"stopped" in err
