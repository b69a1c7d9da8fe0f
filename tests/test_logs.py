"""Application log lines are JSON whatever they hold: quotes, newlines, non-ASCII, tracebacks,
`extra=` fields. Access lines are checked in test_access_log.py."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys

import orjson
import pytest

from server.logs import JsonFormatter, iso_utc

from .conftest import ROOT

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
