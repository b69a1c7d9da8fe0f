"""Application log lines are JSON whatever they hold: quotes, newlines, non-ASCII, tracebacks,
`extra=` fields; and nothing a process writes escapes them (warnings, uncaught exceptions, the
answers and failures of requests). Access lines' fields are checked in test_access_log.py; the
tests that run a real server check its whole output at the end (tests/served.py)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from server import logs
from server.access_log import AccessLog
from server.app import add_routes, create_app
from server.config import Config
from server.logs import JsonFormatter, iso_utc
from server.routes import get
from server.runner import free_port

from .conftest import ROOT, configured
from .json_logs import assert_json_log

ISO = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def lines() -> tuple[logging.Logger, io.StringIO]:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("surge.test_logs")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    return logger, out


def parsed(out: io.StringIO) -> list[dict[str, object]]:
    text = out.getvalue()
    assert text.endswith("\n")
    return [orjson.loads(line) for line in text.splitlines()]


def test_a_message_with_quotes_newlines_and_unicode_is_one_json_line(
    lines: tuple[logging.Logger, io.StringIO],
) -> None:
    logger, out = lines
    logger.warning('he said "hi"\nthen \\ left: %s', "héllo ☃ \x00")
    (line,) = parsed(out)
    assert line["msg"] == 'he said "hi"\nthen \\ left: héllo ☃ \x00'
    assert line["level"] == "warning" and line["logger"] == "surge.test_logs"
    assert isinstance(line["ts"], str) and ISO.match(line["ts"])


def test_a_traceback_and_extra_fields_are_fields(lines: tuple[logging.Logger, io.StringIO]) -> None:
    logger, out = lines
    try:
        raise ValueError('bad "value"')
    except ValueError:
        logger.exception("failed", extra={"request_id": "r-1", "trace_id": "abc"})
    (line,) = parsed(out)
    assert line["msg"] == "failed" and line["level"] == "error"
    assert line["request_id"] == "r-1" and line["trace_id"] == "abc"
    assert isinstance(line["exc"], str)
    assert line["exc"].startswith("Traceback") and 'ValueError: bad "value"' in line["exc"]


def test_timestamps_are_iso_8601_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1796587633.0037) == "2026-12-06T20:07:13.003Z"


def test_the_server_process_logs_json_lines() -> None:
    """A real process: `migrate` against a database that does not answer logs its failure."""
    proc = subprocess.run(
        [sys.executable, "-m", "server", "migrate"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "DATABASE_URL": "postgresql://nobody@127.0.0.1:1/x"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    logged = [orjson.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    others = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert all(line.startswith("surge: ") for line in others), others  # the one-line refusals
    for line in logged:
        assert {"ts", "level", "logger", "msg"} <= line.keys()


# What a process prints past logging: a library's warning, an exception nothing caught in a
# thread, in a finalizer (sys.unraisablehook), and in the main thread at the end.
UNCAUGHT = """
import threading, warnings
from server import logs

logs.configure("info", "json")
warnings.warn("a library warns", UserWarning)
thread = threading.Thread(target=lambda: 1 / 0, name="exporter")
thread.start()
thread.join()


class Leaky:
    def __del__(self):
        raise ValueError("raised in __del__")


Leaky()
raise RuntimeError("nothing caught this")
"""


def test_warnings_and_uncaught_exceptions_are_json_lines_too() -> None:
    proc = subprocess.run(
        [sys.executable, "-c", UNCAUGHT],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (proc.returncode, proc.stdout) == (1, "")
    assert_json_log(proc.stderr, "stderr")
    lines = [orjson.loads(line) for line in proc.stderr.splitlines()]
    assert [(line["level"], line["logger"]) for line in lines] == [
        ("warning", "py.warnings"),
        ("error", "surge"),
        ("error", "surge"),
        ("critical", "surge"),
    ]
    warned, thread, unraisable, uncaught = lines
    assert "UserWarning: a library warns" in warned["msg"]
    assert thread["msg"] == "uncaught exception in thread exporter"
    assert "ZeroDivisionError" in thread["exc"]
    assert unraisable["msg"].startswith("Exception ignored in: <function Leaky.__del__")
    assert "ValueError: raised in __del__" in unraisable["exc"]
    assert uncaught["msg"] == "uncaught exception"
    assert "RuntimeError: nothing caught this" in uncaught["exc"]


@pytest.fixture
def json_stderr() -> Iterator[Callable[[], str]]:
    """The application's logging set up as `serve` does (server.logs.configure), with stderr
    itself redirected for the test: whatever anything writes there is read back, not only what
    goes through logging. Pytest's handlers and Python's hooks are put back after."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    saved_unraisable = sys.unraisablehook
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            logs.configure("info", "json")
            yield err.getvalue
    finally:
        root.handlers[:], level, sys.excepthook, threading.excepthook = saved
        root.setLevel(level)
        sys.unraisablehook = saved_unraisable
        logging.captureWarnings(False)


def broken(request: web.Request) -> web.Response:
    raise RuntimeError("a bug")


async def test_requests_and_their_failures_log_only_json_lines(
    aiohttp_client: Any, config: Config, json_stderr: Callable[[], str]
) -> None:
    """In process: a 200, 4xx answers, a 500 with its traceback, and the warnings of a Redis
    that does not answer; every line on stderr (application) and in the access log is JSON
    with ts, level, logger and msg."""
    access = io.BytesIO()
    down = configured(config, redis_url=f"redis://127.0.0.1:{free_port()}/0", access_log=True)
    app = create_app(down, access_log=AccessLog(access, flush_s=3600))
    add_routes(app, [get("/test/broken", broken, page=True, plain=True)])
    client = await aiohttp_client(app)
    answers = [
        (await client.get("/healthz")).status,
        (await client.get("/v1/me")).status,
        (await client.post("/v1/auth/signup", json={})).status,
        (await client.get("/nope")).status,
        (await client.get("/test/broken")).status,
    ]
    assert answers == [200, 401, 422, 404, 500]
    await client.close()  # the access log is flushed at shutdown

    stderr, stdout = json_stderr(), access.getvalue().decode()
    assert_json_log(stderr, "stderr")
    assert_json_log(stdout, "access log")
    app_lines = [orjson.loads(line) for line in stderr.splitlines()]
    access_lines = [orjson.loads(line) for line in stdout.splitlines()]
    assert [line["status"] for line in access_lines] == answers
    assert {line["logger"] for line in access_lines} == {"surge.access"}
    (error,) = [line for line in app_lines if line["level"] == "error"]
    assert error["msg"] == "unhandled error" and "RuntimeError: a bug" in error["exc"]
    assert error["request_id"] == access_lines[-1]["request_id"]
    warned = [line["msg"] for line in app_lines if line["level"] == "warning"]
    assert any("Redis unavailable" in msg for msg in warned), warned
